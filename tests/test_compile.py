"""generate.py --compile: the decode step of every cache is one graph, compiled once and never again as positions
advance, and it decodes the same tokens into the same cache contents as eager PyTorch. Plus the decode benchmark's
CPU smoke run. A tiny random float32 model on the CPU (inductor builds C++ there; CUDA graphs are skipped)."""
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import reset_dynamo
import runner
import engine
from model import ModelArgs, Transformer

from cli_options import parse_strategy_options, strategy_parser
from scripts import bench_decode

ARGS = ModelArgs(vocab_size=256, dim=128, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=256, head_dim=64)
SINK_WINDOW = dict(sink_size=4, window_size=8)
# group_size 16: a flush group of KIVI keys completes within the few decode steps below.
CASES = {
    "full": ("full", {}),
    "compress_kv": ("compress_kv", dict(SINK_WINDOW, rope_positions="cache")),
    "compress_kv-original": ("compress_kv", dict(SINK_WINDOW, rope_positions="original")),
    "quantize_kv-int8": ("quantize_kv", dict(SINK_WINDOW, bits="8")),
    "quantize_kv-fp8": ("quantize_kv", dict(SINK_WINDOW, bits="fp8")),
    "quantize_kv-int4": ("quantize_kv", dict(SINK_WINDOW, bits="4", group_size=16)),
    "quantize_kv-int2-token": ("quantize_kv", dict(SINK_WINDOW, bits="2", group_size=16, k_granularity="token",
                                                   rotate="hadamard")),
    "h2o": ("h2o", dict(SINK_WINDOW, budget=24)),  # evicts from position 24 on, with scores from every step
    # their mean over each token's queries (positions in the update), decode pooled over each head's run in any lane
    "h2o-mean-adaptive-pooled": ("h2o", dict(SINK_WINDOW, budget=24, accumulate="mean", head_budget="adaptive",
                                             decode_kernel_size=3)),
    "snapkv-then-int8": ("snapkv", dict(SINK_WINDOW, budget=24, then_bits="8")),
    "snapkv-adaptive": ("snapkv", dict(SINK_WINDOW, budget=24, head_budget="adaptive")),
    # prompt statistics at prefill, a decode step that never revises; int4 kept tokens rotated (--rotate auto)
    "expected_attention-then-int4": ("expected_attention", dict(SINK_WINDOW, budget=24, then_bits="4",
                                                                group_size=16)),
    # with the decode step's attention pooled over 3 held neighbours (--decode_kernel_size: an argsort a step)
    "tova-mixed": ("tova", dict(SINK_WINDOW, budget=24, then_bits="2", fine_share=0.5, group_size=16,
                                decode_kernel_size=3)),
}
# The fused Triton decode attention (--attn_impl triton, a custom op under torch.compile) on its richest input,
# quantize_kv's packed KIVI store; Triton's CPU interpreter is slow, so the full cache's (hi store only) is left to
# tests/test_kernels.py.
_impl = next((a for a in strategy_parser("quantize_kv")._actions if a.dest == "attn_impl"), None)
if _impl is not None and "triton" in (_impl.choices or ()):
    CASES["quantize_kv-int4-triton"] = ("quantize_kv", dict(SINK_WINDOW, bits="4", group_size=16, attn_impl="triton"))
PROMPT_LEN, NEW_TOKENS, MAX_SEQ_LENGTH = 20, 14, 48


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def model_():
    torch.manual_seed(0)
    return Transformer(ARGS).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return model_()


def prompt():
    return torch.randint(ARGS.vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def options(name):
    strategy, opts = CASES[name]
    # attn_impl and any other option keep the strategy's own default
    return strategy, {**parse_strategy_options(strategy, []), **opts}


def run(model, name, decode_fn):
    strategy, opts = options(name)
    runner.setup_cache(model, strategy, opts, batch_size=2, max_seq_length=MAX_SEQ_LENGTH)
    tokens = engine.generate_batch(model, prompt().tolist(), NEW_TOKENS, decode_fn=decode_fn)["tokens"]
    return tokens, [{k: b.clone() for k, b in cache.named_buffers()} for cache in model.caches()]


def python_state(cache) -> dict:
    """Everything a cache holds besides its buffers: torch.compile guards on it, so it must not change per step."""
    return {k: v for k, v in vars(cache).items() if not k.startswith("_") and k != "training"}


@pytest.mark.parametrize("name", CASES)
def test_decode_step_is_static(model, name):
    """Eagerly, over decode steps that cross flushes and ring wrap-arounds: no Python attribute of the cache changes
    (a changing int would make torch.compile recompile every step) and every buffer is written in place (a new
    tensor would break CUDA-graph replay), and no tensor lives outside the registered buffers."""
    strategy, opts = options(name)
    runner.setup_cache(model, strategy, opts, batch_size=2, max_seq_length=MAX_SEQ_LENGTH)
    caches = model.caches()
    for cache in caches:
        loose = [k for k, v in python_state(cache).items() if isinstance(v, torch.Tensor)]
        assert not loose, f"{name}: tensors outside the registered buffers: {loose}"
    token = runner.prefill(model, prompt())[:, -1:].argmax(-1)
    state = [python_state(c) for c in caches]
    pointers = [{k: b.data_ptr() for k, b in c.named_buffers()} for c in caches]
    for pos in range(PROMPT_LEN, MAX_SEQ_LENGTH):
        token = runner.decode_one_token(model, token, torch.tensor([pos]))
        assert [python_state(c) for c in caches] == state, f"{name}: cache attributes changed at position {pos}"
        assert [{k: b.data_ptr() for k, b in c.named_buffers()} for c in caches] == pointers, \
            f"{name}: a cache buffer was re-allocated at position {pos}"


def compiled_run(model, name, decode_fn):
    reset_dynamo()
    counters.clear()
    # Any second compilation (a guard failing as positions advance) raises instead of silently recompiling.
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = run(model, name, decode_fn)
    assert counters["stats"]["unique_graphs"] == 1, f"{name}: {counters['stats']['unique_graphs']} graphs"
    assert not counters["graph_break"], f"{name}: graph breaks {dict(counters['graph_break'])}"
    return result


def assert_same(name, compiled, eager, exact):
    """Same tokens and cache contents. Inductor may round floats differently in the last bit; a quantized code can
    then land one step over (and the next layer sees that), so its check allows what follows from that: codes within
    one step on a few elements and float contents within 1e-3 of their norm. Without inductor all must be equal."""
    (tokens, buffers), (ref_tokens, ref_buffers) = compiled, eager
    assert torch.equal(tokens, ref_tokens), f"{name}: compiled decode produced other tokens"
    for layer, (got, want) in enumerate(zip(buffers, ref_buffers)):
        for key in want:
            where = f"{name}: layer {layer} {key}"
            if exact or key.endswith("pos"):  # positions (ring.pos) are exact whatever the rounding
                assert torch.equal(got[key], want[key]), f"{where} differs"
                continue
            diff = (got[key].float() - want[key].float()).abs()
            if want[key].is_floating_point():
                assert diff.norm() <= 1e-3 * want[key].float().norm(), f"{where} differs: {diff.max()}"
            else:
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02, f"{where} differs: {diff.max()}"


def test_compiled_decode_matches_eager():
    """The real --compile path (runner.compile_decode: inductor, mode reduce-overhead, fullgraph) on the full
    cache. Inductor's C++ build takes most of a minute on the CPU, so the other strategies use aot_eager below."""
    compiled = compiled_run(model_(), "full", runner.compile_decode())
    assert_same("full", compiled, run(model_(), "full", runner.decode_one_token), exact=False)


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])
def test_compiled_decode_other_strategies(model, name):
    """Every other strategy through dynamo and AOT autograd without inductor's code generation (aot_eager): graph
    breaks and recompiles come from there, at a fraction of the compile time."""
    compiled = torch.compile(runner.decode_one_token, backend="aot_eager", fullgraph=True)
    assert_same(name, compiled_run(model, name, compiled), run(model, name, runner.decode_one_token), exact=True)


def test_bench_decode_cpu_smoke(tmp_path):
    bench_decode.main(["--device", "cpu", "--shapes", "tiny", "--contexts", "64", "--batches", "1,2", "--steps", "2",
                       "--repeats", "1", "--warmup", "1", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("bench_decode_*.json")).read_text())
    rows = report["rows"]
    assert [(r["batch"], r["strategy"]) for r in rows] == [(b, s) for b in (1, 2) for s in bench_decode.STRATEGIES]
    args = bench_decode.SHAPES["tiny"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["roofline_pct"] > 0 and r["note"] == "", r
        # the full cache's bytes: K and V, every layer, batch x max_seq_length tokens, float32 (the CPU's default)
        assert r["full_kv_bytes"] == 2 * args.n_layer * r["batch"] * args.n_kv_head * args.head_dim \
            * r["max_seq_length"] * 4
        assert r["roofline_s"] == pytest.approx((r["weight_bytes"] + r["kv_bytes"]) / report["bandwidth"])
        assert r["vs_full"] == pytest.approx(
            next(f for f in rows if f["strategy"] == "full" and f["batch"] == r["batch"])["step_s"] / r["step_s"])
    compress = next(r for r in rows if r["strategy"] == "compress_kv")
    assert compress["kv_bytes"] < compress["full_kv_bytes"]  # 16 + 32 slots instead of 64 + steps
    table = next(tmp_path.glob("bench_decode_*.md")).read_text()
    assert "| tiny | 64 | 2 | quantize_kv-int4 |" in table and "copy bandwidth" in table
    assert report["dtype"] == "float32"
    bench_decode.main(["--plot", str(next(tmp_path.glob("bench_decode_*.json"))), "--out", str(tmp_path / "plot")])
    assert (tmp_path / "plot" / "roofline.png").read_bytes().startswith(b"\x89PNG")


def test_bench_decode_interleaved(tmp_path):
    """--interleave: the strategies of each context and batch timed in turns, every row complete."""
    names = ["full", "quantize_kv-int4", "snapkv"]
    bench_decode.main(["--device", "cpu", "--shapes", "tiny", "--contexts", "64", "--batches", "2", "--steps", "2",
                       "--repeats", "2", "--warmup", "1", "--strategies", ",".join(names), "--interleave",
                       "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("bench_decode_*.json")).read_text())
    rows = report["rows"]
    assert [r["strategy"] for r in rows] == names and report["interleave"]
    for r in rows:
        assert r["interleaved"] == 3 and r["step_s"] > 0 and r["fill_s"] > 0 and r["note"] == ""
        assert r["tokens_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["vs_full"] == pytest.approx(rows[0]["step_s"] / r["step_s"])
    assert "timed in turns (--interleave)" in next(tmp_path.glob("bench_decode_*.md")).read_text()
    with pytest.raises(SystemExit, match="--interleave times decode steps: drop --attention_kernel"):
        bench_decode.main(["--device", "cpu", "--shapes", "tiny", "--interleave", "--attention_kernel",
                           "--out", str(tmp_path)])


def test_bench_decode_interleaved_compiled(tmp_path):
    """--interleave --compile: each row's compiled graph is picked again on each of its turns (a recompilation
    while timing would fail the run), and every row is timed compiled."""
    names = ["full", "quantize_kv-int4"]
    bench_decode.main(["--device", "cpu", "--shapes", "tiny", "--contexts", "64", "--batches", "2", "--steps", "2",
                       "--repeats", "2", "--warmup", "1", "--strategies", ",".join(names), "--interleave", "--compile",
                       "--out", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("bench_decode_*.json")).read_text())["rows"]
    assert [r["strategy"] for r in rows] == names
    for r in rows:
        assert r["decode_path"] == "compiled" and r["interleaved"] == 2 and r["step_s"] > 0 and r["note"] == "", r


def test_bench_attention_kernel_cpu_smoke(tmp_path):
    """The fused-kernel rows (Triton's CPU interpreter here): every kind runs and its byte count is the stores'."""
    bench_decode.main(["--device", "cpu", "--shapes", "tiny", "--attention_kernel", "--contexts", "100",
                       "--batches", "1", "--out", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("bench_decode_*.json")).read_text())["attention_kernel_rows"]
    assert [r["kind"] for r in rows] == list(bench_decode.KERNEL_KINDS)
    for r in rows:
        assert r["note"] == "" and r["seconds"] > 0 and r["bytes_per_s"] > 0, r
    args = bench_decode.SHAPES["tiny"]
    q_bytes = 2 * args.n_head * args.head_dim * 2  # q read + output written, bfloat16
    assert rows[0]["bytes"] == q_bytes + 2 * args.n_kv_head * 100 * args.head_dim * 2  # bf16: K and V of 100 tokens
    by_kind = {r["kind"]: r for r in rows}
    quantized = [r for r in rows[1:] if not r["kind"].endswith("+scores")]
    assert all(r["bytes"] < rows[0]["bytes"] for r in quantized)  # quantized stores move fewer bytes
    for kind in [k for k in by_kind if k.endswith("+scores")]:  # the same reads, with the scores stored besides
        assert by_kind[kind]["bytes"] == by_kind[kind[:-len("+scores")]]["bytes"]


@pytest.mark.skipif("quantize_kv-int4-triton" not in CASES, reason="no triton")
def test_compiled_triton_step_flushes_with_the_triton_kernel(model):
    """Compiled with --attn_impl triton, the decode flush is the Triton kernel's op (kvcache.quantize_into) in the
    graph, as eager steps call it: the PyTorch route writes the same bytes in ~50 ops, so no other test sees the
    difference (a condition meant to keep the C flush out of compiled steps once dropped the Triton one too)."""
    name, op = "quantize_kv-int4-triton", "kvcache.quantize_into"
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    reset_dynamo()
    run(model, name, torch.compile(runner.decode_one_token, backend=recording, fullgraph=True))
    assert any(target.split(".default")[0] == op for target in targets), f"the compiled step flushes without {op}"


def test_compiled_cpu_step_quantizes_a_group_only_when_one_completes(model):
    """Compiled on the CPU with per-channel keys, the flush of a key group is a branch of the graph (torch.cond: the
    group is quantized on the step where one completes, the scratch group's bytes written back on the others), and
    inductor's code of it decodes the eager step's tokens and leaves the caches' contents."""
    from torch._inductor.compile_fx import compile_fx

    name, targets = "quantize_kv-int4", []

    def recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return compile_fx(gm, example_inputs)

    compiled = compiled_run(model, name, torch.compile(runner.decode_one_token, backend=recording, fullgraph=True))
    assert "cond" in targets, "the compiled step quantizes a key group on every step"
    assert_same(name, compiled, run(model, name, runner.decode_one_token), exact=False)
