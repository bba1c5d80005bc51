"""scripts/evaluate.py, scripts/run_matrix.py and scripts/slurm/ as tools for everyday use (issue 11).

A bad option is one line on stderr naming the fix, a non-zero exit, no traceback, and nothing written or lost: every
check runs before the first file is touched. A matrix killed part-way resumes where it stopped and keeps what was
finished. A retrieval length is what it says. Progress in a log (stderr not a terminal) is a few whole lines.
The command-line behaviours run as real subprocesses on the embedded model with the smallest settings; bad options
that end before any work run in this process (in_process), which shows what a subprocess would.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint import default_checkpoint_path
from conftest import in_process
from scripts import evaluate, run_matrix
from scripts.data import corpus
from scripts.prepare_checkpoint import smollm2_gguf_path
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def checkpoint_path():
    """The prepared model.pth when setup has run, else the GGUF it is made from (same weights)."""
    path = default_checkpoint_path()
    return path if path.exists() else smollm2_gguf_path()


# Smallest evaluation: 8 scored tokens, no ROUGE-L (it would cache references in the repo's outputs/), one
# 80-token passkey prompt (SmolLM2's passkey prompts need 74), caches sized for 80 tokens.
TINY = ["--device", "cpu", "--dtype", "float32", "--max_tokens", "8", "--stream_tokens", "0", "--max_position", "80",
        "--rouge_prompts", "0", "--retrieval_lengths", "80", "--retrieval_depths", "0.5", "--prefill_chunk", "16"]


def tiny():
    return TINY + ["--checkpoint_path", str(checkpoint_path())]


def cli(script, *argv, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", f"scripts.{script.removesuffix('.py')}", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under folder: name -> (bytes, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- run_matrix.py: check everything first


def planted_results(folder: Path) -> dict:
    """A results folder as an earlier run left it: entry JSONs (one of another matrix) and the table."""
    folder.mkdir()
    for name in ("00_full.json", "01_compress_kv_16-32.json", "14_quantize_kv_64-256_fp8.json"):
        (folder / name).write_text(json.dumps({"strategy": "full", "note": f"earlier result {name}"}))
    (folder / "table.md").write_text("| earlier table |\n")
    return snapshot(folder)


@pytest.mark.parametrize("argv, words", [
    (["--bogus", "1"], ["--bogus"]),                                  # an option neither script knows
    (["--max_tokens", "-1"], ["--max_tokens", ">= 0"]),              # an evaluate.py option out of range
    (["--retrieval_depths", "0.5,2"], ["--retrieval_depths"]),
    (["--retrieval_lengths", "128,128"], ["128", "once"]),
    (["--only", "99"], ["--only", "0..18"]),
    (["--only", "1,1"], ["--only", "once"]),
    (["--windows", "16-32"], ["--windows"]),
    (["--json", "x.json"], ["--json", "--out"]),                       # contradicts --out
    (["--render", "--max_tokens", "5"], ["--render"]),
    (["--data", "/nonexistent.txt"], ["--data"]),
])
def test_bad_matrix_option_fails_before_touching_the_results(tmp_path, argv, words):
    out = tmp_path / "matrix"
    before = planted_results(out)
    proc = in_process(run_matrix.main, ["--out", out, *argv])
    assert_one_line_error(proc, *words)
    assert snapshot(out) == before  # nothing deleted, replaced or added


def test_matrix_check_that_needs_the_model_fails_before_touching_the_results(tmp_path):
    """Too short a retrieval length needs the tokenizer to tell: still one line, still nothing touched."""
    out = tmp_path / "matrix"
    before = planted_results(out)
    line = assert_one_line_error(cli("run_matrix.py", "--out", out, "--only", "0,1", *tiny(),
                                     "--retrieval_lengths", "8", timeout=200), "--retrieval_lengths 8", "at least")
    assert re.search(r"use \d+ or more", line)
    assert snapshot(out) == before


def test_matrix_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli("run_matrix.py", "--out", tmp_path / "file" / "matrix", "--only", "0", *tiny()),
                          "is a file")


# ---------------------------------------------------------------- run_matrix.py: resume after a kill


def entry_jsons(out: Path) -> dict:
    return {p.name: p for p in sorted(out.glob("[0-9][0-9]_*.json"))}


def assert_complete(path: Path):
    result = json.loads(path.read_text())  # valid JSON: written atomically, even when killed
    for key in ("strategy", "settings", "kv_bytes", "perplexity", "retrieval_accuracy", "seconds"):
        assert key in result, (path.name, key)


def test_killed_matrix_resumes_and_keeps_finished_entries(tmp_path, capsys):
    out = tmp_path / "matrix"
    command = [sys.executable, "-m", "scripts.run_matrix", "--out", str(out), "--only", "0,1", *tiny()]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150
    while not (out / "00_full.json").exists():  # the first entry is done: kill the run during the second
        assert first.poll() is None and time.monotonic() < deadline, "the first entry never finished"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGTERM
    finished = entry_jsons(out)
    assert "00_full.json" in finished and "01_compress_kv_16-32.json" not in finished
    for path in finished.values():
        assert_complete(path)
    kept = {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in finished.items()}

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "skipped 00_full.json: complete, made with the same settings" in again.stdout
    assert "skipped 01_" not in again.stdout
    now = entry_jsons(out)
    assert sorted(now) == ["00_full.json", "01_compress_kv_16-32.json"]
    for path in now.values():
        assert_complete(path)
    assert {name: (now[name].read_bytes(), now[name].stat().st_mtime_ns) for name in kept} == kept  # untouched

    # What a third run would redo: a JSON made with other settings (stale) or cut short; a broken JSON in the
    # folder is left out of the table with a warning, not a traceback.
    job = run_matrix.make_jobs(run_matrix.build_matrix(), [1], out, tiny())[0]
    settings = evaluate.run_settings(job["args"], job["options"])
    assert run_matrix.finished(job["path"], settings) == "complete"
    result = json.loads(job["path"].read_text())
    result["settings"]["seed"] += 1
    job["path"].write_text(json.dumps(result))
    assert run_matrix.finished(job["path"], settings) == "stale"
    job["path"].write_text(job["path"].read_text()[:100])
    assert run_matrix.finished(job["path"], settings) == "unreadable"
    job["path"].write_text(json.dumps({"strategy": "compress_kv"}))
    assert run_matrix.finished(job["path"], settings) == "incomplete"
    (out / "05_broken.json").write_text('{"strategy": "full", "kv_bytes"')
    table = run_matrix.render(out)
    assert "05_broken.json is not readable JSON" in capsys.readouterr().err
    assert len([line for line in table.splitlines() if line.startswith("| ")][1:]) == 1  # 00 (01 is incomplete now)


def test_whole_run_sets_aside_results_of_other_entries(tmp_path):
    (tmp_path / "00_full.json").write_text("{}")
    (tmp_path / "14_quantize_kv_64-256_fp8.json").write_text('{"earlier": 1}')
    jobs = run_matrix.make_jobs(run_matrix.build_matrix(), range(11), tmp_path, [])
    run_matrix.set_aside_others(tmp_path, jobs)
    assert (tmp_path / "00_full.json").exists() and not (tmp_path / "14_quantize_kv_64-256_fp8.json").exists()
    assert (tmp_path / "superseded" / "14_quantize_kv_64-256_fp8.json").read_text() == '{"earlier": 1}'


def test_a_stale_result_is_kept_in_superseded(tmp_path, monkeypatch):
    """Issue 22 item 2: an entry redone with other settings replaces its result only once the new one is complete,
    and the old one is kept in DIR/superseded/ (a name already taken there gets a number): nothing is deleted."""
    [job] = run_matrix.make_jobs(run_matrix.build_matrix(), [0], tmp_path, tiny())
    path = job["path"]
    (tmp_path / "superseded").mkdir()
    (tmp_path / "superseded" / path.name).write_text('{"older": 1}')
    path.write_text(json.dumps({"strategy": "full", "seconds": 1, "settings": {"seed": 0}}))  # stale
    monkeypatch.setattr(evaluate, "load", lambda args: (None, None, "checkpoint"))
    monkeypatch.setattr(evaluate, "prepare", lambda tokenizer, args: {})
    monkeypatch.setattr(evaluate, "plan", lambda *args: {})
    monkeypatch.setattr(evaluate, "evaluate", lambda *args: {"strategy": "full", "seconds": 2, "new": True})
    monkeypatch.setattr(evaluate, "summary", lambda result: "summary")
    assert run_matrix.run([job]) == 1
    assert json.loads(path.read_text())["new"]
    assert json.loads((tmp_path / "superseded" / path.name).read_text()) == {"older": 1}
    assert json.loads((tmp_path / "superseded" / f"{path.stem}.1.json").read_text())["settings"] == {"seed": 0}


def test_rows_made_with_other_settings_are_marked():
    """Issue 22 item 2: the table never compares rows made with other settings without saying so."""
    base = dict(strategy="full", options={}, device="cpu", dtype="float32", checkpoint="c", data="d", tokens=24,
                chunk_size=1, prefill_chunk=32, kv_tokens=24, kv_bytes=2**20, kv_ratio=1.0,
                kv_bytes_by_tokens=[[24, 2**20]], perplexity=10.0, rouge_l=None, rouge_l_vs_full=None,
                retrieval_accuracy=None, tokens_per_s=None)
    full = dict(base, label="full", settings={"strategy": "full", "options": {}, "max_tokens": 24, "seed": 1})
    other = dict(base, strategy="compress_kv", label="compress_kv 16/32",
                 settings={"strategy": "compress_kv", "options": {"sink_size": 16}, "max_tokens": 16, "seed": 1})
    same = dict(base, strategy="quantize_kv", label="quantize_kv 16/32 int8",
                settings={"strategy": "quantize_kv", "options": {"bits": "8"}, "max_tokens": 24, "seed": 1})
    table = run_matrix.render_table([full, other, same])
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3 and rows[1].startswith("| compress_kv 16/32 ‡ |")
    assert "‡" not in rows[0] + rows[2]
    assert "‡ compress_kv 16/32: max_tokens 16 (first row: 24)" in table and "not comparable" in table


def test_commands_txt_runs_again_as_written(tmp_path):
    """Issue 22 item 15: every argument quoted (an empty one, one with a space), so the line runs as written."""
    argv = ["--out", str(tmp_path / "my run"), "--retrieval_lengths", "", "--max_tokens", "8"]
    run_matrix.log_command(tmp_path, datetime.datetime.now(), argv)
    command = (tmp_path / "commands.txt").read_text().splitlines()[-1].split(" s: ", 1)[1]
    assert shlex.split(command) == ["python", "-m", "scripts.run_matrix", *argv]


def test_kv_bytes_are_those_of_the_run_s_first_part():
    """Issue 22 item 14: a RULER-only run reports the KV bytes of its RULER length, not of the disabled ROUGE-L
    defaults; each part in turn decides when the ones before it are off."""
    def tokens(*argv):
        args, _ = evaluate.parse(["--device", "cpu", *argv])
        return evaluate.run_tokens(args)

    assert tokens("--max_tokens", "64") == 64
    assert tokens("--max_tokens", "0") == 160 + 48  # a ROUGE-L prompt and its continuation
    assert tokens("--max_tokens", "0", "--rouge_prompts", "0", "--retrieval_lengths", "100,300") == 300
    assert tokens("--max_tokens", "0", "--rouge_prompts", "0", "--retrieval_lengths", "", "--ruler", "vt",
                  "--ruler_lengths", "1k,512") == 1024


# ---------------------------------------------------------------- evaluate.py


@pytest.mark.parametrize("where, words", [
    ("folder", ["is a folder"]),
    ("under_file", ["is a file, not a folder"]),
])
def test_unwritable_json_path_fails_before_the_evaluation(tmp_path, where, words):
    (tmp_path / "file").write_text("x")
    path = tmp_path if where == "folder" else tmp_path / "file" / "result.json"
    before = snapshot(tmp_path)
    started = time.monotonic()
    assert_one_line_error(cli("evaluate.py", *tiny(), "--json", path), *words)
    assert time.monotonic() - started < 60  # before the model is loaded, not after the work
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, words", [
    (["--retrieval_lengths", "8"], ["--retrieval_lengths 8 is too short for passkey", "at least"]),
    (["--retrieval_tasks", "qa", "--retrieval_lengths", "64"], ["too short for qa", "at least"]),
    (["--max_position", "100000"], ["beyond the model's context of 8192"]),
    (["--data", "/nonexistent.txt"], ["--data"]),
])
def test_bad_evaluation_settings_are_one_line(argv, words):
    assert_one_line_error(in_process(evaluate.main, [*tiny(), *argv]), *words)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(checkpoint_path())


def prompt_args(**changes):
    args = argparse.Namespace(retrieval_tasks=["passkey", "qa"], retrieval_lengths=[256], retrieval_depths=[0, 0.5, 1],
                              retrieval_samples=1, seed=1234)
    return argparse.Namespace(**{**vars(args), **changes})


def test_retrieval_prompt_and_answer_fill_exactly_the_length(tokenizer):
    lengths = [160, 256, 1000, 4096, 10_000]  # 10,000 used to hold 9,603 passkey tokens; 128 qa ones 240-255
    prompts = evaluate.retrieval_prompts(tokenizer, prompt_args(retrieval_lengths=lengths))
    assert len(prompts) == 2 * len(lengths) * 3
    for p in prompts:
        assert len(p["ids"]) + evaluate.ANSWER_TOKENS[p["task"]] == p["length"], (p["task"], p["length"], p["depth"])
    for p in prompts:  # the pass key is there, at its depth in the filler between the intro and the question
        if p["task"] == "passkey":
            text = tokenizer.decode(p["ids"])
            assert text.startswith(corpus.PASSKEY_INTRO) and text.endswith(corpus.PASSKEY_QUESTION)
            haystack = len(text) - len(corpus.PASSKEY_INTRO) - len(corpus.PASSKEY_QUESTION)
            where = (text.index(p["answers"][0]) - len(corpus.PASSKEY_INTRO)) / haystack
            assert abs(where - p["depth"]) < 0.15, (p["length"], p["depth"], where)
    assert evaluate.retrieval_tokens(prompts, 10_000) == 10_000


def test_shortest_retrieval_length_is_the_one_the_error_names(tokenizer):
    for task in ("passkey", "qa"):
        with pytest.raises(ValueError, match=f"too short for {task}") as error:
            evaluate.retrieval_prompts(tokenizer, prompt_args(retrieval_tasks=[task], retrieval_lengths=[16]))
        minimum = int(re.search(r"use (\d+) or more", str(error.value)).group(1))
        prompts = evaluate.retrieval_prompts(tokenizer, prompt_args(retrieval_tasks=[task],
                                                                     retrieval_lengths=[minimum]))
        assert all(len(p["ids"]) + evaluate.ANSWER_TOKENS[task] == minimum for p in prompts)
        with pytest.raises(ValueError, match=f"use {minimum} or more"):
            evaluate.retrieval_prompts(tokenizer, prompt_args(retrieval_tasks=[task], retrieval_lengths=[minimum - 1]))


def test_log_progress_and_quantize_notice_only_for_the_asked_size(tmp_path):
    """stderr to a pipe (a Slurm log): whole progress lines, no carriage returns. quantize_kv 4/32 at
    --max_position 80 quantizes, so its "nothing is quantized" notice must not appear for the sizes evaluate uses
    inside (the memory curve's 16 and 32); with a window that covers all 80 tokens it appears once."""
    quantizes = cli("evaluate.py", "quantize_kv", "--sink_size", "4", "--window_size", "32", "--bits", "4",
                    "--group_size", "16", *tiny(), "--max_tokens", "20", "--json", tmp_path / "q.json")
    assert quantizes.returncode == 0, quantizes.stderr
    assert "\r" not in quantizes.stderr
    lines = quantizes.stderr.splitlines()
    assert 2 <= len(lines) <= 25, lines
    assert all(re.match(r"(perplexity|retrieval)\b.*: \d+/\d+ ", line) for line in lines), lines
    assert "nothing is quantized" not in quantizes.stderr
    assert json.loads((tmp_path / "q.json").read_text())["tokens"] == 20
    assert len(quantizes.stdout.strip().splitlines()) == 1  # the summary line

    nothing = cli("evaluate.py", "quantize_kv", "--sink_size", "4", "--window_size", "100", *tiny(),
                  "--retrieval_lengths", "")
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stderr.count("nothing is quantized") == 1


def test_log_progress_writes_a_line_per_tenth(capsys):
    for _ in evaluate.LogProgress(range(1000), None, "work", "step"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("work: 1000/1000 step (100%)")


# ---------------------------------------------------------------- scripts/slurm/submit.sh


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with a stub sbatch that records its arguments (one call per line) and answers a job id."""
    if shutil.which("sbatch", path="/usr/bin:/bin") or shutil.which("module", path="/usr/bin:/bin"):
        pytest.skip("a real Slurm is installed here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    if shutil.which("conda", path="/usr/bin:/bin"):
        pytest.skip("conda is installed in /usr/bin or /bin")
    # Nothing of the caller's cluster set-up: no exported `module` function, no settings of env.sh.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODULES", "CONDA_ENV", "EVAL_ARGS", "BASH_ENV") and not k.startswith("BASH_FUNC_")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return env, calls


def submit(env, **variables):
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "submit.sh"), "--partition=gpu"], cwd="/",
                          env={**env, **variables}, capture_output=True, text=True, timeout=120)


def test_submit_sizes_the_array_with_eval_args(fake_slurm):
    env, calls = fake_slurm
    eval_args = "--windows 16/32,64/256,16/128 --max_tokens 64"
    proc = submit(env, EVAL_ARGS=eval_args)
    assert proc.returncode == 0, proc.stderr
    listed = cli("run_matrix.py", "--list", *eval_args.split()).stdout.strip().splitlines()
    assert len(listed) == 24  # 1 + 3 pairs x (compress_kv + 4 formats) + 8 eviction entries (16/32 fits --budget 128)
    matrix_call, merge_call = calls.read_text().splitlines()
    assert f"--array=0-{len(listed) - 1} --partition=gpu scripts/slurm/matrix.sbatch" in matrix_call
    assert "--dependency=afterany:4242" in merge_call and "MATRIX_JOB_ID=4242" in merge_call
    assert "array job 4242 (24 tasks)" in proc.stdout


@pytest.mark.parametrize("variables, path, words", [
    ({}, "/usr/bin:/bin", ["sbatch is not on PATH"]),
    ({"MODULES": "anaconda3"}, None, ["MODULES=", "module"]),
    ({"CONDA_ENV": "kv-cache"}, None, ["CONDA_ENV=", "conda"]),
    ({"EVAL_ARGS": "--bogus 1"}, None, ["--bogus"]),
])
def test_submit_without_its_tools_is_one_line(fake_slurm, variables, path, words):
    env, calls = fake_slurm
    if path:
        env = {**env, "PATH": path}
    assert_one_line_error(submit(env, **variables), *words)
    assert not calls.exists()  # nothing queued
