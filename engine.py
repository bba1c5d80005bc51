"""The engine: requests in, tokens out, continuous batching over the model's cache rows.

    engine = Engine(model)                        # caches set up by runner.setup_cache (batch = rows)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        out = engine.step()                       # out.tokens: (request, token) made this step; out.finished

Each step admits what the scheduler lets in (scheduler.py), prefills it (copies of one prompt together), then runs
one decode step over every row: static shapes, so one compiled graph serves the whole run; rows without a request
are inactive and cost the fused kernel nothing. A static batch is the same loop with every request added before the
first step. The engine orchestrates; the scheduler decides, the block pool keeps books, runner.py owns the device.
"""
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from runner import Sampling, decode_one_token, prefill_rows, sample, synchronize
from scheduler import Request, SamplingParams, Scheduler

__all__ = ["Engine", "SamplingParams", "Request", "StepOutput", "generate_batch"]


@dataclass
class StepOutput:
    tokens: list = field(default_factory=list)  # (request, token id) in the order they were made
    finished: list = field(default_factory=list)  # requests that ended this step


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    shared_tokens: int = 0  # prompt tokens taken from the pool's shared blocks, not computed
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens made by decode steps (running requests only, never filler of empty rows)
    generated_tokens: int = 0  # every new token, the first of each request (made by its prefill) included


def _signed64(seed: int) -> int:
    return (seed + 2**63) % 2**64 - 2**63


class Engine:
    def __init__(self, model, decode_fn=decode_one_token, prefill_chunk_size: int = None, seed: int = None):
        """model: its caches set up (runner.setup_cache); their batch size is the number of rows. decode_fn:
        runner.decode_one_token or its compiled form. seed: requests without their own seed draw with seed +
        their id (None: a seed from torch's global generator, so torch.manual_seed decides)."""
        cache = model.caches()[0]
        self.model, self.decode_fn, self.prefill_chunk_size = model, decode_fn, prefill_chunk_size
        self.device = model.tok_embeddings.weight.device
        self.batch_size = cache.batch_size
        positions = model.rope_cos.shape[0]  # a position needs its RoPE angle, whatever the cache holds
        self.groups = [dataclasses.replace(g, capacity=positions if g.capacity is None else min(g.capacity, positions))
                       for g in cache.row_groups()]
        self.scheduler = Scheduler(self.groups)
        self.seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        self.next_id = 0
        self.stats = EngineStats()
        self._sampling, self._sampling_rows = None, None
        self.reset()

    def reset(self):
        """Empty every row (after something else used the caches, e.g. a compile warm-up); nothing may be running."""
        assert not self.scheduler.running, "reset while requests run"
        self.model.reset_caches()
        self.model.finish_sequences(torch.ones(self.batch_size, dtype=torch.bool, device=self.device))

    # ------------------------------------------------------------ requests

    def check(self, prompt: list[int], params: SamplingParams, name: str = "the prompt", kv: str = None) -> Request:
        """The request these would make, or a one-line ValueError when it can never run; nothing is queued."""
        params.check()
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
        vocab = self.model.args.vocab_size
        if max(prompt) >= vocab or min(prompt) < 0:
            raise ValueError(f"the prompt holds token id {max(prompt)} but the model has {vocab} embeddings")
        seed = params.seed if params.seed is not None else self.seed + self.next_id
        request = Request(self.next_id, list(prompt), params, _signed64(seed), kv)
        self.scheduler.check_fits(request, name)
        return request

    def add_request(self, prompt: list[int], params: SamplingParams = None, kv: str = None) -> int:
        """Queue a request (token ids) for KV configuration `kv` (a row group's name; None: the first); its id. A
        one-line ValueError when it can never run."""
        request = self.check(prompt, params or SamplingParams(), kv=kv)
        self.scheduler.add(request)
        self.next_id += 1
        return request.id

    def abort(self, request_id: int) -> Request:
        """End a request now (waiting or running): its row and blocks are free for the next step. None when it
        already ended or never was."""
        request = self.scheduler.find(request_id)
        if request is None:
            return None
        if request.row is None:
            self.scheduler.remove_waiting(request)
            request.finish_reason = "abort"
        else:
            self._retire(request, "abort")
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ the loop

    def step(self) -> StepOutput:
        """Admit and prefill what fits, then one decode step over every row."""
        out = StepOutput()
        t0 = time.perf_counter()
        self._prefill(self.scheduler.admit(), out)
        synchronize(self.device)
        t1 = time.perf_counter()
        self.stats.prefill_s += t1 - t0
        running = self.scheduler.running
        if running:
            self.scheduler.reserve_decode()
            tokens = torch.zeros(self.batch_size, 1, dtype=torch.long)
            positions = torch.zeros(self.batch_size, 1, dtype=torch.long)  # empty rows: position 0, a harmless write
            for row, request in running.items():
                tokens[row, 0], positions[row, 0] = request.tokens[-1], request.position
            next_token = self.decode_fn(self.model, tokens.to(self.device), positions.to(self.device),
                                        self._sampling_for(running))
            new = next_token[:, 0].tolist()  # one host copy a step
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(running)
            for row, request in list(running.items()):
                self._append(request, new[row], out)
            self.stats.decode_s += time.perf_counter() - t1
        return out

    def generate(self, prompts: list[list[int]], params=None, on_step=None) -> list[Request]:
        """Run the prompts to their ends (params: one SamplingParams for all, or one each) and return the finished
        requests in prompt order. on_step(StepOutput) is called after each step (e.g. to stream)."""
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        for i, (prompt, p) in enumerate(zip(prompts, params)):  # every prompt checked before any is queued
            self.check(prompt, p, f"prompt {i}")
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]
        done = {}
        while self.has_unfinished():
            out = self.step()
            for request in out.finished:
                done[request.id] = request
            if on_step:
                on_step(out)
        return [done[rid] for rid in ids]

    # ------------------------------------------------------------ internals

    def _prefill(self, admitted: list[Request], out: StepOutput):
        copies = {}  # copies of one prompt (in one KV configuration) are prefilled together
        for request in admitted:
            copies.setdefault((request.group, tuple(request.prompt)), []).append(request)
        for (_, prompt), group in copies.items():
            rows = [r.row for r in group]
            self.model.reset_caches(torch.tensor(rows, device=self.device))  # empty, active again
            logits, shared = prefill_rows(self.model, list(prompt), rows, self.prefill_chunk_size)
            sampling = self._sampling_of(group)
            position = torch.full((len(group), 1), len(prompt) - 1, device=self.device)
            first = sample(logits, sampling, position)[:, 0].tolist()
            self.stats.prompt_tokens += len(prompt) * len(group)
            for request, n_shared, token in zip(group, shared, first):
                request.shared_tokens = n_shared
                self.stats.shared_tokens += n_shared
                self._append(request, token, out)

    def _append(self, request: Request, token: int, out: StepOutput):
        request.tokens.append(token)
        self.stats.generated_tokens += 1
        out.tokens.append((request, token))
        if token in request.params.stop_ids:
            self._retire(request, "stop", out)
        elif len(request.tokens) >= request.params.max_new_tokens:
            self._retire(request, "length", out)

    def _retire(self, request: Request, reason: str, out: StepOutput = None):
        row = request.row
        self.scheduler.finish(request, reason)
        rows = torch.tensor([row], device=self.device)
        self.model.reset_caches(rows)  # its blocks return to the pool now
        self.model.finish_sequences(torch.arange(self.batch_size, device=self.device) == row)
        if out is not None:
            out.finished.append(request)

    def _sampling_of(self, requests: list[Request]):
        """Sampling tensors of these requests' rows, None when all are greedy (the decode step's cheap path)."""
        if all(r.params.temperature == 0 for r in requests):
            return None
        return Sampling.of([(r.params.temperature, r.params.top_k, r.params.top_p, r.seed) for r in requests],
                           self.device)

    def _sampling_for(self, running: dict):
        """Per-row sampling tensors for the decode step, rebuilt only when the running requests change."""
        key = tuple((row, r.id) for row, r in sorted(running.items()))
        if key != self._sampling_rows:
            if all(r.params.temperature == 0 for r in running.values()):
                self._sampling = None
            else:
                greedy = (0.0, 0, 1.0, 0)
                by_row = {row: (r.params.temperature, r.params.top_k, r.params.top_p, r.seed)
                          for row, r in running.items()}
                self._sampling = Sampling.of([by_row.get(row, greedy) for row in range(self.batch_size)],
                                             self.device)
            self._sampling_rows = key
        return self._sampling


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature=0.0, top_k=None, eos_ids=(),
                   prefill_chunk=None, decode_fn=decode_one_token, seed=None, on_step=None) -> dict:
    """Generate after each prompt (token id lists of any lengths) on caches already set up, with at most their
    batch size at once: a static batch when the prompts fit the rows, continuous batching beyond. Returns
    sequences (in prompt order: tokens up to and including the stop token, finish_reason "stop" or "length"),
    tokens (B, longest) padded with 0 after a sequence's end, and the engine's counts (EngineStats' fields)."""
    engine = Engine(model, decode_fn, prefill_chunk, seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                            stop_ids=tuple(eos_ids))
    done = engine.generate(prompts, params, on_step)
    sequences = [dict(tokens=r.tokens, finish_reason=r.finish_reason) for r in done]
    longest = max(len(s["tokens"]) for s in sequences)
    tokens = torch.tensor([s["tokens"] + [0] * (longest - len(s["tokens"])) for s in sequences])
    return {"sequences": sequences, "tokens": tokens, **vars(engine.stats),
            "peak_running": engine.scheduler.peak_running}
