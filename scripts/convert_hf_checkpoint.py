"""Convert a Hugging Face Llama directory (config.json + *.safetensors) into checkpoints/NAME/model.pth.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir ~/Meta-Llama-3-8B --out_dir checkpoints/llama3-8b

Writes model.pth (weights in their stored dtype, q/k/v fused into wqkv), model_args.json, and the tokenizer files
(checkpoint.TOKENIZER_FILES: every file tokenizer.py reads, chat_template.jinja included),
so `generate.py --checkpoint_path checkpoints/llama3-8b/model.pth` finds everything beside it. The folder is built
beside --out_dir and swapped in whole: with --force no file of the previous checkpoint survives (its tokenizer.json
would otherwise shadow the new model's tokenizer.model), and a killed or failed run leaves the old folder intact.
"""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import (INTERRUPTED, TOKENIZER_FILES, TOKENIZER_NAMES, check_replaceable, clean_stale,  # noqa: E402
                        load_hf_dir, stop_on_sigterm, write_checkpoint)


def tokenizer_sources(checkpoint_dir: Path) -> dict[str, Path]:
    """name -> source file of each tokenizer file the HF directory has. Meta's Llama-3 repos keep the tiktoken BPE
    file as original/tokenizer.model."""
    sources = {}
    for name in TOKENIZER_FILES:
        for src in (checkpoint_dir / name, checkpoint_dir / "original" / name):
            if src.is_file():
                sources[name] = src
                break
    return sources


def convert(checkpoint_dir: Path, out_dir: Path, force: bool = False) -> Path:
    if not (checkpoint_dir / "config.json").exists():
        raise ValueError(f"no config.json in {checkpoint_dir} — pass a Hugging Face model directory as "
                         "--checkpoint_dir")
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out_dir {out_dir} is the --checkpoint_dir: the conversion replaces its whole output "
                         "folder, so choose another --out_dir")
    clean_stale(out_dir)  # what a killed earlier run left beside it
    check_replaceable(out_dir, force)  # checked first: nothing is read or written before a refusal
    args, state_dict = load_hf_dir(checkpoint_dir)
    sources = tokenizer_sources(checkpoint_dir)

    def copy_tokenizer(folder: Path):
        for name, src in sources.items():
            shutil.copyfile(src, folder / name)

    model_path = write_checkpoint(out_dir, args, state_dict, force=force, write_extra=copy_tokenizer)
    print(f"wrote {model_path} ({sum(v.numel() for v in state_dict.values()) / 1e6:.0f}M params), model_args.json"
          f" and {', '.join(sources) or 'no tokenizer file'}")
    if not any(name in sources for name in TOKENIZER_NAMES):
        print(f"note: {checkpoint_dir} has no {' or '.join(TOKENIZER_NAMES)}: copy the model's tokenizer into "
              f"{out_dir} before generating", file=sys.stderr)
    return model_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--out_dir", type=Path, required=True, help="where to write model.pth, e.g. checkpoints/NAME")
    parser.add_argument("--force", action="store_true", help="replace an existing --out_dir folder whole")
    args = parser.parse_args(argv)
    with stop_on_sigterm():
        try:
            convert(args.checkpoint_dir, args.out_dir, args.force)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: write_checkpoint removed its half-built folder
            raise SystemExit(INTERRUPTED) from None
        except OSError as e:  # disk full, no permission...: write_checkpoint left the old folder as it was
            where = f": {e.filename}" if e.filename else ""
            raise SystemExit(f"error: the conversion failed ({e.strerror or e}{where}), {args.out_dir} is unchanged: "
                             "free disk space or fix the permissions, then run it again")


if __name__ == "__main__":
    main()
