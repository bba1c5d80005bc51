"""Load a Llama checkpoint into model.py's state-dict names, from any of three layouts:

  * a llama.cpp `.gguf` file (dequantized here; llama.cpp's Q/K row permutation undone),
  * a Hugging Face directory (config.json + one or sharded *.safetensors),
  * a `model.pth` with `model_args.json` beside it, as written by write_checkpoint (the scripts/ converters),
  * gpt-fast's `model.pth` (no model_args.json; its config from the Hugging Face config.json beside it or from
    gpt-fast's table by folder name), whose Meta-layout q/k rows are put back in Hugging Face order.

Tensors come back in float32 (GGUF) or in their stored float dtype; the caller casts. Every model.pth is checked
against its config (check_shapes) before a tensor is read.
"""
import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import torch
from torch import Tensor

from atomic import AtomicDir, clean_stale  # noqa: F401 (clean_stale: for the scripts)
from gguf_file import open_gguf
from model import ModelArgs, Transformer, rope_inv_freq
from weight_quant import WEIGHT_QUANTIZATION_FILE, import_torchao, weight_quantization  # noqa: F401 (re-exported)

REPO_DIR = Path(__file__).resolve().parent
SETUP_HINT = "run `bash scripts/setup.sh` to prepare the default model, or pass --checkpoint_path"
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model")  # what tokenizer.load_tokenizer reads from a folder
# Every file of a checkpoint folder that tokenizer.py reads: the tokenizer, its special tokens, the chat template
# (chat_template.jinja first, then tokenizer_config.json's) and the stop tokens. What a conversion copies
# (scripts/convert_hf_checkpoint.py, scripts/prepare_checkpoint.py --quantize) and what RULER's cache key hashes.
TOKENIZER_FILES = (*TOKENIZER_NAMES, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def default_checkpoint_path() -> Path:
    return REPO_DIR / "checkpoints" / "smollm2-135m" / "model.pth"


def load_checkpoint(path, dtype: torch.dtype = None, shard=None) -> tuple[ModelArgs, dict[str, Tensor]]:
    """(ModelArgs, state_dict) from a .gguf file, a HF directory, or a model.pth (or a directory holding one).
    With `dtype`, each tensor is cast as it is read, so a large checkpoint never sits in memory twice.
    shard (tensor parallel, tp.py): a function of the ModelArgs, called before any tensor is read, giving
    {name: (dim, [(start, stop), ...])}: of those tensors only the slices along dim are read (concatenated in
    order): safetensors through get_slice, a model.pth through its memory map, GGUF one tensor at a time."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path} — {SETUP_HINT}")
    if path.is_dir():
        if (path / "config.json").exists() and list(path.glob("*.safetensors")):
            return load_hf_dir(path, dtype, shard)
        if (path / "model.pth").exists():
            return load_pth(path / "model.pth", dtype, shard)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype, shard)
        raise ValueError(f"no checkpoint in {path}: expected model.pth with model_args.json, one .gguf file, or "
                         "config.json with *.safetensors — convert one with scripts/convert_hf_checkpoint.py, or "
                         "pass the checkpoint file itself as --checkpoint_path")
    if path.suffix == ".gguf":
        return load_gguf(path, dtype, shard)
    if path.name == "config.json" or path.suffix == ".safetensors":
        return load_hf_dir(path.parent, dtype, shard)
    return load_pth(path, dtype, shard)


def _cast(t: Tensor, dtype) -> Tensor:
    # A torchao tensor (a quantized checkpoint's linears) keeps its own dtypes: its activations set the output's.
    return t if dtype is None or type(t) is not torch.Tensor else t.to(dtype)


def load_model_args(path) -> ModelArgs:
    """The checkpoint's ModelArgs alone, no weight read (generate.py --plan): the model_args.json of a model.pth
    checkpoint, a Hugging Face config.json (the file, or a folder holding it: the weights need not be there), or
    a GGUF's metadata. The same layouts load_checkpoint reads, in the same order."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path} — {SETUP_HINT}")
    if path.suffix == ".gguf":
        return read_gguf(path)[0]
    folder = path if path.is_dir() else path.parent
    hf = (path.name == "config.json" or path.suffix == ".safetensors" or
          path.is_dir() and (path / "config.json").is_file() and
          (any(path.glob("*.safetensors")) or not (path / "model_args.json").is_file()))
    name = "config.json" if hf else "model_args.json"
    model_file = path if path.is_file() else folder / "model.pth"
    if not hf and not (folder / name).is_file() and model_file.is_file() and gpt_fast_config(model_file):
        return _gpt_fast_state_dict(model_file)[1]  # (memory-mapped: only the names are looked at)
    if (folder / name).is_file():
        try:
            config = json.loads((folder / name).read_text())
            return hf_model_args(config) if hf else ModelArgs.from_dict(config)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read {folder / name} ({_one_line(e)}) — convert the checkpoint again")
    ggufs = sorted(folder.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return read_gguf(ggufs[0])[0]
    raise ValueError(f"no model config in {folder}: expected model_args.json, a Hugging Face config.json or one "
                     ".gguf file")


def take_piece(t: Tensor, piece, dtype=None) -> Tensor:
    """t, or with piece = (dim, [(start, stop), ...]) its slices along dim concatenated (a copy: only those
    elements are read from a memory-mapped t), cast to dtype."""
    if piece is None:
        return _cast(t, dtype)
    if type(t) is not torch.Tensor:  # a quantized tensor subclass (torchao): its packing is not sliced here
        raise ValueError(f"a {type(t).__name__} tensor cannot be split for tensor parallelism: load the 16-bit "
                         "checkpoint and quantize after sharding (--quantize)")
    dim, ranges = piece
    return torch.cat([_cast(t.narrow(dim, start, stop - start), dtype) for start, stop in ranges], dim)


def _fused_parts(ranges, sizes) -> list[tuple[int, int, int]]:
    """Rows [start, stop) of a tensor made of parts of `sizes` rows stacked, as (part, start, stop) within each
    part, in order: how wqkv's rows are read from the q, k and v matrices of a checkpoint that keeps them apart."""
    parts = []
    for start, stop in ranges:
        offset = 0
        for i, size in enumerate(sizes):
            low, high = max(start, offset), min(stop, offset + size)
            if low < high:
                parts.append((i, low - offset, high - offset))
            offset += size
    return parts


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


# ---- model.pth + model_args.json -----------------------------------------------------------------------------

def checkpoint_problem(directory, tokenizer: bool = True, model_file: str = "model.pth") -> str | None:
    """Why `directory` is not a complete model.pth checkpoint, in one line, or None when it is. Complete: the
    weights (model_file), model_args.json and, with `tokenizer`, tokenizer.json or tokenizer.model: every file
    generate.py reads. Presence only (cheap): a damaged file is reported by the loader that reads it."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} does not exist"
    missing = [name for name in (model_file, "model_args.json") if not (directory / name).is_file()]
    if tokenizer and not any((directory / name).is_file() for name in TOKENIZER_NAMES):
        missing.append(" or ".join(TOKENIZER_NAMES))
    if not missing:
        return None
    return f"{directory} is an incomplete checkpoint: no {', no '.join(missing)}"


def rebuild_hint(directory) -> str:
    """The command that rebuilds the checkpoint folder `directory` whole (the fix an incomplete one needs)."""
    directory = Path(directory)
    if directory.resolve() == default_checkpoint_path().parent:
        return "rebuild it with `python scripts/prepare_checkpoint.py --force`"
    return (f"rebuild it with `python scripts/convert_hf_checkpoint.py --checkpoint_dir HF_DIR --out_dir {directory} "
            f"--force` (or `python scripts/prepare_checkpoint.py --out_dir {directory} --force` for SmolLM2)")


def load_pth(path: Path, dtype=None, shard=None) -> tuple[ModelArgs, dict]:
    args_path = path.parent / "model_args.json"
    if path.is_file() and not args_path.exists() and gpt_fast_config(path) is not None:
        return load_gpt_fast(path, dtype, shard)
    # The tokenizer is not needed for the weights: tokenizer.py reports a missing one itself.
    problem = checkpoint_problem(path.parent, tokenizer=False, model_file=path.name)
    if problem:
        hint = (" (or, for a gpt-fast model.pth, put its Hugging Face config.json beside it)"
                if path.is_file() and not args_path.exists() else "")
        raise ValueError(f"{problem}, so {path} cannot be read — {rebuild_hint(path.parent)}{hint}")
    try:
        args = ModelArgs.from_dict(json.loads(args_path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{args_path} is not valid model args ({_one_line(e)}) — convert the checkpoint again")
    if weight_quantization(path) is not None:  # torchao's tensor classes, registered for weights_only loading
        import_torchao()
    state_dict = _torch_load(path)
    if not isinstance(state_dict, dict) or "tok_embeddings.weight" not in state_dict:
        raise ValueError(f"{path} is not a model.pth written by this repo's converters — convert the checkpoint "
                         "with scripts/convert_hf_checkpoint.py")
    check_shapes(args, state_dict, path, "model_args.json")
    pieces = shard(args) if shard else {}
    return args, {k: take_piece(v, pieces.get(k), dtype) for k, v in state_dict.items()}


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise ValueError(f"cannot read {path} ({_one_line(e)}) — the file is damaged or incomplete: "
                         "delete it and convert/prepare the checkpoint again")


# ---- gpt-fast's model.pth ------------------------------------------------------------------------------------
#
# gpt-fast (github.com/pytorch-labs/gpt-fast) converts a Hugging Face folder into a model.pth written inside that
# folder: model.py's names (tok_embeddings, layers.N.attention.wqkv = [q; k; v], attention.wo, feed_forward.w1/w2/w3,
# attention_norm, ffn_norm, norm, output), with no config file of its own: its ModelArgs.from_name picks the
# config by the folder's name from its transformer_configs table. Its q and k rows are in Meta's layout (its
# convert_hf_checkpoint.py `permute`: per head, the two rotate-half halves interleaved for its complex RoPE), which
# unpermute_rope_rows undoes, exactly as for llama.cpp. Here the config is the Hugging Face config.json beside the
# model.pth (where gpt-fast's scripts leave it), else gpt-fast's table entry for the folder's name. A model.pth with
# a model_args.json beside it is this repo's (HF row layout).

GPT_FAST_CONFIGS = {  # gpt-fast's model.py transformer_configs, verbatim
    "CodeLlama-7b-Python-hf": dict(block_size=16384, vocab_size=32000, n_layer=32, dim=4096, rope_base=1000000),
    "7B": dict(n_layer=32, n_head=32, dim=4096),
    "13B": dict(n_layer=40, n_head=40, dim=5120),
    "30B": dict(n_layer=60, n_head=52, dim=6656),
    "34B": dict(n_layer=48, n_head=64, dim=8192, vocab_size=32000, n_local_heads=8, intermediate_size=22016,
                rope_base=1000000),
    "70B": dict(n_layer=80, n_head=64, dim=8192, n_local_heads=8, intermediate_size=28672),
    "Mistral-7B": dict(n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=32000),
    "stories15M": dict(n_layer=6, n_head=6, dim=288),
    "stories110M": dict(n_layer=12, n_head=12, dim=768),
    "llama-3-8b": dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
                       vocab_size=128256, rope_base=500000),
    "llama-3-70b": dict(block_size=8192, n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672,
                        vocab_size=128256, rope_base=500000),
    "llama-3.1-8b": dict(block_size=131072, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
                         vocab_size=128256, rope_base=500000,
                         rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.1-70b": dict(block_size=131072, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
                          intermediate_size=28672, vocab_size=128256, rope_base=500000,
                          rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192)),
    "llama-3.1-405b": dict(block_size=131072, n_layer=126, n_head=128, n_local_heads=8, dim=16384,
                           intermediate_size=53248, vocab_size=128256, rope_base=500000,
                           rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192)),
}


def gpt_fast_table_args(name: str) -> tuple[str, ModelArgs] | None:
    """(table key, ModelArgs) as gpt-fast's ModelArgs.from_name(name) picks them: the key equal to name, else the
    longest key contained in it (case-insensitive); None when none is. Its defaults filled in as its dataclass does
    (vocab 32000, block_size 2048, n_local_heads = n_head, head_dim = dim / n_head, intermediate_size the multiple
    of 256 above 8/3 dim)."""
    if name in GPT_FAST_CONFIGS:
        key = name
    else:
        keys = sorted((k for k in GPT_FAST_CONFIGS if k.lower() in name.lower()), key=len, reverse=True)
        if not keys:
            return None
        if len(keys) > 1 and len(keys[0]) == len(keys[1]):
            raise ValueError(f"the folder name {name!r} matches gpt-fast's configs {keys[0]!r} and {keys[1]!r} alike: "
                             "put the model's Hugging Face config.json beside its model.pth")
        key = keys[0]
    c = GPT_FAST_CONFIGS[key]
    dim, n_head = c.get("dim", 4096), c.get("n_head", 32)
    hidden = int(2 * 4 * dim / 3)
    scaling = c.get("rope_scaling")
    return key, ModelArgs(
        vocab_size=c.get("vocab_size", 32000), dim=dim, n_layer=c.get("n_layer", 32), n_head=n_head,
        n_kv_head=c.get("n_local_heads", n_head),
        intermediate_size=c.get("intermediate_size") or hidden + (-hidden) % 256, head_dim=dim // n_head,
        norm_eps=c.get("norm_eps", 1e-5), rope_base=float(c.get("rope_base", 10000)),
        rope_scaling={"rope_type": "llama3", **scaling} if scaling else None,
        max_position_embeddings=c.get("block_size", 2048), tie_word_embeddings=False)


def gpt_fast_config(path: Path) -> tuple[str, ModelArgs] | None:
    """(where the config came from, ModelArgs) for a model.pth without model_args.json taken as gpt-fast's: the
    Hugging Face config.json beside it, else gpt-fast's table entry for the folder's name; None when neither."""
    config = path.parent / "config.json"
    if config.is_file():
        try:
            return "config.json", hf_model_args(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read {config} ({_one_line(e)}), the config of the gpt-fast model.pth beside it "
                             "— download the model's config.json again")
    found = gpt_fast_table_args(path.resolve().parent.name)
    if found is None:
        return None
    return f"gpt-fast's {found[0]!r} config (from the folder name)", found[1]


def _gpt_fast_state_dict(path: Path) -> tuple[str, ModelArgs, dict]:
    """gpt-fast's model.pth as stored (memory-mapped), its tied flag from the tensors, q/k/v fused into wqkv when
    kept apart (gpt-fast's Attention.load_hook does the same)."""
    source, args = gpt_fast_config(path)
    state_dict = _torch_load(path)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):  # gpt-fast's stories checkpoints
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict) or "tok_embeddings.weight" not in state_dict:
        raise ValueError(f"{path} has no model_args.json beside it and is not a gpt-fast model.pth either (no "
                         "tok_embeddings.weight) — convert the checkpoint with scripts/convert_hf_checkpoint.py")
    quantized = next((name for name in state_dict if name.endswith((".scales", ".scales_and_zeros"))), None)
    if quantized:
        raise ValueError(f"{path} is a gpt-fast quantized checkpoint ({quantized}): load its float model.pth and "
                         "quantize with --quantize")
    for i in range(args.n_layer):
        prefix = f"layers.{i}.attention."
        if prefix + "wq.weight" in state_dict:
            state_dict[prefix + "wqkv.weight"] = torch.cat([state_dict.pop(prefix + f"w{p}.weight") for p in "qkv"])
    args.tie_word_embeddings = "output.weight" not in state_dict
    return source, args, state_dict


def load_gpt_fast(path: Path, dtype=None, shard=None) -> tuple[ModelArgs, dict]:
    """A gpt-fast model.pth (see above) in model.py's layout: q and k rows back in Hugging Face order."""
    source, args, state_dict = _gpt_fast_state_dict(path)
    check_shapes(args, state_dict, path, source)
    pieces = shard(args) if shard else {}
    q_rows, kv_rows = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    out = {}
    for name, t in state_dict.items():
        if name.endswith(".attention.wqkv.weight"):
            q, k, v = t.split([q_rows, kv_rows, kv_rows])
            t = torch.cat([unpermute_rope_rows(q, args.n_head), unpermute_rope_rows(k, args.n_kv_head), v])
        out[name] = take_piece(t, pieces.get(name), dtype)
    return args, out


INTERRUPTED = ("error: interrupted: the checkpoint folder is replaced whole or not at all, and the partial copy "
               "was removed")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_sigterm():
    """Within it, SIGTERM (kill, a job scheduler) ends a conversion as Ctrl-C does: KeyboardInterrupt, so that
    write_checkpoint removes its half-built folder before the process ends. The previous handler comes back after
    (a script's main() called in-process leaves the caller's handler as it was); outside the main thread, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def expected_shapes(args: ModelArgs) -> dict[str, tuple]:
    """{name: shape} of every tensor a checkpoint of `args` holds: model.py's own parameters (built on the meta
    device, nothing allocated)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_shapes(args: ModelArgs, state_dict: dict, path, config_name: str):
    """Raise a one-line ValueError naming the first tensor of state_dict that the config (`config_name`, which gave
    `args`) does not describe (missing, extra or of another shape) and the likely cause, instead of
    load_state_dict's page of size mismatches. Shapes only: nothing is read from a memory-mapped tensor."""
    expected = expected_shapes(args)
    fix = (f"{config_name} does not belong to these weights (copied from another model, or the weights replaced "
           "without it) — convert the checkpoint again")
    layers = {int(name.split(".")[1]) for name in state_dict if name.startswith("layers.") and
              name.split(".")[1].isdigit()}
    if layers and len(layers) != args.n_layer:
        raise ValueError(f"{path} holds {len(layers)} layers but {config_name} says n_layer={args.n_layer}: {fix}")
    if ("output.weight" in state_dict) == args.tie_word_embeddings:
        has = "holds an output.weight" if "output.weight" in state_dict else "has no output.weight"
        raise ValueError(f"{path} {has} but {config_name} says tie_word_embeddings={args.tie_word_embeddings}: {fix}")
    sizes = (f"dim={args.dim}, n_head={args.n_head}, n_kv_head={args.n_kv_head}, head_dim={args.head_dim}, "
             f"intermediate_size={args.intermediate_size}, vocab_size={args.vocab_size}")
    for name, t in state_dict.items():
        if name not in expected:
            raise ValueError(f"{path} holds a tensor {name!r} that model.py has no place for: not a Llama checkpoint "
                             f"of this layout, or {fix}")
        shape = tuple(getattr(t, "shape", ()))
        if shape != expected[name]:
            raise ValueError(f"{path}: tensor {name} has shape {list(shape)} but {config_name} ({sizes}) gives "
                             f"{list(expected[name])}: {fix}")
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise ValueError(f"{path} has no tensor {missing[0]!r}"
                         + (f" (nor {len(missing) - 1} other(s))" if len(missing) > 1 else "")
                         + " — the file is incomplete or not a Llama checkpoint: convert the checkpoint again")


def check_replaceable(out_dir: Path, force: bool):
    """Raise ValueError (one line naming the fix) unless write_checkpoint may replace out_dir: it is absent or an
    empty folder, or force is given and it is a checkpoint folder (files only; a folder of folders, such as
    checkpoints/ itself, is never swapped away)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder: choose another --out_dir")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    subfolders = sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    if subfolders:
        raise ValueError(f"{out_dir} holds folders ({', '.join(subfolders[:3])}), so it is not a checkpoint folder "
                         "and is not replaced: choose another --out_dir")
    if not force:
        what = "model.pth" if (out_dir / "model.pth").exists() else "a non-empty folder"
        raise ValueError(f"{out_dir} already exists ({what}) — pass --force to replace the whole folder, or choose "
                         "another --out_dir")


def _folder_mode(out_dir: Path) -> int:
    """The permissions the new folder gets: the old folder's, else the umask's (mkdtemp would leave 0o700)."""
    if out_dir.is_dir():
        return out_dir.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_checkpoint(out_dir, args: ModelArgs, state_dict: dict, force: bool = False, write_extra=None) -> Path:
    """Write out_dir as one new checkpoint folder: model.pth, model_args.json and whatever write_extra(folder)
    adds (the tokenizer files). The folder is built beside out_dir and swapped in whole (atomic.AtomicDir): a killed
    or failed run leaves the previous folder exactly as it was, and a finished one leaves no file of it behind (a
    stale tokenizer.json would be loaded before the new model's tokenizer.model). An existing folder is replaced
    only with force (check_replaceable)."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, force)
    mode = _folder_mode(out_dir)
    with AtomicDir(out_dir) as tmp:
        os.chmod(tmp, mode)
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, tmp / "model.pth")
        (tmp / "model_args.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
    return out_dir / "model.pth"


# ---- Hugging Face directory ----------------------------------------------------------------------------------

def hf_model_args(config: dict) -> ModelArgs:
    if config.get("model_type", "llama") != "llama" or config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"unsupported model_type {config.get('model_type')!r} (or attention/mlp bias): only "
                         "Llama-architecture checkpoints (Llama-2/3/3.1, SmolLM2) load")
    # transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters holding both.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_base = config.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    if rope.get("rope_type", rope.get("type")) in (None, "default"):
        rope = None
    return ModelArgs(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layer=config["num_hidden_layers"],
        n_head=config["num_attention_heads"],
        n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        head_dim=config.get("head_dim"),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_base=float(rope_base),
        rope_scaling=rope,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )


HF_NAMES = {  # HF name (after "model.layers.{i}.") -> ours (after "layers.{i}.")
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def load_hf_dir(path: Path, dtype=None, shard=None) -> tuple[ModelArgs, dict]:
    from safetensors import safe_open

    try:
        args = hf_model_args(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"cannot read {path / 'config.json'} ({_one_line(e)}) — download the checkpoint again")
    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {path} — download the checkpoint's safetensors weights")
    name_to_file = {}
    try:
        for f in files:
            with safe_open(path / f, framework="pt") as handle:
                name_to_file.update({name: f for name in handle.keys()})
    except Exception as e:  # SafetensorError / OSError for a truncated or missing shard
        raise ValueError(f"cannot read {path / f} ({_one_line(e)}) — the file is damaged or incomplete: "
                         "download the checkpoint again")

    pieces = shard(args) if shard else {}

    def get(name: str, piece=None) -> Tensor:
        if name not in name_to_file:
            raise ValueError(f"{path} has no tensor {name!r} — is it a complete Llama checkpoint?")
        with safe_open(path / name_to_file[name], framework="pt") as handle:
            if piece is None:
                return _cast(handle.get_tensor(name), dtype)
            dim, ranges = piece  # get_slice reads only the rows (dim 0) or columns (dim 1) asked for
            part = handle.get_slice(name)
            return torch.cat([_cast(part[start:stop] if dim == 0 else part[:, start:stop], dtype)
                              for start, stop in ranges], dim)

    state_dict = {"tok_embeddings.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not args.tie_word_embeddings:
        state_dict["output.weight"] = get("lm_head.weight")
    q_rows, kv_rows = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    for i in range(args.n_layer):
        hf = f"model.layers.{i}."
        qkv = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        wqkv = f"layers.{i}.attention.wqkv.weight"
        if wqkv in pieces:  # our fused rows, read from q_proj, k_proj and v_proj
            state_dict[wqkv] = torch.cat([get(qkv[part], (0, [(start, stop)])) for part, start, stop in
                                          _fused_parts(pieces[wqkv][1], (q_rows, kv_rows, kv_rows))])
        else:
            state_dict[wqkv] = torch.cat([get(name) for name in qkv])
        for hf_name, name in HF_NAMES.items():
            state_dict[f"layers.{i}.{name}"] = get(hf + hf_name, pieces.get(f"layers.{i}.{name}"))
    return args, state_dict


# ---- GGUF ----------------------------------------------------------------------------------------------------

GGUF_NAMES = {  # llama.cpp name (after "blk.{i}.") -> ours (after "layers.{i}.")
    "attn_norm.weight": "attention_norm.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}


def unpermute_rope_rows(w: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation (its convert_hf_to_gguf.py `permute`; transformers reverses it the
    same way): per head, llama.cpp interleaves the two rotate-half halves for its pairwise RoPE."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_rope_scaling(fields: dict, rope_freqs: Tensor, args: ModelArgs) -> dict:
    """llama.cpp keeps Llama-3.1 rope scaling as a `rope_freqs` tensor (one divisor per frequency) rather than as
    parameters. Recover the HF "llama3" parameters and check that they reproduce the tensor."""
    factor = float(rope_freqs.max())
    old_context = int(fields.get("llama.rope.scaling.original_context_length", 8192))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": old_context}
    plain = rope_inv_freq(ModelArgs(**{**args.to_dict(), "rope_scaling": None}))
    scaled = rope_inv_freq(ModelArgs(**{**args.to_dict(), "rope_scaling": scaling}))
    if not torch.allclose(plain / scaled, rope_freqs.float(), rtol=1e-3):
        raise ValueError("this GGUF's rope_freqs tensor does not match Llama-3.1 rope scaling — convert the model "
                         "from its Hugging Face checkpoint with scripts/convert_hf_checkpoint.py instead")
    return scaling


def read_gguf(path: Path):
    """(ModelArgs, get): a GGUF's metadata read, its tensors only mapped; get(name) dequantizes one tensor."""
    import gguf

    try:
        reader = open_gguf(path)
    except Exception as e:  # a truncated file fails in many ways inside numpy's memmap parsing
        raise ValueError(f"cannot read GGUF file {path} ({_one_line(e)}) — the file is damaged or incomplete: "
                         "download it again")
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("tokenizer.ggml.")}  # the token lists are large and not needed here
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} holds a {arch!r} model: only llama-architecture GGUF files load")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path} has no token_embd.weight tensor — is it a complete Llama GGUF file?")
    missing = [k for k in ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                           "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon") if k not in fields]
    if missing:
        raise ValueError(f"{path} lacks the metadata {', '.join(missing)} — is it a complete Llama GGUF file?")
    n_head = fields["llama.attention.head_count"]
    args = ModelArgs(
        # The embedding's rows, not the tokenizer's list: they can differ (padded vocabularies), the weights rule.
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml shapes are (columns, rows)
        dim=fields["llama.embedding_length"],
        n_layer=fields["llama.block_count"],
        n_head=n_head,
        n_kv_head=fields.get("llama.attention.head_count_kv", n_head),
        intermediate_size=fields["llama.feed_forward_length"],
        head_dim=fields.get("llama.attention.key_length", fields.get("llama.rope.dimension_count")),
        norm_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
        rope_base=float(fields.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=fields.get("llama.context_length", 4096),
        tie_word_embeddings="output.weight" not in tensors,
    )
    scaling_type = fields.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":  # linear / yarn: passed on, and model.py says which types it implements
        args.rope_scaling = {"rope_type": scaling_type, "factor": float(fields["llama.rope.scaling.factor"]),
                             "original_max_position_embeddings":
                                 int(fields.get("llama.rope.scaling.original_context_length", 8192))}

    supported = {gguf.GGMLQuantizationType[t] for t in ("Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32")}

    def get(name: str) -> Tensor:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path} has no tensor {name!r} — is it a complete Llama GGUF file?")
        if t.tensor_type not in supported:
            raise ValueError(f"tensor {name} of {path} has type {t.tensor_type.name}: only Q4_0, Q4_1, Q8_0, F16, "
                             "BF16 and F32 GGUF tensors load — use a GGUF file quantized to one of these")
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    if "rope_freqs.weight" in tensors:
        args.rope_scaling = _gguf_rope_scaling(fields, get("rope_freqs.weight"), args)
    return args, get


def load_gguf(path: Path, dtype=None, shard=None) -> tuple[ModelArgs, dict]:
    args, get = read_gguf(path)
    # (A truncated file already failed in GGUFReader: it maps every tensor's data when it opens the file.)
    pieces = shard(args) if shard else {}  # quantized blocks are dequantized whole, one tensor at a time, then cut
    state_dict = {"tok_embeddings.weight": _cast(get("token_embd.weight"), dtype),
                  "norm.weight": _cast(get("output_norm.weight"), dtype)}
    if not args.tie_word_embeddings:
        state_dict["output.weight"] = _cast(get("output.weight"), dtype)
    for i in range(args.n_layer):
        blk = f"blk.{i}."
        q = unpermute_rope_rows(get(blk + "attn_q.weight"), args.n_head)
        k = unpermute_rope_rows(get(blk + "attn_k.weight"), args.n_kv_head)
        name = f"layers.{i}.attention.wqkv.weight"
        state_dict[name] = take_piece(torch.cat([q, k, get(blk + "attn_v.weight")]), pieces.get(name), dtype)
        for gguf_name, name in GGUF_NAMES.items():
            state_dict[f"layers.{i}.{name}"] = take_piece(get(blk + gguf_name), pieces.get(f"layers.{i}.{name}"),
                                                          dtype)
    return args, state_dict
