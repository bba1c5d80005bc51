"""scripts/gpu_suite.py --tiny: the GPU suite's own code paths on the CPU (Triton interpreter, tiny shapes), so the
one GPU run a lease allows cannot fail on a typo. Runs the real script in a subprocess, as the GPU machine will."""
import json
import os
import subprocess
import sys
import pytest
import torch

from scripts import tune_decode
from scripts.common import REPO_DIR
SECTIONS = ["kernels", "model", "headline", "short", "long", "compiled", "mixed", "kernel", "budget", "peer", "serve",
            "curve"]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    # --budget_s past the rows' time on a loaded CI machine: this test checks every section ran, not the budget
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_suite", str(out), "--tiny", "--budget_s", "590"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    return out, proc


def test_tiny_suite_runs_every_section(suite_run):
    out, proc = suite_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["finished"] and report["mode"] == "tiny" and report["bandwidth"] > 0
    assert "command" in report and "torch" in report and "triton" in report and "device" in report
    rows = report["rows"]
    assert [s for s in SECTIONS if any(r["section"] == s for r in rows)] == SECTIONS
    broken = [r for r in rows if r.get("result", "").startswith("FAIL") or r["note"].startswith(("error", "skipped"))]
    assert not broken, broken
    # the printed row and the recorded one agree; the markdown holds every section and the targets
    assert proc.stdout.count("[model]") == sum(r["section"] == "model" for r in rows)
    table = (out / "gpu_suite.md").read_text()
    assert "## targets" in table and "| headline | full | 80 | 1 |" in table


def test_tiny_suite_rows_are_consistent(suite_run):
    out, _ = suite_run
    report = json.loads((out / "gpu_suite.json").read_text())
    rows = report["rows"]
    for r in (r for r in rows if "tokens_per_s" in r and r["name"] != "hf-eager"):
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["roofline_s"] == pytest.approx((r["weight_bytes"] + r["kv_bytes"]) / report["bandwidth"])
    assert all(a["at_s"] <= b["at_s"] for a, b in zip(rows, rows[1:]))  # when each row ended, in order
    model_rows = [r for r in rows if r["section"] == "model"]
    # every strategy and bit width, fused vs torch path within the stated bf16 tolerance
    assert len(model_rows) == 6 and all(r["err"] <= r["tol"] for r in model_rows)
    full_torch = next(r for r in rows if r["section"] == "long" and r["name"] == "full@torch")
    assert full_torch["attn_impl"] == "torch"
    # two KV configurations in one batch against each alone on the same requests (the CPU runs eager steps only)
    mixed = {r["name"]: r for r in rows if r["section"] == "mixed"}
    assert set(mixed) == {"full alone (eager)", "quantize_kv-int4 alone (eager)", "mixed full + quantize_kv-int4 (eager)"}
    both = mixed["mixed full + quantize_kv-int4 (eager)"]
    best = max(mixed[n]["decode_tps"] for n in ("full alone (eager)", "quantize_kv-int4 alone (eager)"))
    assert both["vs_best_single"] == pytest.approx(both["decode_tps"] / best)
    assert both["rows"] == 4 and both["requests"] == 4 and both["generated_tokens"] == 4 * 4
    assert 0 <= both["same_tokens"] <= 4
    assert any(t["case"] == "mixed full + quantize_kv-int4 (eager)" and t["value"] for t in report["targets"])
    long = {r["name"]: r for r in rows if r["section"] == "long"}
    # paged rows: the pool holds every sequence's max_seq_length in blocks (full: a little more than contiguous,
    # the null block and the rounding to whole blocks; quantized pages need no per-sequence scratch group), and
    # they are compared with the contiguous full row
    assert long["full+paged"]["kv_bytes"] >= long["full"]["kv_bytes"]
    for name in ("full", "quantize_kv-int4", "quantize_kv-int2"):
        paged = long[name + "+paged"]
        assert 0 < paged["kv_bytes"] <= 1.1 * long[name]["kv_bytes"] and paged["vs_full"] > 0
    budget = {r["name"]: r for r in rows if r["section"] == "budget"}
    # the budget rows' batches come from the caches' byte counts: smaller KV per token, more sequences
    assert budget["full"]["batch"] < budget["quantize_kv-int4"]["batch"] < budget["quantize_kv-int2"]["batch"]
    assert all(r["kv_bytes"] + report["weight_bytes"] <= r["budget_gb"] * 1e9 for r in budget.values())
    peer = [r for r in rows if r["section"] == "peer" and r["name"] == "full"]
    assert len(peer) == 2 and all(r["vs_peer"] > 0 for r in peer)
    kinds = {t["case"] for t in report["targets"]}
    assert "full b1" in kinds and "full b1 compiled" in kinds and "int4 / full" in kinds


def test_plot_from_the_json(suite_run):
    out, _ = suite_run
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_suite", str(out), "--plot"], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "roofline.png").stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_says_to_rehearse(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_suite", str(tmp_path / "x")], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "--tiny" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_spent_time_budget_skips_rows_and_still_finishes(tmp_path):
    """On the GPU the budget runs out part way: every later row is recorded as skipped, the targets and the tables
    are still written, and the run ends normally (it crashed once on a skipped row without a shape)."""
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_suite", str(tmp_path), "--tiny", "--budget_s", "0.01"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["finished"] and report["rows"] and all(r["result"] == "skipped" for r in report["rows"])
    assert "## targets" in (tmp_path / "gpu_suite.md").read_text()


def test_tune_decode_rehearsal(tmp_path):
    """scripts/tune_decode.py --tiny: every variant's row is timed and its output equals the defaults' on the same
    seeded inputs (the interpreter ignores warps and stages, not tiles and splits); the table marks one best per
    format and batch."""
    proc = subprocess.run([sys.executable, "-m", "scripts.tune_decode", str(tmp_path), "--tiny"], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "tune_decode.json").read_text())
    rows = report["rows"]
    assert report["finished"] and {(r["kind"], r["name"]) for r in rows} == {
        (kind, name) for kind in ("int8", "int4") for name in ("defaults", "block_n 32", "bf16 dots")}
    assert all(r["seconds"] > 0 and r["rel_err"] <= tune_decode.TOL and r["note"] == "" for r in rows)
    assert (tmp_path / "tune_decode.md").read_text().count("**(best)**") == 2


def test_tune_decode_without_a_gpu_says_to_rehearse(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the machine without a GPU")
    proc = subprocess.run([sys.executable, "-m", "scripts.tune_decode", str(tmp_path / "x")], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "--tiny" in proc.stderr
    assert not (tmp_path / "x").exists()
