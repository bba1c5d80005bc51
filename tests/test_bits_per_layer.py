"""quantize_kv --bits_per_layer: a format per layer.

The spec's grammar and its one-line errors; every byte count (memory.predicted_kv_bytes / pool_bytes, the scripts' sizers)
against the sum of the real buffers of the per-layer caches, contiguous and paged; and a 2-layer float64 model with
per-layer formats against a written-out reference that quantizes each layer with its own format (the reference
functions of kernels/quantize.py, tested on their own in test_quantize.py), plus paged against contiguous.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import engine
import memory
import runner
import kv_cache
from kv_cache.layer_spec import layer_bits
from model import ModelArgs, Transformer, apply_rope, rope_tables
from test_kv_cache import SCHEDULE, group_quantizer, quantized_counts, random_tokens, stream, tiny_model

from scripts.kv_capacity import Layout, Sizer

QUANTIZE_KV = kv_cache.STRATEGIES["quantize_kv"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize("spec,n_layer,expected", [
    ("8:0-1,28-29;2:*", 30, ["8", "8"] + ["2"] * 26 + ["8", "8"]),
    ("4:0;fp8:1", 2, ["4", "fp8"]),
    (" 8 : 0 , 2 ; 2:* ", 4, ["8", "2", "8", "2"]),  # spaces around the parts are allowed
    ("2:*", 3, ["2", "2", "2"]),
    ("fp8:3;4:0-2", 4, ["4", "4", "4", "fp8"]),  # entries in any order, ranges or single layers
    ("8:0-0,1", 2, ["8", "8"]),
])
def test_spec_gives_each_layer_its_format(spec, n_layer, expected):
    assert layer_bits(spec, n_layer) == expected
    opts = QUANTIZE_KV.check_options(dict(bits_per_layer=spec, bits="4"), 512, 64)  # --bits is overridden
    per_layer = [QUANTIZE_KV.layer_options(opts, i, n_layer) for i in range(n_layer)]
    assert [o.bits for o in per_layer] == expected
    for o in per_layer:  # each layer's options are those --bits would give: its format's own key granularity
        assert o == QUANTIZE_KV.check_options(dict(bits=o.bits), 512, 64)
        assert o.flush_size == (32 if o.bits in ("4", "2") else 1)


BAD_SPECS = [
    # spec, n_layer, the error names
    ("8", 4, "entry '8' is not BITS:LAYERS: write e.g."),
    ("", 4, "is not BITS:LAYERS"),
    ("8:0;;2:*", 4, "entry '' is not BITS:LAYERS"),
    ("8:", 4, "is not BITS:LAYERS"),
    ("3:0;8:*", 4, "bits '3' is not supported: use 8, 4, 2, fp8"),
    ("8:a", 4, "'a' is not a layer index or range a-b"),
    ("8:-1;2:*", 4, "'-1' is not a layer index"),
    ("8:5-2;2:*", 8, "range '5-2' runs backwards: write 2-5"),
    ("2:*;8:0", 4, "'*' (every layer not named before it) must be the last entry"),
    ("8:0,*", 4, "'*' stands alone"),
    ("8:0-3;4:3", 4, "layer 3 is named twice ('8:0-3' and '4:3')"),
    ("8:0-3;4:3-5;2:*", 8, "layer 3 is named twice"),
    # checked against the model's layers
    ("8:0-1,28-31;2:*", 30, "names layers 30-31 but the model has 30 layers (0-29): name layers below 30"),
    ("8:4", 4, "names layer 4 but the model has 4 layers"),
    ("8:0-1", 4, "gives layers 2-3 no format (the model has 4 layers): name them, or end the spec with an entry "
                 "such as '8:*'"),
    ("8:0,2", 3, "gives layer 1 no format"),
    ("8:0-1;2:*", 2, "'2:*' names no layer (the entries before it name all 2): drop it"),
]


@pytest.mark.parametrize("spec,n_layer,match", BAD_SPECS, ids=[f"{s!r}/{n}" for s, n, _ in BAD_SPECS])
def test_bad_spec_is_one_line_error(spec, n_layer, match):
    """A bad spec raises one ValueError line naming the fix: in the options check (grammar, formats, repeats) or,
    once the model's layer count is known, in layer_options, i.e. in runner.setup_cache and cache_bytes before
    any cache is built."""
    args = ModelArgs(vocab_size=32, dim=64, n_layer=n_layer, n_head=1, n_kv_head=1, intermediate_size=32)
    options = dict(bits_per_layer=spec)
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        opts = QUANTIZE_KV.check_options(options, 256, args.head_dim)
        QUANTIZE_KV.layer_options(opts, 0, n_layer)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"--bits_per_layer {spec!r}")
    with pytest.raises(ValueError, match="--bits_per_layer"):
        memory.predicted_kv_bytes(args, "quantize_kv", options, 1, 256)
    model = Transformer(args)
    with pytest.raises(ValueError, match="--bits_per_layer"):
        runner.setup_cache(model, "quantize_kv", options, 1, 256)
    assert all(layer.attention.kv_cache is None for layer in model.layers)  # refused before the first cache


def test_a_layer_format_that_cannot_work_fails_the_options_check():
    """Every format the spec names is checked as its --bits would be, once, before any layer is built."""
    with pytest.raises(ValueError, match="--group_size 48 must divide head_dim 64"):
        QUANTIZE_KV.check_options(dict(bits_per_layer="8:0;4:*", group_size=48), 256, 64)
    QUANTIZE_KV.check_options(dict(bits_per_layer="8:0;fp8:*", group_size=48), 256, 64)  # no grouped format
    with pytest.raises(ValueError, match="build layer i's cache with"):  # a whole spec is no one layer's options
        QUANTIZE_KV(1, 256, 1, 64, torch.float32, "cpu", bits_per_layer="8:0;2:*")
    with pytest.raises(ValueError, match="bytes per token differ by layer"):
        QUANTIZE_KV.bytes_per_token(dict(bits_per_layer="8:0;2:*"), 1, 64, torch.float32)


def test_cli_refuses_a_spec_past_the_model(tmp_path, smollm2_gguf_path):
    """generate.py ends with one `error:` line naming the fix (the tiny 2-layer checkpoint of test_generate_cli),
    and a good spec runs, reporting the bytes the per-layer caches really allocate."""
    from test_generate_cli import run_in_process, write_tiny
    from tokenizer import save_gguf_tokenizer
    save_gguf_tokenizer(smollm2_gguf_path, tmp_path / "tokenizer")
    checkpoint = str(write_tiny(tmp_path / "tiny", tmp_path / "tokenizer"))
    common = ["--checkpoint_path", checkpoint, "--prompt", "Once upon a time, there was", "--max_new_tokens", "3",
              "quantize_kv", "--sink_size", "1", "--window_size", "2", "--group_size", "4"]
    bad = run_in_process(common + ["--bits_per_layer", "8:0-2;2:*"], tmp_path)
    err = bad.stderr.decode().strip()
    assert bad.returncode != 0 and err.count("\n") == 0, err
    assert err == ("error: --bits_per_layer '8:0-2;2:*' names layer 2 but the model has 2 layers (0-1): name layers "
                   "below 2"), err
    good = run_in_process(common + ["--bits_per_layer", "8:0;2:1"], tmp_path)
    assert good.returncode == 0, good.stderr.decode()
    # "KV cache: X MiB allocated (R x the full cache's Y MiB for N tokens)": the ratio R has the most digits.
    line = next(x for x in good.stdout.decode().splitlines() if x.startswith("KV cache:"))
    model = runner.load_model(Path(checkpoint), torch.device("cpu"), torch.float32)
    tokens = int(line.split(" for ")[1].split()[0])
    expected = memory.predicted_kv_bytes(model.args, "quantize_kv", dict(sink_size=1, window_size=2, group_size=4,
                                                                     bits_per_layer="8:0;2:1"), 1, tokens,
                                    torch.float32)
    assert f"({expected / memory.full_kv_bytes(model, 1, tokens):.3f}x" in line, (line, expected)


# ---------------------------------------------------------------- bytes, counted exactly


def buffer_bytes(model) -> int:
    """The real storage of every layer's cache, buffer by buffer (not through KVCache.nbytes): everything but the
    batch's active flags, the shared block table and --rotate's matrix, which are no KV storage."""
    return sum(b.numel() * b.element_size() for cache in model.caches() for name, b in cache.named_buffers()
               if name.rsplit(".", 1)[-1] not in ("active", "table", "rotation"))


ARGS = ModelArgs(vocab_size=64, dim=64, n_layer=4, n_head=4, n_kv_head=2, intermediate_size=64, head_dim=32,
                 max_position_embeddings=512)
SPECS = [
    dict(bits_per_layer="8:0;4:1-2;2:*", group_size=16),  # flush groups of 1 and 16 tokens in one model
    dict(bits_per_layer="fp8:0,3;2:1-2", group_size=8, k_granularity="token", key_rope="pre"),
    dict(bits_per_layer="4:0-3", group_size=8),  # one format named per layer: exactly --bits 4
]


@pytest.mark.parametrize("options", SPECS, ids=[o["bits_per_layer"] for o in SPECS])
@pytest.mark.parametrize("block_size", [None, 16])
def test_bytes_reported_are_the_per_layer_buffers(options, block_size):
    """cache_bytes, pool_bytes and kv_capacity's Sizer count, for each layer, what its own cache allocates:
    equal to the buffers of the caches runner.setup_cache builds, and (contiguous) to each layer's cache built
    alone with that layer's single format."""
    B, L = 3, 300
    model = Transformer(ARGS).eval()
    pool = runner.setup_cache(model, "quantize_kv", options, B, L, block_size=block_size)
    real = buffer_bytes(model)
    num_blocks = pool.num_blocks if pool else None
    assert memory.allocated_kv_bytes(model) == real
    assert memory.predicted_kv_bytes(ARGS, "quantize_kv", options, B, L, torch.float32, block_size, num_blocks) == real
    bits = layer_bits(options["bits_per_layer"], ARGS.n_layer)
    assert [cache.opts.bits for cache in model.caches()] == bits
    single = {k: v for k, v in options.items() if k != "bits_per_layer"}
    layout = Layout("per-layer", "per-layer", "quantize_kv", options, paged=block_size is not None)
    sizer = Sizer(layout, ARGS, L, block_size or 16, torch.float32)
    if block_size is None:
        one_layer = ModelArgs(**{**ARGS.to_dict(), "n_layer": 1})
        alone = [memory.predicted_kv_bytes(one_layer, "quantize_kv", dict(single, bits=b), B, L, torch.float32)
                 for b in bits]
        assert [cache.nbytes() for cache in model.caches()] == alone
        assert sizer.allocated(B) == real
    else:
        fixed, per_block = memory.predicted_pool_bytes(ARGS, "quantize_kv", options, B, L, block_size, torch.float32)
        assert fixed + per_block * pool.num_blocks == real
        assert sizer.allocated(B, pool.num_blocks) == real
        # One block table for all layers: blocks of whole flush groups of every format, as many slots as the
        # format that quantizes soonest needs.
        formats = [QUANTIZE_KV.check_options(dict(single, bits=b), L, ARGS.head_dim) for b in set(bits)]
        assert pool.block_tokens == math.lcm(block_size, *(o.flush_size for o in formats))
        assert pool.space.slots_used(L) == max(o.n_older(L) for o in formats)


# ---------------------------------------------------------------- outputs against a per-layer reference


@dataclass
class LayerQuantization:
    """What one layer of the reference does: quantize(k, v) -> (k_hat, v_hat) of the positions it quantizes, and
    how many positions past the sinks each token sees quantized."""
    quantize: object
    n_quantized: list
    key_rope: str = "post"


def reference_logits(model, tokens, layers: list, sink_size: int):
    """The model with written-out attention in float64: every token attends to every position up to itself, and
    in layer i token t sees positions sink_size .. sink_size + layers[i].n_quantized[t] - 1 through that layer's
    quantize-dequantize. key_rope "post": quantize gets keys rotated at their absolute positions; "pre": the
    unrotated keys, and its keys are rotated after."""
    a = model.args
    B, T = tokens.shape
    S = sink_size
    cos, sin = rope_tables(a, T)
    group = a.n_head // a.n_kv_head
    x = model.tok_embeddings(tokens)
    for layer, spec in zip(model.layers, layers):
        h = layer.attention_norm(x)
        q, k, v = layer.attention.wqkv(h).split([a.n_head * a.head_dim, a.n_kv_head * a.head_dim,
                                                 a.n_kv_head * a.head_dim], dim=-1)
        q = apply_rope(q.view(B, T, a.n_head, a.head_dim).transpose(1, 2), cos, sin)
        k = k.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        v = v.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        k_rot = apply_rope(k, cos, sin)
        if spec.key_rope == "pre":
            k_hat, v_hat = spec.quantize(k, v)
            k_hat = apply_rope(k_hat, cos, sin)
        else:
            k_hat, v_hat = spec.quantize(k_rot, v)
        ys = []
        for t in range(T):
            k_t, v_t = k_rot[:, :, :t + 1].clone(), v[:, :, :t + 1].clone()
            n = spec.n_quantized[t]
            k_t[:, :, S:S + n], v_t[:, :, S:S + n] = k_hat[:, :, S:S + n], v_hat[:, :, S:S + n]
            k_t, v_t = k_t.repeat_interleave(group, 1), v_t.repeat_interleave(group, 1)
            weights = torch.softmax(q[:, :, t:t + 1] @ k_t.transpose(-1, -2) / math.sqrt(a.head_dim), dim=-1)
            ys.append(weights @ v_t)
        x = x + layer.attention.wo(torch.cat(ys, dim=2).transpose(1, 2).reshape(B, T, -1))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    weight = model.tok_embeddings.weight if model.output is None else model.output.weight
    return model.norm(x) @ weight.T


def layer_quantization(bits, schedule, S, W, group_size, length, k_granularity=None, key_rope="post"):
    """The reference of one layer quantized with a single format, under the cache's documented rules."""
    bits = {"8": 8, "4": 4, "2": 2, "fp8": "fp8"}[bits]
    k_granularity = k_granularity or ("channel" if bits in (4, 2) else "token")
    F = group_size if k_granularity == "channel" else 1
    return LayerQuantization(group_quantizer(S, F, bits, k_granularity, group_size, length),
                             quantized_counts(schedule, S, W, F), key_rope)


def run_cache(model, options, tokens, schedule, max_seq_length):
    runner.setup_cache(model, "quantize_kv", options, tokens.shape[0], max_seq_length, quiet=True)
    return stream(model, tokens, schedule)


@pytest.mark.parametrize("spec,key_rope", [("8:0;2:1", "post"), ("4:0;fp8:1", "post"), ("2:1;4:*", "post"),
                                           ("fp8:0;4:1", "pre")])
def test_per_layer_model_equals_per_layer_reference(spec, key_rope):
    """A 2-layer float64 model, prefill chunks and decode steps across flushes: layer i quantizes exactly as a
    cache of layer i's single format would (which tokens, when, how), each with its own flush group. Unrotated:
    the reference quantizes the keys as they are (the rotation's own reference: tests/test_rotation.py)."""
    S, W, G = 4, 8, 8
    options = dict(sink_size=S, window_size=W, group_size=G, bits_per_layer=spec, key_rope=key_rope, rotate="none")
    model, tokens = tiny_model(), random_tokens(2, 88)
    out = run_cache(model, options, tokens, SCHEDULE, 96)
    bits = layer_bits(spec, 2)
    layers = [layer_quantization(b, SCHEDULE, S, W, G, 88, key_rope=key_rope) for b in bits]
    ref = reference_logits(model, tokens, layers, S)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    for single in bits:  # per layer is not one format everywhere
        uniform = reference_logits(model, tokens, [layer_quantization(single, SCHEDULE, S, W, G, 88,
                                                                      key_rope=key_rope)] * 2, S)
        assert (out - uniform).abs().max() > 1e-6


def test_reference_is_test_kv_cache_reference_for_one_format():
    """The per-layer reference with one format in every layer is test_kv_cache's (independently written) one."""
    from test_kv_cache import reference_logits as one_format_reference
    S, W, G = 4, 8, 8
    model, tokens = tiny_model(), random_tokens(2, 88)
    layer = layer_quantization("4", SCHEDULE, S, W, G, 88)
    ours = reference_logits(model, tokens, [layer, layer], S)
    theirs = one_format_reference(model, tokens, quantize=layer.quantize, n_quantized=layer.n_quantized,
                                  sink_size=S)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("key_rope", ["post", "pre"])
def test_paged_per_layer_equals_contiguous(block_size, key_rope):
    """Paged, one block table serves layers of different flush groups (int8 flushes every token, int2 every 8):
    ragged prompts, chunked prefill, float64: bit for bit the contiguous cache's logits and tokens, and each
    sequence holds the blocks of the layer that quantizes soonest."""
    from test_paged import CHUNK, MAX_SEQ_LENGTH, NEW_TOKENS, Recorder, prompts
    from test_batch import ARGS as BATCH_ARGS
    torch.manual_seed(0)
    model = Transformer(BATCH_ARGS).double().eval().requires_grad_(False)
    options = dict(sink_size=4, window_size=8, group_size=8, bits_per_layer="8:0;2:1", key_rope=key_rope)
    results = []
    for paged in (None, block_size):
        pool = runner.setup_cache(model, "quantize_kv", options, 4, MAX_SEQ_LENGTH, quiet=True, block_size=paged)
        recorder = Recorder(pool)
        out = engine.generate_batch(model, prompts(), NEW_TOKENS, prefill_chunk=CHUNK, decode_fn=recorder)
        results.append((out["tokens"], torch.stack(recorder.logits), pool, recorder.held))
    (want, want_logits, *_), (got, got_logits, pool, held) = results
    assert torch.equal(got, want)
    assert torch.equal(got_logits, want_logits)
    pool.check()
    for row, ids in enumerate(prompts()):
        stored = len(ids) + NEW_TOKENS - 1  # the last new token is sampled, never written
        assert held[row] == -(-max(0, stored - 4 - 8) // pool.block_tokens)  # int8: every token
