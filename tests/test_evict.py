"""The eviction policies (kv_cache/snapkv.py, h2o.py, tova.py on kv_cache/evict.py) against an explicit reference:
a per-head Python simulation in float64 that holds token positions in lists, scores them as the papers do (H2O:
attention accumulated over every query; TOVA: the current query's; SnapKV: the observation window's, average-pooled
over neighbouring positions) and evicts by the documented rule. Which tokens each head keeps must match exactly,
and so must every attention output (to float32 tolerance); hand-set scores decide a replacement exactly; the bytes
a cache allocates are its layout's, to the byte. Generation-level checks (budget >= tokens equals full, batches
equal one by one, paged equals contiguous, compile) live with the other strategies in tests/test_batch.py,
tests/test_paged.py, tests/test_compile.py and tests/test_kernels.py."""
import math

import pytest
import torch

import kv_cache
from kernels.quantize import dequantize_block, quantize_keys, quantize_planes, quantize_values, unpack_bits
from kv_cache.rotation import rotation_matrix
from kv_cache.stores import QuantizedStore

S, W, BUDGET = 2, 3, 9  # kept = 4 slots per head
HQ, H, D = 4, 2, 8
PROMPT, STEPS = 12, 10


class Reference:
    """One sequence, per KV head: sinks and window by position, `kept` in slot order, scores by position, and the
    tokens each head has room for (adaptive: what it won at the prompt when the prompt overflowed the budget)."""

    def __init__(self, policy: str, kernel_size: int, adaptive: bool = False, floor: int = 0, fine_size: int = 0,
                 group_size: int = 0, obs_window: int = W, pooling: str = "centered", decode_kernel_size: int = 1,
                 accumulate: str = "sum", then_bits: str = None, rotation=None):
        self.policy, self.kernel_size, self.adaptive, self.floor = policy, kernel_size, adaptive, floor
        self.pooling, self.decode_kernel_size = pooling, decode_kernel_size
        self.accumulate = accumulate  # h2o: the attention received summed, or its mean over the queries that paid it
        self.obs_window = obs_window  # snapkv: the last prompt queries that score
        self.k, self.v = {}, {}
        self.kept = [[] for _ in range(H)]
        self.score = [{} for _ in range(H)]
        self.room = [BUDGET - S - W] * H
        # Kept tokens quantized: --then_bits codes per token (groups of group_size channels for int4 / int2, one
        # scale a head for int8 / fp8), or mixed precision's (fine_size > 0) 2-bit planes of a 4-bit code, fine
        # ones with both; with --rotate (rotation R, keys and values) the codes of x R, read back times R^T.
        self.then_bits, self.rotation = then_bits, rotation
        self.fine_size, self.group_size = fine_size, group_size
        self.fine = [set() for _ in range(H)]
        self.demoted = 0

    def stored(self, x, h, t):
        """Head h's key or value of position t as the cache attends to it: kept tokens dequantized in float64 from
        their --then_bits codes or their planes (mixed precision), everything else as given. The quantizer is
        kernels/quantize.py's, whose codes tests/test_quantize.py holds to its own reference: what this checks is
        which tokens are quantized, when, at which precision, and how the rotation wraps them."""
        if t not in self.kept[h] or not (self.fine_size or self.then_bits):
            return x[t][h].double()
        r, G = self.rotation, self.group_size
        y = (x[t][h] if r is None else x[t][h] @ r).view(1, 1, 1, D)
        if self.then_bits:
            bits = self.then_bits
            codes = quantize_keys(y, bits, "token", G) if x is self.k else quantize_values(y, bits, G)
            read = dequantize_block(*codes, bits, "token", G, D, torch.float64).flatten()
        else:
            hi, lo, scale, zero = quantize_planes(y, G)
            low = unpack_bits(lo, 2, D).double() if t in self.fine[h] else torch.full((D,), 1.5, dtype=torch.float64)
            codes = (unpack_bits(hi, 2, D).double() * 4 + low).view(-1, G)
            read = (codes * scale.double().view(-1, 1) + zero.double().view(-1, 1)).flatten()
        return read if r is None else read @ r.T

    def probs(self, h, q, positions):
        """Attention (group heads, len(positions)) of q (group heads, D) over the head's tokens, float64."""
        keys = torch.stack([self.stored(self.k, h, p) for p in positions])
        return (q.double() @ keys.T / math.sqrt(D)).softmax(-1)

    def attend(self, q, positions_of_head):
        out = torch.zeros(HQ, D, dtype=torch.float64)
        group = HQ // H
        probs = []
        for h in range(H):
            p = self.probs(h, q[h * group:(h + 1) * group], positions_of_head[h])
            out[h * group:(h + 1) * group] = p @ torch.stack([self.stored(self.v, h, t) for t in positions_of_head[h]])
            probs.append(p.sum(0))
        return out, probs

    def pooled(self, values: list, k: int) -> list:
        """Each value averaged over its k neighbours in the list (the held tokens in position order) as many as
        exist: centred, or with --pooling forward the k up to it."""
        around = (lambda i: range(i - k + 1, i + 1)) if self.pooling == "forward" else \
            (lambda i: range(i - k // 2, i + k // 2 + 1))
        return [sum(values[j] for j in around(i) if 0 <= j < len(values)) /
                sum(1 for j in around(i) if 0 <= j < len(values)) for i in range(len(values))]

    def keep_fine(self, h, t, replaced):
        """Mixed precision: head h keeps position t, in place of `replaced` (None: a free slot). It is fine if the
        replaced token was, or a fine place is free, or it outscores the lowest fine token (demoted)."""
        fine, score = self.fine[h], self.score[h]
        if replaced in fine:
            fine.discard(replaced)
        elif len(fine) >= self.fine_size:
            slots = [i for i, p in enumerate(self.kept[h]) if p in fine]
            lowest = min(slots, key=lambda i: (score[self.kept[h][i]], i))
            if score[t] <= score[self.kept[h][lowest]]:
                return
            fine.discard(self.kept[h][lowest])
            self.demoted += 1
        fine.add(t)

    def prefill(self, q, k, v):
        """A first chunk of T tokens: q (HQ, T, D), k, v (H, T, D). Returns outputs (HQ, T, D)."""
        T = q.shape[1]
        for t in range(T):
            self.k[t], self.v[t] = k[:, t], v[:, t]
        outs = torch.stack([self.attend(q[:, t], [list(range(t + 1))] * H)[0] for t in range(T)], dim=1)
        queries = {"h2o": range(T), "tova": [T - 1], "snapkv": range(max(0, T - self.obs_window), T)}[self.policy]
        candidates = list(range(S, T - W))
        for h in range(H):
            mass = torch.zeros(T, dtype=torch.float64)
            for t in queries:
                mass[:t + 1] += self.attend(q[:, t], [list(range(t + 1))] * H)[1][h]
            if self.kernel_size > 1:  # --kernel_size: pooled over neighbouring positions (snapkv's default)
                mass = torch.tensor(self.pooled(mass.tolist(), self.kernel_size), dtype=torch.float64)
            if self.accumulate == "mean":  # token t was attended by the T - t queries from t on
                mass = mass / torch.arange(T, 0, -1, dtype=torch.float64)
            self.score[h] = {t: float(mass[t]) for t in range(T)}
            best = sorted(candidates, key=lambda t: -self.score[h][t])[:BUDGET - S - W]
            self.kept[h] = sorted(best)
            self.fine[h] = set(best[:self.fine_size])
        M = BUDGET - S - W
        if self.adaptive and len(candidates) > M:  # AdaKV: each head its best `floor`, then the best of the rest
            kept = [sorted(candidates, key=lambda t: -self.score[h][t])[:self.floor] for h in range(H)]
            rest = sorted(((-self.score[h][t], h, t) for h in range(H) for t in candidates if t not in kept[h]))
            for _, h, t in rest[:H * M - sum(map(len, kept))]:
                kept[h].append(t)
            self.kept = [sorted(x) for x in kept]
            self.room = [len(x) for x in kept]
        self.length = T
        return outs

    def decode(self, q, k, v):
        p = self.length
        self.k[p], self.v[p] = k, v
        leaving = p - W
        for h in range(H):
            if leaving >= S:
                kept, score = self.kept[h], self.score[h]
                if len(kept) < self.room[h]:
                    kept.append(leaving)
                    replaced = None
                elif self.policy != "snapkv":
                    lowest = min(range(len(kept)), key=lambda i: (score[kept[i]], i))
                    replaced = kept[lowest]
                    if score[leaving] > score[kept[lowest]]:
                        kept[lowest] = leaving
                if self.fine_size and leaving in kept:
                    self.keep_fine(h, leaving, replaced)
            self.score[h][p] = 0.0
        held = [sorted(set(range(min(S, p + 1))) | set(range(max(S, p - W + 1), p + 1)) | set(self.kept[h]))
                for h in range(H)]
        out, probs = self.attend(q, held)
        for h in range(H):
            for t, prob in zip(held[h], self.pooled(probs[h].tolist(), self.decode_kernel_size)):
                if self.policy == "h2o" and self.accumulate == "mean":  # the queries t .. p - 1, then p's
                    self.score[h][t] = (self.score[h][t] * (p - t) + prob) / (p - t + 1)
                elif self.policy == "h2o":
                    self.score[h][t] += prob
                elif self.policy == "tova":
                    self.score[h][t] = prob
        self.length += 1
        return out


def identity_rope(length):
    return torch.ones(length, D), torch.zeros(length, D)


def held_scores(cache, row, h) -> dict:
    """{position: score} of what head h of sequence `row` holds in the older store (its run, in whatever lanes)."""
    start, n = int(cache.older_start[row, h]), int(cache.n_older[row, h])
    cells = cache.cells(torch.arange(start, start + n))
    return dict(zip(cache.older_pos[row].flatten()[cells].tolist(), cache.older_score[row].flatten()[cells].tolist()))


def make_cache(policy, batch=1, dtype=torch.float32, **options):
    cls = kv_cache.STRATEGIES[policy]
    # each token scored alone (--kernel_size 1) unless a test pools: the references below score token by token
    return cls(batch, 64, H, D, dtype, "cpu", **{"sink_size": S, "window_size": W, "budget": BUDGET,
                                                         "kernel_size": 1, **options})


@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
@pytest.mark.parametrize("policy,kernel_size,pooling", [("h2o", 1, "centered"), ("tova", 1, "centered"),
                                                        ("snapkv", 3, "centered"), ("h2o", 3, "centered"),
                                                        ("tova", 3, "centered"), ("tova", 3, "forward"),
                                                        ("snapkv", 5, "forward")])
def test_policy_keeps_what_the_reference_keeps(policy, kernel_size, pooling, head_budget):
    check_against_reference(policy, kernel_size, pooling, head_budget)


@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
@pytest.mark.parametrize("policy,pooling", [("tova", "centered"), ("tova", "forward"), ("h2o", "centered")])
def test_pooled_decode_scores_keep_what_the_reference_keeps(policy, pooling, head_budget):
    """--decode_kernel_size 3: each decode step's attention pooled over neighbouring held tokens of each head (under
    adaptive budgets, its run across lanes) before the scores take it; the tokens kept, outputs and scores are the
    reference's, and differ from unpooled decoding's."""
    pooled = check_against_reference(policy, 3, pooling, head_budget, decode_kernel_size=3)
    assert pooled.kept != check_against_reference(policy, 3, pooling, head_budget).kept or policy == "h2o"


@pytest.mark.parametrize("kernel_size,decode_kernel_size,head_budget", [(1, 1, "uniform"), (3, 3, "uniform"),
                                                                       (3, 3, "adaptive")])
def test_h2o_mean_keeps_what_the_reference_keeps(kernel_size, decode_kernel_size, head_budget):
    """--accumulate mean: each token's received attention divided by the queries that paid it (from its position on,
    prompt and decode steps), pooled or not; the tokens kept, outputs and scores are the reference's, and the
    choice differs from the sum's (which favours the earliest tokens)."""
    mean = check_against_reference("h2o", kernel_size, "centered", head_budget, decode_kernel_size, accumulate="mean")
    assert mean.kept != check_against_reference("h2o", kernel_size, "centered", head_budget, decode_kernel_size).kept


@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
def test_pooled_step_pools_each_heads_own_tokens(head_budget):
    """pooled_step on random probabilities in every column, held or not: each head's held tokens (its run, in
    whatever lanes, and the ring) averaged over their 3 neighbours in position order; every other column 0."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, heads, PROMPT, D, generator=gen) * 2 for heads in (HQ, H, H))
    cache = make_cache("tova", head_budget=head_budget, head_floor=0.25, decode_kernel_size=3)
    cache(q, k, v, torch.arange(PROMPT), *identity_rope(PROMPT), torch.tensor([0]))
    assert (len(set(cache.n_older[0].tolist())) > 1) == (head_budget == "adaptive")  # runs across lanes, or not
    n_slots = cache.older.n_slots
    probs = torch.rand(1, H, n_slots + cache.ring.n_slots, generator=gen)
    expected = torch.zeros_like(probs)
    older_probs, older_pos = probs[0, :, :n_slots].flatten(), cache.older_pos[0].flatten()
    for h in range(H):
        start, n = int(cache.older_start[0, h]), int(cache.n_older[0, h])
        held = [(int(older_pos[cell]), "older", cell) for cell in cache.cells(torch.arange(start, start + n)).tolist()]
        held += [(p, "ring", j) for j, p in enumerate(cache.ring.pos[0].tolist()) if p >= 0]
        held.sort()
        values = [float(older_probs[i] if part == "older" else probs[0, h, n_slots + i]) for _, part, i in held]
        for (_, part, i), pooled in zip(held, Reference("tova", 1).pooled(values, 3)):
            if part == "older":
                expected[0, i // n_slots, i % n_slots] = pooled
            else:
                expected[0, h, n_slots + i] = pooled
    assert torch.allclose(cache.pooled_step(probs), expected, atol=1e-6)


def test_h2o_mean_over_chunks_and_steps_is_the_mean_attention_received():
    """--accumulate mean, nothing evicted (budget 20): row 0 prefilled in two chunks (the kept store holds tokens
    before the second), row 1 in one, then both decode together at their own positions; each token's score, kept
    or in the ring, is the attention its KV head's queries paid it averaged over the queries from its position on,
    computed from the whole causal attention in float64."""
    gen = torch.Generator().manual_seed(3)
    lengths, steps = (14, 10), 3
    n = max(lengths) + steps
    q, k, v = (torch.randn(2, heads, n, D, generator=gen) for heads in (HQ, H, H))
    cache = make_cache("h2o", batch=2, budget=20, accumulate="mean")
    cos, sin = identity_rope(n)
    for row, chunks in ((0, ((0, 8), (8, 14))), (1, ((0, 10),))):
        for first, end in chunks:
            cache(q[row:row + 1, :, first:end], k[row:row + 1, :, first:end], v[row:row + 1, :, first:end],
                  torch.arange(first, end), cos, sin, torch.tensor([row]))
    for step in range(steps):
        at = torch.tensor([[length + step] for length in lengths])
        gather = lambda x: x.gather(2, at[:, None, :, None].expand(-1, x.shape[1], 1, D))  # noqa: E731
        cache(gather(q), gather(k), gather(v), at, cos, sin)
    for row, length in enumerate(lengths):
        m = length + steps
        logits = q[row, :, :m].double() @ k[row, :, :m].double().repeat_interleave(HQ // H, 0).transpose(1, 2)
        probs = (logits / math.sqrt(D)).masked_fill(~torch.ones(m, m, dtype=torch.bool).tril(), float("-inf"))
        received = probs.softmax(-1).view(H, HQ // H, m, m).sum(1)  # (H, queries, keys)
        for h in range(H):
            got = held_scores(cache, row, h)
            assert sorted(got) == list(range(S, m - W)), got  # past the sinks, out of the window: every one kept
            got.update({int(p): float(cache.ring_score[row, h, j]) for j, p in enumerate(cache.ring.pos[row])
                        if p >= 0})
            assert sorted(got) == list(range(m))
            for t, score in got.items():
                assert abs(score - float(received[h, t:, t].mean())) < 1e-5, (row, h, t)


@pytest.mark.parametrize("prompt", [S + W + 1, 3])
@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_pooled_decode_over_a_store_and_ring_still_filling(policy, prompt):
    """Short prompts: decoding starts with the kept store (and, for 3 tokens, the ring) part empty, so the pooling
    must skip the slots nothing holds, as the reference's held tokens do."""
    check_against_reference(policy, 3, "centered", "uniform", decode_kernel_size=3, prompt=prompt, steps=14)


def check_against_reference(policy, kernel_size, pooling, head_budget, decode_kernel_size=1, prompt=PROMPT,
                            steps=STEPS, accumulate="sum", then_bits=None, rotate="none") -> "Reference":
    gen = torch.Generator().manual_seed(7)
    T = prompt + steps
    # --then_bits in float64: the reference's quantizer gets the very inputs the cache's gets (rotated in float64)
    dtype = torch.float32 if then_bits is None else torch.float64
    q = (torch.randn(1, HQ, T, D, generator=gen) * 2).to(dtype)  # peaked attention: scores well apart, no near-ties
    k = (torch.randn(1, H, T, D, generator=gen) * 2).to(dtype)
    v = torch.randn(1, H, T, D, generator=gen).to(dtype)
    stored = {} if then_bits is None else dict(then_bits=then_bits, group_size=4, rotate=rotate)
    # pooled over 3 positions at most here: snapkv's default (15) spans this 12-token prompt, so every score would tie
    cache = make_cache(policy, dtype=dtype, head_budget=head_budget, head_floor=0.25, kernel_size=kernel_size,
                       pooling=pooling, decode_kernel_size=decode_kernel_size, **stored,
                       **({"accumulate": accumulate} if policy == "h2o" else {}))
    assert cache.rotate == (rotate != "none")
    ref = Reference(policy, kernel_size, head_budget == "adaptive", cache.opts.floor_size, pooling=pooling,
                    decode_kernel_size=decode_kernel_size, accumulate=accumulate,
                    then_bits=then_bits, group_size=4,
                    rotation=rotation_matrix(rotate, D, torch.float64, "cpu") if rotate != "none" else None)
    cos, sin = (x.to(dtype) for x in identity_rope(T))  # keys and queries unrotated: the reference needs no RoPE
    out = cache(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], torch.arange(prompt), cos, sin,
                torch.tensor([0]))
    ref_out = ref.prefill(q[0, :, :prompt], k[0, :, :prompt], v[0, :, :prompt])
    assert torch.allclose(out[0].double(), ref_out, atol=1e-5)
    assert cache.older_tokens(0) == ref.kept, "after the prompt"
    if head_budget == "adaptive":  # the heads' shares differ, and their sum is the budget's
        assert len(set(ref.room)) > 1 and sum(ref.room) == H * (BUDGET - S - W), ref.room
    for p in range(prompt, T):
        out = cache(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1], torch.tensor([[p]]), cos, sin)
        ref_out = ref.decode(q[0, :, p], k[0, :, p], v[0, :, p])
        assert torch.allclose(out[0, :, 0].double(), ref_out, atol=1e-5), f"output at position {p}"
        assert cache.older_tokens(0) == [sorted(kept) for kept in ref.kept], f"kept after position {p}"
        for h in range(H):  # the scores beside the kept tokens are the reference's
            got = held_scores(cache, 0, h)
            assert all(abs(got[t] - ref.score[h][t]) < 1e-4 for t in ref.kept[h]), (p, h)
    if policy == "tova":  # decoding replaced some prompt tokens (h2o's prompt tokens have accumulated more)
        assert any(t >= prompt - W for kept in ref.kept for t in kept)
    return ref


@pytest.mark.parametrize("policy,then_bits,rotate,head_budget", [
    ("h2o", "4", "hadamard", "uniform"), ("tova", "4", "signed_hadamard", "adaptive"),
    ("snapkv", "8", "none", "uniform"), ("snapkv", "4", "hadamard", "adaptive"),
    ("h2o", "fp8", "none", "adaptive"), ("h2o", "fp8", "none", "uniform"), ("tova", "2", "hadamard", "uniform")])
def test_quantized_kept_tokens_keep_what_the_reference_keeps(policy, then_bits, rotate, head_budget):
    """--then_bits, rotated or not, uniform and head-adaptive budgets: the tokens each head keeps, every output and
    the scores are those of the float64 reference whose kept tokens are rotated, quantized, read back and turned back
    (sinks and window exact); and the quantization shows: over what each head holds at the end, a query's
    attention differs with the kept tokens exact."""
    ref = check_against_reference(policy, 3 if policy == "snapkv" else 1, "centered", head_budget,
                                  then_bits=then_bits, rotate=rotate)
    q = torch.randn(HQ, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    held = [sorted(set(range(S)) | set(kept)) for kept in ref.kept]
    exact_kept = Reference(policy, 1)
    exact_kept.k, exact_kept.v, exact_kept.kept = ref.k, ref.v, ref.kept
    assert not torch.allclose(ref.attend(q, held)[0], exact_kept.attend(q, held)[0], atol=1e-3)


def test_snapkv_observation_window_scores_with_its_queries():
    """--obs_window: the last obs_window prompt queries score the prompt, not the last window_size."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, PROMPT, D, generator=gen) * 2 for n in (HQ, H, H))
    cos, sin = identity_rope(PROMPT)
    kept = {}
    for obs in (0, 9):
        cache = make_cache("snapkv", kernel_size=1, obs_window=obs)
        cache(q, k, v, torch.arange(PROMPT), cos, sin, torch.tensor([0]))
        ref = Reference("snapkv", 1, obs_window=obs or W)
        ref.prefill(q[0], k[0], v[0])
        assert cache.older_tokens(0) == ref.kept, obs
        kept[obs] = ref.kept
    assert kept[0] != kept[9]  # the window's queries and the wider observation's choose differently here


@pytest.mark.parametrize("rotate", ["none", "hadamard"])
@pytest.mark.parametrize("prompt", [PROMPT, S + W + 1])
@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv"])
def test_mixed_precision_keeps_what_the_reference_keeps(policy, prompt, rotate):
    """--then_bits 2 --fine_share 0.5: the 4 kept tokens of a head at 2 bits, its best-scored 2 with their low planes
    too (4 bits). Which tokens each head keeps, which of them at 4 bits, and every output match a float64 reference
    that dequantizes each kept token by its precision (rotated: the planes of kR, read back times R^T; then in
    float64, so the reference's codes round as the cache's); decoding demotes fine tokens that a newcomer outscores.
    A prompt with one token past sinks and window leaves a 4-bit place free: decoding fills it first."""
    gen = torch.Generator().manual_seed(11)
    T = prompt + STEPS
    dtype = torch.float32 if rotate == "none" else torch.float64
    q = (torch.randn(1, HQ, T, D, generator=gen) * 2).to(dtype)
    k = (torch.randn(1, H, T, D, generator=gen) * 2).to(dtype)
    v = torch.randn(1, H, T, D, generator=gen).to(dtype)
    cache = make_cache(policy, dtype=dtype, then_bits="2", fine_share=0.5, group_size=4, rotate=rotate,
                       **(dict(kernel_size=3) if policy == "snapkv" else {}))
    assert cache.fine_size == 2 and cache.rotate == (rotate != "none")
    r = rotation_matrix(rotate, D, torch.float64, "cpu") if cache.rotate else None
    ref = Reference(policy, cache.opts.kernel_size, fine_size=2, group_size=4, rotation=r)
    cos, sin = (x.to(dtype) for x in identity_rope(T))

    def fine_tokens():
        older = cache.older
        return [{int(cache.older_pos[0, h, i]) for i in range(int(cache.n_older[0, h]))
                 if older.low_entry[0, h, i] >= 0}
                for h in range(H)]

    out = cache(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], torch.arange(prompt), cos, sin,
                torch.tensor([0]))
    assert torch.allclose(out[0].double(), ref.prefill(q[0, :, :prompt], k[0, :, :prompt], v[0, :, :prompt]),
                          atol=1e-5)
    assert cache.older_tokens(0) == ref.kept and fine_tokens() == ref.fine, "after the prompt"
    if prompt < PROMPT:
        assert all(len(fine) == 1 for fine in ref.fine)
    for p in range(prompt, T):
        out = cache(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1], torch.tensor([[p]]), cos, sin)
        ref_out = ref.decode(q[0, :, p], k[0, :, p], v[0, :, p])
        assert torch.allclose(out[0, :, 0].double(), ref_out, atol=1e-4), f"output at position {p}"
        assert cache.older_tokens(0) == [sorted(kept) for kept in ref.kept], f"kept after position {p}"
        assert fine_tokens() == ref.fine, f"4-bit tokens after position {p}"
    if policy == "tova":  # its scores are the current query's: newcomers outscore and demote fine tokens
        assert ref.demoted > 0
    check_planes(cache, 0, *((k, v) if r is None else (k @ r, v @ r)))  # the planes of what is stored


def check_planes(cache, row, k, v):
    """Every held token of sequence `row` (keys and values k, v (B, H, T, D) by position, stored as they are: no
    RoPE, no rotation) is stored as quantize_planes makes it, its high plane in its slot and, when fine, its low
    plane at its entry; the entries of a head are distinct and below fine_size."""
    older = cache.older
    for h in range(H):
        entries = []
        for slot in range(int(cache.n_older[row, h])):
            t, entry = int(cache.older_pos[row, h, slot]), int(older.low_entry[row, h, slot])
            for x, hi, lo in ((k, older.k_q, older.k_lo), (v, older.v_q, older.v_lo)):
                planes = quantize_planes(x[row:row + 1, h:h + 1, t:t + 1], older.group_size)
                assert torch.equal(hi[row, h, slot], planes[0][0, 0, 0]), (row, h, slot)
                if entry >= 0:
                    assert torch.equal(lo[row, h, entry], planes[1][0, 0, 0]), (row, h, slot, entry)
            entries += [entry] if entry >= 0 else []
        assert len(set(entries)) == len(entries) and all(0 <= e < cache.fine_size for e in entries), entries


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_mixed_precision_planes_stay_their_tokens_over_chunks(policy):
    """Two ragged prompts prefilled in chunks of 3 (tokens already kept are copied in their stored form; a coarse
    one has no low plane to get back), then decoded together: after every call each held token's planes are its
    own and its entry is one of its head's distinct 4-bit places."""
    gen = torch.Generator().manual_seed(5)
    T, lengths = 36, (21, 14)
    q, k, v = (torch.randn(2, n, T, D, generator=gen) * 2 for n in (HQ, H, H))
    cache = make_cache(policy, batch=2, budget=13, then_bits="2", fine_share=0.5, group_size=4, rotate="none")
    cos, sin = identity_rope(T)
    for row, length in enumerate(lengths):
        for first in range(0, length, 3):
            end = min(first + 3, length)
            cache(q[row:row + 1, :, first:end], k[row:row + 1, :, first:end], v[row:row + 1, :, first:end],
                  torch.arange(first, end), cos, sin, torch.tensor([row]))
            check_planes(cache, row, k, v)
    pos = torch.tensor(lengths)
    for _ in range(T - max(lengths)):
        step = lambda x: torch.stack([x[r, :, p] for r, p in enumerate(pos.tolist())])[:, :, None]  # noqa: E731
        cache(step(q), step(k), step(v), pos[:, None], cos, sin)
        pos += 1
        for row in range(2):
            check_planes(cache, row, k, v)


def test_hand_set_scores_decide_the_replacement():
    """h2o with the older store full: the token leaving the window replaces the head's lowest-scored older token only
    when it scores higher (head 0: 2.0 > 1.0 replaces slot 1; head 1: 0.5 < 1.0 is dropped)."""
    gen = torch.Generator().manual_seed(3)
    cache = make_cache("h2o")
    cos, sin = identity_rope(32)
    x = lambda heads, n: torch.randn(1, heads, n, D, generator=gen)  # noqa: E731
    cache(x(HQ, PROMPT), x(H, PROMPT), x(H, PROMPT), torch.arange(PROMPT), cos, sin, torch.tensor([0]))
    before = cache.older_pos[0, :, :4].tolist()
    cache.older_score[0] = 0.0
    cache.older_score[0, 0, :4] = torch.tensor([5.0, 1.0, 7.0, 3.0])
    cache.older_score[0, 1, :4] = torch.tensor([1.0, 4.0, 2.0, 6.0])
    leaving = PROMPT - W  # the token position PROMPT pushes out of the window
    slot = int(cache.ring.slots(torch.tensor(leaving)))
    assert int(cache.ring.pos[0, slot]) == leaving
    cache.ring_score[0, :, slot] = torch.tensor([2.0, 0.5])
    cache(x(HQ, 1), x(H, 1), x(H, 1), torch.tensor([[PROMPT]]), cos, sin)
    assert cache.older_pos[0, 0, :4].tolist() == [before[0][0], leaving, before[0][2], before[0][3]]
    assert cache.older_pos[0, 1, :4].tolist() == before[1]


@pytest.mark.parametrize("policy", ["h2o", "expected_attention"])  # the layout is the policies' shared one
@pytest.mark.parametrize("head_budget", ["uniform", "adaptive"])
@pytest.mark.parametrize("then_bits", [None, "8", "4", "fp8"])
def test_bytes_are_the_layout(then_bits, head_budget, policy):
    """nbytes counts every buffer (ring, older store, scores, positions, each head's count, start and room) and
    bytes_per_token is what one more slot of the older store costs, to the byte. Head-adaptive budgets cost the
    same bytes: the heads share one run of H x (budget - sinks - window) slots (the sum, not heads x the most one
    head may keep)."""
    options = dict(then_bits=then_bits, group_size=4, head_budget=head_budget)
    B, ring, kept_slots = 3, S + W, BUDGET - S - W + 1  # + the scratch slot
    cache = make_cache(policy, batch=B, **options)
    if then_bits is None:
        kept = 2 * B * H * kept_slots * D * 4
    else:
        kept = B * H * kept_slots * QuantizedStore.bytes_per_token(cache.opts.format, 4, "token", D)
    expected = (2 * B * H * ring * D * 4 + B * ring * 8  # ring keys, values and positions
                + kept + B * H * (ring + kept_slots) * 4 + B * H * kept_slots * 4  # scores, positions
                + 3 * B * H * 8)  # each head's count, start and room
    assert cache.nbytes() == expected
    cls = kv_cache.STRATEGIES[policy]
    bigger = cls(B, 64, H, D, torch.float32, "cpu", sink_size=S, window_size=W, budget=BUDGET + 1, **options)
    assert bigger.nbytes() - cache.nbytes() == B * cls.bytes_per_token(cache.opts, H, D, torch.float32)


def test_mixed_precision_bytes_are_the_layout():
    """--fine_share 0.5: every kept slot a 2-bit token (payload, the 4-bit code's scales and zero-points) and its
    int16 low-plane entry, plus low planes of keys and values for 2 tokens a head (and a scratch entry). (At this
    tiny head_dim the metadata outweighs the planes; at 64 channels, groups of 32, a token costs 48 bytes at int2,
    66 here, 80 at int4.)"""
    B, ring, kept_slots, fine = 3, S + W, BUDGET - S - W + 1, 2
    cache = make_cache("h2o", batch=B, then_bits="2", group_size=4, fine_share=0.5)
    kept = B * H * kept_slots * (QuantizedStore.bytes_per_token(cache.opts.format, 4, "token", D) + 2)
    expected = (2 * B * H * ring * D * 4 + B * ring * 8 + kept + 2 * B * H * (fine + 1) * D // 4
                + B * H * (ring + kept_slots) * 4 + B * H * kept_slots * 4 + 3 * B * H * 8)
    assert cache.nbytes() == expected
    assert make_cache("h2o", batch=B, then_bits="2", group_size=4).nbytes() < cache.nbytes()
    bigger = make_cache("h2o", batch=B, then_bits="2", group_size=4, fine_share=0.5, budget=BUDGET + 2)  # 3 fine
    per_token = kv_cache.STRATEGIES["h2o"].bytes_per_token(cache.opts, H, D, torch.float32)
    assert bigger.nbytes() - cache.nbytes() == 2 * B * per_token


def test_bad_options_are_one_line_errors():
    cls = kv_cache.STRATEGIES["snapkv"]
    with pytest.raises(ValueError, match="--budget 10 leaves no room.*use --budget 49"):
        cls.check_options(dict(budget=10), 128, 64)
    with pytest.raises(ValueError, match="--kernel_size must be an odd"):
        cls.check_options(dict(kernel_size=4), 128, 64)
    with pytest.raises(ValueError, match="--pooling 'back' is not supported: use centered or forward"):
        cls.check_options(dict(pooling="back"), 128, 64)
    with pytest.raises(ValueError, match="--head_budget 'even' is not supported: use uniform or adaptive"):
        cls.check_options(dict(head_budget="even"), 128, 64)
    with pytest.raises(ValueError, match="--obs_window must be a whole number of queries >= 0"):
        cls.check_options(dict(obs_window=-1), 128, 64)
    with pytest.raises(ValueError, match="--fine_share .* needs --then_bits 2 and --head_budget uniform"):
        cls.check_options(dict(then_bits="4", fine_share=0.5), 128, 64)
    with pytest.raises(ValueError, match="--fine_share must be a share between 0 and 1"):
        cls.check_options(dict(then_bits="2", fine_share=2), 128, 64)
    with pytest.raises(ValueError, match="is 0 tokens at 4 bits: it must be 1 to 32767"):
        cls.check_options(dict(then_bits="2", fine_share=0.001, budget=100), 128, 64)
    with pytest.raises(ValueError, match="is 40000 tokens at 4 bits: it must be 1 to 32767"):
        cls.check_options(dict(then_bits="2", fine_share=1, budget=40048), 128, 64)
    with pytest.raises(ValueError, match="--group_size 48 must divide head_dim 64"):
        kv_cache.STRATEGIES["h2o"].check_options(dict(then_bits="4", group_size=48), 128, 64)
    with pytest.raises(ValueError, match="--decode_kernel_size must be an odd whole number >= 1"):
        kv_cache.STRATEGIES["tova"].check_options(dict(decode_kernel_size=2), 128, 64)
    with pytest.raises(ValueError, match="snapkv never revises its choice while decoding, so --decode_kernel_size"):
        cls.check_options(dict(decode_kernel_size=3), 128, 64)
    with pytest.raises(ValueError, match="expected_attention never revises its choice while decoding, so --decode"):
        kv_cache.STRATEGIES["expected_attention"].check_options(dict(decode_kernel_size=3), 128, 64)


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
def test_a_budget_beyond_the_run_allocates_the_full_cache(policy):
    """A budget that holds every token a run can have (here 256 >= max_seq_length 16) evicts nothing: the cache is
    the full cache, the same bytes (not the budget's 16x) and the same outputs over a prompt and decode steps."""
    max_seq_length, prompt = 16, 6
    full = kv_cache.STRATEGIES["full"](1, max_seq_length, H, D, torch.float32, "cpu")
    cache = kv_cache.STRATEGIES[policy](1, max_seq_length, H, D, torch.float32, "cpu", sink_size=S, window_size=W,
                                        budget=256)
    assert cache.nbytes() == full.nbytes()
    assert kv_cache.STRATEGIES[policy].capacity(cache.opts, max_seq_length) == max_seq_length
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, max_seq_length, D, generator=gen) for n in (HQ, H, H))
    cos, sin = identity_rope(max_seq_length)
    for lo, hi in [(0, prompt), *((p, p + 1) for p in range(prompt, max_seq_length))]:
        pos = torch.arange(lo, hi) if lo == 0 else torch.tensor([[lo]])
        args = (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], pos, cos, sin)
        rows = (torch.tensor([0]),) if lo == 0 else ()
        assert torch.equal(cache(*args, *rows), full(*args, *rows)), f"position {lo}"
