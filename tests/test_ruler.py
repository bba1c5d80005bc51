"""scripts/data/ruler.py and evaluate.py --ruler: RULER from the nvidia-long-context-eval package's own generators and
scoring, with the embedded SmolLM2 tokenizer and model, at the smallest lengths each task family fits.

The generators fit each sample to the length with the evaluated model's tokenizer, one search step below it at
most (RULER's own tolerance: a step is a few filler sentences, words or documents); samples are cached on disk and
read back; RULER's string match scores hand-made answers as the package's functions do; evaluate.py puts `ruler`
and `ruler_mean` in its JSON, and a bad --ruler setting is one line before anything is written.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from long_context_eval.eval.synthetic.constants import (string_match_all, string_match_all_per_sample,
                                                        string_match_part, string_match_part_per_sample)

from checkpoint import default_checkpoint_path
from scripts import evaluate, run_matrix
from scripts.data import ruler
from tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent

# task -> (length, RULER's search step in tokens there: its samples fall within one step below the length)
FAMILIES = {
    "niah_single_1": (512, 160),  # 5 filler sentences per step below 4096 tokens
    "vt": (1024, 320),            # 10 noise lines (vt also holds a worked example: it needs ~700 tokens)
    "cwe": (1024, 160),           # 10 words
    "fwe": (512, 120),            # length / 32 coded words
    "qa_1": (2048, 1800),         # 10 SQuAD documents (fewer do not fit: qa needs ~1.5k tokens)
}


@pytest.fixture(scope="module")
def checkpoint(smollm2_gguf_path):
    path = default_checkpoint_path()
    return path if path.exists() else smollm2_gguf_path


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


def samples_of(tokenizer, checkpoint, cache_dir, tasks, num_samples=2):
    return ruler.load_samples(tokenizer, checkpoint, tasks, sorted({FAMILIES[t][0] for t in tasks}), num_samples,
                              42, cache_dir)


def test_generators_fit_the_length_and_cache_their_samples(tokenizer, checkpoint, tmp_path, monkeypatch):
    tasks = list(FAMILIES)
    # Every task at each length asked: keep the lengths the families fit by asking them one length at a time.
    made = {}
    for task in tasks:
        made[task] = samples_of(tokenizer, checkpoint, tmp_path, [task])
    head = tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).partition("x")[0]
    for task, samples in made.items():
        length, step = FAMILIES[task]
        assert [s["index"] for s in samples] == [0, 1]
        for s in samples:
            tokens = len(s["ids"]) + ruler.tokens_to_generate(task)
            assert length - step <= tokens <= length, (task, tokens)
            assert s["ids"] == tokenizer.encode(s["input"])  # a chat prompt: the template's tokens, no extra BOS
            assert s["input"].startswith(head)  # SmolLM2-Instruct: its own chat template, system prompt intact
            found = [answer in s["input"] for answer in s["outputs"]]
            assert all(found) if task != "qa_1" else any(found), (task, s["outputs"])
    assert "<|im_end|> Answer" not in made["vt"][0]["input"]  # vt's worked example keeps no end-of-turn token
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(files) == len(tasks) and all(json.loads((tmp_path / f).read_text())["samples"] for f in files)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(ruler, "generate", no_generation)
    for task in tasks:
        assert samples_of(tokenizer, checkpoint, tmp_path, [task]) == made[task]  # read from the cache
        assert samples_of(tokenizer, checkpoint, tmp_path, [task], 1) == made[task][:1]  # fewer: its first ones


def test_too_short_a_length_is_refused(tokenizer, checkpoint, tmp_path):
    """RULER's generators retry forever when a length cannot hold the task; the child process gives up."""
    with pytest.raises(ruler.TooShort, match="--ruler_lengths 256 is too short for RULER task vt"):
        ruler.load_samples(tokenizer, checkpoint, ["vt"], [256], 1, 42, tmp_path)
    assert not list(tmp_path.glob("*.json"))


def test_scoring_is_rulers_own():
    references = [["7434190"], ["1111111", "2222222", "3333333"], ["4444444"]]
    predictions = [" 7434190.", "\x02 2222222 and 1111111\n", " 1234567"]  # right, partly right (2 of 3), wrong
    score, per_sample = ruler.score("niah_multivalue", predictions, references)
    cleaned = [p.strip().replace("\x02", "\n").strip() for p in predictions]
    assert score == string_match_all(cleaned, references) == round((100 + 200 / 3 + 0) / 3, 2)
    assert per_sample == string_match_all_per_sample(cleaned, references) == pytest.approx([100, 200 / 3, 0])
    # qa: one of the references is enough
    references = [["Denver Broncos", "Broncos"], ["France"], ["1066"]]
    predictions = [" the broncos won", " Normandy, France", " 1067"]
    assert ruler.score("qa_1", predictions, references) == (
        string_match_part([p.strip() for p in predictions], references),
        string_match_part_per_sample([p.strip() for p in predictions], references))
    assert ruler.score("qa_1", predictions, references)[0] == round(200 / 3, 2)
    assert {task: ruler.metrics(task)[0] for task in ("vt", "cwe", "fwe", "qa_2")} == {
        "vt": string_match_all, "cwe": string_match_all, "fwe": string_match_all, "qa_2": string_match_part}


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoint):
    args, _ = evaluate.parse(["--checkpoint_path", str(checkpoint), "--device", "cpu", "--dtype", "float32"])
    model, tokenizer, _ = evaluate.load(args)
    return model, tokenizer


def tiny(checkpoint, *extra):
    return ["--checkpoint_path", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--max_tokens", "0",
            "--rouge_prompts", "0", "--retrieval_lengths", "", "--prefill_chunk", "64", "--eval_batch_size", "1",
            *map(str, extra)]


def test_evaluate_writes_ruler_scores(model_and_tokenizer, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "OUTPUTS", tmp_path)  # the RULER samples are cached there
    monkeypatch.setattr(evaluate, "load", lambda args: (*model_and_tokenizer, checkpoint))
    out = tmp_path / "matrix" / "full.json"
    evaluate.main(tiny(checkpoint, "--ruler", "fwe", "--ruler_lengths", "256", "--ruler_samples", "1", "--json", out))
    result = json.loads(out.read_text())
    assert set(result["ruler"]) == {"fwe"} and set(result["ruler"]["fwe"]) == {"256"}
    score = result["ruler"]["fwe"]["256"]
    assert 0 <= score <= 100 and result["ruler_mean"] == score and result["ruler_template"] == "chat"
    assert result["kv_tokens"] == 256  # the KV bytes of this RULER-only run's length (issue 22 item 14)
    [sample] = result["ruler_samples"]
    assert sample["tokens"] + 50 <= 256 and len(sample["outputs"]) == 3
    assert sample["score"] == pytest.approx(score, abs=0.01)  # the mean is rounded to 2 decimals, a sample's not
    assert result["settings"]["ruler"] == ["fwe"] and result["settings"]["ruler_lengths"] == [256]
    assert list(tmp_path.glob("ruler/fwe-256-*.json"))
    assert f"RULER {score:.1f} (fwe {score:.1f} at 256 tokens)" in capsys.readouterr().out

    table = run_matrix.render_table([result], ruler_by_task=True)
    header, _, row = [line for line in table.splitlines() if line.startswith("|")]
    assert "| Retrieval | RULER | RULER fwe | Tokens/s |" in header and f"| {score:.1f} | {score:.1f} |" in row
    assert "RULER: 1 tasks at [256] tokens, 1 samples each, chat prompt template" in table
    assert "RULER" not in run_matrix.render_table([{**result, "ruler_mean": None}])

    # A length the cache cannot hold is refused before any sample is made.
    with pytest.raises(SystemExit, match="RULER length 512 needs 512 tokens but a full cache holds 300 .* raise "
                                         "--max_position"):
        evaluate.main(tiny(checkpoint, "--ruler", "vt", "--ruler_lengths", "512", "--max_position", "300"))
    assert not list(tmp_path.glob("ruler/vt-*"))


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "scripts.evaluate", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, words", [
    (["--ruler", "niah_single_1,nope"], ["unknown RULER task nope", "all", "niah_multivalue", "qa_2"]),
    (["--ruler", "vt", "--ruler_lengths", "9000"], ["--ruler_lengths 9000", "context of 8192", "use 8192 or less"]),
])
def test_bad_ruler_setting_is_one_line_and_writes_nothing(checkpoint, tmp_path, extra, words):
    out = tmp_path / "r.json"
    before = set((REPO / "outputs" / "ruler").glob("*")) if (REPO / "outputs" / "ruler").exists() else set()
    proc = cli(*tiny(checkpoint, *extra, "--json", out))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists() and proc.stdout == ""
    after = set((REPO / "outputs" / "ruler").glob("*")) if (REPO / "outputs" / "ruler").exists() else set()
    assert after == before


def test_matrix_passes_ruler_options_and_does_not_resume_other_ones(tmp_path):
    matrix = run_matrix.build_matrix()
    args, settings = run_matrix.parse_args(["--ruler_by_task", "--ruler", "vt,fwe", "--ruler_lengths", "1024"])
    assert args.ruler_by_task and settings == ["--ruler", "vt,fwe", "--ruler_lengths", "1024"]
    [vt_fwe] = run_matrix.make_jobs(matrix, [0], tmp_path, settings)
    [vt_only] = run_matrix.make_jobs(matrix, [0], tmp_path, ["--ruler", "vt", "--ruler_lengths", "1024"])
    [no_ruler] = run_matrix.make_jobs(matrix, [0], tmp_path, [])
    assert vt_fwe["args"].ruler == ["vt", "fwe"]

    def settings_of(job):
        return evaluate.run_settings(job["args"], job["options"])

    vt_fwe["path"].write_text(json.dumps({"strategy": "full", "seconds": 1, "settings": settings_of(vt_fwe)}))
    assert run_matrix.finished(vt_fwe["path"], settings_of(vt_fwe)) == "complete"
    assert run_matrix.finished(vt_fwe["path"], settings_of(vt_only)) == "stale"
    assert run_matrix.finished(vt_fwe["path"], settings_of(no_ruler)) == "stale"
    # Without --ruler the settings are those of a result made before the RULER options existed.
    assert not any(key.startswith("ruler") for key in settings_of(no_ruler))
    all_tasks = run_matrix.make_jobs(matrix, [0], tmp_path, ["--ruler", "all"])[0]["args"].ruler
    assert all_tasks == ruler.task_names() and len(all_tasks) == 13


@pytest.mark.parametrize("command", [["-m", "scripts.data.ruler"], ["-m", "scripts.data.corpus"],
                                     ["scripts/data/ruler.py"]])
def test_the_data_libraries_are_not_commands(command):
    """Issue 22 item 17: run as a command with --help, a library says what it is and which command to run instead
    (it printed nothing and exited 0)."""
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: scripts/data/") and "is a library" in line and "python -m scripts.evaluate" in line
