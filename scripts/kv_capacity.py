"""KV memory capacity: which cache layout holds the most sequences in a memory budget, one table for a model shape
and a workload (quality is scripts/run_matrix.py's question, speed scripts/bench_decode.py's).

    python -m scripts.kv_capacity --shape llama3-8b --prompt_tokens 128-8192 --num_prompts 1000 \\
        --new_tokens 256 --kv_memory_gb 40
    python -m scripts.kv_capacity --check     # the predictions against real paged runs (tiny model, CPU)

One row per layout: the contiguous full cache (a static batch preallocates every sequence at the longest
prompt + new tokens), the paged full cache, paged quantize_kv pages of every format of scripts/presets.py (int8,
int4, int2, fp8; 16-bit sinks + window per sequence), compress_kv contiguous and paged. Every number comes from the
stores' own byte counts: caches built on the meta device (memory.predicted_kv_bytes / memory.predicted_pool_bytes,
all layers, scales, zero-points and slot positions included) and the strategy's PageSpace (which blocks a sequence
of n tokens holds), never from a formula of the formats' sizes. A sequence is its prompt plus --new_tokens tokens: what a static batch
sizes its slots for and what continuous batching (scheduler.py) reserves blocks for before admitting it.

Sequences that fit: contiguous, how many slots of the longest sequence the budget holds; paged, how many of the
workload's sequences, taken in order (the list repeated when the budget holds more), fit together in a pool of the
budget's size: their blocks, the null block and their per-sequence state (a pool sized as generate.py's
--kv_memory_gb sizes it). --check runs exactly that admission in real generation and compares.
Results: OUT/kv_capacity_<shape>.md and .json (atomically; OUT defaults to outputs/local/, not tracked by git).
"""
import argparse
import os
import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kv_cache
from atomic import atomic_write_json, atomic_write_text, check_writable_file
from checkpoint import load_model_args
from cli_options import positive_number, whole_number
from engine import generate_batch
from kv_cache.paging import DEFAULT_BLOCK_SIZE, PoolExhausted
from memory import (allocated_kv_bytes, blocks_in, format_bytes, largest, predicted_kv_bytes, predicted_pool_bytes,
                    sizing_options)
from model import ModelArgs
from runner import DTYPES, decode_one_token, setup_cache
from scripts.common import GiB, LOCAL_OUT, command_line, count, length_range, list_of, markdown_table, name_list
from scripts import presets
from scripts.presets import GROUP_SIZE, PRESETS, SINK_SIZE, WINDOW_SIZE
from shapes import SHAPES, random_model


# ---------------------------------------------------------------- layouts and their byte counts


@dataclass
class Layout:
    key: str  # command-line name (--layouts), JSON key
    label: str  # the table's name
    strategy: str  # kv_cache strategy
    options: dict = field(default_factory=dict)
    paged: bool = False


def layouts(sink_size: int = SINK_SIZE, window_size: int = WINDOW_SIZE, group_size: int = GROUP_SIZE) -> list[Layout]:
    """The full cache contiguous and paged, scripts/presets.py's quantize_kv formats paged, compress_kv both ways."""
    sink_window = dict(sink_size=sink_size, window_size=window_size)
    rows = [Layout("contiguous-full", "contiguous full", "full"),
            Layout("paged-full", "paged full", "full", paged=True)]
    rows += [Layout(f"paged-{p.variant}", f"paged quantize_kv {p.variant}", "quantize_kv",
                    dict(sink_window, bits=p.options()["bits"], group_size=group_size), paged=True)
             for p in PRESETS if p.strategy == "quantize_kv"]
    rows += [Layout("contiguous-compress_kv", "contiguous compress_kv", "compress_kv", dict(sink_window)),
             Layout("paged-compress_kv", "paged compress_kv", "compress_kv", dict(sink_window), paged=True)]
    return rows


LAYOUT_KEYS = [layout.key for layout in layouts()]


class Sizer:
    """One layout's byte counts for a model shape, every sequence at most max_seq_length tokens: from caches built
    on the meta device (memory.predicted_kv_bytes / predicted_pool_bytes) and the strategy's PageSpace."""

    def __init__(self, layout: Layout, args: ModelArgs, max_seq_length: int, block_size: int, dtype):
        self.layout, self.args, self.max_seq_length, self.block_size, self.dtype = (layout, args, max_seq_length,
                                                                                    block_size, dtype)
        cls = kv_cache.STRATEGIES[layout.strategy]
        # One ValueError line for options that cannot work at this shape (e.g. a group that does not divide head_dim).
        resolved = sizing_options(layout.strategy, layout.options, args.head_dim)
        self.space = cls.page_space(resolved, max_seq_length, block_size) if layout.paged else None
        # compress_kv's ring: its bytes do not grow with the sequence (the strategy says it streams without end)
        self.constant = cls.capacity(resolved, max_seq_length) is None
        if layout.paged:
            self.fixed_per_sequence, self.per_block = self.pool_split(1)
        self._allocated, self._linear = {}, None

    @property
    def block_tokens(self):
        return self.space.block_tokens if self.space else None

    def pool_split(self, rows: int) -> tuple[int, int]:
        """(bytes that do not depend on the pool's size for `rows` sequences, bytes per block), all layers."""
        return predicted_pool_bytes(self.args, self.layout.strategy, self.layout.options, rows, self.max_seq_length,
                          self.block_size, self.dtype)

    def allocated(self, rows: int, num_blocks: int = None) -> int:
        """Bytes every layer allocates for `rows` sequences (paged: with a pool of num_blocks blocks: the bytes of
        the rows' own state, from caches with pools of 2 and 3 blocks, plus num_blocks blocks; a pool of a million
        blocks is never built)."""
        if not self.layout.paged:
            return predicted_kv_bytes(self.args, self.layout.strategy, self.layout.options, rows, self.max_seq_length,
                               self.dtype)
        return self.fixed(rows) + num_blocks * self.per_block

    def fixed(self, rows: int) -> int:
        """Paged: the bytes of `rows` sequences' own state, outside the pool. Each such buffer has a row per
        sequence, so this is `rows` times one sequence's: checked at 2 and 3 rows (else every row count is built:
        the pool's host-side lists for a million rows take seconds to build)."""
        if self._linear is None:
            self._linear = all(self.pool_split(n)[0] == n * self.fixed_per_sequence for n in (2, 3))
        if self._linear:
            return rows * self.fixed_per_sequence
        if rows not in self._allocated:
            self._allocated[rows] = self.pool_split(rows)[0]
        return self._allocated[rows]

    def blocks(self, length: int) -> int:
        """Blocks a paged sequence of `length` tokens holds."""
        return self.space.blocks_for(length)

    def sequence_bytes(self, length: int) -> int:
        """Bytes one sequence of `length` tokens takes: contiguous, its slot (sized for the longest sequence);
        paged, its per-sequence state and its blocks."""
        if not self.layout.paged:
            return self.allocated(1)
        return self.fixed_per_sequence + self.blocks(length) * self.per_block

    def bytes_per_token(self):
        """One more token of one sequence, all layers, metadata amortized (paged: a block's bytes over its tokens;
        quantize_kv: a token of the quantized store); None when constant (compress_kv)."""
        if self.constant:
            return None
        if self.layout.paged:
            return self.per_block / self.block_tokens
        return self.allocated(1) / self.max_seq_length


class Workload:
    """Sequence lengths (prompt + new tokens), taken in order and repeated as often as a budget holds them."""

    def __init__(self, lengths: list[int]):
        self.lengths = list(lengths)

    def total(self, values: list, n: int):
        """Sum of values[i % len] over the first n sequences."""
        whole, part = divmod(n, len(values))
        return whole * sum(values) + sum(values[:part])


def pool_blocks(sizer: Sizer, workload: Workload, n: int) -> int:
    """Blocks a pool must have for the first n sequences together, the null block included (a pool has 2 at
    least)."""
    return max(2, 1 + workload.total([sizer.blocks(L) for L in workload.lengths], n))


def allocated_for(sizer: Sizer, workload: Workload, n: int) -> int:
    """Bytes allocated for the first n sequences of the workload at once."""
    if not sizer.layout.paged:  # slots of the longest sequence, whatever each one holds
        return sizer.allocated(n)
    return sizer.allocated(n, pool_blocks(sizer, workload, n))


MOST_SEQUENCES = 2**40


def sequences_that_fit(sizer: Sizer, workload: Workload, budget: int) -> int:
    """How many of the workload's sequences (in order, repeated) the budget holds at once."""
    n = largest(lambda n: allocated_for(sizer, workload, n) <= budget, MOST_SEQUENCES)
    if n == MOST_SEQUENCES:
        raise ValueError(f"the budget holds {MOST_SEQUENCES} sequences or more: give a smaller --kv_memory_gb")
    return n


def wasted_bytes(sizer: Sizer, workload: Workload, n: int) -> int:
    """Bytes allocated for the first n sequences that never hold a token. Contiguous: each slot beyond what a slot
    sized for its sequence would take. Paged: the unfilled slots of each sequence's last block (a block's bytes
    spread over its slots) and the pool's blocks no sequence holds (the null block)."""
    if n == 0:
        return 0
    if not sizer.layout.paged:
        slot = sizer.allocated(1)
        per_sequence = [slot - min(slot, predicted_kv_bytes(sizer.args, sizer.layout.strategy, sizer.layout.options, 1,
                                                     L, sizer.dtype)) for L in workload.lengths]
        return workload.total(per_sequence, n)
    space = sizer.space
    unfilled = [sizer.blocks(L) * space.block_tokens - space.slots_used(L) for L in workload.lengths]
    held = workload.total([sizer.blocks(L) for L in workload.lengths], n)
    spare_blocks = pool_blocks(sizer, workload, n) - held
    return round(workload.total(unfilled, n) * sizer.per_block / space.block_tokens) + spare_blocks * sizer.per_block


def compare_rows(args: ModelArgs, workload: Workload, budget: int, block_size: int, dtype,
                 chosen: list[Layout]) -> list[dict]:
    max_len = max(workload.lengths)
    mean_len = round(statistics.fmean(workload.lengths))
    contiguous = Sizer(layouts()[0], args, max_len, block_size, dtype)
    base_fit = sequences_that_fit(contiguous, workload, budget)
    base_bytes = contiguous.sequence_bytes(mean_len)
    rows = []
    sizers = [Sizer(layout, args, max_len, block_size, dtype) for layout in chosen]  # bad options fail first
    for layout, sizer in zip(chosen, sizers):
        fit = sequences_that_fit(sizer, workload, budget)
        per_sequence = sizer.sequence_bytes(mean_len)
        allocated = allocated_for(sizer, workload, fit) if fit else 0
        wasted = wasted_bytes(sizer, workload, fit)
        rows.append(dict(
            key=layout.key, layout=layout.label, strategy=layout.strategy, options=layout.options,
            paged=layout.paged, block_tokens=sizer.block_tokens,
            bytes_per_token=sizer.bytes_per_token(), constant=sizer.constant,
            fixed_bytes_per_sequence=sizer.fixed_per_sequence if layout.paged else None,
            bytes_per_sequence=per_sequence, sequences_fit=fit, allocated_bytes=allocated, wasted_bytes=wasted,
            wasted_fraction=wasted / allocated if allocated else None,
            fit_vs_contiguous=fit / base_fit if base_fit else None,
            bytes_per_sequence_vs_contiguous=per_sequence / base_bytes))
    return rows


# ---------------------------------------------------------------- report


def ratio(x, digits=2) -> str:
    return "—" if x is None else f"{x:.{digits}f}x"


def markdown(header: dict, rows: list[dict]) -> str:
    w = header["workload"]
    budget = header["kv_memory_bytes"]
    lines = [f"# KV memory capacity of the cache layouts: {header['model_name']}", "",
             f"`{header['command']}`", "",
             f"Model: {header['model']['n_layer']} layers, {header['model']['n_kv_head']} KV heads, head_dim "
             f"{header['model']['head_dim']}, {header['dtype']}. Budget: {format_bytes(budget)} of KV memory. "
             f"Paged blocks of {header['block_size']} tokens (quantize_kv: whole key groups). Options: sink "
             f"{header['options']['sink_size']}, window {header['options']['window_size']}, group "
             f"{header['options']['group_size']}.",
             f"Workload: {w['num_sequences']} sequences of {w['prompt_tokens']} prompt tokens "
             f"{'(drawn with seed ' + str(w['seed']) + ') ' if w['drawn'] else ''}+ {w['new_tokens']} new: "
             f"mean {w['mean_tokens']} tokens, longest {w['max_tokens']} (the contiguous slot).", ""]
    headers = ["layout", "block", "bytes/token", "fixed/seq", f"bytes/seq (mean {w['mean_tokens']} tok)",
               f"seqs in {format_bytes(budget)}", "wasted", "seqs vs contiguous", "bytes/seq vs contiguous"]
    cells = []
    for r in rows:
        per_token = "constant" if r["constant"] else format_bytes(r["bytes_per_token"])
        fixed = "—" if r["fixed_bytes_per_sequence"] is None else format_bytes(r["fixed_bytes_per_sequence"])
        wasted = format_bytes(r["wasted_bytes"]) + (f" ({100 * r['wasted_fraction']:.1f}%)"
                                                    if r["wasted_fraction"] is not None else "")
        cells.append([r["layout"], r["block_tokens"] or "—", per_token, fixed, format_bytes(r["bytes_per_sequence"]),
                      r["sequences_fit"], wasted, ratio(r["fit_vs_contiguous"]),
                      ratio(r["bytes_per_sequence_vs_contiguous"], 3)])
    return "\n".join(lines + markdown_table(headers, cells, LEGEND) + [""])


LEGEND = """\
Every figure is all layers, from the stores' own byte counts (caches built on the meta device: scales, zero-points
and slot positions included). A sequence is its prompt + new tokens. **block** = tokens per paged block.
**bytes/token** = one more token of one sequence (a block's bytes over its tokens when paged; quantize_kv: a token
of its quantized store); compress_kv is constant: its bytes/seq does not grow. **fixed/seq** = paged, what each
sequence holds outside the pool (quantize_kv: its 16-bit sinks + window; compress_kv: slot positions).
**bytes/seq** = a sequence of the workload's mean length (contiguous: its slot of the longest length).
**seqs in budget** = contiguous, slots of the longest sequence; paged, the workload's sequences in order (repeated)
whose blocks, null block and per-sequence state fit together (as continuous batching admits them; full's prefix
sharing not counted). **wasted** = bytes allocated for those sequences that never hold a token (contiguous: each
slot beyond its sequence's length; paged: unfilled slots of last blocks and the null block), % of what they take.
**vs contiguous** = over the contiguous full cache's figure."""


# ---------------------------------------------------------------- --check: predictions against real runs


CHECK_PROMPTS = (150, 9, 97, 61, 130, 33)  # tokens; with CHECK_NEW they reach into quantize_kv's quantized store
CHECK_NEW = 12
CHECK_SLOTS = 3  # the check's budget: this many contiguous full slots


def compare(label: str, predicted: dict, measured: dict) -> tuple[bool, str]:
    """(every prediction equals its measurement, the one-line verdict)."""
    wrong = [k for k in predicted if predicted[k] != measured.get(k)]
    parts = [f"{k} {predicted[k]}" + (f" predicted but {measured.get(k)} measured" if k in wrong else "")
             for k in predicted]
    return not wrong, f"{'FAIL' if wrong else 'ok'}  {label}: " + "; ".join(parts)


class Watch:
    """A decode_fn that records how many sequences run in the first decode step (continuous batching's first
    admissions: every row that is not empty is active) and the most blocks each row of the pool held (a finished
    sequence returns its blocks at once)."""

    def __init__(self, pool=None):
        self.pool, self.running, self.held = pool, None, None

    def __call__(self, model, token, input_pos, sampling=None):
        if self.running is None:
            self.running = int(model.caches()[0].active.sum())
        if self.pool is not None:
            now = [len(held) for held in self.pool.held]
            self.held = now if self.held is None else [max(a, b) for a, b in zip(self.held, now)]
        return decode_one_token(model, token, input_pos, sampling)


def check_layout(model, sizer: Sizer, workload: Workload, budget: int, prompts) -> tuple[bool, str]:
    """Run the layout for real and compare: blocks each sequence holds, bytes allocated, sequences in the budget.
    Paged, two pools are built: one of the blocks the check's prompts need together ("their pool"), and one of the
    budget's bytes ("the budget's pool"), whose admissions give the sequences that fit."""
    layout, max_len = sizer.layout, sizer.max_seq_length
    n = sequences_that_fit(sizer, workload, budget)
    predicted, measured = {}, {}

    def setup(rows, num_blocks=None):
        return setup_cache(model, layout.strategy, layout.options, rows, max_len, quiet=True,
                           block_size=sizer.block_size if layout.paged else None, num_blocks=num_blocks)

    if not layout.paged:
        rows = max(n, 1)
        setup(rows)
        generate_batch(model, prompts(rows), CHECK_NEW)
        predicted[f"bytes for {rows} slots"] = sizer.allocated(rows)
        measured[f"bytes for {rows} slots"] = allocated_kv_bytes(model)
        fit = 0  # the largest number of real slots within the budget
        while True:
            setup(fit + 1)
            if allocated_kv_bytes(model) > budget:
                break
            fit += 1
        predicted["fit in budget"], measured["fit in budget"] = n, fit
        return compare(layout.label, predicted, measured)

    # A static batch of the check's prompts in a pool of the blocks the table counts for them: every sequence
    # holds the blocks of the tokens it stored (the last new token is sampled, never stored).
    N = len(workload.lengths)
    num_blocks = pool_blocks(sizer, workload, N)
    pool = setup(N, num_blocks)
    predicted["blocks per sequence"] = [sizer.blocks(L - 1) for L in workload.lengths]
    try:
        watch = Watch(pool)
        generate_batch(model, prompts(N), CHECK_NEW, decode_fn=watch)
        measured["blocks per sequence"] = watch.held
    except PoolExhausted:  # the predicted pool is too small for what the sequences really hold
        measured["blocks per sequence"] = f"pool of {num_blocks} blocks exhausted"
    their_pool = f"bytes allocated with the {N} prompts' pool of {num_blocks} blocks"
    predicted[their_pool], measured[their_pool] = sizer.allocated(N, num_blocks), allocated_kv_bytes(model)

    # Continuous batching in a pool of the budget (sized as generate.py's --kv_memory_gb): with n rows all n are
    # admitted at once; with n + 1 rows (a smaller pool: one more sequence's state) at most n.
    def admitted(rows):
        fixed, per_block = sizer.pool_split(rows)
        blocks = blocks_in(budget, fixed, per_block)
        if blocks < 2:
            return 0, 0
        setup(rows, blocks)
        allocated = allocated_kv_bytes(model)
        wave = Watch()
        try:
            generate_batch(model, prompts(rows), CHECK_NEW, decode_fn=wave)
        except ValueError:  # a prompt larger than the whole pool: it can never run
            return 0, allocated
        except PoolExhausted:  # admitted but could not grow: admission and the prediction disagree
            return -1, allocated
        return wave.running or 0, allocated

    together, allocated = admitted(n) if n else (0, 0)
    one_more, allocated_more = admitted(n + 1)
    in_budget = max(allocated, allocated_more) <= budget
    predicted["fit in budget"] = n
    measured["fit in budget"] = ("an admitted sequence ran out of blocks" if -1 in (together, one_more) else
                                 n if together == n and one_more <= n else
                                 f"{one_more} of {n + 1} admitted at once" if one_more > n else
                                 f"{together} of {n} admitted at once")
    in_budget_pool = f"allocated with the budget's pool <= budget {budget}"
    predicted[in_budget_pool], measured[in_budget_pool] = True, in_budget
    return compare(layout.label, predicted, measured)


def run_check(options: dict, block_size: int, chosen: list[Layout]) -> bool:
    """--check: the tiny shape with random weights on the CPU (float32), a handful of prompts; one verdict line per
    layout. True when every prediction held."""
    args = SHAPES["tiny"]
    dtype = torch.float32
    model = random_model(args, torch.device("cpu"), dtype)
    workload = Workload([p + CHECK_NEW for p in CHECK_PROMPTS])
    max_len = max(workload.lengths)
    budget = CHECK_SLOTS * Sizer(layouts()[0], args, max_len, block_size, dtype).allocated(1)
    generator = torch.Generator().manual_seed(1)

    def prompts(n):  # the check's lengths in order, repeated; fresh random tokens each (no shared prefixes)
        return [torch.randint(0, args.vocab_size, (CHECK_PROMPTS[i % len(CHECK_PROMPTS)],),
                              generator=generator).tolist() for i in range(n)]

    print(f"check: tiny shape, random float32 weights, CPU; prompts of {list(CHECK_PROMPTS)} tokens + {CHECK_NEW} "
          f"new; budget {format_bytes(budget)} ({CHECK_SLOTS} contiguous full slots); block_size {block_size}")
    ok = True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model runs fastest on one thread
    try:
        with torch.no_grad():
            for layout in chosen:
                layout = with_options(layout, options)
                good, line = check_layout(model, Sizer(layout, args, max_len, block_size, dtype), workload,
                                          budget, prompts)
                print(line, flush=True)
                ok &= good
    finally:
        torch.set_num_threads(threads)
    print("check: every prediction held" if ok else "check: a prediction was off (FAIL above)")
    return ok


# ---------------------------------------------------------------- command line


def fail(message: str):
    """Bad input: one line naming the fix, exit status 2 (argparse's), no usage dump, no traceback."""
    print(f"error: {' '.join(str(message).split())} (see --help)", file=sys.stderr)
    sys.exit(2)


def budget_gib(text) -> float:
    """cli_options.positive_number, its error said for a budget."""
    try:
        return positive_number(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(str(e).replace("must be a number > 0", "must be > 0 GiB")) from None


def shape_name(text):
    if text not in SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}: choose one of {', '.join(SHAPES)}")
    return text


def token_counts(text):
    """'128,512,2048' (a list) or '128-8192' (a range to draw --num_prompts from)."""
    if "-" in text:
        return ("range", *length_range(text))
    counts = list_of(count, "prompt lengths (e.g. 128,512,2048) or a range LOW-HIGH (e.g. 128-8192)")(text)
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"prompt lengths must be at least 1 token, got {text}")
    return ("list", counts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.kv_capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail
    p.add_argument("--shape", type=shape_name, default=None,
                   help=f"a model shape of shapes.py: {', '.join(SHAPES)} (default llama3-8b)")
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="instead of --shape: the shape of a checkpoint, read from its config only (model_args.json "
                        "beside a model.pth, a HF directory's config.json or a GGUF's metadata)")
    p.add_argument("--prompt_tokens", type=token_counts, default=token_counts("128-8192"),
                   help="prompt lengths: a list (128,512,2048) or a range LOW-HIGH to draw --num_prompts from "
                        "(default 128-8192)")
    p.add_argument("--num_prompts", type=whole_number(1), default=None,
                   help="with a range: how many prompt lengths to draw, uniformly (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    p.add_argument("--new_tokens", type=whole_number(1), default=256, help="new tokens per sequence (default 256)")
    p.add_argument("--kv_memory_gb", type=budget_gib, default=40.0,
                   help="the KV memory budget in GiB (default 40)")
    p.add_argument("--block_size", type=whole_number(1), default=DEFAULT_BLOCK_SIZE,
                   help=f"paged: tokens per block (quantize_kv rounds up to whole key groups; default "
                        f"{DEFAULT_BLOCK_SIZE})")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="the model dtype (default bfloat16)")
    presets.add_arguments(p, "compress_kv, quantize_kv", group=True)
    p.add_argument("--layouts", type=name_list(LAYOUT_KEYS), default=LAYOUT_KEYS,
                   help=f"comma-separated, from {','.join(LAYOUT_KEYS)} (default all)")
    p.add_argument("--out", type=Path, default=LOCAL_OUT,
                   help="folder for kv_capacity_<shape>.md and .json (default outputs/local/, not tracked by git)")
    p.add_argument("--check", action="store_true",
                   help="instead of the table: run every layout for real at small scale (tiny shape, CPU) and "
                        "compare blocks, bytes and sequences that fit with the predictions; exit 1 when one is off")
    return p


def with_options(layout: Layout, options: dict) -> Layout:
    """The layout with the command's sink / window / group (only the options its strategy takes)."""
    own = {k: v for k, v in options.items() if k in layout.options}
    return Layout(layout.key, layout.label, layout.strategy, {**layout.options, **own}, layout.paged)


def workload_of(args) -> tuple[list[int], bool]:
    """(prompt lengths, drawn from a range)."""
    if args.prompt_tokens[0] == "list":
        if args.num_prompts is not None:
            raise ValueError("--num_prompts draws from a range: give --prompt_tokens LOW-HIGH, or list the lengths")
        return args.prompt_tokens[1], False
    _, low, high = args.prompt_tokens
    rng = random.Random(args.seed)
    return [rng.randint(low, high) for _ in range(args.num_prompts or 1000)], True


def run(args, argv):
    options = dict(sink_size=args.sink_size, window_size=args.window_size, group_size=args.group_size)
    chosen = [with_options(layout, options) for layout in layouts() if layout.key in args.layouts]
    if args.shape and args.checkpoint_path:
        raise ValueError("--shape and --checkpoint_path both give the model shape: give one of them")
    if args.checkpoint_path:
        model_args = load_model_args(args.checkpoint_path)
        name = args.checkpoint_path.stem if args.checkpoint_path.is_file() else args.checkpoint_path.name
        name = args.checkpoint_path.resolve().parent.name if name in ("model", "config", "model_args") else name
    else:
        name = args.shape or "llama3-8b"
        model_args = SHAPES[name]
    prompts, drawn = workload_of(args)
    workload = Workload([p + args.new_tokens for p in prompts])
    budget = int(args.kv_memory_gb * GiB)
    dtype = DTYPES[args.dtype]
    rows = compare_rows(model_args, workload, budget, args.block_size, dtype, chosen)

    spec = args.prompt_tokens
    command = command_line(__spec__.name, sys.argv[1:] if argv is None else argv)
    header = dict(command=command, model_name=name, model=model_args.to_dict(), dtype=args.dtype,
                  block_size=args.block_size, options=options, kv_memory_gb=args.kv_memory_gb,
                  kv_memory_bytes=budget,
                  workload=dict(prompt_tokens=f"{spec[1]}-{spec[2]}" if drawn else ",".join(map(str, spec[1])),
                                drawn=drawn, seed=args.seed if drawn else None, new_tokens=args.new_tokens,
                                num_sequences=len(prompts), prompt_lengths=prompts,
                                mean_tokens=round(statistics.fmean(workload.lengths)),
                                max_tokens=max(workload.lengths)))
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"kv_capacity_{name}")
    md_path, json_path = args.out / f"{stem}.md", args.out / f"{stem}.json"
    for path in (md_path, json_path):
        check_writable_file(path)
    text = markdown(header, rows)
    atomic_write_json(json_path, dict(header, rows=rows), indent=1)
    atomic_write_text(md_path, text)
    print(text)
    print(f"wrote {md_path} and {json_path}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            options = dict(sink_size=args.sink_size, window_size=args.window_size, group_size=args.group_size)
            chosen = [layout for layout in layouts() if layout.key in args.layouts]
            for layout in chosen:  # bad options: one line before anything runs
                Sizer(with_options(layout, options), SHAPES["tiny"], 2**10, args.block_size, torch.float32)
            sys.exit(0 if run_check(options, args.block_size, chosen) else 1)
        run(args, argv)
    except ValueError as e:
        fail(e)
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
