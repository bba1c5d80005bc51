"""quantize_kv --key_rope pre (KVQuant): keys quantized before RoPE, rotated after dequantization inside attention.

References: the written-out float64 model of tests/test_bits_per_layer.py (quantize the unrotated keys with the
reference functions of kernels/quantize.py, dequantize, rotate by absolute position, attend); for the fused kernel,
the float64 decode_attention_ref over keys dequantized and rotated in float64 (contiguous and paged, with unowned
pool blocks and unread slots poisoned, as tests/test_paged_kernels.py lays them out); the Triton path of the cache
against its PyTorch path, quantized stores byte for byte; and the compiled decode step against the eager one, with
no recompiles. Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py).
"""
import os

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import held_state, reset_dynamo
import engine
import runner
import kv_cache
from model import ModelArgs, Transformer, apply_rope, rope_tables
from test_bits_per_layer import layer_quantization, reference_logits, run_cache
from test_kv_cache import SCHEDULE, random_tokens, tiny_model

QUANTIZE_KV = kv_cache.STRATEGIES["quantize_kv"]
HAS_TRITON_DEVICE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="no GPU and TRITON_INTERPRET is not 1")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- the PyTorch path against the reference


@pytest.mark.parametrize("bits,k_granularity", [("8", None), ("fp8", None), ("4", None), ("2", None),
                                                ("4", "token"), ("8", "channel")])
def test_pre_rope_equals_reference(bits, k_granularity):
    """2-layer float64 model, prefill chunks and decode steps across flushes: the cache quantizes exactly the
    unrotated keys the reference quantizes, and rotates them (sinks + window too) by their absolute positions."""
    S, W, G = 4, 8, 8
    options = dict(sink_size=S, window_size=W, group_size=G, bits=bits, key_rope="pre")
    if k_granularity:
        options["k_granularity"] = k_granularity
    model, tokens = tiny_model(), random_tokens(2, 88)
    out = run_cache(model, options, tokens, SCHEDULE, 96)
    layer = layer_quantization(bits, SCHEDULE, S, W, G, 88, k_granularity, key_rope="pre")
    torch.testing.assert_close(out, reference_logits(model, tokens, [layer, layer], S), rtol=0, atol=1e-9)
    post = run_cache(model, dict(options, key_rope="post"), tokens, SCHEDULE, 96)
    assert (out - post).abs().max() > 1e-6  # quantizing before the rotation is another quantization


def test_pre_rope_without_quantized_tokens_is_full():
    """Sinks + window hold everything: nothing is quantized, and pre is exactly post (and full)."""
    model, tokens = tiny_model(), random_tokens(2, 88)
    full = run_cache(model, dict(sink_size=8, window_size=80, bits="2", group_size=8), tokens, SCHEDULE, 88)
    pre = run_cache(model, dict(sink_size=8, window_size=80, bits="2", group_size=8, key_rope="pre"), tokens,
                    SCHEDULE, 88)
    assert torch.equal(pre, full)


def test_bad_key_rope_is_one_line_error():
    with pytest.raises(ValueError, match="--key_rope 'mid' is not supported: use post or pre") as info:
        QUANTIZE_KV.check_options(dict(key_rope="mid"), 256, 64)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16 .* use --attn_impl torch"):
        QUANTIZE_KV(1, 256, 1, 48, torch.float32, "meta", key_rope="pre", attn_impl="triton")
    QUANTIZE_KV(1, 256, 1, 48, torch.float32, "meta", key_rope="pre", attn_impl="torch")  # the torch path rotates


# ---------------------------------------------------------------- the fused kernel against float64


KERNEL_CASES = [
    # name, dtype, B, n_head, n_kv_head, D, kind, group F, paged stores, recent_block, older_block (test_paged_kernels)
    ("int8-b3-gqa4-fp32", torch.float32, 3, 8, 2, 64, "8", 1, "", 0, 0),
    ("int8-older-b3-gqa4", torch.bfloat16, 3, 8, 2, 64, "8", 1, "older", 0, 16),
    ("fp8-both-b1-gqa3", torch.bfloat16, 1, 6, 2, 64, "fp8", 1, "recent+older", 16, 32),
    ("int4-kivi32-b3-gqa4-fp32", torch.float32, 3, 8, 2, 64, "4", 32, "", 0, 0),
    ("int4-kivi32-both-b3-gqa4-fp32", torch.float32, 3, 8, 2, 64, "4", 32, "recent+older", 32, 32),
    ("int2-kivi16-older-b3-gqa3", torch.bfloat16, 3, 6, 2, 64, "2", 16, "older", 0, 16),
    ("int4-kivi16-both-b1-gqa4-d128", torch.bfloat16, 1, 4, 1, 128, "4", 16, "recent+older", 16, 32),
]


@needs_triton
@pytest.mark.parametrize("name,dtype,B,HQ,H,D,kind,F,paged,recent_block,older_block", KERNEL_CASES,
                         ids=[c[0] for c in KERNEL_CASES])
def test_kernel_rotates_the_dequantized_keys(name, dtype, B, HQ, H, D, kind, F, paged, recent_block, older_block,
                                             monkeypatch):
    """decode_attention with the RoPE tables against the float64 reference over the older keys dequantized in
    float64 and rotated by positions sink_size + t (model.apply_rope, float64): per sequence (one short, one long,
    one finished), contiguous and paged, and the scores output too."""
    from kernels.decode_attention import decode_attention
    from kernels.reference import decode_attention_ref, dequantize_ref
    from test_kernels import DEVICE, TOL, rel_err
    from test_paged_kernels import paged_case
    q, logical, pages, finished = paged_case(name, dtype, B, HQ, H, D, kind, F, paged, recent_block, older_block)
    S, M = logical["sink_size"], logical["k_q"].shape[2]
    cos, sin = rope_tables(ModelArgs(vocab_size=8, dim=D, n_layer=1, n_head=1, n_kv_head=1, intermediate_size=8),
                           S + M + 5, DEVICE)
    k = dequantize_ref(logical["k_q"], logical["k_scale"], logical["k_zero"], D)  # (B, H, M, D) float64
    k_rot = apply_rope(k, cos[S:S + M].double(), sin[S:S + M].double())
    # The rotated keys as a float64 "payload" with unit per-token scales: the reference reads them as they are.
    ref_inputs = dict(logical, k_q=k_rot, k_scale=torch.ones(B, H, M, 1, dtype=torch.float64, device=DEVICE),
                      k_zero=None)
    ref, ref_probs = decode_attention_ref(q, **ref_inputs, return_scores=True)
    out, probs = decode_attention(q, **pages, k_rope_cos=cos, k_rope_sin=sin, return_scores=True)
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    assert (probs - ref_probs).abs().max() < 10 * TOL[dtype]
    plain = decode_attention(q, **pages)
    assert rel_err(plain, ref) > 10 * TOL[dtype]  # the rotation changed the output
    if finished:
        assert out[-1].abs().max() == 0


@needs_triton
def test_kernel_refuses_what_it_cannot_rotate():
    from kernels.decode_attention import decode_attention
    q, hi = torch.randn(1, 2, 1, 48), torch.randn(1, 1, 8, 48)
    cos, sin = torch.ones(64, 48), torch.zeros(64, 48)
    with pytest.raises(ValueError, match="with an older store"):
        decode_attention(q, hi, hi, k_rope_cos=cos, k_rope_sin=sin)
    older = dict(n_older=torch.tensor([4]), k_q=torch.zeros(1, 1, 8, 48, dtype=torch.int8),
               k_scale=torch.ones(1, 1, 8, 1, dtype=torch.float16), v_q=torch.zeros(1, 1, 8, 48, dtype=torch.int8),
               v_scale=torch.ones(1, 1, 8, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        decode_attention(q, hi, hi, **older, k_rope_cos=cos, k_rope_sin=sin)


# ---------------------------------------------------------------- the cache's Triton path against its PyTorch path


TRITON_CASES = [dict(bits="8"), dict(bits="4", group_size=8), dict(bits="2", group_size=8, k_granularity="token")]


@needs_triton
@pytest.mark.parametrize("options", TRITON_CASES, ids=[str(o) for o in TRITON_CASES])
def test_cache_triton_matches_torch(options):
    """A tiny model through quantize_kv --key_rope pre with --attn_impl triton (fused attention rotating the older
    tiles, the decode flush quantizing the unrotated ring keys in Triton) and torch: the logits agree at every step
    across flushes and a second prefill chunk, and the quantized stores are the same bytes."""
    from test_kernels import DEVICE, rel_err
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, dim=64, n_layer=1, n_head=2, n_kv_head=1, intermediate_size=64, head_dim=32)
    model = Transformer(args).to(DEVICE).eval().requires_grad_(False)
    tokens = torch.randint(0, 64, (2, 30), device=DEVICE)
    schedule = [10] + [1] * 10 + [4] + [1] * 6  # KIVI groups of 8 past sinks 4 + window 8 flush at 19 and 27
    logits, stores = {}, {}
    for impl in ("torch", "triton"):
        model.setup_caches(lambda i: QUANTIZE_KV(2, 30, 1, 32, torch.float32, DEVICE, sink_size=4, window_size=8,
                                                 key_rope="pre", attn_impl=impl, **options), 30)
        out, pos = [], 0
        for n in schedule:
            out.append(model(tokens[:, pos:pos + n], torch.arange(pos, pos + n, device=DEVICE)))
            pos += n
        logits[impl] = torch.cat(out, dim=1)
        stores[impl] = held_state(model.layers[0].attention.kv_cache)
    assert rel_err(logits["triton"], logits["torch"]) < 1e-5
    for name, buf in stores["torch"].items():
        assert torch.equal(stores["triton"][name].view(torch.uint8), buf.view(torch.uint8)), name


# ---------------------------------------------------------------- paged, compiled


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_pre_rope_equals_contiguous(block_size):
    """Paged quantized pages of pre-RoPE keys: ragged prompts, chunked prefill, float64, bit for bit the
    contiguous cache (the PyTorch path rotates what it gathers from the pool)."""
    from test_paged import CHUNK, MAX_SEQ_LENGTH, NEW_TOKENS, Recorder, prompts
    from test_batch import ARGS as BATCH_ARGS
    torch.manual_seed(0)
    model = Transformer(BATCH_ARGS).double().eval().requires_grad_(False)
    options = dict(sink_size=4, window_size=8, bits="4", group_size=8, key_rope="pre")
    results = []
    for paged in (None, block_size):
        runner.setup_cache(model, "quantize_kv", options, 4, MAX_SEQ_LENGTH, quiet=True, block_size=paged)
        recorder = Recorder()
        out = engine.generate_batch(model, prompts(), NEW_TOKENS, prefill_chunk=CHUNK, decode_fn=recorder)
        results.append((out["tokens"], torch.stack(recorder.logits)))
    assert torch.equal(results[1][0], results[0][0])
    assert torch.equal(results[1][1], results[0][1])


COMPILE_ARGS = ModelArgs(vocab_size=64, dim=64, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=64, head_dim=32)
# Sinks 4 + window 8, groups of 8: decode positions 14-21 cross the flush at 19 (per-layer: int8 flushes each step).
COMPILE_CASES = {
    "int4-pre": dict(sink_size=4, window_size=8, bits="4", group_size=8, key_rope="pre"),
    "per-layer-pre": dict(sink_size=4, window_size=8, group_size=8, bits_per_layer="8:0;2:1", key_rope="pre"),
}
if HAS_TRITON_DEVICE:
    COMPILE_CASES["int4-pre-triton"] = dict(COMPILE_CASES["int4-pre"], attn_impl="triton")


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compiled_decode_is_one_graph(name):
    """The decode step through dynamo and AOT autograd (aot_eager, fullgraph): one graph, no recompile as positions
    advance across flushes, the eager step's tokens and cache contents; no cache attribute changes per step."""
    import torch._dynamo
    from test_compile import assert_same, python_state
    torch.manual_seed(0)
    model = Transformer(COMPILE_ARGS).eval().requires_grad_(False)
    prompt = torch.randint(64, (2, 14), generator=torch.Generator().manual_seed(1))

    def run(decode_fn):
        runner.setup_cache(model, "quantize_kv", COMPILE_CASES[name], 2, 24)
        state = [python_state(c) for c in model.caches()]
        tokens = engine.generate_batch(model, prompt.tolist(), 9, decode_fn=decode_fn)["tokens"]
        assert [python_state(c) for c in model.caches()] == state
        return tokens, [{k: b.clone() for k, b in cache.named_buffers()} for cache in model.caches()]

    eager = run(runner.decode_one_token)
    reset_dynamo()
    counters.clear()
    compiled_step = torch.compile(runner.decode_one_token, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(compiled_step)
    assert counters["stats"]["unique_graphs"] == 1, counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_same(name, compiled, eager, exact=True)
