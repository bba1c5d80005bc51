"""Convert a Hugging Face Llama directory (config.json + *.safetensors) into checkpoints/NAME/model.pth.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir ~/Meta-Llama-3-8B --out_dir checkpoints/llama3-8b

Writes model.pth (weights in their stored dtype, q/k/v fused into wqkv), model_args.json, and the tokenizer files,
so `generate.py --checkpoint_path checkpoints/llama3-8b/model.pth` finds everything beside it.
"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_hf_dir, write_checkpoint  # noqa: E402

TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json"]


def convert(checkpoint_dir: Path, out_dir: Path, force: bool = False) -> Path:
    if not (checkpoint_dir / "config.json").exists():
        raise ValueError(f"no config.json in {checkpoint_dir} — pass a Hugging Face model directory as "
                         "--checkpoint_dir")
    if (out_dir / "model.pth").exists() and not force:  # checked first: nothing is written beside a user's file
        raise ValueError(f"{out_dir / 'model.pth'} already exists — pass --force to overwrite it, or choose another "
                         "--out_dir")
    args, state_dict = load_hf_dir(checkpoint_dir)
    model_path = write_checkpoint(out_dir, args, state_dict, force=force)
    for name in TOKENIZER_FILES:
        # Meta's Llama-3 repos keep the tiktoken BPE file as original/tokenizer.model.
        for src in (checkpoint_dir / name, checkpoint_dir / "original" / name):
            if src.exists():
                shutil.copyfile(src, out_dir / name)
                break
    print(f"wrote {model_path} ({sum(v.numel() for v in state_dict.values()) / 1e6:.0f}M params), "
          f"model_args.json and the tokenizer files")
    return model_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--out_dir", type=Path, required=True, help="where to write model.pth, e.g. checkpoints/NAME")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model.pth in --out_dir")
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint_dir, args.out_dir, args.force)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
