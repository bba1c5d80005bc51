"""What returning the per-token scores costs on the CPU (torch path): one layer's decode attention of the SmolLM2
shape (9 query heads, 3 KV heads, head_dim 64), float32, over N held tokens: SDPA (kv_cache.base.attend) against the
explicit softmax that also returns the probabilities per KV head (attend_with_scores). Median of 200 calls."""
import statistics, sys, time
import torch
sys.path.insert(0, ".")
from kv_cache.base import attend, attend_with_scores

torch.set_num_threads(1)
for B, N in ((1, 256), (1, 1024), (8, 1024), (1, 4096)):
    q = torch.randn(B, 9, 1, 64)
    k, v = torch.randn(B, 3, N, 64), torch.randn(B, 3, N, 64)
    keep = torch.ones(B, N, dtype=torch.bool)
    def median(fn):
        for _ in range(10):
            fn()
        times = []
        for _ in range(200):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
        return statistics.median(times)
    plain = median(lambda: attend(q, k, v, keep.view(B, 1, 1, -1)))
    scored = median(lambda: attend_with_scores(q, k, v, keep))
    print(f"batch {B} tokens {N}: sdpa {plain * 1e6:.0f} us, with scores {scored * 1e6:.0f} us ({scored / plain:.2f}x)")
