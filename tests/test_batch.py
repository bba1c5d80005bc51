"""Batches of different prompts: every sequence has its own length, positions, ring state and end.

The reference for a batch is each prompt run alone (a cache of batch 1, the same code), token for token, greedy:
what a user gets from `generate.py --prompts_file` must not depend on which prompts share the batch."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import reset_dynamo
import engine
import runner
from model import ModelArgs, Transformer

ARGS = ModelArgs(vocab_size=96, dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128,
                 max_position_embeddings=256)
SINK_WINDOW = dict(sink_size=4, window_size=8)
CASES = {
    "full": ("full", {}),
    "compress_kv": ("compress_kv", SINK_WINDOW),
    "compress_kv-original": ("compress_kv", dict(SINK_WINDOW, rope_positions="original")),
    "quantize_kv-int8": ("quantize_kv", dict(SINK_WINDOW, bits="8")),
    "quantize_kv-fp8": ("quantize_kv", dict(SINK_WINDOW, bits="fp8")),
    "quantize_kv-int4": ("quantize_kv", dict(SINK_WINDOW, bits="4", group_size=8)),
    # --rotate (kv_cache/rotation.py) on the lowest bits: paged, batched and compiled like the others
    "quantize_kv-int2": ("quantize_kv", dict(SINK_WINDOW, bits="2", group_size=8, rotate="signed_hadamard")),
    "quantize_kv-int4-token-keys": ("quantize_kv", dict(SINK_WINDOW, bits="4", group_size=8, k_granularity="token")),
    # budget 20: 8 slots beyond sinks + window, so the longer prompts and their decoding evict
    "h2o": ("h2o", dict(SINK_WINDOW, budget=20)),
    "h2o-mean": ("h2o", dict(SINK_WINDOW, budget=20, accumulate="mean")),  # scores by positions: chunks, rows
    "tova": ("tova", dict(SINK_WINDOW, budget=20)),
    "snapkv": ("snapkv", dict(SINK_WINDOW, budget=20)),
    "expected_attention": ("expected_attention", dict(SINK_WINDOW, budget=20)),
    "expected_attention-adaptive-then-int4": ("expected_attention", dict(SINK_WINDOW, budget=20, head_budget="adaptive",
                                                                     then_bits="4", group_size=8)),
    "h2o-then-int4": ("h2o", dict(SINK_WINDOW, budget=20, then_bits="4", group_size=8, rotate="hadamard")),
    # --head_budget adaptive: the heads share 2 x 8 slots (runs across lanes), whole prompt and chunked
    "snapkv-adaptive": ("snapkv", dict(SINK_WINDOW, budget=20, head_budget="adaptive")),
    "h2o-adaptive-then-int2": ("h2o", dict(SINK_WINDOW, budget=20, head_budget="adaptive", then_bits="2",
                                           group_size=8)),
    # fp8 codes move through the prefill's choice as bytes (the CPU has no float8 gather), kept ones too when a
    # later chunk comes (h2o prefills in chunks: tests/test_paged.py)
    "h2o-adaptive-then-fp8": ("h2o", dict(SINK_WINDOW, budget=20, head_budget="adaptive", then_bits="fp8")),
    # --fine_share: mixed precision by score (tova demotes 4-bit tokens to 2 bits as it decodes)
    "tova-mixed": ("tova", dict(SINK_WINDOW, budget=20, then_bits="2", fine_share=0.5, group_size=8)),
    # --decode_kernel_size: each decode step's attention pooled over held neighbours, per row's own tokens
    "tova-pooled-decode": ("tova", dict(SINK_WINDOW, budget=20, then_bits="4", group_size=8, decode_kernel_size=3)),
    # ... and over each head's run across lanes (--head_budget adaptive)
    "tova-adaptive-pooled-decode": ("tova", dict(SINK_WINDOW, budget=20, head_budget="adaptive",
                                                 decode_kernel_size=3)),
}
# Ragged: one token, shorter than sinks + window, longer than the window, and longer than several flush groups.
PROMPT_LENGTHS = [7, 1, 23, 41]  # the one-token prompt not in row 0: its prefill must reach its own row
NEW_TOKENS = 14


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ARGS).eval().requires_grad_(False)


def prompts(lengths=PROMPT_LENGTHS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, ARGS.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def run(model, name, batch, new_tokens=NEW_TOKENS, eos_ids=(), decode_fn=runner.decode_one_token,
        max_seq_length=None):
    strategy, options = CASES[name]
    max_seq_length = max_seq_length or max(map(len, batch)) + new_tokens
    runner.setup_cache(model, strategy, options, len(batch), max_seq_length)
    return engine.generate_batch(model, batch, new_tokens, eos_ids=eos_ids, decode_fn=decode_fn)["sequences"]


@pytest.mark.parametrize("name", CASES)
def test_batch_of_different_prompts_equals_one_by_one(model, name):
    batch = prompts()
    together = run(model, name, batch)
    for prompt, result in zip(batch, together):
        # The batch's cache size: a run sized for a short prompt alone may hold every token (a budget or sinks +
        # window past its length is the full cache), a different cache, not a different batch.
        alone = run(model, name, [prompt], max_seq_length=max(map(len, batch)) + NEW_TOKENS)[0]
        assert result["tokens"] == alone["tokens"], f"{name}: prompt of {len(prompt)} tokens differs in a batch"
        assert result["finish_reason"] == "length" and len(result["tokens"]) == NEW_TOKENS


def test_each_sequence_ends_on_its_own_eos(model):
    """A sequence that produces EOS stops there (its finish reason says so) while the others go on, and what every
    sequence generated equals its run alone with the same EOS."""
    batch = prompts()
    free = run(model, "quantize_kv-int4", batch)
    eos = free[1]["tokens"][3]  # a token sequence 1 produces early: its EOS
    together = run(model, "quantize_kv-int4", batch, eos_ids={eos})
    assert together[1]["finish_reason"] == "stop" and together[1]["tokens"][-1] == eos
    assert len(together[1]["tokens"]) <= 4
    assert any(r["finish_reason"] == "length" for r in together)  # not every sequence stopped with it
    for prompt, result in zip(batch, together):
        assert result == run(model, "quantize_kv-int4", [prompt], eos_ids={eos})[0]


def test_reset_one_sequence_alone(model):
    """Resetting one sequence and prefilling another prompt in its place leaves the other sequences untouched."""
    strategy, options = CASES["quantize_kv-int4"]
    batch = prompts([23, 41])
    runner.setup_cache(model, strategy, options, 2, 41 + NEW_TOKENS)
    engine.generate_batch(model, batch, NEW_TOKENS)
    state = {k: b.clone() for k, b in model.caches()[0].named_buffers()}
    model.reset_caches(torch.tensor([1]))
    for name, buf in model.caches()[0].named_buffers():
        if buf.ndim >= 2 and name != "rotation":  # per-sequence state: row 0 kept, row 1 emptied (positions -1, payload 0)
            assert torch.equal(buf[0], state[name][0]), name
            assert (buf[1] == (-1 if name.endswith("pos") else 0)).all(), name


def test_batched_decode_is_one_graph_as_sequences_finish(model):
    """The batched decode step compiles once: per-sequence positions advance (finished ones stay), sequences
    finish, and nothing recompiles; it decodes the eager tokens."""
    batch = prompts()
    eager = run(model, "quantize_kv-int4", batch)
    eos = eager[0]["tokens"][2]
    eager = run(model, "quantize_kv-int4", batch, eos_ids={eos})
    reset_dynamo()
    counters.clear()
    compiled_fn = torch.compile(runner.decode_one_token, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(model, "quantize_kv-int4", batch, eos_ids={eos}, decode_fn=compiled_fn)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert compiled == eager
    assert eager[0]["finish_reason"] == "stop"


def test_sampling_differs_per_sequence(model):
    """temperature > 0: copies of one prompt in a batch draw their own tokens."""
    strategy, options = CASES["full"]
    batch = prompts([5]) * 4
    runner.setup_cache(model, strategy, options, 4, 5 + 24)
    torch.manual_seed(0)
    rows = engine.generate_batch(model, batch, 24, temperature=1.0)["sequences"]
    assert len({tuple(r["tokens"]) for r in rows}) > 1


@pytest.mark.parametrize("name", ["full", "compress_kv", "quantize_kv-int4", "h2o-adaptive-then-int2", "tova-mixed"])
def test_fused_kernel_path_per_sequence(model, name):
    """--attn_impl triton (Triton's CPU interpreter here) on a ragged batch gives the torch path's tokens."""
    strategy, options = CASES[name]
    batch = prompts([1, 23, 41])
    out = {}
    for impl in ("torch", "triton"):
        CASES["_impl"] = (strategy, dict(options, attn_impl=impl))
        out[impl] = run(model, "_impl", batch, new_tokens=10)
    del CASES["_impl"]
    assert out["triton"] == out["torch"]
