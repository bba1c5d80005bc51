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
import numpy as np  # noqa: E402
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
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a test run in the background ignores it
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


def test_fast_gguf_reader_reads_what_gguf_reads(tiny_gguf):
    """gguf_file.open_gguf (gguf's reader through a plain view of the map) gives gguf.GGUFReader's fields and
    tensors, byte for byte: metadata scalars, strings, the token list and merges, Q4_1 and float tensors."""
    from gguf_file import open_gguf

    theirs, ours = gguf.GGUFReader(str(tiny_gguf)), open_gguf(tiny_gguf)
    assert list(ours.fields) == list(theirs.fields) and "tokenizer.ggml.merges" in ours.fields
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.types, mine.data) == (field.offset, field.types, field.data), name
        assert len(mine.parts) == len(field.parts), name
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), name
        assert mine.contents() == field.contents(), name
    assert {t.tensor_type for t in ours.tensors} >= {gguf.GGMLQuantizationType.Q4_1}
    for mine, tensor in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type, list(mine.shape), mine.data_offset) == \
            (tensor.name, tensor.tensor_type, list(tensor.shape), tensor.data_offset)
        assert mine.data.dtype == tensor.data.dtype and np.array_equal(mine.data, tensor.data), mine.name


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

import generate  # noqa: E402
from checkpoint import default_checkpoint_path, write_checkpoint  # noqa: E402
from conftest import in_process  # noqa: E402
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
    result = in_process(generate.main, ["--checkpoint_path", model_path, "--prompt", "Hi", "--max_new_tokens", "2",
                                        "--device", "cpu"])
    assert_one_line_error(result, str(model_path), "model_args.json does not belong to these weights", *needles)
    assert snapshot(folder) == before


# ---- gpt-fast's model.pth ----------------------------------------------------------------------------------

import re  # noqa: E402

from checkpoint import gpt_fast_table_args, load_model_args  # noqa: E402

# gpt-fast's scripts/convert_hf_checkpoint.py (pytorch-labs/gpt-fast, commit 32971d3), verbatim where it matters.
GPT_FAST_WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def gpt_fast_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """gpt-fast's `permute`: Hugging Face q/k rows to Meta's interleaved layout (head_dim from the rows)."""
    head_dim, dim = w.shape[0] // n_head, w.shape[1]
    return w.view(n_head, 2, head_dim // 2, dim).transpose(1, 2).reshape(head_dim * n_head, dim)


def gpt_fast_convert(checkpoint_dir: Path, n_head: int, n_kv_head: int):
    """gpt-fast's conversion of a Hugging Face folder: model.pth written inside it (its config is given here rather
    than looked up by the folder's name)."""
    from safetensors.torch import load_file
    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())
    merged = {}
    for file in sorted({checkpoint_dir / name for name in index["weight_map"].values()}):
        merged.update(load_file(str(file), device="cpu"))
    final = {}
    for key, value in merged.items():
        if "layers" in key:
            new_key = GPT_FAST_WEIGHT_MAP[re.sub(r"(\d+)", "{}", key)]
            if new_key is None:
                continue
            new_key = new_key.format(re.search(r"\d+", key).group(0))
        else:
            new_key = GPT_FAST_WEIGHT_MAP[key]
        final[new_key] = value
    for key in tuple(final.keys()):
        if "wq" in key:
            q, k, v = final.pop(key), final.pop(key.replace("wq", "wk")), final.pop(key.replace("wq", "wv"))
            final[key.replace("wq", "wqkv")] = torch.cat([gpt_fast_permute(q, n_head), gpt_fast_permute(k, n_kv_head),
                                                          v])
    torch.save(final, checkpoint_dir / "model.pth")


def logits(args: ModelArgs, state_dict: dict, ids=(1, 5, 9, 200, 3, 77)) -> torch.Tensor:
    from kv_cache.full import FullCache
    model = Transformer.from_state_dict(args, state_dict, dtype=torch.float32)
    model.setup_caches(lambda i: FullCache(1, 16, args.n_kv_head, args.head_dim, torch.float32, "cpu"), 16)
    ids = torch.tensor([ids])
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]))


@pytest.mark.parametrize("name", ["llama2", "llama3", "tied"])
def test_gpt_fast_model_pth_loads_as_its_hugging_face_folder(name, tmp_path):
    """gpt-fast's converter writes model.pth into the Hugging Face folder (config.json beside it): loaded from the
    model.pth, the weights and logits are exactly those of the folder's safetensors."""
    hf = tmp_path / name
    reference = make_hf_checkpoint(name, hf)
    gpt_fast_convert(hf, reference.config.num_attention_heads, reference.config.num_key_value_heads)
    args, state_dict = load_checkpoint(hf / "model.pth")
    hf_args, hf_state_dict = load_checkpoint(hf)  # the safetensors, our way
    assert args == hf_args and load_model_args(hf / "model.pth") == hf_args
    assert state_dict.keys() == hf_state_dict.keys()
    for key in state_dict:
        assert torch.equal(state_dict[key], hf_state_dict[key]), key
    assert torch.equal(logits(args, state_dict), logits(hf_args, hf_state_dict))


def test_gpt_fast_model_pth_by_folder_name(tmp_path):
    """No config.json: gpt-fast's table entry for the folder's name (its ModelArgs.from_name), here stories15M;
    the logits equal the same weights written our way."""
    key, args = gpt_fast_table_args("stories15M")
    assert key == "stories15M" and (args.dim, args.n_layer, args.n_head, args.intermediate_size) == (288, 6, 6, 768)
    assert gpt_fast_table_args("llama-2-7b-chat-hf")[0] == "7B"
    assert gpt_fast_table_args("meta-llama-3.1-8b-instruct")[0] == "llama-3.1-8b"
    assert gpt_fast_table_args("smollm2-135m") is None
    ours = random_model(args).to(torch.bfloat16).state_dict()
    q_rows, kv_rows = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    theirs = {}
    for name, t in ours.items():
        if name.endswith("wqkv.weight"):
            q, k, v = t.split([q_rows, kv_rows, kv_rows])
            t = torch.cat([gpt_fast_permute(q, args.n_head), gpt_fast_permute(k, args.n_kv_head), v])
        theirs[name] = t.clone()
    (tmp_path / "stories15M").mkdir()
    torch.save(theirs, tmp_path / "stories15M" / "model.pth")
    loaded_args, loaded = load_checkpoint(tmp_path / "stories15M" / "model.pth")
    assert loaded_args == args and load_model_args(tmp_path / "stories15M") == args
    for name in ours:
        assert torch.equal(loaded[name], ours[name]), name
    assert torch.equal(logits(loaded_args, loaded), logits(args, ours))


def test_generate_runs_a_gpt_fast_model_pth(tmp_path):
    """generate.py --checkpoint_path on a gpt-fast model.pth (config.json and tokenizer beside it) gives the
    tokens of the same weights converted our way."""
    state_dict = random_model(TINY).state_dict()
    write_checkpoint(tmp_path / "ours", TINY, state_dict)
    with_smollm2_tokenizer(tmp_path / "ours")
    q_rows, kv_rows = TINY.n_head * TINY.head_dim, TINY.n_kv_head * TINY.head_dim
    theirs = {}
    for name, t in state_dict.items():
        if name.endswith("wqkv.weight"):
            q, k, v = t.split([q_rows, kv_rows, kv_rows])
            t = torch.cat([gpt_fast_permute(q, TINY.n_head), gpt_fast_permute(k, TINY.n_kv_head), v])
        theirs[name] = t
    (tmp_path / "gpt-fast").mkdir()
    torch.save(theirs, tmp_path / "gpt-fast" / "model.pth")
    (tmp_path / "gpt-fast" / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": TINY.vocab_size, "hidden_size": TINY.dim,
        "num_hidden_layers": TINY.n_layer, "num_attention_heads": TINY.n_head,
        "num_key_value_heads": TINY.n_kv_head, "intermediate_size": TINY.intermediate_size,
        "rms_norm_eps": TINY.norm_eps, "rope_theta": TINY.rope_base,
        "max_position_embeddings": TINY.max_position_embeddings, "tie_word_embeddings": False}))
    with_smollm2_tokenizer(tmp_path / "gpt-fast")
    tokens = []
    for folder in ("ours", "gpt-fast"):
        out = tmp_path / f"{folder}.jsonl"
        result = run("generate.py", "--checkpoint_path", tmp_path / folder / "model.pth", "--prompt",
                     "Once upon a time,", "--max_new_tokens", "8", "--device", "cpu", "--out", out)
        assert result.returncode == 0, result.stderr
        tokens.append(json.loads(out.read_text())["tokens"])
    assert tokens[0] == tokens[1]
