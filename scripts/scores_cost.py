"""What returning the per-token attention scores costs on the CPU (the torch path the eviction policies use): one
layer's decode attention of the SmolLM2 shape (9 query heads, 3 KV heads, head_dim 64), float32, over N held
tokens: SDPA (kv_cache.base.attend) against the explicit softmax that also returns the probabilities per KV head
(attend_with_scores). Median of 200 calls, one thread.

    python -m scripts.scores_cost       # outputs/results/cpu_evict_2026-12-02/scores_cost.txt is one run
"""
import argparse
import statistics

import torch

from kv_cache.base import attend, attend_with_scores
from scripts.common import timed

CASES = ((1, 256), (1, 1024), (8, 1024), (1, 4096))  # (batch, tokens held)
CPU = torch.device("cpu")


def median_seconds(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    return statistics.median(timed(fn, CPU) for _ in range(calls))


def main(argv=None):
    argparse.ArgumentParser(prog="python -m scripts.scores_cost", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.set_num_threads(1)
    for B, N in CASES:
        q = torch.randn(B, 9, 1, 64)
        k, v = torch.randn(B, 3, N, 64), torch.randn(B, 3, N, 64)
        keep = torch.ones(B, N, dtype=torch.bool)
        plain = median_seconds(lambda: attend(q, k, v, keep.view(B, 1, 1, -1)))
        scored = median_seconds(lambda: attend_with_scores(q, k, v, keep))
        print(f"batch {B} tokens {N}: sdpa {plain * 1e6:.0f} us, with scores {scored * 1e6:.0f} us "
              f"({scored / plain:.2f}x)")


if __name__ == "__main__":
    main()
