"""scripts/bench_serve.py: a tiny serving run through main(argv) (seconds), its rows against each other and its
markdown against its JSON; bad options end in one line."""
import json
import subprocess
import sys

import pytest
import torch

from scripts import bench_serve
from scripts.common import REPO_DIR

NUM_PROMPTS, NEW_TOKENS = 8, 6
ARGV = ["--device", "cpu", "--shape", "tiny", "--num_prompts", str(NUM_PROMPTS), "--prompt_lengths", "8-40",
        "--new_tokens", str(NEW_TOKENS), "--sink_size", "4", "--window_size", "8", "--group_size", "8",
        "--prefill_prompt", "64", "--prefill_chunks", "16,all", "--rows", ",".join(bench_serve.ROWS)]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    bench_serve.main(ARGV + ["--out", str(out)])
    (json_path,) = out.glob("bench_serve_cpu_*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


def test_every_row_ran_the_same_work(report):
    data, _ = report
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == list(bench_serve.ROWS)
    assert all(r["note"] == "" for r in rows.values()), [r["note"] for r in rows.values()]
    for r in rows.values():
        assert r["generated_tokens"] == NUM_PROMPTS * NEW_TOKENS
        assert r["prompt_tokens"] == data["prompt_tokens"] and r["shared_tokens"] == 0  # random prompts
        assert r["kv_bytes"] <= data["budget_bytes"] and r["fits_budget"]
        # the host-side replay of the admission rule that chose the rows predicts the run exactly (no EOS)
        assert (r["decode_steps"], r["peak_running"]) == (r["predicted_steps"], r["predicted_peak"])
        assert r["total_tps"] == pytest.approx((r["prompt_tokens"] + r["generated_tokens"]) / r["total_s"])
    first = rows["contiguous-static"]
    assert first["vs_first"]["total_tps"] == 1.0 and first["same_tokens_as_first"] == NUM_PROMPTS
    # contiguous and paged full store the same values: the same greedy tokens
    assert rows["paged-full"]["same_tokens_as_first"] == NUM_PROMPTS


def test_pages_fit_more_sequences(report):
    data, _ = report
    rows = {r["name"]: r for r in data["rows"]}
    for name in ("paged-full", "paged-int8", "paged-int4", "paged-full-static"):
        r = rows[name]
        assert 0 < r["peak_blocks"] <= r["usable_blocks"]
        assert r["peak_in_use_bytes"] <= r["kv_bytes"]
    assert rows["paged-int8"]["peak_running"] >= rows["paged-full"]["peak_running"]
    assert rows["paged-int4"]["peak_running"] >= rows["paged-full"]["peak_running"]
    assert rows["paged-int8"]["peak_running"] > rows["contiguous-continuous"]["peak_running"]


def test_markdown_agrees_with_json(report):
    data, md = report
    assert data["command"] in md and data["commit"] in md and data["date"] in md
    lines = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit() and line.count("|") == 18]
    assert len(lines) == len(data["rows"])
    for line, r in zip(lines, data["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == r["label"] and int(cells[2]) == r["rows"] and int(cells[7]) == r["peak_running"]
        assert float(cells[4]) == pytest.approx(r["kv_bytes"] / 2**20, abs=0.05)
        assert float(cells[11]) == pytest.approx(r["total_tps"], abs=0.05)
        assert cells[15] == f"{r['same_tokens_as_first']}/{NUM_PROMPTS}"
    chunks = [p["chunk_label"] for p in data["prefill_rows"]]
    assert chunks == ["16", "all"] and all(p["peak_bytes"] > 0 for p in data["prefill_rows"])
    assert data["prefill_rows"][1]["chunk"] == 64
    for p in data["prefill_rows"]:
        assert f"| {p['chunk_label']} | {p['seconds']:.2f} |" in md


@pytest.mark.parametrize("argv, words", [
    (["--prompt_lengths", "40-8"], "LO <= HI"),
    (["--rows", "paged-int3"], "unknown paged-int3"),
    (["--kv_memory_gb", "0.00001"], "raise --kv_memory_gb"),
    (["--kv_memory_gb", "-1"], "must be a number > 0"),
    (["--prefill_chunks", "64,x"], "'all'"),
    (["--device", "cuda:0" if not torch.cuda.is_available() else "tpu"], "--device"),
])
def test_bad_options_are_one_line(argv, words, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_serve.main(["--shape", "tiny", "--out", str(tmp_path)] + argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code and words in e.value.code


def test_bad_cache_option_fails_in_one_stderr_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_serve", "--device", "cpu", "--shape", "tiny",
                           "--group_size", "7", "--out", str(tmp_path)],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "--group_size" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written before the check


def test_results_go_to_an_untracked_folder_by_default():
    """Issue 22 item 11: by default nothing is written into the tracked outputs/results/."""
    out = bench_serve.build_parser().parse_args([]).out
    assert out == REPO_DIR / "outputs" / "local"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "bench_serve_cpu_x.json")], cwd=REPO_DIR)
    assert ignored.returncode == 0  # .gitignore holds it
