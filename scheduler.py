"""Continuous batching: the cache's batch rows are slots that sequences take and give back. When a sequence ends
(its EOS or max_new_tokens) the next waiting prompt is prefilled into its row, and the others decode on; the decode
step keeps its static shapes (every row, finished and empty ones inactive), so one compiled graph serves the whole
run.

Admission with a paged pool (kv_cache/paging.py): blocks are taken on demand as sequences grow, but a prompt is only
admitted when the free blocks cover its worst case (prompt + max_new_tokens) on top of what the running sequences
may still take. So a running sequence never finds the pool empty: no preemption, no recomputation (vLLM admits
optimistically and preempts instead); a sequence that ends early at its EOS returns its blocks early, and the next
admission uses them. A prompt whose worst case exceeds the whole pool can never run: generate_continuous refuses
it before anything is generated.

Prefill of an admitted prompt runs between decode steps, in chunks (--prefill_chunk_size); the running sequences
wait for it. vLLM's mixed steps (prefill chunks and decode tokens in one forward) would need a decode step of
variable shape, which would give up the single CUDA graph the decode step replays.
"""
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from generate import decode_one_token, pool_of, prefill_one, sample
from model import Transformer


@dataclass
class Running:
    index: int  # the prompt's place in the input
    position: int  # where its next token goes
    tokens: list = field(default_factory=list)


def worst_case_blocks(model: Transformer, prompt_len: int, max_new_tokens: int) -> int:
    pool = pool_of(model)
    return pool.space.blocks_for(prompt_len + max_new_tokens) if pool is not None else 0


def check_fits(model: Transformer, prompts: list[list[int]], max_new_tokens: int):
    """One line, before any work, when a prompt can never run in the pool."""
    pool = pool_of(model)
    if pool is None:
        return
    need, i = max((worst_case_blocks(model, len(ids), max_new_tokens), i) for i, ids in enumerate(prompts))
    if need > pool.usable:
        raise ValueError(f"prompt {i} ({len(prompts[i])} tokens) + --max_new_tokens {max_new_tokens} needs {need} "
                         f"blocks of {pool.block_tokens} tokens but the pool has {pool.usable}: raise --num_blocks / "
                         "--kv_memory_gb, or lower --max_new_tokens")


def generate_continuous(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature=0.0,
                        top_k=None, eos_ids=(), prefill_chunk=None, decode_fn=decode_one_token,
                        on_sequence=None) -> dict:
    """Generate up to max_new_tokens after each prompt with at most the cache's batch size running at once,
    admitting the next prompt as soon as a row (and, paged, the blocks) are free. on_sequence(index, sequence) is
    called as each one ends. Returns sequences (input order: tokens up to and including the EOS, finish_reason),
    prompt_tokens, shared_tokens (taken from the pool's shared blocks, not computed), prefill_s, decode_s,
    decode_steps, decode_tokens (tokens made by decode steps) and peak_running."""
    check_fits(model, prompts, max_new_tokens)
    caches = model.caches()
    B = caches[0].batch_size
    device = model.tok_embeddings.weight.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pool = pool_of(model)
    eos = set(eos_ids)
    model.reset_caches()
    model.finish_sequences(torch.ones(B, dtype=torch.bool, device=device))  # empty rows cost the kernel nothing
    waiting, free_rows, running = deque(range(len(prompts))), list(range(B)), {}
    sequences = [None] * len(prompts)
    tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
    positions = [0] * B
    prefill_s = decode_s = 0.0
    steps = decode_tokens = peak_running = shared = 0

    def promised() -> int:  # blocks the running sequences may still take
        return sum(worst_case_blocks(model, len(prompts[r.index]), max_new_tokens) - len(pool.held[row])
                   for row, r in running.items())

    def retire(row: int, reason: str):
        r = running.pop(row)
        sequences[r.index] = dict(tokens=r.tokens, finish_reason=reason)
        model.reset_caches(torch.tensor([row], device=device))  # its blocks return to the pool now
        model.finish_sequences(torch.arange(B, device=device) == row)
        free_rows.append(row)
        positions[row] = 0  # an empty row's (ignored) decode write stays inside every store and RoPE table
        if on_sequence:
            on_sequence(r.index, sequences[r.index])

    def record(row: int, token: int) -> bool:
        """Append a new token; retire the sequence when it ends. True while it runs on."""
        r = running[row]
        r.tokens.append(token)
        if token in eos:
            retire(row, "eos")
        elif len(r.tokens) == max_new_tokens:
            retire(row, "length")
        return row in running

    while waiting or running:
        t0 = time.perf_counter()
        while waiting and free_rows:
            ids = prompts[waiting[0]]
            if pool is not None and (worst_case_blocks(model, len(ids), max_new_tokens) >
                                     pool.available - promised()):
                break  # wait for blocks: a running sequence ends within max_new_tokens steps
            index, row = waiting.popleft(), free_rows.pop(0)
            model.reset_caches(torch.tensor([row], device=device))  # empty, active again
            logits, n_shared = prefill_one(model, ids, row, prefill_chunk)
            first = sample(logits, temperature, top_k)
            shared += n_shared
            running[row] = Running(index, len(ids))
            if record(row, int(first)):
                tokens[row] = first[0]
                positions[row] = len(ids)
        synchronize()
        t1 = time.perf_counter()
        prefill_s += t1 - t0
        if not running:
            continue
        peak_running = max(peak_running, len(running))
        if pool is not None:
            for row in running:
                pool.reserve(row, positions[row] + 1)
        input_pos = torch.tensor(positions, device=device)[:, None]
        next_token = decode_fn(model, tokens, input_pos, temperature, top_k).clone()
        new = next_token[:, 0].tolist()
        steps += 1
        decode_tokens += len(running)
        for row in list(running):
            positions[row] += 1
            record(row, new[row])
        tokens = next_token
        decode_s += time.perf_counter() - t1
    return dict(sequences=sequences, prompt_tokens=sum(map(len, prompts)), shared_tokens=shared, prefill_s=prefill_s,
                decode_s=decode_s,
                decode_steps=steps, decode_tokens=decode_tokens, peak_running=peak_running)
