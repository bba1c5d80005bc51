"""scripts/compare_peers.py: the comparison is fair by construction (transformers' full cache and ours give the same
greedy tokens for the same ids), the KV bytes are counted from the caches' tensors, and a missing peer is a row."""
import importlib.util
import subprocess
import sys

import pytest
import torch

from scripts import compare_peers as cp
from scripts.common import REPO_DIR
from scripts.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 8
PROMPT = "The capital of France is Paris. The capital of Germany is"


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_kvpress = pytest.mark.skipif(not has("kvpress"), reason="kvpress is not importable in this venv: run in "
                                   ".venv-peers (bash scripts/setup.sh --peers)")
needs_quanto = pytest.mark.skipif(not has("optimum.quanto"), reason="optimum-quanto is not importable in this venv: "
                                  "run in .venv-peers (bash scripts/setup.sh --peers)")


@pytest.fixture(scope="module")
def models(smollm2_model, smollm2_transformers):
    torch.manual_seed(0)
    return smollm2_model, smollm2_transformers, cp.load_tokenizer_ids()


@pytest.fixture(scope="module")
def prompt_ids(models):
    tokenizer = models[2]
    return ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(PROMPT)


def test_transformers_full_cache_gives_our_greedy_tokens(models, prompt_ids):
    """The baseline of every row: the same weights (one GGUF), the same ids, greedy, full caches on both sides."""
    ours, hf, tokenizer = models
    ref = cp.hf_generate(hf, cp.Method("full (DynamicCache)", "transformers", "hf"), prompt_ids, NEW, ())
    mine = cp.our_generate(ours, cp.Method("full", "ours", "ours", strategy="full", options={}), prompt_ids, NEW, ())
    assert len(ref["tokens"]) == NEW
    assert mine["tokens"] == ref["tokens"], tokenizer.decode(ref["tokens"])
    # both caches hold prompt + NEW - 1 tokens of float32 K and V: the same bytes
    assert ref["kv_bytes"] == cp.hf_full_bytes(hf, len(prompt_ids) + NEW - 1)
    assert mine["kv_bytes"] == cp.hf_full_bytes(hf, len(prompt_ids) + NEW)  # ours is sized for the whole span


def test_tensor_bytes_counts_plain_and_nested():
    t = torch.zeros(3, 4)
    assert cp.tensor_bytes(t) == 48
    assert cp.tensor_bytes([t, torch.zeros(2, dtype=torch.uint8), None]) == 50


def test_missing_library_is_a_row_not_a_crash():
    m = cp.Method("SnapKVPress", "kvpress", "press")
    m.reason = cp.importable("no_such_module_for_compare_peers")
    assert "no_such_module_for_compare_peers is not importable" in m.reason
    row = cp.run_method(m, {"versions": {"kvpress": None}}, None, {}, None, {})
    assert row["kv_bytes"] is None and row["notes"] == [m.reason]
    assert "| SnapKVPress | kvpress |" in cp.markdown({"date": "d", "command": "c", "device": "cpu", "threads": 1,
                                                       "dtype": "float32", "context": 8, "versions": {}}, [row])


def test_ours_are_every_preset():
    """A strategy listed in scripts/presets.py is compared with the peers, at the run's sinks and window; quantized
    eviction keeps twice the tokens (bytes comparable with the 16-bit eviction)."""
    args = cp.build_parser().parse_args(["--context", "500"])
    ours = [m for m in cp.methods(args, {"tokens": "tokens", "bytes": "bytes"}) if m.library == "ours"]
    assert [m.params["strategy"] for m in ours] == [p.strategy for p in PRESETS]
    by_name = {m.name: m.params["options"] for m in ours}
    assert by_name["h2o 16/32 budget 100"]["budget"] == 100 and by_name["h2o 16/32 budget 200 then int4"]["budget"] == 200
    assert by_name["quantize_kv 16/32 int4"]["bits"] == "4"


def test_press_bytes_rows_keep_that_share():
    """--press_bytes 0.1: every press that evicts, at compression ratio 0.9 whatever the prompt's length (a press
    keeps that share of the tokens, so of full's bytes); KVzap (Hub weights) is left out."""
    args = cp.build_parser().parse_args(["--context", "500", "--press_bytes", "0.1"])
    rows = [m for m in cp.methods(args, {"tokens": "tokens", "bytes": "bytes"}) if m.params.get("budget") == 0.1]
    assert [m.params["press"] for m in rows] == ["StreamingLLMPress", "SnapKVPress", "KnormPress",
                                                 "ExpectedAttentionPress", "TOVAPress", "KVzipPress",
                                                 "AdaKVPress(SnapKVPress)"]
    assert all(m.name.endswith("(bytes = 0.1x full)") for m in rows)
    with pytest.raises(ValueError, match="--press_bytes 1.5: give fractions between 0 and 1"):
        cp.check_args(cp.build_parser().parse_args(["--press_bytes", "1.5"]))


def test_bad_setting_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.compare_peers", "--context", "40", "--out", str(tmp_path)],
                         cwd=REPO_DIR, capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error: --context 40") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@needs_kvpress
def test_kvpress_press_really_drops_tokens(models, prompt_ids):
    """A scorer press shrinks the cache tensors (its bytes are measured, not its nominal ratio), and at ratio 0 it
    is the full cache."""
    ours, hf, tokenizer = models
    full = cp.hf_generate(hf, cp.Method("full", "transformers", "hf"), prompt_ids, NEW, ())
    keep = 8
    press = cp.Method("StreamingLLMPress", "kvpress", "press", press="StreamingLLMPress",
                      press_kwargs={"n_sink": 4}, budget="tokens")
    press.params["budget_ratio"] = lambda n: 1 - keep / n
    out = cp.hf_generate(hf, press, prompt_ids, NEW, ())
    assert not out["masked"]
    assert out["kept_tokens"] == keep + NEW - 1
    assert out["kv_bytes"] == cp.hf_full_bytes(hf, keep + NEW - 1)
    press.params["budget_ratio"] = lambda n: 0.0
    assert cp.hf_generate(hf, press, prompt_ids, NEW, ())["tokens"] == full["tokens"]


@needs_quanto
def test_quantized_cache_bytes_are_below_full(models, prompt_ids):
    ours, hf, tokenizer = models
    q = cp.Method("q", "transformers", "hf", quantized=dict(backend="quanto", nbits=4, residual_length=4,
                                                          q_group_size=32))
    out = cp.hf_generate(hf, q, prompt_ids, NEW, ())
    assert 0 < out["kv_bytes"] < cp.hf_full_bytes(hf, len(prompt_ids) + NEW - 1) / 2
