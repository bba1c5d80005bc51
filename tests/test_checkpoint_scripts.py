"""scripts/convert_hf_checkpoint.py and scripts/prepare_checkpoint.py as a user runs them (subprocesses): a checkpoint
folder is replaced whole or not at all, and an incomplete one gets one line naming the command that fixes it.

Small random Hugging Face checkpoints and a tiny GGUF are written in the real formats, as tests/test_model.py does;
the tokenizers are real files too: a byte-level BPE tokenizer.json and a tiktoken tokenizer.model whose ids differ.
"""
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from checkpoint import load_checkpoint
from test_model import make_hf_checkpoint, write_gguf
from tokenizer import load_tokenizer

REPO_DIR = Path(__file__).resolve().parent.parent
CONVERT = "scripts/convert_hf_checkpoint.py"
PREPARE = "scripts/prepare_checkpoint.py"
TEXT = "hello"


def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO_DIR, capture_output=True, text=True)


def assert_one_line_error(result, *needles):
    """Exit status != 0, exactly one line on stderr, starting `error:` and naming each needle, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders a write left beside its target."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def hf_with_tokenizer_json(folder: Path):
    """Checkpoint A: a Llama-2-shaped HF folder with a byte-level BPE tokenizer.json, its config and stop tokens."""
    make_hf_checkpoint("llama2", folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = HFTokenizer(models.BPE({char: i for i, char in enumerate(alphabet)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [257]}))


def tiktoken_ids(text: str) -> list[int]:
    """What checkpoint B's tokenizer.model gives: byte b has rank 255 - b (no merges)."""
    return [255 - b for b in text.encode()]


def hf_with_tokenizer_model(folder: Path):
    """Checkpoint B: a Llama-3-shaped HF folder whose only tokenizer is a tiktoken tokenizer.model (Meta's format)."""
    make_hf_checkpoint("llama3", folder)
    lines = [f"{base64.b64encode(bytes([255 - rank])).decode()} {rank}\n" for rank in range(256)]
    (folder / "tokenizer.model").write_text("".join(lines))


@pytest.fixture
def two_checkpoints(tmp_path):
    hf_with_tokenizer_json(tmp_path / "hf_a")
    hf_with_tokenizer_model(tmp_path / "hf_b")
    assert load_tokenizer(tmp_path / "hf_a").encode(TEXT) != tiktoken_ids(TEXT)  # A's ids differ from B's
    return tmp_path / "hf_a", tmp_path / "hf_b"


def test_force_conversion_replaces_the_whole_folder(two_checkpoints, tmp_path):
    hf_a, hf_b = two_checkpoints
    out = tmp_path / "out"
    assert run(CONVERT, "--checkpoint_dir", hf_a, "--out_dir", out).returncode == 0
    assert set(snapshot(out)) == {"model.pth", "model_args.json", "tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json"}
    a_files = snapshot(out)

    refused = run(CONVERT, "--checkpoint_dir", hf_b, "--out_dir", out)
    assert_one_line_error(refused, "--force", str(out))
    assert snapshot(out) == a_files

    assert run(CONVERT, "--checkpoint_dir", hf_b, "--out_dir", out, "--force").returncode == 0
    # Nothing of A is left: B's own files only (transformers wrote B a generation_config.json too).
    assert set(snapshot(out)) == {"model.pth", "model_args.json", "tokenizer.model", "generation_config.json"}
    for name in ("tokenizer.model", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_b / name).read_bytes(), name
    tokenizer = load_tokenizer(out / "model.pth")
    assert tokenizer.encode(TEXT) == tiktoken_ids(TEXT)  # B's tokenizer.model, not A's stale tokenizer.json
    args, state_dict = load_checkpoint(out / "model.pth")
    b_args, b_state_dict = load_checkpoint(hf_b)
    assert args == b_args and state_dict.keys() == b_state_dict.keys()
    assert leftovers(tmp_path) == []
    assert (out.stat().st_mode & 0o777) == (hf_a.stat().st_mode & 0o777)  # not mkdtemp's 0o700


# A script run with torch.save cut short: it writes half of model.pth, then the process is killed or the disk is full.
CUT_SHORT = """
import os, runpy, signal, sys, torch
mode, real_save = sys.argv[1], torch.save
def save_half(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(28, "No space left on device", str(path))
torch.save = save_half
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_killed_or_failed_conversion_leaves_the_old_folder(two_checkpoints, tmp_path):
    hf_a, hf_b = two_checkpoints
    out = tmp_path / "out"
    assert run(CONVERT, "--checkpoint_dir", hf_a, "--out_dir", out).returncode == 0
    a_files = snapshot(out)
    argv = [CONVERT, "--checkpoint_dir", hf_b, "--out_dir", out, "--force"]

    failed = run("-c", CUT_SHORT, "fail", *argv)
    assert_one_line_error(failed, "No space left on device", f"{out} is unchanged")
    assert snapshot(out) == a_files and leftovers(tmp_path) == []

    killed = run("-c", CUT_SHORT, "kill", *argv)
    assert killed.returncode == -9, killed.stderr
    assert snapshot(out) == a_files  # only a hidden temporary folder beside it holds the half-written file
    load_checkpoint(out / "model.pth")


def test_conversion_never_replaces_a_folder_that_is_not_a_checkpoint(two_checkpoints, tmp_path):
    hf_a, _ = two_checkpoints
    (tmp_path / "checkpoints" / "other-model").mkdir(parents=True)
    (tmp_path / "checkpoints" / "other-model" / "model.pth").write_bytes(b"another model")
    result = run(CONVERT, "--checkpoint_dir", hf_a, "--out_dir", tmp_path / "checkpoints", "--force")
    assert_one_line_error(result, "other-model", "--out_dir")
    assert (tmp_path / "checkpoints" / "other-model" / "model.pth").read_bytes() == b"another model"

    before = snapshot(hf_a)
    assert_one_line_error(run(CONVERT, "--checkpoint_dir", hf_a, "--out_dir", hf_a, "--force"), "--out_dir")
    assert snapshot(hf_a) == before


# ---- prepare_checkpoint.py on a tiny GGUF (--gguf) in place of the embedded SmolLM2 one ----------------------

@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, make_hf_checkpoint("tied", tmp_path / "hf"), gguf.GGMLQuantizationType.Q4_1, with_tokenizer=True)
    return path


def test_incomplete_checkpoint_names_force_and_force_rebuilds_it(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    assert run(PREPARE, "--gguf", tiny_gguf, "--out_dir", out).returncode == 0
    complete = snapshot(out)
    assert set(complete) == {"model.pth", "model_args.json", "tokenizer.json", "tokenizer_config.json"}
    again = run(PREPARE, "--gguf", tiny_gguf, "--out_dir", out)
    assert again.returncode == 0 and "nothing to do" in again.stdout and snapshot(out) == complete

    (out / "model_args.json").unlink()
    (out / "special_tokens_map.json").write_text("{}")  # a stray file: --force rebuilds the folder without it
    broken = snapshot(out)
    # The loader and prepare_checkpoint.py agree: the folder is incomplete and --force rebuilds it.
    with pytest.raises(ValueError, match="no model_args.json.*prepare_checkpoint.py --out_dir .* --force"):
        load_checkpoint(out / "model.pth")
    generate = run("generate.py", "--checkpoint_path", out / "model.pth", "--device", "cpu", "--max_new_tokens", "2")
    assert_one_line_error(generate, "no model_args.json", "--force")
    refused = run(PREPARE, "--gguf", tiny_gguf, "--out_dir", out)
    assert_one_line_error(refused, "no model_args.json", "--force")
    assert snapshot(out) == broken

    assert run(PREPARE, "--gguf", tiny_gguf, "--out_dir", out, "--force").returncode == 0
    assert snapshot(out).keys() == complete.keys() and leftovers(tmp_path) == []
    args, state_dict = load_checkpoint(out / "model.pth")
    gguf_args, gguf_state_dict = load_checkpoint(tiny_gguf)
    assert args == gguf_args and state_dict.keys() == gguf_state_dict.keys()
    tokenizer = load_tokenizer(out / "model.pth")
    assert tokenizer.decode(tokenizer.encode("hello there")) == "hello there"


def test_folder_with_only_a_tokenizer_is_incomplete(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("a user's tokenizer")
    assert_one_line_error(run(PREPARE, "--gguf", tiny_gguf, "--out_dir", out), "no model.pth", "--force")
    assert snapshot(out) == {"tokenizer.json": b"a user's tokenizer"}


def test_failed_prepare_leaves_the_old_folder(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    assert run(PREPARE, "--gguf", tiny_gguf, "--out_dir", out).returncode == 0
    before = snapshot(out)
    failed = run("-c", CUT_SHORT, "fail", PREPARE, "--gguf", tiny_gguf, "--out_dir", out, "--force")
    assert_one_line_error(failed, "No space left on device", f"{out} is unchanged")
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_missing_gguf_is_one_line(tmp_path):
    assert_one_line_error(run(PREPARE, "--gguf", tmp_path / "nope.gguf", "--out_dir", tmp_path / "out"), "--gguf")
    assert not (tmp_path / "out").exists()
    assert not os.listdir(tmp_path)
