"""Decode speed of every cache strategy against the memory roofline, on random weights of real model shapes.

    python -m scripts.bench_decode --shapes llama3-8b --contexts 256,32k --batches 1,8 --compile
    python -m scripts.bench_decode --attention_kernel                 # the fused decode-attention kernel alone
    python -m scripts.bench_decode --device cpu --shapes tiny         # seconds: the tests' smoke run
    python -m scripts.bench_decode --tp 8 --shapes llama3-70b --compile   # tensor parallel (tp.py), 8 ranks

No checkpoint is needed: the weights are random bfloat16 of the real shapes (speed does not depend on their values).
The rows are scripts/presets.py's entries. Each fills the context with runner.prefill's chunked prefill of random
tokens, then times --steps decode steps (CUDA events, warm-up excluded, median of --repeats), compiled and replayed
as CUDA graphs through runner.compile_decode with --compile. The run measures the device's copy bandwidth first, and
compares every row with its roofline: (weight bytes + KV bytes read per step) / bandwidth. Results go to
OUT/bench_decode_<date>.md and .json (OUT: outputs/local/ unless --out), rewritten after every row so a run cut short
keeps what it measured; the markdown file explains its columns.

--tp N runs the rows tensor parallel over N ranks (started here through scripts/launch.py, or under torchrun): each
rank holds its shard of random weights (tp.py), the weight and KV bytes are one GPU's, and the roofline adds the
bytes each GPU sends for the step's all-reduces (2 per layer, ring) over the measured all-reduce bus bandwidth.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's CPU interpreter; set before triton is imported

import kv_cache  # noqa: E402
import tp  # noqa: E402
from atomic import atomic_write_json, atomic_write_text  # noqa: E402
from kernels.formats import FORMATS  # noqa: E402
from memory import (available_memory_bytes, peak_memory_bytes, predicted_generation_bytes,  # noqa: E402
                    predicted_kv_bytes)
from model import ModelArgs, Transformer  # noqa: E402
from cli_options import strategy_parser  # noqa: E402
from runner import (DTYPES, compile_decode, decode_one_token, pool_of, prefill, resolve_dtype,  # noqa: E402
                    setup_cache, synchronize)
from scripts.common import (GiB, LOCAL_OUT, copy_bandwidth, count, fmt, header_lines, list_of,  # noqa: E402
                            markdown_table, name_list, plot_roofline, release, run_header, timed)
from scripts import presets  # noqa: E402
from scripts.presets import PRESETS  # noqa: E402
from shapes import SHAPES, random_model  # noqa: E402

STRATEGIES = {preset.name: preset for preset in PRESETS}  # the rows, by name
# --attention_kernel rows: 16-bit only, or a quantized older store of each format; "+scores": the same call returning
# every token's attention probability (what h2o / tova / snapkv read), to measure what storing the scores costs.
KERNEL_KINDS = ("bf16", *(f.label for f in FORMATS.values()), "bf16+scores", "int4+scores")
DTYPE = torch.bfloat16  # the GPU kernel rows' and the GPU suite's model dtype (the decode rows take --dtype)

LEGEND = """\
Columns: **tokens/s** = batch x steps / decode seconds. **vs full** = this row's tokens/s over the full cache's at
the same shape, context and batch. **ideal** = the speed-up over full that the bytes allow: (weights + full KV) /
(weights + this KV). **% ideal** = vs full / ideal. **step ms** = one decode step (median of the repeats).
**roofline ms** = (weight bytes read per step + KV bytes) / measured copy bandwidth, the fastest a memory-bound step
can be. **% roofline** = roofline ms / step ms. **KV MiB** = bytes the caches allocate (all layers; scales and
zero-points included; a static decode step reads them). **peak GiB** = peak memory of the row (GPU allocated,
weights included; process RSS on CPU). **fill s** = the chunked prefill of the context. **first call s** = the
first decode call (compilation with --compile). Tensor parallel (--tp N): bytes are one GPU's, and **roofline ms**
adds **all-reduce KiB** (what each GPU sends per step for its 2 x layers all-reduces, ring: 2 (N-1)/N of each
message) over the all-reduce bus bandwidth; **all-reduce ms** = the step's all-reduces of their real size, timed
back to back (small messages: latency, which the byte roofline does not see).
Attention-kernel rows: one layer's fused decode attention over the context; **GB/s** = bytes it must read and write
/ median time; **% copy** = GB/s over the copy bandwidth."""


# ---------------------------------------------------------------- set-up


def weight_bytes_read(model: Transformer) -> int:
    """Weight bytes one decode step reads: every matrix once; an untied embedding only looks up a row per token."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.output is not None:
        n_bytes -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return n_bytes


def decode_positions(context: int, steps: int, repeats: int, warmup: int) -> int:
    """Positions a row reaches: the filled context, then time_decode's first call, warm-up and timed steps."""
    return context + 1 + warmup + repeats * steps


def activation_bytes(args: ModelArgs, rows: int, max_seq_length: int, chunk: int, dtype=DTYPE) -> int:
    """What a prefill chunk of `rows` sequences holds that memory.predicted_generation_bytes leaves out, a
    deliberate over-estimate: the keys and values expanded to the query heads (GQA) and quantize_kv's store
    dequantized, in the model dtype; per token the MLP's activations and (math attention) float32 scores over the
    whole cache. generate.py's check leaves these to the memory it keeps free; a bench cannot, since it fills
    contexts of 32k tokens near the memory limit, where they outweigh the logits."""
    item = dtype.itemsize
    kv_elems = rows * max_seq_length * args.head_dim
    expanded = 2 * args.n_head * kv_elems * item + 4 * args.n_kv_head * kv_elems * item
    per_token = rows * (3 * args.intermediate_size * item + 2 * args.n_head * max_seq_length * 4)
    return expanded + chunk * per_token


def fill_plan(args: ModelArgs, strategy: str, options: dict, batch: int, context: int, max_seq_length: int,
              available: int, rows: int = None, chunk: int = None, block_size: int = None,
              chunk_bytes: int = 8 * GiB, dtype=DTYPE) -> tuple[int, int]:
    """(prefill chunk, bytes needed) of a row filling `context` tokens of `rows` sequences (default: the batch)
    with caches for `batch`: memory.predicted_generation_bytes (caches, RoPE tables, the chunk's logits counted for
    the whole batch) + activation_bytes + 1/2 GiB for the decode step. The chunk (unless given): the largest power
    of two from 2048 down to 16, at most the context, whose bytes fit `available` and whose own (what grows with
    the chunk) stay within `chunk_bytes`; the whole context for a strategy that scores whole prompts
    (runner.prefill feeds it in one chunk)."""
    def need(c):
        return (predicted_generation_bytes(args, strategy, options, batch, max_seq_length, c, max_seq_length, dtype,
                                           block_size) + activation_bytes(args, rows or batch, max_seq_length, c, dtype)
                + GiB // 2)

    if kv_cache.STRATEGIES[strategy].whole_prompt:
        chunk = context
    elif chunk is None:
        fixed, chunk = need(0), 2048
        while chunk > 16 and need(min(chunk, context)) > min(available, fixed + chunk_bytes):
            chunk //= 2
    chunk = max(1, min(chunk, context))
    return chunk, need(chunk)


# ---------------------------------------------------------------- timing


def all_reduce_seconds(n_bytes: int, device, repeats: int = 20) -> float:
    """Median seconds of one all-reduce (sum) of n_bytes of bfloat16 over the tensor-parallel ranks."""
    import torch.distributed as dist
    t = torch.zeros(max(1, n_bytes // DTYPE.itemsize), dtype=DTYPE, device=device)
    for _ in range(3):
        dist.all_reduce(t)
    synchronize(device)
    return statistics.median(timed(lambda: dist.all_reduce(t), device) for _ in range(repeats))


def all_reduce_bandwidth(device, world: int) -> float:
    """Bus bandwidth of a large all-reduce: the bytes each rank sends in a ring (tp.ring_bytes) per second."""
    n_bytes = GiB // 4 if device.type == "cuda" else 16 * 2**20
    return tp.ring_bytes(n_bytes, world) / all_reduce_seconds(n_bytes, device, repeats=5)


@torch.no_grad()
def fill_context(model: Transformer, batch: int, context: int, chunk: int, device, broadcast: bool = False):
    """Prefill `context` random tokens through runner.prefill in chunks (only the last token's logits kept, so
    memory stays bounded); the next token, (batch, 1).

    broadcast: prefill one sequence and copy its cache state to the other rows. A decode step's cost does not depend
    on the values it reads, so the timed steps are the same, and the fill costs 1/batch of the compute (what lets
    the GPU suite fill 32k x 8 and larger batches in seconds). Per-sequence cache state is every buffer whose first
    dimension is the batch (the caches' layout: (B, ...) for everything stored per sequence)."""
    rows = 1 if broadcast else batch
    tokens = torch.randint(model.args.vocab_size, (rows, context), device=device)
    prefill(model, tokens, 0, chunk, last_only=True)
    pool = pool_of(model)
    if broadcast and batch > 1:
        for cache in model.caches():
            for buf in cache.buffers():
                if buf.ndim >= 2 and buf.shape[0] == batch and (pool is None or buf is not pool.table):
                    buf[1:].copy_(buf[:1].expand_as(buf[1:]))
        if pool is not None:  # paged: every sequence its own copy of sequence 0's blocks (its own memory traffic)
            for row in range(1, batch):
                pool.reserve(row, context)
                for cache in model.caches():
                    cache.copy_blocks(pool.held[0], pool.held[row])
    # contiguous like every later token: a strided one would compile a second graph
    return tokens[:, -1:].expand(batch, 1).contiguous()


def cuda_graph(fn, warmup: int = 1):
    """fn captured once as a CUDA graph, after `warmup` calls off the capture stream (as torch.cuda.graphs advises;
    they also compile its kernels); returns (the graph's replay, what the captured call returned). A replay is one
    launch instead of fn's many, so a timing of it sees the kernels, not the host's launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class GraphedDecode:
    """decode_one_token captured once as a CUDA graph and replayed (plain eager kernels, no torch.compile): the
    launch overhead of a few hundred small kernels per step disappears at no compile time. Capture happens on the
    first call. A decode step at a fixed position is idempotent (it rewrites the same cache slots with the same
    values), so the warm-up and capture runs at that position leave the cache exactly as one step would."""

    def __init__(self):
        self.replay = None

    def __call__(self, model, token, input_pos, sampling=None):
        if self.replay is None:
            self.token, self.input_pos = token.clone(), input_pos.clone()
            self.replay, self.out = cuda_graph(
                lambda: decode_one_token(model, self.token, self.input_pos, sampling), warmup=2)
        self.token.copy_(token)
        self.input_pos.copy_(input_pos)
        self.replay()
        return self.out


class Decoder:
    """Greedy decode steps of one filled cache from position `context` on. Positions (B, 1), as the engine passes
    them, stay on the device and are advanced in place, so the loop never waits for the host."""

    def __init__(self, model, decode_fn, token, context, device):
        self.model, self.decode_fn, self.token, self.device = model, decode_fn, token, device
        self.input_pos = torch.full((token.shape[0], 1), context, device=device)

    @torch.no_grad()
    def run(self, n: int):
        for _ in range(n):
            # clone: a CUDA-graph output is overwritten by the next replay
            self.token = self.decode_fn(self.model, self.token, self.input_pos, None).clone()
            self.input_pos.add_(1)

    def seconds_per_step(self, n: int) -> float:
        return timed(lambda: self.run(n), self.device) / n

    def first_call(self, warmup: int) -> float:
        """Seconds of the first call (compilation, capture), then `warmup` untimed steps."""
        first_s = timed(lambda: self.run(1), self.device)
        self.run(warmup)
        synchronize(self.device)
        return first_s


def time_decode(model, decode_fn, token, context, steps, repeats, warmup, device) -> tuple[float, float]:
    """(median seconds per decode step, seconds of the first call), greedy."""
    decoder = Decoder(model, decode_fn, token, context, device)
    first_s = decoder.first_call(warmup)
    return statistics.median(decoder.seconds_per_step(steps) for _ in range(repeats)), first_s


def filled(out: dict, model, strategy: str, options: dict, batch: int, context: int, max_seq_length: int,
           chunk: int, device, broadcast: bool = False, block_size: int = None) -> torch.Tensor:
    """Set up `strategy`'s caches and fill them to `context` tokens for `batch` sequences (paged: every sequence
    holding the blocks of all its max_seq_length positions, so timed steps run on the device alone); out gets
    attn_impl and fill_s. The next token (batch, 1)."""
    pool = setup_cache(model, strategy, options, batch, max_seq_length, block_size=block_size)
    out["attn_impl"] = model.caches()[0].attn_impl
    t0 = time.perf_counter()
    token = fill_context(model, batch, context, chunk, device, broadcast)
    for row in range(batch if pool is not None else 0):
        pool.reserve(row, max_seq_length)
    synchronize(device)
    out["fill_s"] = time.perf_counter() - t0
    return token


def measure(model, strategy: str, options: dict, batch: int, context: int, max_seq_length: int, chunk: int,
            steps: int, repeats: int, warmup: int, device, decode_fn=decode_one_token, broadcast: bool = False,
            block_size: int = None, path: str = None) -> dict:
    """Fill `strategy`'s caches to `context` tokens for `batch` sequences, then time decode steps with decode_fn:
    attn_impl, fill_s, step_s, first_call_s, peak_bytes, or note "OOM" (the caches are released either way).
    Paged, every sequence holds the blocks of all its max_seq_length positions before the timed steps, which then
    run on the device alone. path: decode_fn's name (e.g. "cuda graph"): when it fails to compile or capture, the
    steps are timed eagerly instead, and the note says so (decode_path: the one timed)."""
    out = {"decode_path": path} if path else {}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        token = filled(out, model, strategy, options, batch, context, max_seq_length, chunk, device, broadcast,
                       block_size)
        try:
            out["step_s"], out["first_call_s"] = time_decode(model, decode_fn, token, context, steps, repeats,
                                                             warmup, device)
        except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as e:
            if path in (None, "eager"):
                raise
            # One lease: a capture or compile failure must still leave an eager number (and say why).
            out.update(note=f"{path} failed ({type(e).__name__}: {str(e)[:120]}); eager instead", decode_path="eager")
            torch._dynamo.reset()
            out["step_s"], out["first_call_s"] = time_decode(model, decode_one_token, token, context, steps, repeats,
                                                             warmup, device)
        out["peak_bytes"] = peak_memory_bytes(device)
    except torch.cuda.OutOfMemoryError:
        out["note"] = "OOM"
    finally:
        release(model, device)
    return out


@torch.no_grad()
def measure_interleaved(model, plans: list[dict], batch: int, context: int, steps: int, repeats: int, warmup: int,
                        device, decode_fn=decode_one_token, path: str = "eager") -> list[dict]:
    """--interleave: the rows of one (shape, context, batch) timed in turns: every plan's caches (strategy,
    options, max_seq_length, chunk) filled once and kept side by side, then each repeat of each row in one round,
    the model's layers given that row's caches for its turn. A shared machine's drift then falls on every row
    alike, where rows timed minutes apart can differ by 10-15 % on their own. Compiled (decode_fn from
    runner.compile_decode), each plan's first call compiles its own graph, which torch.compile's guards pick again
    on each of its turns; a recompilation while timing fails the run. measure's fields per plan, in order."""
    outs, turns = [], []
    graphs = torch._dynamo.utils.counters["stats"]
    try:
        with torch._dynamo.config.patch(recompile_limit=max(8, len(plans))):  # one graph per plan, none run eagerly
            for plan in plans:
                out = {}
                token = filled(out, model, plan["strategy"], plan["options"], batch, context, plan["max_seq_length"],
                               plan["chunk"], device)
                caches = [layer.attention.kv_cache for layer in model.layers]
                decoder = Decoder(model, decode_fn, token, context, device)
                out["first_call_s"] = decoder.first_call(warmup)
                outs.append(out)
                turns.append((caches, decoder, []))
            compiled = graphs["unique_graphs"]
            for _ in range(repeats):
                for caches, decoder, times in turns:
                    for layer, cache in zip(model.layers, caches):
                        layer.attention.kv_cache = cache
                    times.append(decoder.seconds_per_step(steps))
            if graphs["unique_graphs"] != compiled:
                raise RuntimeError("the compiled step recompiled while timed in turns: run without --interleave")
        for out, (_, _, times) in zip(outs, turns):
            out.update(step_s=statistics.median(times), peak_bytes=peak_memory_bytes(device), decode_path=path,
                       interleaved=len(plans))
    finally:
        turns.clear()
        release(model, device)
    return outs


# ---------------------------------------------------------------- one row


def row_options(name: str, cfg: dict, attn_impl: str = None) -> dict:
    """The cache options of row `name`: its preset with the run's sinks and window, and --attn_impl where the
    strategy has one."""
    preset = STRATEGIES[name]
    attn_impl = attn_impl or cfg.get("attn_impl")
    extra = ["--attn_impl", attn_impl] if attn_impl and preset.takes("attn_impl") else []
    return preset.options(cfg["sink_size"], cfg["window_size"], extra=extra)


def bench_row(model, shape, name, context, batch, cfg, device) -> dict:
    row = plan_row(model, shape, name, context, batch, cfg, device)
    if "skipped" in row["note"]:
        return row
    row.update(measure(model, STRATEGIES[name].strategy, row["options"], batch, context, row["max_seq_length"],
                       row["prefill_chunk"], cfg["steps"], cfg["repeats"], cfg["warmup"], device,
                       compile_decode() if cfg["compile"] else decode_one_token))
    return finish_row(model, row, cfg, device)


def bench_rows_interleaved(model, shape, names, context, batch, cfg, device) -> list[dict]:
    """--interleave: every row of `names` at one context and batch, timed in turns (measure_interleaved)."""
    rows = [plan_row(model, shape, name, context, batch, cfg, device) for name in names]
    timed_rows = [r for r in rows if "skipped" not in r["note"]]
    plans = [dict(strategy=STRATEGIES[r["strategy"]].strategy, options=r["options"], max_seq_length=r["max_seq_length"],
                  chunk=r["prefill_chunk"]) for r in timed_rows]
    decode_fn, path = (compile_decode(), "compiled") if cfg["compile"] else (decode_one_token, "eager")
    for row, out in zip(timed_rows, measure_interleaved(model, plans, batch, context, cfg["steps"], cfg["repeats"],
                                                        cfg["warmup"], device, decode_fn, path)):
        row.update(out)
        finish_row(model, row, cfg, device)
    return rows


def plan_row(model, shape, name, context, batch, cfg, device) -> dict:
    """A row's sizes before it is timed: its cache's bytes, the ideal speed-up, the fill's chunk; note "skipped: ..."
    when its estimate does not fit the free memory."""
    strategy = STRATEGIES[name].strategy
    args = model.args
    row = dict(shape=shape, context=context, batch=batch, strategy=name, note="")
    options = row_options(name, cfg)
    max_seq_length = decode_positions(context, cfg["steps"], cfg["repeats"], cfg["warmup"])
    kv = predicted_kv_bytes(args, strategy, options, batch, max_seq_length, cfg["dtype"])
    full_kv = predicted_kv_bytes(args, "full", {}, batch, max_seq_length, cfg["dtype"])
    available = int(tp.min_over_ranks(available_memory_bytes(device)))  # tensor parallel: every rank skips alike
    chunk, need = fill_plan(args, strategy, options, batch, context, max_seq_length, available,
                            chunk=cfg["prefill_chunk"], dtype=cfg["dtype"])
    weights = cfg["weight_bytes"][shape]
    row.update(kv_bytes=kv, full_kv_bytes=full_kv, max_seq_length=max_seq_length, prefill_chunk=chunk,
               weight_bytes=weights, options=options, ideal_vs_full=(weights + full_kv) / (weights + kv))
    if need > available:
        row["note"] = f"skipped: OOM estimate ({need / GiB:.1f} GiB needed, {available / GiB:.1f} GiB free)"
    return row


def finish_row(model, row: dict, cfg: dict, device) -> dict:
    """tokens/s and the roofline of a timed row."""
    if "step_s" not in row:
        return row
    args, batch, step_s = model.args, row["batch"], row["step_s"]
    roofline_s = (row["weight_bytes"] + row["kv_bytes"]) / cfg["bandwidth"]
    world = getattr(model, "tp_world", 1)
    if world > 1:  # each GPU sends (and receives) its ring share of the step's 2 x n_layer all-reduces
        message = tp.all_reduce_bytes(args, batch, 1, cfg["dtype"]) // (2 * args.n_layer)
        row["allreduce_bytes"] = tp.ring_bytes(message, world) * 2 * args.n_layer
        row["allreduce_step_s"] = 2 * args.n_layer * all_reduce_seconds(message, device)  # measured, back to back
        roofline_s += row["allreduce_bytes"] / cfg["allreduce_bandwidth"]
    row.update(tokens_per_s=batch / step_s, roofline_s=roofline_s, roofline_pct=100 * roofline_s / step_s)
    return row


def compare_with_full(rows: list[dict]):
    """Fill in each row's speed relative to the full cache's row of the same shape, context and batch."""
    full = {(r["shape"], r["context"], r["batch"]): r for r in rows if r["strategy"] == "full" and "step_s" in r}
    for r in rows:
        base = full.get((r.get("shape"), r.get("context"), r.get("batch")))
        if base and "step_s" in r:
            r["vs_full"] = base["step_s"] / r["step_s"]
            r["pct_of_ideal"] = 100 * r["vs_full"] / r["ideal_vs_full"]


# ---------------------------------------------------------------- fused attention kernel alone


def kernel_case(kind, args: ModelArgs, batch, context, cfg, device, generator):
    """Inputs of one decode-attention call over `context` tokens (one layer), as the caches lay them out, and the
    bytes the call must move. bf16: a 16-bit store only (full cache); otherwise quantize_kv's recent (ring) and
    older (quantized) stores, passed as the kernel's hi and older arguments."""
    if kind.endswith("+scores"):
        inputs, n_bytes = kernel_case(kind[:-len("+scores")], args, batch, context, cfg, device, generator)
        return dict(inputs, return_scores=True), n_bytes  # bytes of the keys and values only: the same reads
    H, D = args.n_kv_head, args.head_dim
    q = torch.randn(batch, args.n_head, 1, D, device=device, dtype=DTYPE, generator=generator)
    if kind == "bf16":
        recent_k = torch.randn(batch, H, context, D, device=device, dtype=DTYPE, generator=generator)
        recent_v = torch.randn(recent_k.shape, device=device, dtype=DTYPE, generator=generator)  # seeded, as k
        inputs = dict(q=q, recent_k=recent_k, recent_v=recent_v, recent_last=torch.tensor([context - 1], device=device))
        return inputs, 2 * q.nbytes + recent_k.nbytes + recent_v.nbytes
    options = row_options(f"quantize_kv-{kind}", cfg)
    cache = kv_cache.STRATEGIES["quantize_kv"](batch, context, H, D, DTYPE, device, **options)
    S, W, F = cache.sink_size, cache.window_size, cache.flush_size
    n_older = max(0, context - S - W) // F * F
    ring, older = cache.ring, cache.older
    for name, buf in cache.named_buffers():
        if buf.dtype == torch.float16:  # scales and zero-points: small, so dequantized values stay moderate
            buf.copy_(torch.rand(buf.shape, device=device, generator=generator) * 0.02)
        elif buf.dtype in (torch.int8, torch.uint8):
            buf.copy_(torch.randint(-127 if buf.dtype == torch.int8 else 0, 128 if buf.dtype == torch.int8 else 256,
                                    buf.shape, device=device, generator=generator))
        elif buf.dtype == torch.float8_e4m3fn:
            buf.copy_(torch.randn(buf.shape, device=device, generator=generator).mul(100).clamp(-448, 448))
        elif buf.is_floating_point():
            buf.copy_(torch.randn(buf.shape, device=device, generator=generator))
    # recent_pos after positions 0..context-1 were stored: the sinks, and in each ring slot its latest position
    # (the oldest of them may already be in the older store: the kernel masks those).
    pos = torch.arange(context, device=device)
    pos = pos[(pos < S) | (pos >= context - ring.ring_size)]
    ring.pos.fill_(-1)[:, ring.slots(pos)] = pos
    inputs = dict(q=q, recent_k=ring.k, recent_v=ring.v, recent_pos=ring.pos, sink_size=S,
                  n_older=torch.tensor([n_older], device=device))
    n_bytes = 2 * q.nbytes + ring.k.nbytes + ring.v.nbytes + ring.pos.nbytes
    capacity = cache.older_size + F  # the older store holds one scratch flush group past the end
    for name, buf in zip(("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero"), older.buffers_of(batch)):
        if buf is not None:
            inputs[name] = buf
            n_bytes += buf.nbytes * n_older // capacity  # only the first n_older tokens are read
    return inputs, n_bytes


def seeded_kernel_case(kind, shape: str, batch, context, cfg, device):
    """kernel_case's inputs and bytes for a row, drawn from seed 0: every run and variant of a row reads the same."""
    return kernel_case(kind, SHAPES[shape], batch, context, cfg, device, torch.Generator(device=device).manual_seed(0))


def bench_kernel_row(decode_attention, shape, kind, context, batch, cfg, device, variant: dict = None,
                     case: tuple = None) -> dict:
    """One layer's decode attention over `context` tokens of `batch` sequences, timed. variant: more arguments of
    decode_attention (splits, block_n, num_warps, num_stages, dot_precision: scripts/tune_decode.py); case: the
    (inputs, bytes) of seeded_kernel_case, when the caller reuses them."""
    row = dict(shape=shape, kind=kind, context=context, batch=batch, note="", **({"variant": variant} if variant else {}))
    try:
        inputs, n_bytes = case or seeded_kernel_case(kind, shape, batch, context, cfg, device)
        call = lambda: decode_attention(**inputs, **(variant or {}))  # noqa: E731
        if device.type == "cuda":
            # The call replayed as a CUDA graph (the decode step runs it so; the host's checks and launches would
            # otherwise be timed at batch 1); do_bench clears L2 before each replay, so it reads from memory.
            import triton.testing
            seconds = triton.testing.do_bench(cuda_graph(call)[0], warmup=25, rep=200, return_mode="median") / 1e3
        else:
            call()
            seconds = timed(call, device)
    except torch.cuda.OutOfMemoryError:
        row["note"] = "OOM"
        return row
    finally:
        release(None, device)
    bandwidth = n_bytes / seconds
    row.update(bytes=n_bytes, seconds=seconds, bytes_per_s=bandwidth, copy_pct=100 * bandwidth / cfg["bandwidth"])
    return row


# ---------------------------------------------------------------- report

# (header, cell of a row): the columns of a decode-speed row and of a kernel row (scripts/gpu_suite.py's too)
SPEED_COLUMNS = [
    ("tokens/s", lambda r: fmt(r.get("tokens_per_s"), ".1f")),
    ("vs full", lambda r: fmt(r.get("vs_full"), ".3f")),
    ("ideal", lambda r: fmt(r.get("ideal_vs_full"), ".3f")),
    ("% ideal", lambda r: fmt(r.get("pct_of_ideal"), ".1f")),
    ("step ms", lambda r: fmt(r.get("step_s"), ".3f", 1e-3)),
    ("roofline ms", lambda r: fmt(r.get("roofline_s"), ".3f", 1e-3)),
    ("% roofline", lambda r: fmt(r.get("roofline_pct"), ".1f")),
    ("KV MiB", lambda r: fmt(r.get("kv_bytes"), ".1f", 2**20)),
    ("peak GiB", lambda r: fmt(r.get("peak_bytes"), ".2f", GiB)),
    ("fill s", lambda r: fmt(r.get("fill_s"), ".1f")),
    ("first call s", lambda r: fmt(r.get("first_call_s"), ".2f")),
]
TP_COLUMNS = [  # per GPU and step (see LEGEND)
    ("all-reduce KiB", lambda r: fmt(r.get("allreduce_bytes"), ".1f", 2**10)),
    ("all-reduce ms", lambda r: fmt(r.get("allreduce_step_s"), ".3f", 1e-3)),
]
KERNEL_COLUMNS = [
    ("us", lambda r: fmt(r.get("seconds"), ".1f", 1e-6)),
    ("MB moved", lambda r: fmt(r.get("bytes"), ".2f", 1e6)),
    ("GB/s", lambda r: fmt(r.get("bytes_per_s"), ".0f", 1e9)),
    ("% copy", lambda r: fmt(r.get("copy_pct"), ".1f")),
]


def table(first: list[str], columns: list, rows: list[dict]) -> list[str]:
    """A markdown table: the rows' `first` fields as they are, then `columns`, then the note."""
    return markdown_table([*first, *(name for name, _ in columns), "note"],
                          [[*(r.get(key, "") for key in first), *(cell(r) for _, cell in columns), r["note"]]
                           for r in rows])


def write_report(path: Path, header: dict, rows: list[dict], kernel_rows: list[dict]):
    if not tp.is_main():  # tensor parallel: rank 0 writes
        return
    tp_rows = header.get("tp", 1) > 1
    atomic_write_json(path.with_suffix(".json"), dict(header, rows=rows, attention_kernel_rows=kernel_rows),
                      indent=1, default=str)
    lines = [f"# Decode benchmark {header['date']}", "", *header_lines(header),
             f"- copy bandwidth: {header['bandwidth'] / 1e9:.0f} GB/s (device-to-device copy, read + write)",
             f"- model dtype: {header.get('dtype', 'bfloat16')} (random weights of the shape's sizes)",
             f"- compile: {header['compile']}; steps {header['steps']} x repeats {header['repeats']} "
             f"(median), warm-up {header['warmup']}; sinks {header['sink_size']}, window {header['window_size']}"
             + ("; the strategies of each context and batch timed in turns (--interleave)"
                if header.get("interleave") else ""),
             *[f"- {s}: weights read per step {b / 1e9:.3f} GB" + (" per GPU" if tp_rows else "")
               for s, b in header["weight_bytes"].items()]]
    if tp_rows:
        lines += [f"- tensor parallel: {header['tp']} ranks (tp.py); weight, KV and peak bytes are one GPU's; "
                  f"all-reduce bus bandwidth {header['allreduce_bandwidth'] / 1e9:.1f} GB/s (ring bytes sent "
                  "per rank / time, a large all-reduce)"]
    lines.append("")
    if rows:
        lines += table(["shape", "context", "batch", "strategy"], SPEED_COLUMNS + (TP_COLUMNS if tp_rows else []),
                       rows) + [""]
    if kernel_rows:
        lines += table(["shape", "kind", "context", "batch"], KERNEL_COLUMNS, kernel_rows) + [""]
    lines += [LEGEND, ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")
    p.add_argument("--shapes", type=name_list(SHAPES), default=["smollm2-135m", "llama3-8b"],
                   help=f"comma-separated, from {','.join(SHAPES)} (default smollm2-135m,llama3-8b)")
    p.add_argument("--contexts", type=list_of(count), default=None,
                   help="tokens filled before decoding (default 256,4k,16k,32k; tiny: 96)")
    p.add_argument("--batches", type=list_of(count), default=None, help="batch sizes (default 1,8,32; tiny: 1,2)")
    p.add_argument("--strategies", type=name_list(STRATEGIES), default=list(STRATEGIES),
                   help=f"comma-separated, from {','.join(STRATEGIES)} (scripts/presets.py; default all)")
    presets.add_arguments(p, "every strategy with sinks and a window")
    p.add_argument("--steps", type=int, default=None, help="decode steps per timed repeat (default 32; CPU 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5; CPU 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps after the first call (default 3)")
    p.add_argument("--prefill_chunk", type=int, default=None, help="prefill chunk (default: sized to free memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step with CUDA graphs")
    p.add_argument("--interleave", action="store_true",
                   help="time the strategies of each context and batch in turns, their caches side by side (eager or "
                        "--compile; for a shared CPU, whose drift otherwise falls on rows measured minutes apart)")
    p.add_argument("--attn_impl", default=None,
                   help="decode attention (triton, cpu or torch) of every strategy with an --attn_impl option "
                        "(default: each cache's own)")
    p.add_argument("--attention_kernel", action="store_true",
                   help="time the fused decode-attention kernel alone (contexts default 32k) instead of decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="the decode rows' model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (tp.py): started through scripts/launch.py unless under torchrun")
    p.add_argument("--replicate_kv_heads", action="store_true",
                   help="with --tp above the KV heads: copy each KV head to tp / KV heads ranks")
    p.add_argument("--out", type=Path, default=LOCAL_OUT,
                   help="folder for the .md and .json (default outputs/local/, not tracked by git)")
    p.add_argument("--plot", type=Path, nargs="+", metavar="JSON",
                   help="instead of measuring: OUT/roofline.png from these runs' .json (tokens/s against context per "
                        "strategy, decode path and compile, rooflines dashed)")
    return p


def plot(paths: list[Path], out: Path):
    """OUT/roofline.png from bench_decode .json files: one line per strategy, decode path and --compile."""
    rows, devices = [], set()
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: --plot {path}: not a bench_decode .json ({e}): give the .json a run wrote")
        devices.add(f"{report['device']}, {report.get('dtype', 'bfloat16')}")
        rows += [dict(r, compiled=report["compile"]) for r in report["rows"]]
    label = lambda r: (f"{r['strategy']} ({r.get('attn_impl', '?')}{', compiled' if r['compiled'] else ''})")  # noqa: E731
    plot_roofline(rows, label, out / "roofline.png", "; ".join(sorted(devices)) + ", random weights")


def main(argv=None):
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.plot:
        plot(args.plot, args.out)
        return
    if args.tp > 1 and tp.world_size() == 1:  # one process per rank: the same command under torchrun
        from scripts import launch
        code = launch.main(["--nproc_per_node", str(args.tp), "-m", __spec__.name, *argv])
        if code:
            sys.exit(code)
        return
    try:
        run(args, argv)
    except ValueError as e:  # bad options reach the caches' checks: one line, no traceback
        sys.exit(f"error: {e}")


def run(args, argv):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible: run on a GPU machine or pass --device cpu")
    world = tp.world_size()
    if world != max(1, args.tp):
        sys.exit(f"error: --tp {args.tp} but torchrun started {world} rank(s): give --tp {world}")
    if world > 1 and args.attention_kernel:
        sys.exit("error: --attention_kernel times one GPU's kernel: drop --tp")
    if args.interleave and args.attention_kernel:
        sys.exit("error: --interleave times decode steps: drop --attention_kernel")
    for shape in args.shapes:  # a shape that does not split fails before any row runs
        tp.shard_args(SHAPES[shape], world, args.replicate_kv_heads)
    device = tp.rank_device(device)
    tp.init(device)
    on_cpu = device.type == "cpu"
    tiny_only = args.shapes == ["tiny"]
    if on_cpu and tiny_only:
        torch.set_num_threads(1)  # a model this small runs fastest on one thread; more thrash on a busy machine
    contexts = args.contexts or ([256] if tiny_only and args.attention_kernel else [96] if tiny_only
                                 else [32768] if args.attention_kernel else [256, 4096, 16384, 32768])
    batches = args.batches or ([1, 2] if tiny_only else [1, 8] if args.attention_kernel else [1, 8, 32])
    steps, repeats = args.steps or (4 if on_cpu else 32), args.repeats or (2 if on_cpu else 5)
    if min(contexts) < 1 or min(batches) < 1 or steps < 1 or repeats < 1 or args.warmup < 0:
        sys.exit("error: --contexts, --batches, --steps and --repeats must be at least 1 (see --help)")
    cfg = dict(dtype=resolve_dtype(args.dtype, device),
               steps=steps, repeats=repeats, warmup=args.warmup, compile=args.compile, prefill_chunk=args.prefill_chunk,
               sink_size=args.sink_size, window_size=args.window_size, attn_impl=args.attn_impl, weight_bytes={})
    if args.attn_impl:  # every strategy with an --attn_impl option must offer it
        for name in kv_cache.STRATEGIES:
            action = next((a for a in strategy_parser(name)._actions if a.dest == "attn_impl"), None)
            if action and action.choices and args.attn_impl not in action.choices:
                sys.exit(f"error: --attn_impl {args.attn_impl} is not available in {name}: use one of "
                         f"{', '.join(action.choices)}")
    for name in args.strategies:  # bad options fail here, before any row runs
        for shape in args.shapes:
            kv_cache.STRATEGIES[STRATEGIES[name].strategy].check_options(row_options(name, cfg), 2**20,
                                                                         SHAPES[shape].head_dim)

    header = run_header(device, __spec__.name, argv, Path(__file__))
    cfg["bandwidth"] = bandwidth = copy_bandwidth(device)
    if world > 1:
        cfg["allreduce_bandwidth"] = all_reduce_bandwidth(device, world)
    header.update(dtype=str(cfg["dtype"]).removeprefix("torch."), bandwidth=bandwidth, compile=args.compile,
                  interleave=args.interleave, attn_impl=args.attn_impl, steps=steps, repeats=repeats,
                  warmup=args.warmup, sink_size=args.sink_size, window_size=args.window_size,
                  weight_bytes=cfg["weight_bytes"], tp=world, replicate_kv_heads=args.replicate_kv_heads,
                  allreduce_bandwidth=cfg.get("allreduce_bandwidth"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_decode_{header['date'].replace('T', '_').replace(':', '')}"
    print(f"{header['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; torch {header['torch']}, triton "
          f"{header['triton']}; writing {path}.md/.json", flush=True)

    rows, kernel_rows = [], []
    if args.attention_kernel:
        try:
            from kernels.decode_attention import decode_attention
        except ImportError as e:
            sys.exit(f"error: --attention_kernel needs kernels/decode_attention.py and triton ({e})")
        for shape in args.shapes:
            for context in contexts:
                for batch in batches:
                    for kind in KERNEL_KINDS:
                        row = bench_kernel_row(decode_attention, shape, kind, context, batch, cfg, device)
                        kernel_rows.append(row)
                        print(f"{shape} ctx {context} batch {batch} {kind}: {fmt(row.get('bytes_per_s'), '.0f', 1e9)} "
                              f"GB/s ({fmt(row.get('copy_pct'), '.1f')}% of copy) {row['note']}", flush=True)
                        write_report(path, header, rows, kernel_rows)
    else:
        with torch.no_grad():
            for shape in args.shapes:
                shard = tp.shard_args(SHAPES[shape], world, args.replicate_kv_heads)  # the shape itself at --tp 1
                model = random_model(shard, device, cfg["dtype"], seed=tp.rank())
                if world > 1:
                    tp.parallelize(model, SHAPES[shape], args.replicate_kv_heads)
                cfg["weight_bytes"][shape] = weight_bytes_read(model)
                for context in contexts:
                    for batch in batches:
                        if args.interleave:
                            new = bench_rows_interleaved(model, shape, args.strategies, context, batch, cfg, device)
                        else:
                            new = (bench_row(model, shape, name, context, batch, cfg, device)
                                   for name in args.strategies)
                        for row in new:
                            rows.append(row)
                            compare_with_full(rows)
                            print(f"{shape} ctx {context} batch {batch} {row['strategy']}: "
                                  f"{fmt(row.get('tokens_per_s'), '.1f')} tokens/s, "
                                  f"{fmt(row.get('roofline_pct'), '.1f')}% of roofline, "
                                  f"vs full {fmt(row.get('vs_full'), '.3f')} (ideal "
                                  f"{fmt(row.get('ideal_vs_full'), '.3f')}) {row['note']}", flush=True)
                            write_report(path, header, rows, kernel_rows)
                del model
                release(None, device)
    write_report(path, header, rows, kernel_rows)
    if tp.is_main():
        print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    tp.run(main)  # under torchrun: rank 0 prints, the others only their own errors
