# Run from the repository root: python outputs/results/cpu_speed_2026-12-04/ab_kernel.py.
# A/B of the C kernel: the source before this session's change (adaptive chunks, contiguous only) against now
# (fixed 512-token chunks, rows through token_row), same arguments, interleaved calls, one layer at 1k / 4k / 8k.
import ctypes, subprocess, sys, time, statistics
sys.path.insert(0, ".")
import tempfile, os
tmp = tempfile.mkdtemp()
old_source = subprocess.run(["git", "show", "e08d31f:kernels/cpu_attention.c"], capture_output=True, text=True,
                            check=True).stdout
open(os.path.join(tmp, "old.c"), "w").write(old_source)
import torch
from kernels import cpu_attention as ca
from kernels.formats import get_format
from kv_cache.stores import QuantizedStore
subprocess.run(["cc", *ca.FLAGS, os.path.join(tmp, "old.c"), "-o", os.path.join(tmp, "old.so"), "-lm"], check=True)
old = ctypes.CDLL(os.path.join(tmp, "old.so")); old.older_attention.argtypes = [ctypes.POINTER(ca._Args)]
new = ca._load()
torch.set_num_threads(2)
for fmt, kg in (("8", "token"), ("4", "channel")):
    for n in (1024, 4096, 8192):
        store = QuantizedStore(1, 3, n, 64, get_format(fmt), 32, kg, "cpu")
        store.store(slice(0, 1), torch.arange(n)[None], torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64))
        q = torch.randn(1, 9, 64)
        times = {"old": [], "new": []}
        for rep in range(30):
            for name, lib in (("old", old), ("new", new)):
                # run through _run with the chosen library
                real = ca._lib
                ca._lib = lib
                t = time.perf_counter()
                for _ in range(10):
                    ca._run(q, *store.buffers_of(1), torch.tensor([n]), fmt, kg, 32)
                times[name].append((time.perf_counter() - t) / 10)
                ca._lib = real
        o, w = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"int{fmt if fmt != '8' else 8} {kg} n={n}: old {o*1e3:.3f} ms, new {w*1e3:.3f} ms, new/old {w/o:.3f}")
