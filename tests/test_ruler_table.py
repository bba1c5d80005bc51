"""scripts/ruler_table.py: RULER cells from many folders' evaluate.py JSON side by side, merged only where the
prompts are the same, with sample counts, the mean only where every task is measured, and disagreements shown."""
import json
import subprocess
import sys

import pytest

from scripts import ruler_table
from scripts.common import REPO_DIR

FULL_BYTES = 1000
SETTINGS = {"seed": 1234, "prefill_chunk": 32, "dtype": "float32", "ruler_package": "26.3"}


def result(strategy, options, scores: dict, length=4096, kv_bytes=FULL_BYTES, settings=SETTINGS):
    """An evaluate.py result: scores {task: [sample scores]} at `length` tokens."""
    samples = [{"task": task, "length": length, "index": i, "output": "", "outputs": [], "score": s}
               for task, per_sample in scores.items() for i, s in enumerate(per_sample)]
    return {"strategy": strategy, "options": options, "checkpoint": {"path": "m.pth", "size": 1}, "settings": settings,
            "ruler_template": "chat", "ruler_samples": samples, "kv_tokens": length, "kv_bytes": kv_bytes,
            "kv_bytes_full": FULL_BYTES, "kv_ratio": kv_bytes / FULL_BYTES, "kv_bytes_by_tokens": [[length, kv_bytes]]}


def write(folder, name, r):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(r))


TOVA = {**ruler_table.default_options("tova"), "budget": 300, "then_bits": "4"}


@pytest.fixture
def results(tmp_path):
    old, new = tmp_path / "cpu_a_2026-12-04", tmp_path / "cpu_b_2026-12-05"
    write(old, "full.json", result("full", {"attn_impl": None}, {"niah_single_1": [100] * 4,
                                                                  "niah_single_2": [100, 0, 100, 100],
                                                                  "niah_multikey_1": [0, 100, 0, 100]}))
    # tova measured a task per file, across two folders; niah_single_1 twice, the code having changed between
    write(old, "tova_s1.json", result("tova", TOVA, {"niah_single_1": [100, 100, 0, 0]}, kv_bytes=100))
    write(new, "tova_s1.json", result("tova", TOVA, {"niah_single_1": [100, 100, 100, 0]}, kv_bytes=100))
    # the checkpoint prepared again (another mtime) is the same model: its cells join the row
    write(new, "tova_s2.json", {**result("tova", TOVA, {"niah_single_2": [100, 0, 0, 0]}, kv_bytes=100),
                                "checkpoint": {"path": "m.pth", "size": 1, "mtime_ns": 5}})
    # niah_multikey_1 measured before --pooling, --decode_kernel_size and --accumulate (their defaults kept what the
    # code did): the same configuration, one row
    before = {k: v for k, v in TOVA.items() if k not in ruler_table.BEFORE_OPTION}
    write(old, "tova_mk1.json", result("tova", before, {"niah_multikey_1": [100, 100, 0, 0]}, kv_bytes=100))
    # the same configuration on other prompts (another seed) is another row, never merged
    write(new, "tova_mk1_seed.json", result("tova", TOVA, {"niah_multikey_1": [100] * 4}, kv_bytes=100,
                                            settings={**SETTINGS, "seed": 7}))
    # an option the result predates
    write(new, "snapkv.json", result("snapkv", {"sink_size": 16, "window_size": 32, "budget": 300},
                                     {"niah_single_1": [100] * 2}, kv_bytes=200))
    write(old, "snapkv.json", result("snapkv", {"sink_size": 16, "window_size": 32, "budget": 300},
                                     {"niah_single_1": [100] * 4}, kv_bytes=200))  # the same score on more samples
    write(new, "at2k.json", result("full", {"attn_impl": None}, {"niah_single_1": [0] * 4}, length=2048))
    (new / "peers.json").write_text(json.dumps({"rows": []}))  # not an evaluate.py result
    (new / "broken.json").write_text("{")
    return tmp_path


def table_rows(text):
    return {line.split(" | ")[0].strip("| "): [c.strip(" |") for c in line.split(" | ")[1:]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| configuration")}


def test_cells_merge_across_folders_with_counts_means_and_disagreements(results):
    text = ruler_table.render(ruler_table.collect(ruler_table.ruler_results([results]), 4096), ruler_table.NIAH3,
                              4096)
    rows = table_rows(text)
    assert rows["full"] == ["1.000", "100.0 (4)", "75.0 (4)", "50.0 (4)", "75.0"]
    tova = "tova budget=300 then_bits=4"
    # the newer folder's score first; both kept, and the disagreement named under the table with its files
    assert rows[tova] == ["0.100", "75.0 (4) / 50.0 (4)", "25.0 (4)", "50.0 (4)", "50.0"]  # the mean of the newest
    assert f"- {tova}, niah_single_1: 75.0 (4) in {results / 'cpu_b_2026-12-05' / 'tova_s1.json'}; 50.0 (4) in" in text
    # the other seed's row stands apart, saying how its prompts differ from the first row's
    assert rows[f"{tova} [seed 7]"] == ["0.100", "–", "–", "100.0 (4)", "–"]
    snapkv = [label for label in rows if label.startswith("snapkv")]
    assert snapkv and "obs_window=?" in snapkv[0] and "budget=300" in snapkv[0]
    # an option that came with the earlier behaviour as its default: a result before it ran with that default
    assert "pooling" not in snapkv[0] and "decode_kernel_size" not in snapkv[0]
    before = {k: v for k, v in ruler_table.default_options("h2o").items() if k != "accumulate"}
    assert ruler_table.config_label("h2o", before) == "h2o budget=256"  # an h2o result before --accumulate: a sum
    forward = {**ruler_table.default_options("snapkv"), "pooling": "forward"}
    assert ruler_table.config_label("snapkv", forward) == "snapkv budget=256 pooling=forward"
    assert rows[snapkv[0]][1] == "100.0 (2) / 100.0 (4)"  # a cell of another sample count is another measurement
    assert f"- {snapkv[0]}" not in text  # with the same score: no disagreement to name
    # bits and budget are what rows are compared by: shown at their defaults too, the other defaults left out
    assert ruler_table.config_label("quantize_kv", ruler_table.default_options("quantize_kv")) == "quantize_kv bits=8"
    assert list(rows)[0] == "full" and list(rows)[1] == snapkv[0]  # full first, then by bytes
    assert "sample count in parentheses" in text


def test_other_length_and_errors(results, tmp_path):
    rows = table_rows(ruler_table.render(ruler_table.collect(ruler_table.ruler_results([results]), 2048),
                                         ["niah_single_1"], 2048))
    assert rows == {"full": ["1.000", "0.0 (4)", "0.0"]}
    with pytest.raises(ValueError, match="no RULER result at 1024 tokens"):
        ruler_table.render(ruler_table.collect(ruler_table.ruler_results([results]), 1024), ["niah_single_1"], 1024)
    run = subprocess.run([sys.executable, "-m", "scripts.ruler_table", str(tmp_path / "missing"), "--length", "4k"],
                         cwd=REPO_DIR, capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "is not a folder" in run.stderr
    out = tmp_path / "table.md"
    run = subprocess.run([sys.executable, "-m", "scripts.ruler_table", str(results), "--length", "4k", "--out",
                          str(out)], cwd=REPO_DIR, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == run.stdout and "| full | 1.000 |" in run.stdout
