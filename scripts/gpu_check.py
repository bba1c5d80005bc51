"""GPU correctness check: every Triton kernel in kernels/ against its PyTorch reference, at real shapes.

    python -m scripts.gpu_check                   # on a GPU: head_dim 64/128, GQA 3:1/4:1, 4k/32k
    python -m scripts.gpu_check --tiny            # no GPU: the same cases, small, in Triton's CPU interpreter

  * kernels/decode_attention.py against its float64 reference (decode_attention_ref): ||out - ref|| / ||ref||
    within the tolerance of the dtype. The "paged" cases read the same logical cache through block tables (as
    vLLM's PagedAttention): the full cache's recent store, or the older store of each format (its recent ring unpaged),
    scattered over shuffled pool blocks of 16 tokens (32 for KIVI's 32-token key groups), the blocks no sequence
    owns (the null block 0 every unused table entry points to, and spare ones) poisoned.
  * kernels/quantize_append.py (quantize_into, the decode flush of quantize_kv) against kernels/quantize.py's
    quantize_keys / quantize_values: the bytes it writes must be the reference's, bit for bit (tolerance 0; the
    error column is the fraction of bytes that differ), at the store offset it is given, and nothing else changes.

Each case draws fresh random inputs (the seed is printed; --seed repeats a run), poisons every buffer the kernel
allocates or writes with NaN or 0xAB bytes (so an unwritten element fails), and also NaN-fills the cache slots the
kernel must not read (the unused tail of a store, the ring slots already moved to the quantized store, scales past
n_older). Lengths are not multiples of any block size. Prints a table and exits 1 if any case fails. Without a GPU it
needs --tiny, which alone sets TRITON_INTERPRET=1: the real shapes would take the interpreter many minutes.
"""
import argparse
import contextlib
import os
import random
import sys
import time

import torch

# The kernels (and triton) are imported inside the checks: main() must choose the interpreter before triton loads.
from kernels.formats import FORMATS
from kv_cache.stores import flush_size, ring_slots
from kernels.quantize import quantize_keys, quantize_values
from scripts.common import device_name
from scripts.presets import GROUP_SIZE, SINK_SIZE, WINDOW_SIZE

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
# name, query heads, KV heads, head_dim: SmolLM2-135M (GQA 3:1) and Llama-3-8B (GQA 4:1), or small ones (--tiny).
HEADS = {False: [("d64-gqa3", 9, 3, 64), ("d128-gqa4", 32, 8, 128)],
         True: [("d64-gqa3", 3, 1, 64), ("d128-gqa4", 4, 1, 128)]}
# --tiny: one length (the interpreter is slow); at 187 its batch of 3 holds 187, 86 and 1 tokens.
LENGTHS = {False: [4096 + 37, 32768 + 41], True: [187]}
# Batch sizes of the decode-attention cases; sequence b of a batch holds length - 101 b tokens (its own state).
BATCHES = {False: [1, 8], True: [1, 3]}
# older-store kind: (bits, key granularity); None = the full cache's 16-bit store only.
KINDS = {"bf16": None, **{f.label: (f.name, f.default_k_granularity) for f in FORMATS.values()},
         "int4-token-keys": ("4", "token")}
# Tokens per block of a paged store; an older block holds whole key groups (F = GROUP_SIZE for KIVI keys).
PAGE_BLOCK = 16


@contextlib.contextmanager
def poisoned_empty():
    """Every floating torch.empty(_like) made inside starts as NaN, so an output element the kernel skips shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def crash_note(e: Exception) -> str:
    """A row's note for a case that crashed (the other cases still run)."""
    return f"{type(e).__name__}: {e}"[:200]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def quantized_older(B, H, D, n_older, bits, k_granularity, device, gen):
    """An older store holding n_older random tokens, quantized by kernels/quantize.py in the cache layout, with one
    scratch flush group of garbage past the end (payload random, scales NaN: reading them poisons the output)."""
    F = flush_size(GROUP_SIZE, k_granularity)
    k = torch.randn(B, H, n_older, D, device=device, generator=gen)
    v = torch.randn(B, H, n_older, D, device=device, generator=gen)
    older = dict(zip(("k_q", "k_scale", "k_zero"), quantize_keys(k, bits, k_granularity, GROUP_SIZE)))
    older.update(zip(("v_q", "v_scale", "v_zero"), quantize_values(v, bits, GROUP_SIZE)))
    for name, t in list(older.items()):
        if t is None:
            continue
        rows = F if name == "k_q" or name.startswith("v") or k_granularity == "token" else 1
        if t.is_floating_point() and t.dtype != torch.float8_e4m3fn:
            tail = torch.full((B, H, rows, t.shape[3]), float("nan"), device=device, dtype=t.dtype)
        else:
            tail = torch.randint(0, 127, (B, H, rows, t.shape[3]), device=device, generator=gen).to(t.dtype)
        older[name] = torch.cat([t, tail], dim=2)
    return older, F


def decode_attention_case(kind, B, HQ, H, D, length, dtype, device, gen):
    """Inputs of one decode_attention call after `length` tokens were stored, as the caches lay them out."""
    q = torch.randn(B, HQ, 1, D, device=device, generator=gen).to(dtype)
    if KINDS[kind] is None:
        # Full cache: per-sequence last slots, the buffer longer than both; the tail is NaN and must not be read.
        recent_k = torch.randn(B, H, length + 77, D, device=device, generator=gen).to(dtype)
        recent_v = torch.randn(B, H, length + 77, D, device=device, generator=gen).to(dtype)
        recent_last = torch.tensor([length - 1 - 101 * b for b in range(B)], device=device)
        for b in range(B):
            recent_k[b, :, recent_last[b] + 1:] = recent_v[b, :, recent_last[b] + 1:] = float("nan")
        return dict(q=q, recent_k=recent_k, recent_v=recent_v, recent_last=recent_last), 0
    bits, k_granularity = KINDS[kind]
    S, W = SINK_SIZE, WINDOW_SIZE
    F = flush_size(GROUP_SIZE, k_granularity)
    # Every sequence has its own length (as in a batch of different prompts): its own ring state and n_older.
    lengths = [max(1, length - 101 * b) for b in range(B)]
    older_counts = [max(0, n - S - W) // F * F for n in lengths]
    older, F = quantized_older(B, H, D, max(older_counts), bits, k_granularity, device, gen)
    for b, n_older in enumerate(older_counts):  # a sequence's tokens past its own n_older must not be read: NaN scales
        older["v_scale"][b, :, n_older:] = float("nan")
        older["k_scale"][b, :, n_older // F if k_granularity == "channel" else n_older:] = float("nan")
    # recent store (sinks + ring of W + F slots): each ring slot holds its latest position; the older ones among them
    # are already in the older store, are masked by recent_pos, and hold NaN here.
    ring = W + F
    recent_pos = torch.full((B, S + ring), -1, dtype=torch.long, device=device)
    recent_k = torch.randn(B, H, S + ring, D, device=device, generator=gen).to(dtype)
    recent_v = torch.randn(B, H, S + ring, D, device=device, generator=gen).to(dtype)
    for b, (n, n_older) in enumerate(zip(lengths, older_counts)):
        pos = torch.arange(n, device=device)
        pos = pos[(pos < S) | (pos >= n - ring)]
        recent_pos[b, ring_slots(pos, S, ring)] = pos
        stale = (recent_pos[b] < 0) | ((recent_pos[b] >= S) & (recent_pos[b] < S + n_older))
        recent_k[b, :, stale] = recent_v[b, :, stale] = float("nan")
    return dict(q=q, recent_k=recent_k, recent_v=recent_v, recent_pos=recent_pos, sink_size=S, n_older=torch.tensor(older_counts, device=device),
                **older), max(older_counts)


def block_table(used: list, max_blocks: int, n_pool: int, device, gen) -> torch.Tensor:
    """(B, max_blocks) int32: sequence b's first used[b] logical blocks on distinct shuffled pool blocks 1 ..
    n_pool - 1 (block 0 is the null block), every later entry 0."""
    free = torch.randperm(n_pool - 1, device=device, generator=gen) + 1
    table = torch.zeros(len(used), max_blocks, dtype=torch.int32, device=device)
    for b, n in enumerate(used):
        table[b, :n] = free[sum(used[:b]):sum(used[:b]) + n].int()
    return table


def page(logical: torch.Tensor, table: torch.Tensor, used: list, block: int, n_pool: int, device, gen,
         tokens_per_row: int = 1) -> torch.Tensor:
    """The logical store (B, H, rows, ...) scattered into a pool (1, H, n_pool * block // tokens_per_row, ...) as
    the table says (sequence b's first used[b] blocks; a last block past the store's rows only partly). Rows no
    sequence owns hold poison: NaN (float16 / bfloat16) or random bytes (payloads, whose scales there are NaN)."""
    B, H, rows = logical.shape[:3]
    r = block // tokens_per_row  # rows a block
    shape = (1, H, n_pool * r, *logical.shape[3:])
    if logical.is_floating_point() and logical.element_size() > 1:
        pool = torch.full(shape, float("nan"), device=device, dtype=logical.dtype)
    else:
        pool = torch.randint(0, 127, shape, device=device, generator=gen).to(logical.dtype)
    for b, n in enumerate(used):
        src = torch.arange(n * r, device=device)
        dst = (table[b, :n].long()[:, None] * r + torch.arange(r, device=device)).flatten()
        pool[0][:, dst[src < rows]] = logical[b][:, src[src < rows]]
    return pool


def paged_inputs(inputs: dict, kind: str, device, gen) -> dict:
    """decode_attention_case's inputs with the full cache's recent store (kind bf16) or the older store paged: pools of
    PAGE_BLOCK-token blocks (the recent pool as an .expand over the batch, as a cache shares one), shuffled."""
    paged = dict(inputs)
    B = inputs["q"].shape[0]
    if KINDS[kind] is None:
        used = [max(0, -(-(last + 1) // PAGE_BLOCK)) for last in inputs["recent_last"].tolist()]  # -1: finished
        n_pool = 1 + sum(used) + 2  # the null block and two spare ones
        table = block_table(used, -(-inputs["recent_k"].shape[2] // PAGE_BLOCK), n_pool, device, gen)
        for name in ("recent_k", "recent_v"):
            paged[name] = page(inputs[name], table, used, PAGE_BLOCK, n_pool, device, gen).expand(B, -1, -1, -1)
        return dict(paged, recent_table=table, recent_block=PAGE_BLOCK)
    F = flush_size(GROUP_SIZE, KINDS[kind][1])
    block = max(PAGE_BLOCK, F)
    used = [-(-n // block) for n in inputs["n_older"].tolist()]
    n_pool = 1 + sum(used) + 2
    table = block_table(used, -(-inputs["k_q"].shape[2] // block), n_pool, device, gen)
    for name in ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero"):
        if inputs.get(name) is not None:
            per_row = F if name in ("k_scale", "k_zero") else 1  # tokens per metadata row
            paged[name] = page(inputs[name], table, used, block, n_pool, device, gen, per_row)
    return dict(paged, older_table=table, older_block=block)


def check_decode_attention(tiny: bool, device, gen, dtype=torch.bfloat16):
    """Rows of (kernel, case description, n_older, error, tolerance, exception) for kernels/decode_attention.py."""
    from kernels.decode_attention import decode_attention
    from kernels.reference import decode_attention_ref

    for head_name, HQ, H, D in HEADS[tiny]:
        for length in LENGTHS[tiny]:
            cases = [(kind, B, False) for B in BATCHES[tiny] for kind in KINDS]
            cases += [(kind, BATCHES[tiny][-1], True) for kind in KINDS]  # paged: the largest batch
            for kind, B, paged in cases:
                case = f"{kind}{' paged' if paged else ''} {head_name} B{B} L{length}"
                try:
                    inputs, n_older = decode_attention_case(kind, B, HQ, H, D, length, dtype, device, gen)
                    kernel_inputs = paged_inputs(inputs, kind, device, gen) if paged else inputs
                    with poisoned_empty():
                        out = decode_attention(**kernel_inputs)
                    reference = decode_attention_ref(**dict(inputs, q=inputs["q"].double()))
                    err = rel_err(out, reference) if out.shape == inputs["q"].shape else float("nan")
                    yield "decode_attention", case, n_older, err, TOL[dtype], ""
                except Exception as e:  # a crash is a failure of this case; the others still run
                    yield "decode_attention", case, 0, float("nan"), TOL[dtype], crash_note(e)
                    continue
                if not paged and length == LENGTHS[tiny][-1] and B == BATCHES[tiny][-1]:
                    # the bfloat16-operand dots scripts/tune_decode.py tries, against the same reference
                    case += " bf16 dots"
                    try:
                        with poisoned_empty():
                            out = decode_attention(**inputs, dot_precision="bf16")
                        yield "decode_attention", case, n_older, rel_err(out, reference), TOL[dtype], ""
                    except Exception as e:
                        yield "decode_attention", case, 0, float("nan"), TOL[dtype], crash_note(e)


def poisoned_store(group: dict, n_groups: int, device) -> dict:
    """A store of n_groups flush groups, laid out as the reference's outputs for one group (`group`), filled with
    poison: NaN (float16 metadata) or 0xAB bytes (int8, uint8, float8 payloads)."""
    store = {}
    for name, t in group.items():
        if t is None:
            continue
        shape = (*t.shape[:2], t.shape[2] * n_groups, *t.shape[3:])
        if t.element_size() == 1:
            store[name] = torch.full(shape, 0xAB, dtype=torch.uint8, device=device).view(t.dtype)
        else:
            store[name] = torch.full(shape, float("nan"), dtype=t.dtype, device=device)
    return store


def reference_store(k, v, bits, k_granularity) -> dict:
    """kernels/quantize.py's quantize_keys / quantize_values of k, v (B, H, N, D) in float32, on their device: what
    quantize_kv's PyTorch path stores there, which its Triton path must match byte for byte."""
    out = dict(zip(("k_q", "k_scale", "k_zero"), quantize_keys(k.float(), bits, k_granularity, GROUP_SIZE)))
    out.update(zip(("v_q", "v_scale", "v_zero"), quantize_values(v.float(), bits, GROUP_SIZE)))
    return out


def differing_bytes(store: dict, before: dict, expected: dict, start: int, n: int, F: int) -> tuple[int, int, str]:
    """(bytes that differ from what quantize_into must leave, bytes compared, first buffer that differs): tokens
    start .. start + n - 1 must hold the reference's bytes, every other row its poison."""
    as_bytes = lambda t: t.cpu().contiguous().view(torch.uint8)  # noqa: E731
    wrong, total, first = 0, 0, ""
    for name, t in store.items():
        per_row = F if name in ("k_scale", "k_zero") else 1  # tokens per metadata row (keys per channel: F)
        lo, hi = start // per_row, (start + n) // per_row
        want = as_bytes(before[name]).clone()
        want[:, :, lo:hi] = as_bytes(expected[name])
        diff = int((as_bytes(t) != want).sum())
        wrong, total = wrong + diff, total + want.numel()
        first = first or (f"{name}: {diff} bytes differ" if diff else "")
    return wrong, total, first


def quantize_into_case(kind, B, H, D, length, dtype, device, gen):
    """One flush of quantize_kv's decode step (the last group of the store) and one bulk write of many tiles ending
    at the store's end (its scratch group included), as the cache lays them out after `length` tokens: the source is
    a ring of 16-bit tokens read through a row index; the store holds the older tokens (whole flush groups) plus one
    scratch group. Yields (what, start, n_rows, inputs)."""
    bits, k_granularity = KINDS[kind]
    F = flush_size(GROUP_SIZE, k_granularity)
    capacity = max(F, (length - SINK_SIZE - WINDOW_SIZE) // F * F)
    bulk = max(F, min(capacity // 2, 4096) // F * F)
    for what, start, n_rows in (("flush", capacity - F, F), ("bulk", capacity + F - bulk, bulk)):
        n_src = n_rows + WINDOW_SIZE + 7  # more ring slots than rows: the index picks them
        k = torch.randn(B, H, n_src, D, device=device, generator=gen).to(dtype)
        v = torch.randn(B, H, n_src, D, device=device, generator=gen).to(dtype)
        k[:, :, :, 3] *= 20  # an outlier channel
        rows = torch.randperm(n_src, device=device, generator=gen)[:n_rows]
        k[:, :, rows[0]] = 0  # an all-zero token: scale 0
        one_group = reference_store(torch.zeros(B, H, F, D), torch.zeros(B, H, F, D), bits, k_granularity)
        store = poisoned_store(one_group, capacity // F + 1, device)  # + the scratch group
        yield what, start, n_rows, dict(k=k, v=v, rows=rows, start=torch.tensor([start], device=device),
                                        store=store, bits=bits, k_granularity=k_granularity, F=F)


def check_quantize_into(tiny: bool, device, gen, dtype=torch.bfloat16):
    """Rows of (kernel, case description, start, error, tolerance, exception) for kernels/quantize_append.py: the
    fraction of bytes that differ from kernels/quantize.py's (tolerance 0: bit for bit)."""
    from kernels.quantize_append import quantize_into

    for head_name, _, H, D in HEADS[tiny]:
        for length in LENGTHS[tiny]:
            for kind, spec in KINDS.items():
                if spec is None:  # the 16-bit full cache quantizes nothing
                    continue
                B = 2
                try:
                    for what, start, n_rows, c in quantize_into_case(kind, B, H, D, length, dtype, device, gen):
                        case = f"{kind} {what} {head_name} B{B} N{n_rows}"
                        store, before = c["store"], {name: t.clone() for name, t in c["store"].items()}
                        quantize_into(c["k"], c["v"], c["rows"], c["start"], store["k_q"], store["k_scale"],
                                      store.get("k_zero"), store["v_q"], store["v_scale"], store.get("v_zero"))
                        expected = reference_store(c["k"][:, :, c["rows"]], c["v"][:, :, c["rows"]], c["bits"],
                                                   c["k_granularity"])
                        wrong, total, first = differing_bytes(store, before, expected, start, n_rows, c["F"])
                        yield "quantize_into", case, start, wrong / total, 0.0, first
                except Exception as e:  # a crash is a failure of this case; the others still run
                    yield ("quantize_into", f"{kind} {head_name} L{length}", 0, float("nan"), 0.0,
                           crash_note(e))


CHECKS = [check_decode_attention, check_quantize_into]  # one generator per kernel file; add new kernels here


def check_device(device: torch.device, tiny: bool):
    """Raise ValueError (one line naming the fix) unless the kernels can run on `device` as asked; with --tiny on
    the CPU, choose Triton's interpreter (before triton is imported)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible: run on a GPU, or with --tiny on the CPU "
                         "(Triton interpreter)")
    if device.type == "cpu" and not tiny:
        raise ValueError("no GPU: the real shapes would run for many minutes in Triton's CPU interpreter; run on a "
                         "GPU, or add --tiny (small shapes on the CPU, interpreted)")
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1" and not tiny:
        raise ValueError("TRITON_INTERPRET=1 would interpret the real shapes for many minutes: unset it to check "
                         "the compiled kernels, or add --tiny")
    if device.type == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("triton was imported before --tiny could choose its interpreter: run "
                             "`TRITON_INTERPRET=1 python -m scripts.gpu_check --tiny`")
        os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes; on the CPU (no GPU) in Triton's interpreter (sets TRITON_INTERPRET=1)")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run's random inputs (default: fresh)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        check_device(device, args.tiny)
    except (ValueError, RuntimeError) as e:  # RuntimeError: torch's for a device name it does not know
        sys.exit(f"error: {e}")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    gen = torch.Generator(device=device).manual_seed(seed)
    name = device_name(device) + (", Triton interpreter" if device.type == "cpu" else "")
    print(f"gpu_check on {name}: torch {torch.__version__}, seed {seed}{', tiny shapes' if args.tiny else ''}")
    print("| kernel | case | n_older | rel err | tol | result |\n|---|---|---|---|---|---|", flush=True)
    failures, t0 = 0, time.time()
    for check in CHECKS:
        for kernel, case, n_older, err, tol, error in check(args.tiny, device, gen):
            ok = err <= tol  # NaN compares False
            failures += not ok
            result = "ok" if ok else f"FAIL {error or ('NaN left in output' if err != err else 'error too large')}"
            print(f"| {kernel} | {case} | {n_older} | {err:.2e} | {tol:.0e} | {result} |", flush=True)
    print(f"{'FAILED' if failures else 'passed'}: {failures} failing case(s), {time.time() - t0:.0f} s, seed {seed}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
