"""A mixed serving workload at one KV memory budget: contiguous preallocation against paged and quantized pages.

    python -m scripts.bench_serve --shape llama3-8b --kv_memory_gb 16 --num_prompts 256 --compile      # a GPU
    python -m scripts.bench_serve --shape smollm2-135m --num_prompts 32 --prompt_lengths 16-256        # a CPU
    python -m scripts.bench_serve --shape tiny --num_prompts 6 --prompt_lengths 8-40 --new_tokens 6    # seconds

No checkpoint: random weights of a named shape (shapes.py), random prompt tokens with
lengths drawn uniformly (fixed --seed) from --prompt_lengths, --new_tokens each, greedy, no EOS: every sequence
runs to --new_tokens, so every row makes the same tokens' worth of work and the run is deterministic.

Every row gets the same KV budget (--kv_memory_gb; default: what contiguous preallocation needs for
max(2, ceil(num_prompts / 8)) sequences of the longest prompt + --new_tokens, so the budget binds):
  contiguous-static      full cache, one max-length slot per row; rows = how many fit the budget (predicted_kv_bytes);
                         the prompts run in static batches of that size (generate_batch: a batch ends when all end)
  contiguous-continuous  the same rows, continuous batching (engine.Engine)
  paged-full             full cache paged in one pool sized to the budget (predicted_pool_bytes / blocks_in), continuous
  paged-int8, paged-int4 quantize_kv pages of scripts/presets.py's formats (sinks and window stay 16-bit per
                         row), continuous
  paged-full-static      (only with --rows) the paged pool, static batches of as many prompts as the pool holds
A paged row's number of rows (the cache's batch) is the smallest one that lets the blocks, not the rows, bind: the
scheduler's admission rule (a prompt enters when the free blocks cover its worst case) is replayed on the host for
every candidate, and the fewest decode steps win (--max_rows N fixes it). Rows cost memory too: quantize_kv keeps
its 16-bit sinks + window per row, outside the pool, and the budget pays for them.

A second table: one --prefill_prompt-token prompt prefilled into a contiguous full cache with each of
--prefill_chunks, its time and its peak memory above what was allocated before it (CUDA: max_memory_allocated
after reset_peak_memory_stats; CPU: torch.profiler(profile_memory=True)'s record of every tensor allocation and
free through PyTorch's CPU allocator, the peak of their running sum; memory outside that allocator, e.g. oneDNN
scratch, is not seen).

Results: OUT/bench_serve_<device>_<date>.md and .json (atomically rewritten after every row; OUT: outputs/local/,
not tracked by git, unless --out), with the command, device, date and git commit.
"""
import argparse
import datetime
import math
import os
import random
import sys
import time
from collections import deque
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's CPU interpreter; set before triton is imported

import kv_cache  # noqa: E402
from atomic import atomic_write_json, atomic_write_text, check_writable_file  # noqa: E402
from cli_options import positive_number, resolve_device_dtype, whole_number  # noqa: E402
from engine import generate_batch  # noqa: E402
from kv_cache.paging import DEFAULT_BLOCK_SIZE  # noqa: E402
from memory import (allocated_kv_bytes, available_memory_bytes, blocks_in, format_bytes, largest,  # noqa: E402
                    predicted_kv_bytes, predicted_pool_bytes, sizing_options)
from model import Transformer  # noqa: E402
from profiling import quiet_profiler_logs  # noqa: E402
from runner import (DTYPES, compile_decode, decode_one_token, prefill, setup_cache, synchronize,  # noqa: E402
                    warm_up)
from scripts.common import (LOCAL_OUT, MiB, count, fmt, header_lines, length_range, list_of,  # noqa: E402
                            markdown_table, name_list, release, run_header)
from scripts import presets  # noqa: E402
from scripts.presets import BY_NAME  # noqa: E402
from shapes import SHAPES, random_model  # noqa: E402

# name -> (label, scripts/presets.py entry, paged, continuous)
ROWS = {
    "contiguous-static": ("contiguous full, static batches", "full", False, False),
    "contiguous-continuous": ("contiguous full, continuous", "full", False, True),
    "paged-full": ("paged full, continuous", "full", True, True),
    "paged-int8": ("paged int8, continuous", "quantize_kv-int8", True, True),
    "paged-int4": ("paged int4, continuous", "quantize_kv-int4", True, True),
    "paged-full-static": ("paged full, static batches", "full", True, False),
}
DEFAULT_ROWS = ["contiguous-static", "contiguous-continuous", "paged-full", "paged-int8", "paged-int4"]

LEGEND = """\
Columns: **rows** = the cache's batch (sequence slots). **blocks** = usable pool blocks (the null block apart).
**KV MiB** = bytes the caches allocate (measured, memory.allocated_kv_bytes: every layer; paged: the whole pool plus
per-row state such as quantize_kv's 16-bit sinks + window). **peak blocks** = most pool blocks held at once. **in use MiB** = per-row state
+ peak blocks x bytes per block. **peak seqs** = most sequences decoding at once. **steps** = decode steps.
**total s** = prefill + decode, the whole workload. **decode tok/s** = tokens made by decode steps / decode seconds.
**total tok/s** = (prompt tokens + generated tokens) / total s. **x row 1** = the ratio to the first row of this run.
**same** = sequences whose tokens equal the first row's (greedy; quantized pages are expected to differ)."""

PREFILL_LEGEND = """\
Prefill rows: one prompt into a contiguous full cache of batch 1 (preallocated before the measurement, so the
peak is what prefill itself allocates: activations, attention scores, logits). **peak MiB** = CUDA:
max_memory_allocated - memory_allocated before; CPU: the peak of the running sum of tensor allocations and frees
through PyTorch's CPU allocator during the prefill (torch.profiler profile_memory; memory outside that allocator
is not seen). **logits MiB** = one chunk's logits (chunk x vocab x dtype), for comparison."""


# ---------------------------------------------------------------- the workload


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for length in lengths]


def replay(lengths: list[int], new_tokens: int, rows: int, usable, blocks_for, continuous: bool) -> tuple[int, int]:
    """(decode steps, peak concurrent sequences) of the workload with `rows` rows and `usable` pool blocks (None:
    contiguous), no EOS: the scheduler's admission rule (a prompt enters when a row is free and the
    free blocks cover its worst case beside the running sequences' worst cases), or static batches of consecutive
    prompts that fit together. Host arithmetic only; prefix sharing (none between random prompts) is ignored."""
    worst = [blocks_for(n + new_tokens) if usable is not None else 0 for n in lengths]
    limit = math.inf if usable is None else usable
    if not continuous:
        steps = peak = i = 0
        while i < len(lengths):
            size = used = 0
            while i < len(lengths) and size < rows and used + worst[i] <= limit:
                size, used, i = size + 1, used + worst[i], i + 1
            if size == 0:
                return math.inf, 0
            steps, peak = steps + new_tokens - 1, max(peak, size)
        return steps, peak
    waiting, running = deque(range(len(lengths))), {}  # prompt -> tokens made
    steps = peak = 0
    while waiting or running:
        while waiting and len(running) < rows:
            if worst[waiting[0]] > limit - sum(worst[i] for i in running):
                break
            i = waiting.popleft()
            running[i] = 1  # the prefill samples the first new token
            if new_tokens == 1:
                del running[i]
        if not running:
            if waiting:
                return math.inf, 0  # a prompt that never fits
            continue
        peak, steps = max(peak, len(running)), steps + 1
        for i in list(running):
            running[i] += 1
            if running[i] == new_tokens:
                del running[i]
    return steps, peak


def static_groups(lengths, new_tokens, rows, usable, blocks_for) -> list[list[int]]:
    """Consecutive prompts in batches of at most `rows` whose worst cases fit the pool together (as replay)."""
    groups, i = [], 0
    while i < len(lengths):
        group, used = [], 0
        while i < len(lengths) and len(group) < rows and (
                usable is None or used + blocks_for(lengths[i] + new_tokens) <= usable):
            used += blocks_for(lengths[i] + new_tokens) if usable is not None else 0
            group.append(i)
            i += 1
        groups.append(group)
    return groups


# ---------------------------------------------------------------- one row


def row_options(cfg, preset) -> dict:
    """The cache options of a row's preset with the run's sinks, window and group (where the strategy has them)."""
    preset = BY_NAME[preset]
    extra = ["--group_size", str(cfg["group_size"])] if preset.takes("group_size") else []
    return preset.options(cfg["sink_size"], cfg["window_size"], extra=extra)


def plan_row(name: str, cfg: dict) -> dict:
    """The row's cache: rows, pool blocks and the replayed schedule, from byte counts alone (nothing allocated)."""
    label, preset, paged, continuous = ROWS[name]
    strategy = BY_NAME[preset].strategy
    args, dtype, budget, n = cfg["args"], cfg["dtype"], cfg["budget"], len(cfg["lengths"])
    options = row_options(cfg, preset)
    max_len, new = cfg["max_seq_length"], cfg["new_tokens"]
    plan = dict(name=name, label=label, strategy=strategy, bits=options.get("bits"), paged=paged,
                continuous=continuous,
                options={k: v for k, v in options.items() if k in ("bits", "sink_size", "window_size", "group_size")},
                note="")
    if not paged:
        rows = largest(lambda b: predicted_kv_bytes(args, strategy, options, b, max_len, dtype) <= budget, n)
        if rows == 0:
            need = predicted_kv_bytes(args, strategy, options, 1, max_len, dtype)
            plan["note"] = f"skipped: one {max_len}-token contiguous sequence needs {format_bytes(need)}"
            return plan
        steps, peak = replay(cfg["lengths"], new, rows, None, None, continuous)
        return dict(plan, rows=rows, options_full=options, predicted_steps=steps, predicted_peak=peak)
    space = kv_cache.STRATEGIES[strategy].page_space(sizing_options(strategy, options, args.head_dim), max_len,
                                                     cfg["block_size"])
    best = None
    for rows in ([cfg["max_rows"]] if cfg["max_rows"] else range(1, n + 1)):
        fixed, per_block = predicted_pool_bytes(args, strategy, options, rows, max_len, cfg["block_size"], dtype)
        num_blocks = blocks_in(budget, fixed, per_block)
        if num_blocks < 2:
            continue
        steps, peak = replay(cfg["lengths"], new, rows, num_blocks - 1, space.blocks_for, continuous)
        if steps < math.inf and (best is None or steps < best[0]):
            best = (steps, peak, rows, num_blocks)
    if best is None:
        worst = max(space.blocks_for(length + new) for length in cfg["lengths"])
        plan["note"] = (f"skipped: the budget's pool cannot hold the longest prompt's {worst} blocks of "
                        f"{space.block_tokens} tokens" + (f" beside --max_rows {cfg['max_rows']} rows' state"
                                                          if cfg["max_rows"] else ""))
        return plan
    steps, peak, rows, num_blocks = best
    return dict(plan, rows=rows, num_blocks=num_blocks, options_full=options, predicted_steps=steps,
                predicted_peak=peak, blocks_for=space.blocks_for)


@torch.no_grad()
def run_row(model, plan: dict, cfg: dict, device) -> dict:
    row = {k: v for k, v in plan.items() if k not in ("options_full", "blocks_for")}
    if "rows" not in plan:
        return row
    prompts, new = cfg["prompts"], cfg["new_tokens"]
    release(model, device)
    pool = setup_cache(model, plan["strategy"], plan["options_full"], plan["rows"], cfg["max_seq_length"],
                       quiet=True, block_size=cfg["block_size"] if plan["paged"] else None,
                       num_blocks=plan.get("num_blocks"))
    row["kv_bytes"] = allocated_kv_bytes(model)  # measured: the buffers the caches hold
    row["fits_budget"] = row["kv_bytes"] <= cfg["budget"]
    decode_fn = decode_one_token
    if cfg["compile"]:
        decode_fn = compile_decode()
        row["compile_s"] = warm_up(model, decode_fn) if new > 1 else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    if plan["continuous"]:
        out = generate_batch(model, prompts, new, prefill_chunk=cfg["prefill_chunk"], decode_fn=decode_fn)
        sequences, prefill_s, decode_s = out["sequences"], out["prefill_s"], out["decode_s"]
        steps, decode_tokens, peak = out["decode_steps"], out["decode_tokens"], out["peak_running"]
        shared = out.get("shared_tokens", 0)
    else:
        usable = pool.usable if pool is not None else None
        groups = static_groups(cfg["lengths"], new, plan["rows"], usable, plan.get("blocks_for"))
        sequences, prefill_s, decode_s, steps, decode_tokens, shared = [], 0.0, 0.0, 0, 0, 0
        for group in groups:
            out = generate_batch(model, [prompts[i] for i in group], new, prefill_chunk=cfg["prefill_chunk"],
                                 decode_fn=decode_fn)
            sequences += out["sequences"]
            prefill_s, decode_s = prefill_s + out["prefill_s"], decode_s + out["decode_s"]
            steps, decode_tokens = steps + out["decode_steps"], decode_tokens + out["decode_tokens"]
            shared += out.get("shared_tokens", 0)
        peak = max(map(len, groups))
    synchronize(device)
    total_s = time.perf_counter() - t0
    generated = sum(len(s["tokens"]) for s in sequences)
    row.update(prompt_tokens=sum(map(len, prompts)), shared_tokens=shared, generated_tokens=generated,
               decode_tokens=decode_tokens, decode_steps=steps, peak_running=peak, prefill_s=prefill_s,
               decode_s=decode_s, total_s=total_s,
               decode_tps=decode_tokens / decode_s if decode_s else None,
               total_tps=(sum(map(len, prompts)) + generated) / total_s)
    if pool is not None:
        pooled = sum(cache.pool_nbytes() for cache in model.caches())
        per_block = pooled // pool.num_blocks
        row.update(usable_blocks=pool.usable, block_tokens=pool.block_tokens, block_bytes=per_block,
                   peak_blocks=pool.peak_used, peak_in_use_bytes=row["kv_bytes"] - pooled + pool.peak_used * per_block)
        pool.check()
    if device.type == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    row["_tokens"] = [s["tokens"] for s in sequences]
    release(model, device)
    return row


def compare_with_first(rows: list[dict]):
    measured = [r for r in rows if "total_s" in r]
    if not measured:
        return
    base = measured[0]
    for r in measured:
        r["vs_first"] = dict(
            total_tps=r["total_tps"] / base["total_tps"],
            decode_tps=r["decode_tps"] / base["decode_tps"] if r["decode_tps"] and base["decode_tps"] else None,
            peak_running=r["peak_running"] / base["peak_running"])
        r["same_tokens_as_first"] = sum(a == b for a, b in zip(r["_tokens"], base["_tokens"]))


# ---------------------------------------------------------------- prefill memory against chunk size


def profiled_peak_bytes(fn) -> int:
    """Peak of the running sum of PyTorch CPU-allocator allocations (+) and frees (-) recorded while fn() runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_profiler_logs():
        prof.start()
    try:
        fn()
    finally:
        with quiet_profiler_logs():
            prof.stop()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        running += size
        peak = max(peak, running)
    return peak


@torch.no_grad()
def prefill_rows(model, cfg, device, on_row) -> list[dict]:
    length, vocab = cfg["prefill_prompt"], model.args.vocab_size
    chunks = [length if c == "all" else min(c, length) for c in cfg["prefill_chunks"]]
    release(model, device)
    setup_cache(model, "full", {}, 1, length, quiet=True)
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(cfg["seed"] + 1))
    tokens = tokens.to(device)
    itemsize = model.tok_embeddings.weight.element_size()
    rows = []

    def run(chunk):
        model.reset_caches()
        synchronize(device)
        prefill(model, tokens, 0, chunk, last_only=True)
        synchronize(device)

    run(min(chunks))  # warm-up, untimed
    # All timings first, then the profiled runs: time is never measured under (or just after) the profiler.
    for label, chunk in zip(cfg["prefill_chunks"], chunks):
        t0 = time.perf_counter()
        run(chunk)
        seconds = time.perf_counter() - t0
        rows.append(dict(chunk=chunk, chunk_label=str(label), tokens=length, seconds=seconds,
                         tokens_per_s=length / seconds, logits_bytes=chunk * vocab * itemsize))
    for row in rows:
        if device.type == "cuda":
            model.reset_caches()
            synchronize(device)
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            run(row["chunk"])
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - start
            row["measured"] = "cuda max_memory_allocated"
        else:
            row["peak_bytes"] = profiled_peak_bytes(lambda: run(row["chunk"]))
            row["measured"] = "torch.profiler CPU allocations"
        on_row(rows)
    release(model, device)
    return rows


# ---------------------------------------------------------------- report


def table_rows(header, rows) -> list[str]:
    headers = ["#", "row", "rows", "blocks", "KV MiB", "peak blocks", "in use MiB", "peak seqs", "steps", "total s",
               "decode tok/s", "total tok/s", "total tok/s x row 1", "decode tok/s x row 1", "peak seqs x row 1",
               "same", "note"]
    cells = []
    for i, r in enumerate(rows, 1):
        vs = r.get("vs_first", {})
        same = f"{r['same_tokens_as_first']}/{header['num_prompts']}" if "same_tokens_as_first" in r else ""
        cells.append([i, r["label"], r.get("rows", ""), r.get("usable_blocks", ""), fmt(r.get("kv_bytes"), ".1f", MiB),
                      r.get("peak_blocks", ""), fmt(r.get("peak_in_use_bytes"), ".1f", MiB), r.get("peak_running", ""),
                      r.get("decode_steps", ""), fmt(r.get("total_s"), ".1f"), fmt(r.get("decode_tps"), ".1f"),
                      fmt(r.get("total_tps"), ".1f"), fmt(vs.get("total_tps"), ".2f"), fmt(vs.get("decode_tps"), ".2f"),
                      fmt(vs.get("peak_running"), ".2f"), same, r["note"]])
    return markdown_table(headers, cells)


def write_report(path: Path, header: dict, rows: list[dict], prefill: list[dict]):
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    atomic_write_json(path.with_suffix(".json"), dict(header, rows=public, prefill_rows=prefill), indent=1,
                      default=str)
    h = header
    lines = [f"# Serving benchmark {h['date']}", "", *header_lines(h),
             f"- {h['threads']} CPU threads",
             f"- model: random {h['dtype']} weights of the {h['shape']} shape; decode step: "
             f"{'torch.compile' if h['compile'] else 'eager'}",
             f"- workload: {h['num_prompts']} prompts of {h['prompt_lengths'][0]}-{h['prompt_lengths'][1]} random "
             f"tokens (seed {h['seed']}; {h['prompt_tokens']} in all, longest {h['longest_prompt']}), "
             f"{h['new_tokens']} new tokens each, greedy, no EOS; prefill chunk {h['prefill_chunk']}",
             f"- KV budget: {h['budget_bytes'] / MiB:.1f} MiB ({h['budget_rule']}); one max-length "
             f"({h['max_seq_length']} tokens) contiguous full sequence: {h['contiguous_seq_bytes'] / MiB:.2f} MiB",
             f"- paged: blocks of {h['block_size']} tokens (quantize_kv: rounded up to whole groups); quantize_kv "
             f"sink {h['sink_size']}, window {h['window_size']}, group {h['group_size']}", ""]
    lines += table_rows(header, rows) + [""]
    if prefill:
        lines += [f"Prefill of one {prefill[0]['tokens']}-token prompt:", ""]
        lines += markdown_table(["chunk", "prefill s", "tokens/s", "peak MiB", "logits MiB"],
                                [[p["chunk_label"], f"{p['seconds']:.2f}", f"{p['tokens_per_s']:.0f}",
                                  fmt(p.get("peak_bytes"), ".1f", MiB), f"{p['logits_bytes'] / MiB:.1f}"]
                                 for p in prefill]) + [""]
    lines += [LEGEND, "", PREFILL_LEGEND, ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))


# ---------------------------------------------------------------- command line


def chunk_size(text):
    """A prefill chunk: a whole number >= 1, or all."""
    if text == "all":
        return text
    value = count(text)
    if value < 1:
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="model shape (default llama3-8b on CUDA, smollm2-135m on CPU)")
    p.add_argument("--num_prompts", type=whole_number(1), default=None, help="prompts (default 256 on CUDA, 32 on CPU)")
    p.add_argument("--prompt_lengths", type=length_range, default=None,
                   help="LO-HI: prompt lengths drawn uniformly (default 128-2048 on CUDA, 16-256 on CPU)")
    p.add_argument("--new_tokens", type=whole_number(1), default=None, help="tokens generated per prompt (default 256 "
                                                                     "on CUDA, 32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv_memory_gb", type=positive_number, default=None,
                   help="the KV budget of every row in GiB (default: what contiguous preallocation needs for "
                        "max(2, ceil(num_prompts/8)) max-length sequences)")
    p.add_argument("--rows", type=name_list(ROWS), default=DEFAULT_ROWS,
                   help=f"comma-separated, from {','.join(ROWS)} (default {','.join(DEFAULT_ROWS)})")
    p.add_argument("--max_rows", type=whole_number(1), default=None,
                   help="rows (batch) of the paged caches (default: the fewest that let the blocks bind)")
    p.add_argument("--block_size", type=whole_number(1), default=DEFAULT_BLOCK_SIZE,
                   help=f"paged: tokens per block (default {DEFAULT_BLOCK_SIZE})")
    presets.add_arguments(p, "quantize_kv", group=True)
    p.add_argument("--prefill_chunk", type=whole_number(1), default=512, help="prefill chunk of the serving rows (512)")
    p.add_argument("--prefill_prompt", type=whole_number(0), default=None,
                   help="tokens of the prefill-memory prompt (default 8192 on CUDA, 1024 on CPU; 0: no table)")
    p.add_argument("--prefill_chunks", type=list_of(chunk_size, "chunk sizes: whole numbers or 'all' (e.g. 64,256,all)"),
                   default=[64, 128, 256, 512, "all"],
                   help="chunk sizes of the prefill-memory table (default 64,128,256,512,all)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compile time apart)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=whole_number(1), default=None,
                   help="CPU threads (default 1 on CPU: on a shared 2-core machine a second spinning thread made "
                        "decode steps 4x slower; torch's default elsewhere)")
    p.add_argument("--out", type=Path, default=LOCAL_OUT,
                   help="folder for the .md and .json (default outputs/local/, not tracked by git)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads or args.device == "cpu":
            torch.set_num_threads(args.threads or 1)
        run(args, argv)
    except ValueError as e:  # bad options reach the caches' checks: one line, no traceback
        sys.exit(f"error: {' '.join(str(e).split())}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --kv_memory_gb or --prefill_prompt")
    except KeyboardInterrupt:
        sys.exit("error: interrupted (the .md/.json hold the rows measured so far)")
    finally:
        torch.set_num_threads(threads)


def run(args, argv):
    argv = sys.argv[1:] if argv is None else argv
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: use cpu or cuda")
    gpu = device.type == "cuda"
    shape = args.shape or ("llama3-8b" if gpu else "smollm2-135m")
    n = args.num_prompts or (256 if gpu else 32)
    lo, hi = args.prompt_lengths or ((128, 2048) if gpu else (16, 256))
    new = args.new_tokens or (256 if gpu else 32)
    prefill_len = args.prefill_prompt if args.prefill_prompt is not None else (8192 if gpu else 1024)
    model_args = SHAPES[shape]
    for name in args.rows:  # bad cache options fail before anything runs
        preset = BY_NAME[ROWS[name][1]]
        kv_cache.STRATEGIES[preset.strategy].check_options(
            row_options(vars(args), preset.name), hi + new, model_args.head_dim, quiet=True)
    now = datetime.datetime.now()
    path = check_writable_file(args.out / f"bench_serve_{device.type}_{now:%Y-%m-%d_%H%M%S}.json").with_suffix("")

    prompts = make_prompts(n, lo, hi, model_args.vocab_size, args.seed)
    lengths = [len(p) for p in prompts]
    max_len = max(lengths) + new
    seq_bytes = predicted_kv_bytes(model_args, "full", {}, 1, max_len, dtype)
    if args.kv_memory_gb is not None:
        budget, rule = int(args.kv_memory_gb * 2**30), f"--kv_memory_gb {args.kv_memory_gb}"
    else:
        k = max(2, -(-n // 8))
        budget, rule = predicted_kv_bytes(model_args, "full", {}, k, max_len, dtype), \
            f"default: {k} max-length contiguous sequences"
    with torch.device("meta"):
        weight_bytes = sum(p.numel() for p in Transformer(model_args).parameters()) * dtype.itemsize
    available = available_memory_bytes(device)
    if budget + weight_bytes > available:
        raise ValueError(f"the KV budget ({format_bytes(budget)}) and the weights ({format_bytes(weight_bytes)}) "
                         f"exceed the {format_bytes(available)} of free memory: lower --kv_memory_gb")

    cfg = dict(args=model_args, dtype=dtype, budget=budget, lengths=lengths, prompts=prompts, new_tokens=new,
               max_seq_length=max_len, block_size=args.block_size, max_rows=args.max_rows, compile=args.compile,
               prefill_chunk=args.prefill_chunk, sink_size=args.sink_size, window_size=args.window_size,
               group_size=args.group_size, prefill_prompt=prefill_len, prefill_chunks=args.prefill_chunks,
               seed=args.seed)
    plans = [plan_row(name, cfg) for name in args.rows]
    if all("rows" not in plan for plan in plans):
        raise ValueError(f"the KV budget ({format_bytes(budget)}) holds no row's longest sequence "
                         f"({max_len} tokens; {plans[0]['note'].removeprefix('skipped: ')}): raise --kv_memory_gb "
                         "or shorten --prompt_lengths / --new_tokens")

    header = dict(run_header(device, __spec__.name, argv, Path(__file__)), threads=torch.get_num_threads(),
                  shape=shape, dtype=str(dtype).replace("torch.", ""), compile=args.compile, num_prompts=n,
                  prompt_lengths=[lo, hi], seed=args.seed, new_tokens=new, prompt_tokens=sum(lengths),
                  longest_prompt=max(lengths), max_seq_length=max_len, budget_bytes=budget, budget_rule=rule,
                  contiguous_seq_bytes=seq_bytes, block_size=args.block_size, sink_size=args.sink_size,
                  window_size=args.window_size, group_size=args.group_size, prefill_chunk=args.prefill_chunk,
                  weight_bytes=weight_bytes)
    print(f"{header['device']}: {shape} {header['dtype']}, {n} prompts {lo}-{hi} + {new} tokens, KV budget "
          f"{format_bytes(budget)} ({rule}); writing {path}.md/.json", flush=True)

    torch.manual_seed(args.seed)
    model = random_model(model_args, device, dtype, args.seed)
    with torch.no_grad():  # warm-up: the first calls of eager PyTorch are slow; no row pays for them
        setup_cache(model, "full", {}, 2, 24, quiet=True)
        generate_batch(model, [prompts[0][:16], prompts[-1][:8]], 4, prefill_chunk=args.prefill_chunk)
    rows, prefill = [], []
    for plan in plans:
        row = run_row(model, plan, cfg, device)
        rows.append(row)
        compare_with_first(rows)
        vs = row.get("vs_first", {})
        print(f"{row['label']}: rows {row.get('rows', '-')}, peak {row.get('peak_running', '-')} sequences, "
              f"{fmt(row.get('total_s'), '.1f')} s, {fmt(row.get('total_tps'), '.1f')} tokens/s "
              f"(x{fmt(vs.get('total_tps'), '.2f')}) {row['note']}", flush=True)
        write_report(path, header, rows, prefill)
    if prefill_len:
        prefill = prefill_rows(model, cfg, device, lambda done: write_report(path, header, rows, done))
    write_report(path, header, rows, prefill)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
