"""--rotate (kv_cache/rotation.py): the matrix against the Walsh-Hadamard definition, quantize_kv against the
written-out reference of tests/test_kv_cache.py with every stored token rotated before it is quantized and rotated
back after, eviction against the same cache fed rotated inputs, and on the real model: rotated int2 loses less than
int2. Batched, paged, compiled and fused-kernel runs take rotated cases in tests/test_batch.py, test_paged.py,
test_compile.py and test_kernels.py."""
import pytest
import torch

import kv_cache
from kv_cache.rotation import hadamard, rotated, rotated_together, rotation_matrix
from test_kv_cache import (SCHEDULE, english_prose, group_quantizer, quantized_counts, random_tokens, reference_logits,
                           run, tiny_model)
from tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_hadamard_is_the_walsh_matrix_and_rotations_are_orthogonal():
    for n in (1, 2, 8, 64, 128):
        walsh = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                             dtype=torch.float64)
        assert torch.equal(hadamard(n), walsh)
    plain = rotation_matrix("hadamard", 64, torch.float64, "cpu")
    signed = rotation_matrix("signed_hadamard", 64, torch.float64, "cpu")
    for r in (plain, signed):
        torch.testing.assert_close(r @ r.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.equal(signed.abs(), plain.abs()) and not torch.equal(signed, plain)  # some rows flipped
    assert rotation_matrix("hadamard", 64, torch.bfloat16, "cpu").dtype == torch.float32  # computed in float32


@pytest.mark.parametrize("bits,rotate,parts", [("8", "hadamard", "keys_values"), ("4", "signed_hadamard", "keys"),
                                               ("2", "hadamard", "keys"), ("2", "hadamard", "keys_values"),
                                               ("fp8", "signed_hadamard", "keys")])
def test_rotated_quantize_kv_equals_reference(bits, rotate, parts):
    """Which tokens are quantized when is quantize_kv's (tests/test_kv_cache.py); here each key is stored as Q(kR)
    and read back times R^T, each value as Q(vR) read back times R^T (keys_values) or as Q(v) (keys): float64,
    exact to 1e-9."""
    S, W, G = 4, 8, 8
    options = dict(sink_size=S, window_size=W, group_size=G, bits=bits, rotate=rotate, rotate_parts=parts)
    model, tokens = tiny_model(), random_tokens(2, 88)
    out = run(model, "quantize_kv", options, tokens, SCHEDULE, 96)
    fmt_bits = {"8": 8, "4": 4, "2": 2, "fp8": "fp8"}[bits]
    k_granularity = "channel" if bits in ("4", "2") else "token"
    F = G if k_granularity == "channel" else 1
    r = rotation_matrix(rotate, model.args.head_dim, torch.float64, "cpu")
    plain = group_quantizer(S, F, fmt_bits, k_granularity, G, 88)
    if parts == "keys_values":
        rotated = lambda k, v: tuple(x @ r.T for x in plain(k @ r, v @ r))  # noqa: E731
    else:
        rotated = lambda k, v: (lambda k_read, v_read: (k_read @ r.T, v_read))(*plain(k @ r, v))  # noqa: E731
    counts = quantized_counts(SCHEDULE, S, W, F)
    ref = reference_logits(model, tokens, quantize=rotated, n_quantized=counts, sink_size=S)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    unrotated = reference_logits(model, tokens, quantize=plain, n_quantized=counts, sink_size=S)
    assert (out - unrotated).abs().max() > 1e-6  # the rotation changed what was quantized


@pytest.mark.parametrize("policy,parts", [("h2o", "keys_values"), ("snapkv", "keys_values"), ("snapkv", "keys")])
def test_rotated_eviction_is_the_cache_over_rotated_tokens(policy, parts):
    """An eviction cache with --rotate is the same cache without it fed qR, kR and vR, its output times R^T
    (keys_values), or qR, kR and v, its output as it is (keys); RoPE is the identity here, so before and after it
    are the same. The same tokens kept per head."""
    HQ, H, D, T, prompt = 4, 2, 16, 30, 14
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, T, D, generator=gen, dtype=torch.float64) * 2 for n in (HQ, H, H))
    cos, sin = torch.ones(T, D, dtype=torch.float64), torch.zeros(T, D, dtype=torch.float64)
    options = dict(sink_size=2, window_size=3, budget=9, then_bits="4", group_size=8)
    cls = kv_cache.STRATEGIES[policy]
    rotated_cache = cls(1, 64, H, D, torch.float64, "cpu", rotate="hadamard", rotate_parts=parts, **options)
    plain_cache = cls(1, 64, H, D, torch.float64, "cpu", rotate="none", **options)
    r = rotation_matrix("hadamard", D, torch.float64, "cpu")
    for start, stop in [(0, prompt)] + [(p, p + 1) for p in range(prompt, T)]:
        pos = torch.arange(start, stop) if stop - start > 1 else torch.tensor([[start]])
        rows = torch.tensor([0]) if stop - start > 1 else None
        x = [t[:, :, start:stop] for t in (q, k, v)]
        got = rotated_cache(*x, pos, cos, sin, rows)
        if parts == "keys_values":
            want = plain_cache(*(t @ r for t in x), pos, cos, sin, rows) @ r.T
        else:
            want = plain_cache(x[0] @ r, x[1] @ r, x[2], pos, cos, sin, rows)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert rotated_cache.older_tokens(0) == plain_cache.older_tokens(0)
    assert rotated_cache.nbytes() == plain_cache.nbytes()  # the matrix is not KV storage


def test_rotation_makes_int2_lose_less_on_smollm2(smollm2_model, smollm2_gguf_path):
    """SmolLM2's keys have outlier channels: on 256 tokens of prose fed in chunks of 64 (each chunk attends to the
    earlier ones through the int2 store), the logits' KL to the full cache's drops with the rotation (of the keys,
    --rotate_parts' default). Measured: KL 0.058 -> 0.013 (keys), 0.012 (keys and values); top-1 agreement 0.917 ->
    0.953 (keys), 0.969 (both); at 384 tokens in chunks of 32, 0.065 -> 0.025 (keys), 0.021 (both)."""
    tokenizer = load_tokenizer(smollm2_gguf_path)
    tokens = torch.tensor([tokenizer.encode(english_prose())[:256]])
    schedule = [64] * 4
    full = run(smollm2_model, "full", {}, tokens, schedule).log_softmax(-1)
    kl = {}
    for rotate in ("none", "hadamard"):
        out = run(smollm2_model, "quantize_kv", dict(bits="2", rotate=rotate), tokens, schedule).log_softmax(-1)
        kl[rotate] = (full.exp() * (full - out)).sum(-1)[:, 64:].mean().item()  # the chunks that read the store
    assert kl["hadamard"] < 0.5 * kl["none"], kl


@pytest.mark.parametrize("strategy,options,message", [
    ("quantize_kv", dict(bits="4", rotate="hadamard", key_rope="pre"), "drop --key_rope pre"),
    ("h2o", dict(budget=64, rotate="hadamard"), "add --then_bits"),
    ("quantize_kv", dict(bits="4", rotate="diagonal"), "use auto, none, hadamard, signed_hadamard"),
    ("quantize_kv", dict(bits="4", rotate_parts="values"), "use auto, keys, keys_values"),
    ("quantize_kv", dict(bits="4", rotate="none", rotate_parts="keys"), "drop --rotate_parts, or use --rotate hada"),
])
def test_rotate_refuses_what_cannot_work(strategy, options, message):
    with pytest.raises(ValueError, match=message):
        kv_cache.STRATEGIES[strategy].check_options(options, 128, 64)


@pytest.mark.parametrize("strategy,options,head_dim,applied", [
    ("quantize_kv", dict(bits="2"), 64, "hadamard"),
    ("quantize_kv", dict(bits="4"), 64, "hadamard"),
    ("quantize_kv", dict(bits="8"), 64, "none"),
    ("quantize_kv", dict(bits="fp8"), 64, "none"),
    ("quantize_kv", dict(bits="4", group_size=16), 48, "none"),  # no Sylvester matrix of 48: no rotation, no error
    ("quantize_kv", dict(bits="4", key_rope="pre"), 64, "none"),  # keys quantized before RoPE are never rotated
    ("quantize_kv", dict(bits="2", rotate="signed_hadamard"), 64, "signed_hadamard"),  # a rotation named: as named
    ("h2o", dict(budget=20, then_bits="2", group_size=16), 64, "hadamard"),
    ("h2o", dict(budget=20, then_bits="8"), 64, "none"),
    ("h2o", dict(budget=20), 64, "none"),
])
def test_auto_rotates_the_low_bit_formats(strategy, options, head_dim, applied):
    """--rotate's default, auto: hadamard for the 4- and 2-bit formats where head_dim is a power of two (measured:
    docs/results.md), none for int8, fp8, the model dtype, pre-RoPE keys and other head_dims; the cache built with
    it computes exactly what the cache with the rotation named computes."""
    cls = kv_cache.STRATEGIES[strategy]
    options = dict(sink_size=2, window_size=3, **options)
    auto = cls(1, 32, 2, head_dim, torch.float64, "cpu", **options)
    named = cls(1, 32, 2, head_dim, torch.float64, "cpu", **dict(options, rotate=applied))
    assert auto.rotate == (applied != "none") and auto.opts.rotate == options.get("rotate", "auto")
    if auto.rotate:
        assert torch.equal(auto.rotation, rotation_matrix(applied, head_dim, torch.float64, "cpu"))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 24, head_dim, generator=gen, dtype=torch.float64) for n in (4, 2, 2))
    cos, sin = torch.ones(32, head_dim, dtype=torch.float64), torch.zeros(32, head_dim, dtype=torch.float64)
    for cache in (auto, named):
        cache.out = cache(q, k, v, torch.arange(24), cos, sin, torch.tensor([0]))
    assert torch.equal(auto.out, named.out)


@pytest.mark.parametrize("strategy,options,rotates_values", [
    ("quantize_kv", dict(bits="2"), False),  # per-channel keys: the keys alone
    ("quantize_kv", dict(bits="4", k_granularity="token"), True),  # per-token keys: values too
    ("quantize_kv", dict(bits="2", rotate_parts="keys_values"), True),  # named: as named
    ("h2o", dict(budget=20, then_bits="2"), True),  # the eviction stores' keys are per token
    ("snapkv", dict(budget=20, then_bits="4", rotate_parts="keys"), False),
])
def test_auto_parts_follow_the_key_layout(strategy, options, rotates_values):
    """--rotate_parts auto rotates the values where keys are quantized per token, not where per channel (measured:
    docs/results.md); what a cache computes with auto is what it computes with the parts named."""
    cls = kv_cache.STRATEGIES[strategy]
    options = dict(sink_size=2, window_size=3, group_size=8, **options)
    auto = cls(1, 48, 2, 16, torch.float64, "cpu", **options)
    assert auto.rotate and auto.rotate_values == rotates_values
    named = cls(1, 48, 2, 16, torch.float64, "cpu",
                **dict(options, rotate_parts="keys_values" if rotates_values else "keys"))
    other = cls(1, 48, 2, 16, torch.float64, "cpu",
                **dict(options, rotate_parts="keys" if rotates_values else "keys_values"))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 40, 16, generator=gen, dtype=torch.float64) for n in (4, 2, 2))
    cos, sin = torch.ones(48, 16, dtype=torch.float64), torch.zeros(48, 16, dtype=torch.float64)
    outs = []
    for cache in (auto, named, other):  # a prompt of 24, then decode steps that read the quantized tokens
        steps = [cache(q[:, :, :24], k[:, :, :24], v[:, :, :24], torch.arange(24), cos, sin, torch.tensor([0]))]
        steps += [cache(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1], torch.tensor([[p]]), cos, sin)
                  for p in range(24, 40)]
        outs.append(torch.cat(steps, 2))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("rotate", ["hadamard", "signed_hadamard"])
def test_transform_is_the_matrix_and_batch_invariant(rotate):
    """rotated() is x @ R and x @ R^T (float64), and a row's result in float32 is bit for bit the same alone as in a
    batch, and a token's alone as in a chunk of tokens (a matmul's rounding may change with the rows beside)."""
    gen = torch.Generator().manual_seed(4)
    for D in (2, 16, 64):
        r = rotation_matrix(rotate, D, torch.float64, "cpu")
        x = torch.randn(3, 2, 5, D, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(rotated(x, r), x @ r, rtol=0, atol=1e-13)
        torch.testing.assert_close(rotated(x, r, inverse=True), x @ r.T, rtol=0, atol=1e-13)
        r32, x32 = rotation_matrix(rotate, D, torch.float32, "cpu"), x.float()
        for inverse in (False, True):
            batch = rotated(x32, r32, inverse)
            assert all(torch.equal(batch[i:i + 1], rotated(x32[i:i + 1], r32, inverse)) for i in range(3))
            assert all(torch.equal(batch[:, :, t:t + 1], rotated(x32[:, :, t:t + 1], r32, inverse)) for t in range(5))
        # q, k, v in one product: each exactly as rotated() alone (GQA: q has more heads than k and v)
        q = torch.randn(3, 6, 5, D, generator=gen)
        for got, x in zip(rotated_together((q, x32, x32[:, :1]), r32), (q, x32, x32[:, :1])):
            assert torch.equal(got, rotated(x, r32))


def test_rotate_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="power-of-two head_dim .* 48"):
        kv_cache.STRATEGIES["quantize_kv"].check_options(dict(bits="2", group_size=16, rotate="hadamard"), 128, 48)
