"""scripts/cpu_peers_speed.py: every library's row is timed on the same ids or says why it is not, each
quantized cache is set against its own library's full cache at the same context, and the results are written
(an 8-token context: int4 weights prefill at about a decode step per token on the CPU; the figures themselves are
outputs/results/' business, never asserted here)."""
import importlib.util
import json

import pytest

from scripts import cpu_peers_speed as cps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_time_each_cache_against_its_librarys_full(tmp_path):
    argv = ["--contexts", "8", "--steps", "2", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    if importlib.util.find_spec("llama_cpp") is None:  # else all three run (in .venv-peers)
        argv += ["--only", "ours,llama.cpp"]
    rows = cps.run(cps.build_parser().parse_args(argv), argv)
    ours = [r for r in rows if r["library"] == "ours"]
    assert [r["cache"] for r in ours] == ["full", "int8", "int4", "full, int8 weights", "full, int4 weights"]
    assert all(r["tokens_per_s"] > 0 for r in ours) and ours[0]["vs_full"] == 1.0
    assert ours[1]["vs_full"] == pytest.approx(ours[1]["tokens_per_s"] / ours[0]["tokens_per_s"])
    llama = [r for r in rows if r["library"] == "llama.cpp"]
    assert len(llama) == 3
    if importlib.util.find_spec("llama_cpp") is None:  # a missing peer is a row saying how to get it
        assert all(r["tokens_per_s"] is None and "setup.sh --peers" in r["note"] for r in llama)
    else:
        assert all(r["tokens_per_s"] > 0 for r in llama)
    saved = json.loads((tmp_path / "cpu_peers_speed.json").read_text())
    assert saved["rows"] == rows and "cpu_peers_speed" in saved["header"]["command"]
    assert "| ours | int4 | 8 |" in (tmp_path / "cpu_peers_speed.md").read_text()
    assert (tmp_path / "cpu_peers_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_one_line():
    with pytest.raises(SystemExit, match="every context longer than --steps"):
        cps.main(["--contexts", "8", "--steps", "16"])


def test_no_weight_rows_times_only_the_caches(tmp_path):
    argv = ["--contexts", "8", "--steps", "2", "--repeats", "1", "--threads", "1", "--only", "ours",
            "--no-weight_rows", "--out", str(tmp_path)]
    rows = cps.run(cps.build_parser().parse_args(argv), argv)
    assert [r["cache"] for r in rows] == ["full", "int8", "int4"] and all(r["tokens_per_s"] > 0 for r in rows)
