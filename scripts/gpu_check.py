"""GPU correctness check: every Triton kernel in kernels/ against its float64 PyTorch reference, at real shapes.

    python scripts/gpu_check.py                                   # on a GPU: head_dim 64/128, GQA 3:1/4:1, 4k/32k
    TRITON_INTERPRET=1 python scripts/gpu_check.py --tiny         # no GPU: the same cases, small, interpreted

Each case draws fresh random inputs (the seed is printed; --seed repeats a run), poisons every buffer the kernel
allocates with NaN (so an unwritten element fails), and also NaN-fills the cache slots the kernel must not read (the
unused tail of a store, the ring slots already moved to the quantized store, scales past n_mid). Lengths are not
multiples of any block size. Pass: no NaN and ||out - ref|| / ||ref|| within the tolerance of the dtype. Prints a
table and exits 1 if any case fails.
"""
import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's CPU interpreter; set before triton is imported

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
from kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from kernels.quantize import quantize_keys, quantize_values  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
SINK_SIZE, WINDOW_SIZE, GROUP_SIZE = 16, 32, 32
# name, query heads, KV heads, head_dim: SmolLM2-135M (GQA 3:1) and Llama-3-8B (GQA 4:1), or small ones (--tiny).
HEADS = {False: [("d64-gqa3", 9, 3, 64), ("d128-gqa4", 32, 8, 128)],
         True: [("d64-gqa3", 3, 1, 64), ("d128-gqa4", 4, 1, 128)]}
LENGTHS = {False: [4096 + 37, 32768 + 41], True: [101, 187]}
# mid-store kind: (bits, key granularity); None = the full cache's 16-bit store only.
KINDS = {"bf16": None, "int8": (8, "token"), "fp8": ("fp8", "token"), "int4": (4, "channel"),
         "int2": (2, "channel"), "int4-token-keys": (4, "token")}


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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def quantized_mid(B, H, D, n_mid, bits, k_granularity, device, gen):
    """A mid store holding n_mid random tokens, quantized by kernels/quantize.py in the cache layout, with one
    scratch flush group of garbage past the end (payload random, scales NaN: reading them poisons the output)."""
    F = GROUP_SIZE if k_granularity == "channel" else 1
    k = torch.randn(B, H, n_mid, D, device=device, generator=gen)
    v = torch.randn(B, H, n_mid, D, device=device, generator=gen)
    mid = dict(zip(("k_q", "k_scale", "k_zero"), quantize_keys(k, bits, k_granularity, GROUP_SIZE)))
    mid.update(zip(("v_q", "v_scale", "v_zero"), quantize_values(v, bits, GROUP_SIZE)))
    for name, t in list(mid.items()):
        if t is None:
            continue
        rows = F if name == "k_q" or name.startswith("v") or k_granularity == "token" else 1
        if t.is_floating_point() and t.dtype != torch.float8_e4m3fn:
            tail = torch.full((B, H, rows, t.shape[3]), float("nan"), device=device, dtype=t.dtype)
        else:
            tail = torch.randint(0, 127, (B, H, rows, t.shape[3]), device=device, generator=gen).to(t.dtype)
        mid[name] = torch.cat([t, tail], dim=2)
    return mid, F


def decode_attention_case(kind, B, HQ, H, D, length, dtype, device, gen):
    """Inputs of one decode_attention call after `length` tokens were stored, as the caches lay them out."""
    q = torch.randn(B, HQ, 1, D, device=device, generator=gen).to(dtype)
    if KINDS[kind] is None:
        # Full cache: per-sequence last slots, the buffer longer than both; the tail is NaN and must not be read.
        hi_k = torch.randn(B, H, length + 77, D, device=device, generator=gen).to(dtype)
        hi_v = torch.randn(B, H, length + 77, D, device=device, generator=gen).to(dtype)
        hi_last = torch.tensor([length - 1 - 101 * b for b in range(B)], device=device)
        for b in range(B):
            hi_k[b, :, hi_last[b] + 1:] = hi_v[b, :, hi_last[b] + 1:] = float("nan")
        return dict(q=q, hi_k=hi_k, hi_v=hi_v, hi_last=hi_last), 0
    bits, k_granularity = KINDS[kind]
    S, W = SINK_SIZE, WINDOW_SIZE
    F = GROUP_SIZE if k_granularity == "channel" else 1
    n_mid = max(0, length - S - W) // F * F
    mid, F = quantized_mid(B, H, D, n_mid, bits, k_granularity, device, gen)
    # hi store (sinks + ring of W + F slots): each ring slot holds its latest position; the older ones among them
    # are already in the mid store, are masked by hi_pos, and hold NaN here.
    ring = W + F
    hi_pos = torch.full((S + ring,), -1, dtype=torch.long, device=device)
    pos = torch.arange(length, device=device)
    pos = pos[(pos < S) | (pos >= length - ring)]
    hi_pos.index_copy_(0, torch.where(pos < S, pos, S + (pos - S) % ring), pos)
    hi_k = torch.randn(B, H, S + ring, D, device=device, generator=gen).to(dtype)
    hi_v = torch.randn(B, H, S + ring, D, device=device, generator=gen).to(dtype)
    stale = (hi_pos < 0) | ((hi_pos >= S) & (hi_pos < S + n_mid))
    hi_k[:, :, stale] = hi_v[:, :, stale] = float("nan")
    return dict(q=q, hi_k=hi_k, hi_v=hi_v, hi_pos=hi_pos, sink_size=S, n_mid=torch.tensor([n_mid], device=device), **mid), n_mid


def check_decode_attention(tiny: bool, device, gen, dtype=torch.bfloat16):
    """Rows of (case description, n_mid, error, tolerance) for kernels/decode_attention.py."""
    for head_name, HQ, H, D in HEADS[tiny]:
        for length in LENGTHS[tiny]:
            for kind in KINDS:
                B = 2
                case = f"{kind} {head_name} B{B} L{length}"
                try:
                    inputs, n_mid = decode_attention_case(kind, B, HQ, H, D, length, dtype, device, gen)
                    with poisoned_empty():
                        out = decode_attention(**inputs)
                    reference = decode_attention_ref(**dict(inputs, q=inputs["q"].double()))
                    err = rel_err(out, reference) if out.shape == inputs["q"].shape else float("nan")
                    yield "decode_attention", case, n_mid, err, TOL[dtype], ""
                except Exception as e:  # a crash is a failure of this case; the others still run
                    yield "decode_attention", case, 0, float("nan"), TOL[dtype], f"{type(e).__name__}: {e}"[:200]


CHECKS = [check_decode_attention]  # one generator per kernel file; add new kernels here


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU, TRITON_INTERPRET=1)")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run's random inputs (default: fresh)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: Triton kernels need a GPU, or TRITON_INTERPRET=1 on the CPU (with --tiny)")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible: run with --device cpu --tiny "
                 "under TRITON_INTERPRET=1")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    gen = torch.Generator(device=device).manual_seed(seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter"
    print(f"gpu_check on {name}: torch {torch.__version__}, seed {seed}{', tiny shapes' if args.tiny else ''}")
    print(f"| kernel | case | n_mid | rel err | tol | result |\n|---|---|---|---|---|---|", flush=True)
    failures, t0 = 0, time.time()
    for check in CHECKS:
        for kernel, case, n_mid, err, tol, error in check(args.tiny, device, gen):
            ok = err <= tol  # NaN compares False
            failures += not ok
            result = "ok" if ok else f"FAIL {error or ('NaN left in output' if err != err else 'error too large')}"
            print(f"| {kernel} | {case} | {n_mid} | {err:.2e} | {tol:.0e} | {result} |", flush=True)
    print(f"{'FAILED' if failures else 'passed'}: {failures} failing case(s), {time.time() - t0:.0f} s, seed {seed}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
