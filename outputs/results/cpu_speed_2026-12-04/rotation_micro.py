"""The rotation's cost at decode shapes on the CPU: the Walsh-Hadamard butterfly in PyTorch ops that
kv_cache/rotation.py used before commit 22f5100 (copied here) against what it uses now (one batched product of
1 x D rows), us a call.

    d=outputs/results/cpu_speed_2026-12-04; .venv/bin/python $d/rotation_micro.py > $d/rotation_micro.txt
"""
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402

from kv_cache.rotation import rotated, rotation_matrix  # noqa: E402


def butterfly(x, r):  # the removed rotated(), forward direction
    signs = r[:, 0].sign()
    y = x.to(r.dtype) * signs
    D, h = y.shape[-1], 1
    while h < D:
        pairs = y.unflatten(-1, (D // (2 * h), 2, h))
        low, high = pairs.select(-2, 0), pairs.select(-2, 1)
        y = torch.stack([low + high, low - high], dim=-2).flatten(-3)
        h *= 2
    return (y / math.sqrt(D)).to(x.dtype)


def us(fn, x, r, n=2000):
    fn(x, r)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x, r)
    return (time.perf_counter() - t0) / n * 1e6


r = rotation_matrix("hadamard", 64, torch.float32, "cpu")
print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
      f"{time.strftime('%Y-%m-%d')}")
for shape in [(1, 3, 1, 64), (1, 9, 1, 64), (8, 9, 1, 64), (1, 9, 512, 64)]:
    x = torch.randn(shape)
    assert torch.allclose(butterfly(x, r), rotated(x, r), atol=1e-5)
    print(f"{shape}: butterfly {us(butterfly, x, r):.1f} us, batched product {us(rotated, x, r):.1f} us")
