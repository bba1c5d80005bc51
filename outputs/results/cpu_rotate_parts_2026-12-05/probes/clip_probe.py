"""Probe (2026-12-05, code of 11ef4e4): a per-group clipping search for the asymmetric int2 codes, monkeypatched into
kernels.quantize.quantize_asym: each group of 32 tries its [min, max] range shrunk about its centre by CLIP_RATIOS and
keeps the one of least squared error (r = 1, min/max, is among them, so the error per group never grows); CLIP_DIMS
-1 (values: per token) and/or -2 (keys: per channel). Run from the repository root with PYTHONPATH=. and
scripts.evaluate's arguments, --attn_impl torch (the PyTorch flush is the one patched), e.g.
  CLIP_DIMS=-1 PYTHONPATH=. python probes/clip_probe.py quantize_kv --bits 2 --rotate hadamard --attn_impl torch \
      --max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "" --json OUT.json"""
import os, sys, runpy, torch
import kernels.quantize as Q
RATIOS = [float(r) for r in os.environ.get("CLIP_RATIOS", "1,0.95,0.9,0.85,0.8,0.75,0.7,0.65,0.6").split(",")]
MAXBITS = int(os.environ.get("CLIP_MAXBITS", "2"))
orig = Q.quantize_asym
def clipped(x, bits, dim):
    if bits > MAXBITS or str(dim) not in os.environ.get('CLIP_DIMS','-1,-2').split(','):
        return orig(x, bits, dim)
    x = x.float()
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = None
    for r in RATIOS:
        zero = Q._half_down(mid - r * half)
        scale = Q._half_up(Q._divide(mid + r * half - zero.float(), levels))
        q = torch.round((x - zero.float()) * Q._reciprocal(scale)).clamp_(0, levels)
        err = ((q * scale.float() + zero.float() - x) ** 2).sum(dim, keepdim=True)
        if best is None:
            best = [err, q, scale, zero]
        else:
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better, q, best[1])
            best[2] = torch.where(better, scale, best[2])
            best[3] = torch.where(better, zero, best[3])
    return best[1].to(torch.uint8), best[2], best[3]
Q.quantize_asym = clipped
sys.argv = ["scripts.evaluate"] + sys.argv[1:]
runpy.run_module("scripts.evaluate", run_name="__main__")
