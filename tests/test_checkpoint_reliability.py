"""checkpoint.py, weight_quant.py and the checkpoint scripts as a user meets them when something is off: an import
cycle, an interrupted or killed conversion, a model_args.json that does not belong to its model.pth, a gpt-fast
model.pth, a chat template kept only in chat_template.jinja. Each failure is one line, exit status non-zero, and
nothing is written or lost."""
import ast
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
PY = sys.executable


def module_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in a file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
    return found


def test_checkpoint_and_weight_quant_import_no_cycle():
    """weight_quant.py sits below checkpoint.py: it never imports checkpoint, and checkpoint imports it once, at the
    top (no function-level import of one by the other)."""
    assert not [name for name, _ in module_imports(REPO_DIR / "weight_quant.py") if name == "checkpoint"]
    from_checkpoint = [top for name, top in module_imports(REPO_DIR / "checkpoint.py") if name == "weight_quant"]
    assert from_checkpoint and all(from_checkpoint)
    # Either imports alone, and checkpoint still offers the marker helpers that scripts import from it.
    out = subprocess.run([PY, "-c", "import weight_quant, sys; assert 'checkpoint' not in sys.modules; "
                          "import checkpoint; "
                          "assert checkpoint.weight_quantization is weight_quant.weight_quantization; "
                          "assert checkpoint.WEIGHT_QUANTIZATION_FILE == 'weight_quantization.json'"],
                         cwd=REPO_DIR, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---- interrupted and killed conversions ----------------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402

import gguf  # noqa: E402
import pytest  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from test_checkpoint_scripts import (CONVERT, PREPARE, assert_one_line_error, hf_with_tokenizer_json,  # noqa: E402
                                     hf_with_tokenizer_model, leftovers, run, snapshot)
from test_model import make_hf_checkpoint, write_gguf  # noqa: E402

# A script whose torch.save is cut short by a signal to the process itself, once half of model.pth is written:
# SIGINT (Ctrl-C), SIGTERM (kill), or SIGKILL (nothing can clean up).
SIGNALLED = """
import os, runpy, signal, sys, time, torch
sig, real_save = getattr(signal, sys.argv[1]), torch.save
def save_half(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    os.kill(os.getpid(), sig)
    time.sleep(5)  # the signal arrives here
torch.save = save_half
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    write_gguf(path, make_hf_checkpoint("tied", folder / "hf"), gguf.GGMLQuantizationType.Q4_1, with_tokenizer=True)
    return path


def conversions(tmp_path, tiny_gguf):
    """(the first command, the --force command replacing its folder) for each script."""
    hf_with_tokenizer_json(tmp_path / "hf_a")
    hf_with_tokenizer_model(tmp_path / "hf_b")
    out = tmp_path / "work" / "out"
    return {"convert": ([CONVERT, "--checkpoint_dir", tmp_path / "hf_a", "--out_dir", out],
                        [CONVERT, "--checkpoint_dir", tmp_path / "hf_b", "--out_dir", out, "--force"]),
            "prepare": ([PREPARE, "--gguf", tiny_gguf, "--out_dir", out],
                        [PREPARE, "--gguf", tiny_gguf, "--out_dir", out, "--force"])}, out


@pytest.mark.parametrize("script", ["convert", "prepare"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_conversion_is_one_line_and_leaves_nothing(script, sig, tmp_path, tiny_gguf):
    commands, out = conversions(tmp_path, tiny_gguf)
    first, force = commands[script]
    assert run(*first).returncode == 0
    before = snapshot(out)
    interrupted = run("-c", SIGNALLED, sig, *force)
    assert_one_line_error(interrupted, "interrupted")
    assert snapshot(out) == before and leftovers(out.parent) == []  # the half-written copy is gone


@pytest.mark.parametrize("script", ["convert", "prepare"])
def test_a_killed_conversion_is_cleaned_by_the_next_run(script, tmp_path, tiny_gguf):
    commands, out = conversions(tmp_path, tiny_gguf)
    first, force = commands[script]
    assert run(*first).returncode == 0
    before = snapshot(out)
    killed = run("-c", SIGNALLED, "SIGKILL", *force)
    assert killed.returncode == -signal.SIGKILL
    assert snapshot(out) == before and len(leftovers(out.parent)) == 1  # the dead run's half-built folder
    # An unrelated hidden file and a live process's temporary folder are never touched.
    (out.parent / ".notes").write_text("mine")
    live = out.parent / f".out.tmp-{os.getpid()}-abcdefgh"
    live.mkdir()
    again = run(*first)  # even a run that refuses (out exists, no --force) cleans up after the killed one
    assert again.returncode != 0 or "nothing to do" in again.stdout
    assert snapshot(out) == before and leftovers(out.parent) == [".notes", live.name]
    live.rmdir()
    assert run(*force).returncode == 0 and leftovers(out.parent) == [".notes"]
    load_checkpoint(out / "model.pth")


def test_a_run_killed_between_the_swap_renames_gets_its_old_folder_back(tmp_path):
    """The swap is two renames (old folder aside, new one in): a run killed between them leaves no target; the next
    run puts the old folder back and removes the new, unfinished-looking one."""
    from atomic import clean_stale

    target = tmp_path / "ckpt"
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".ckpt.old.{dead}").mkdir()
    (tmp_path / f".ckpt.old.{dead}" / "model.pth").write_text("old")
    (tmp_path / f".ckpt.tmp-{dead}-x1y2z3w4").mkdir()
    clean_stale(target)
    assert (target / "model.pth").read_text() == "old" and leftovers(tmp_path) == []


# ---- the tokenizer files a conversion copies ---------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}[[{{ m['role'] }}: {{ m['content'] }}]]{% endfor %}"
                 "{% if add_generation_prompt %}<ASSISTANT>{% endif %}")


def test_tokenizer_files_are_defined_once():
    """checkpoint.TOKENIZER_FILES is the one list: the scripts that copy or hash tokenizer files import it."""
    import checkpoint
    assert "chat_template.jinja" in checkpoint.TOKENIZER_FILES
    assert set(checkpoint.TOKENIZER_NAMES) <= set(checkpoint.TOKENIZER_FILES)
    scripts = [REPO_DIR / "scripts" / "convert_hf_checkpoint.py", REPO_DIR / "scripts" / "prepare_checkpoint.py",
               *(REPO_DIR / "scripts").glob("**/ruler.py")]
    for path in scripts:
        tree = ast.parse(path.read_text())
        assigned = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "TOKENIZER_FILES" for t in node.targets)]
        assert not assigned, f"{path} defines its own TOKENIZER_FILES"
        if "TOKENIZER_FILES" in path.read_text():
            assert any(isinstance(node, ast.ImportFrom) and node.module == "checkpoint"
                       and "TOKENIZER_FILES" in [a.name for a in node.names] for node in ast.walk(tree)), path


def test_chat_template_only_in_chat_template_jinja_survives_conversion(tmp_path):
    """An HF folder whose chat template is only chat_template.jinja (what transformers >= 4.50 saves): the converted
    checkpoint has it, its tokenizer renders it, and generate.py --chat wraps the prompt in it."""
    from tokenizer import load_tokenizer

    hf_with_tokenizer_json(tmp_path / "hf")
    (tmp_path / "hf" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    out = tmp_path / "out"
    converted = run(CONVERT, "--checkpoint_dir", tmp_path / "hf", "--out_dir", out)
    assert converted.returncode == 0, converted.stderr
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tokenizer = load_tokenizer(out / "model.pth")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "[[user: hi]]<ASSISTANT>"

    chat = run("generate.py", "--checkpoint_path", out / "model.pth", "--chat", "--prompt", "hi",
               "--max_new_tokens", "2", "--device", "cpu")
    assert chat.returncode == 0, chat.stderr
    assert f"prompt tokens: {len(tokenizer.encode(rendered))}," in chat.stdout, chat.stdout


# ---- a model_args.json that does not match its model.pth ---------------------------------------------------

import json  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402

from checkpoint import default_checkpoint_path, write_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

TINY = ModelArgs(vocab_size=49152, dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, head_dim=16,
                 max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 0.1)
    return model.eval()


def with_smollm2_tokenizer(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(default_checkpoint_path().parent / name, folder / name)
    return folder / "model.pth"


@pytest.mark.parametrize("change, needles", [
    ({"n_kv_head": 4}, ["layers.0.attention.wqkv.weight", "[128, 64]", "[192, 64]", "n_kv_head=4"]),
    ({"intermediate_size": 256}, ["layers.0.feed_forward.w1.weight", "intermediate_size=256"]),
    ({"n_layer": 3}, ["holds 2 layers", "n_layer=3"]),
    ({"tie_word_embeddings": True}, ["holds an output.weight", "tie_word_embeddings=True"]),
])
def test_model_args_that_do_not_match_the_weights_are_one_line(change, needles, tmp_path):
    folder = tmp_path / "tiny"
    write_checkpoint(folder, TINY, random_model(TINY).state_dict())
    model_path = with_smollm2_tokenizer(folder)
    args = json.loads((folder / "model_args.json").read_text())
    (folder / "model_args.json").write_text(json.dumps({**args, **change}))
    before = snapshot(folder)
    result = run("generate.py", "--checkpoint_path", model_path, "--prompt", "Hi", "--max_new_tokens", "2",
                 "--device", "cpu")
    assert_one_line_error(result, str(model_path), "model_args.json does not belong to these weights", *needles)
    assert snapshot(folder) == before
