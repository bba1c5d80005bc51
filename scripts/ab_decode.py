"""Decode speed of two revisions of generate.py, interleaved in one run: is a change slower beyond noise?

    python -m scripts.ab_decode --before 35a185e --after HEAD --batches 1,8 --repeats 3 --out outputs/local/ab

Each revision is checked out in a temporary git worktree (nothing in the working tree changes); each repeat runs
generate.py of every revision on the same arguments (eager and --compile, each batch size), alternating, so slow
drifts of a shared machine hit both alike. The figure is the decode step rate: batch steps per second (tokens/s
over the batch before the engine reported steps), median of the repeats, and the after/before ratio.
"""
import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import datetime
import json

import torch

from atomic import atomic_write_json, atomic_write_text
from scripts.common import header_lines, list_of, markdown_table, run_header

REPO_DIR = Path(__file__).resolve().parent.parent


def steps_per_second(output: str, batch: int) -> float:
    steps = re.search(r"\(([\d.]+) batch steps/s\)", output)
    if steps:
        return float(steps.group(1))
    return float(re.search(r"decode: ([\d.]+) tokens/s", output).group(1)) / batch  # rows x steps, before


def run(tree: Path, argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "generate.py", *argv], cwd=tree, capture_output=True, text=True,
                            timeout=1800)
    if result.returncode:
        raise RuntimeError(f"generate.py {' '.join(argv)} in {tree}: {result.stderr.strip()[-400:]}")
    return result.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--after", default="HEAD", help="a git revision (default HEAD)")
    parser.add_argument("--batches", type=list_of(), default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO_DIR / "outputs" / "local" / "ab_decode")
    args = parser.parse_args(argv)
    checkpoint = REPO_DIR / "checkpoints" / "smollm2-135m" / "model.pth"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[label]), rev], cwd=REPO_DIR, check=True,
                           capture_output=True)
        try:
            for compiled in (False, True):
                for batch in args.batches:
                    gen = ["--checkpoint_path", str(checkpoint), "--max_new_tokens", str(args.max_new_tokens),
                           "--batch_size", str(batch)] + (["--compile"] if compiled else [])
                    rates = {"before": [], "after": []}
                    for _ in range(args.repeats):
                        for label in ("before", "after"):
                            rates[label].append(steps_per_second(run(trees[label], gen), batch))
                    before, after = (statistics.median(rates[k]) for k in ("before", "after"))
                    rows.append({"decode": "compiled" if compiled else "eager", "batch": batch,
                                 "before_steps_s": before, "after_steps_s": after, "after_over_before": after / before,
                                 "before_runs": rates["before"], "after_runs": rates["after"]})
                    print(rows[-1], flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO_DIR, capture_output=True)
    header = run_header(torch.device("cpu"), "scripts.ab_decode", argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ab_decode_{datetime.date.today()}"
    atomic_write_json(stem.with_suffix(".json"), {"header": header, "rows": rows})
    table = markdown_table(["decode", "batch", f"before ({args.before}) steps/s", f"after ({args.after}) steps/s",
                            "after / before"],
                           [[r["decode"], r["batch"], f"{r['before_steps_s']:.2f}", f"{r['after_steps_s']:.2f}",
                             f"{r['after_over_before']:.3f}"] for r in rows],
                           f"Median of {args.repeats} alternating runs of generate.py (SmolLM2-135M, default prompt, "
                           f"{args.max_new_tokens} new tokens).")
    atomic_write_text(stem.with_suffix(".md"), "\n".join(["# Decode step rate, before and after", "",
                                                          *header_lines(header), "", *table]) + "\n")
    print(f"wrote {stem}.md")

if __name__ == "__main__":
    main()
