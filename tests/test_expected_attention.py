"""expected_attention (kv_cache/expected_attention.py) against a float64 reference written out here: query statistics
from the raw queries, RoPE as explicit rotation matrices averaged over the future positions, the closed-form
expected attention per query head, summed per KV head, times the value norms, and each head's best candidates.
Decode outputs against attention over what each head holds, in float64; its bytes are the shared layout's
(tests/test_evict.py). Batched, paged, compiled and fused-kernel runs take it in tests/test_batch.py,
tests/test_paged.py, tests/test_compile.py and tests/test_kernels.py."""
import math

import pytest
import torch

import kv_cache
from test_evict import held_scores

S, W, BUDGET, N_FUTURE = 2, 3, 9, 8
HQ, H, D, T, LENGTH = 4, 2, 16, 20, 40

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def inv_freq():
    return 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def rope_matrix(p: int) -> torch.Tensor:
    """RoPE at position p as a D x D matrix acting on column vectors: channel i and i + D/2 turn by p * theta_i."""
    m = torch.zeros(D, D, dtype=torch.float64)
    for i, theta in enumerate(inv_freq().tolist()):
        c, s = math.cos(p * theta), math.sin(p * theta)
        j = i + D // 2
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def tables():
    angles = torch.outer(torch.arange(LENGTH, dtype=torch.float64), inv_freq())
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def reference_kept(q, k, v, rotation=None):
    """Per KV head, the positions kept beyond sinks and window, and every token's score (H, T)."""
    keys = torch.stack([k[:, t] @ rope_matrix(t).T for t in range(T)], dim=1)  # (H, T, D), rotated
    r_bar = sum(rope_matrix(p) for p in range(T, T + N_FUTURE)) / N_FUTURE
    if rotation is not None:
        keys = keys @ rotation
    scores = torch.zeros(H, T, dtype=torch.float64)
    for hq in range(HQ):
        x = q[hq, S:]  # (T - S, D)
        mean, cov = x.mean(0), torch.cov(x.T)
        mean, cov = r_bar @ mean, r_bar @ cov @ r_bar.T
        if rotation is not None:
            mean, cov = rotation.T @ mean, rotation.T @ cov @ rotation
        kh = keys[hq // (HQ // H)]
        logits = torch.stack([kh[t] @ mean / math.sqrt(D) + kh[t] @ cov @ kh[t] / (2 * D) for t in range(T)])
        scores[hq // (HQ // H)] += logits.softmax(0)
    scores *= v.norm(dim=-1)
    candidates = list(range(S, T - W))
    kept = [sorted(sorted(candidates, key=lambda t: -scores[h, t])[:BUDGET - S - W]) for h in range(H)]
    return kept, scores


def random_inputs(seed=11):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(HQ, T + 3, D, generator=gen, dtype=torch.float64) + torch.randn(HQ, 1, D, generator=gen,
                                                                                    dtype=torch.float64)
    k = torch.randn(H, T + 3, D, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(H, T + 3, D, generator=gen, dtype=torch.float64) * torch.rand(H, T + 3, 1, generator=gen,
                                                                                   dtype=torch.float64)
    return q, k, v


def make(**options):
    """The reference scores each token alone: --kernel_size 1 (pooling is tests/test_evict.py's)."""
    return kv_cache.STRATEGIES["expected_attention"](1, 64, H, D, torch.float64, "cpu", sink_size=S, window_size=W,
                                                     budget=BUDGET, n_future=N_FUTURE, kernel_size=1, **options)


def test_keeps_what_the_reference_keeps_and_never_revises():
    q, k, v = random_inputs()
    cache = make()
    cos, sin = tables()
    cache(q[None, :, :T], k[None, :, :T], v[None, :, :T], torch.arange(T), cos, sin, torch.tensor([0]))
    kept, scores = reference_kept(q[:, :T], k[:, :T], v[:, :T])
    assert cache.older_tokens(0) == kept
    for h in range(H):
        for t, got in held_scores(cache, 0, h).items():
            assert abs(got - scores[h, t].item()) < 1e-6 * scores[h].max().item()
    for p in range(T, T + 3):  # the budget is full: tokens leaving the window are dropped, the choice stays
        out = cache(q[None, :, p:p + 1], k[None, :, p:p + 1], v[None, :, p:p + 1], torch.tensor([[p]]), cos, sin)
        assert cache.older_tokens(0) == kept
        torch.testing.assert_close(out[0, :, 0], reference_output(q[:, p], k, v, p, kept), rtol=0, atol=1e-5)


def reference_output(q, k, v, p, kept):
    """Decode attention at position p (q (HQ, D)) over what each KV head holds: sinks, its kept tokens, the window
    ending at p; RoPE as matrices."""
    out = torch.zeros(HQ, D, dtype=torch.float64)
    for hq in range(HQ):
        h = hq // (HQ // H)
        held = sorted(set(range(S)) | set(kept[h]) | set(range(p - W + 1, p + 1)))
        keys = torch.stack([k[h, t] @ rope_matrix(t).T for t in held])
        probs = (keys @ (q[hq] @ rope_matrix(p).T) / math.sqrt(D)).softmax(0)
        out[hq] = probs @ v[h, held]
    return out


def test_rotated_storage_keeps_the_same_tokens():
    """--rotate leaves the expected attention unchanged (the statistics are rotated with the keys)."""
    q, k, v = random_inputs(seed=12)
    cos, sin = tables()
    caches = [make(then_bits="8"), make(then_bits="8", rotate="hadamard")]
    for cache in caches:
        cache(q[None, :, :T], k[None, :, :T], v[None, :, :T], torch.arange(T), cos, sin, torch.tensor([0]))
    assert caches[0].older_tokens(0) == caches[1].older_tokens(0) == reference_kept(q[:, :T], k[:, :T], v[:, :T])[0]


def test_bad_n_future_is_one_line():
    with pytest.raises(ValueError, match="--n_future must be a whole number >= 1"):
        kv_cache.STRATEGIES["expected_attention"].check_options(dict(n_future=0), 128, 64)
