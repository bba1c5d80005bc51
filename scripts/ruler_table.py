"""One table of RULER scores from evaluate.py's JSON files, wherever and whenever they were written.

    python -m scripts.ruler_table outputs/results --length 4096
    python -m scripts.ruler_table outputs/results --length 2048 --tasks niah_single_1,niah_single_2,niah_multikey_1

The long RULER matrix is measured a row at a time on the CPU (one configuration and often one task per JSON, so a
session that ends mid-way loses one row at most), across folders and sessions. This puts the cells side by side: a
row per configuration (strategy, its bits or budget, and the options that differ from today's defaults; its KV
bytes at the prompt length as a share of full's; in brackets how its prompts differ from those of most rows), a column per task with its score and sample count, and the mean over --tasks when
every one is measured. Each FOLDER is searched recursively for *.json; files that are not evaluate.py results with
RULER scores at --length are passed over.

Rows are only merged where their prompts are the same: the RULER samples' seed, template and package, the prompt
chunk, the checkpoint and the dtype are part of a row's identity, and a cell's sample count is printed with it. An
option a result does not record (it predates the option) shows as `name=?`, unless the option came with a default
that kept what the code did before it (BEFORE_OPTION). Two files that give one cell another
sample count show both, newest folder date first; different scores (the code changed between them) are also named
under the table, with their files.
"""
import argparse
import collections
import dataclasses
import json
import re
import sys
from pathlib import Path

import kv_cache
from atomic import atomic_write_text, check_writable_file
from cli_options import one_line_error
from scripts.common import count, fmt, list_of, markdown_table

NIAH3 = ["niah_single_1", "niah_single_2", "niah_multikey_1"]
# What makes two results' prompts and numbers comparable besides the cache: evaluate.py's settings keys.
SAME_PROMPTS = ("seed", "prefill_chunk", "dtype", "ruler_package")
SHOWN = ("bits", "budget")  # what a reader compares rows by: shown at their defaults too
# Options added with a default that kept what the code did before them: a result that predates one ran with it.
BEFORE_OPTION = {"pooling": "centered", "decode_kernel_size": 1, "accumulate": "sum"}


def default_options(strategy: str) -> dict:
    return {f.name: f.default for f in dataclasses.fields(kv_cache.STRATEGIES[strategy].Options)}


def with_before_options(strategy: str, options: dict) -> dict:
    """options with each BEFORE_OPTION the strategy has and the result predates at the value it ran with."""
    if strategy not in kv_cache.STRATEGIES:
        return options
    defaults = default_options(strategy)
    return {**{k: v for k, v in BEFORE_OPTION.items() if k in defaults}, **options}


def config_label(strategy: str, options: dict) -> str:
    """The strategy, its bits or budget, and the options that differ from today's defaults (attn_impl apart: the
    path, not the cache); an option the result predates is `name=?`."""
    if strategy not in kv_cache.STRATEGIES:
        return strategy
    parts, defaults = [strategy], default_options(strategy)
    options = with_before_options(strategy, options)
    for name, default in defaults.items():
        if name == "attn_impl":
            continue
        if name not in options:
            parts.append(f"{name}=?")
        elif name in SHOWN or (options[name] != default and str(options[name]) != str(default)):
            parts.append(f"{name}={options[name]}")
    return " ".join(parts)


def folder_date(path: Path) -> str:
    """The date in a results folder's name (outputs/results/cpu_x_2026-12-05/), '' without one: newer first."""
    found = re.findall(r"\d{4}-\d{2}-\d{2}", str(path))
    return found[-1] if found else ""


def model_name(checkpoint) -> str:
    """The checkpoint's folder and size (evaluate.py records path, size and mtime; a checkpoint prepared again on
    another day has another mtime and is the same model)."""
    if not isinstance(checkpoint, dict):
        return str(checkpoint)
    return f"{Path(checkpoint.get('path', '?')).parent.name} ({checkpoint.get('size')} bytes)"


def ruler_results(folders: list[Path]) -> list[tuple[Path, dict]]:
    """(path, result) of every evaluate.py JSON with RULER samples under the folders."""
    found = []
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder: give folders of evaluate.py JSON (e.g. outputs/results)")
        for path in sorted(folder.rglob("*.json")):
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(result, dict) and result.get("ruler_samples") and "kv_bytes_by_tokens" in result:
                found.append((path, result))
    return found


def collect(found: list[tuple[Path, dict]], length: int) -> dict:
    """{row key: {"label", "ratio", "prompts", "cells": {task: {(score, samples): [paths]}}}} at `length` tokens."""
    rows = {}
    for path, r in found:
        samples = [s for s in r["ruler_samples"] if s["length"] == length]
        if not samples:
            continue
        settings = r.get("settings", {})
        # a result before a BEFORE_OPTION ran with its default: one row with today's results at that default
        options = {k: v for k, v in with_before_options(r["strategy"], r["options"]).items() if k != "attn_impl"}
        by_tokens = dict(r["kv_bytes_by_tokens"])
        if r["kv_tokens"] == length:
            ratio = r["kv_ratio"]
        else:  # full's bytes grow with the tokens; the cache's are measured at each point of its memory curve
            ratio = by_tokens[length] / (r["kv_bytes_full"] / r["kv_tokens"] * length) if length in by_tokens else None
        prompts = {"model": model_name(r["checkpoint"]), "template": r.get("ruler_template"),
                   **{k: settings.get(k) for k in SAME_PROMPTS}}
        key = (r["strategy"], json.dumps(options, sort_keys=True), json.dumps(prompts, sort_keys=True))
        row = rows.setdefault(key, {"label": config_label(r["strategy"], r["options"]), "ratio": ratio,
                                    "prompts": prompts, "cells": {}})
        for task in dict.fromkeys(s["task"] for s in samples):
            scored = [s["score"] for s in samples if s["task"] == task]
            measured = (round(sum(scored) / len(scored), 6), len(scored))
            row["cells"].setdefault(task, {}).setdefault(measured, []).append(path)
    return rows


def render(rows: dict, tasks: list[str], length: int) -> str:
    """The markdown table: full first, then by KV bytes; a cell is 'score (n)' with n samples."""
    def newest_first(cell):
        return sorted(cell.items(), key=lambda kv: max(folder_date(p) for p in kv[1]), reverse=True)

    shown = [row for row in rows.values() if any(task in row["cells"] for task in tasks)]
    if not shown:
        raise ValueError(f"no RULER result at {length} tokens for {','.join(tasks)}: check --length and --tasks")
    # the prompts most rows were measured on: a row on other prompts says how they differ, and follows its peers
    counts = collections.Counter(json.dumps(row["prompts"], sort_keys=True) for row in shown)
    reference = json.loads(counts.most_common(1)[0][0])
    ordered = sorted(shown, key=lambda row: (row["label"] != "full", -(row["ratio"] or 0), row["prompts"] != reference,
                                             row["label"]))
    conflicts, body = [], []
    for row in ordered:
        other = ", ".join(f"{k} {v}" for k, v in row["prompts"].items() if v != reference[k])
        label = row["label"] + (f" [{other}]" if other else "")
        cells, scores = [], []
        for task in tasks:
            cell = row["cells"].get(task)
            if cell is None:
                cells.append("–")
                continue
            values = newest_first(cell)
            cells.append(" / ".join(f"{score:.1f} ({n})" for (score, n), _ in values))
            scores.append(values[0][0][0])
            if len({score for (score, _), _ in values}) > 1:
                conflicts.append(f"{label}, {task}: " + "; ".join(
                    f"{score:.1f} ({n}) in {', '.join(map(str, paths))}" for (score, n), paths in values))
        mean = sum(scores) / len(scores) if len(scores) == len(tasks) else None
        body.append([label, fmt(row["ratio"], ".3f", empty="–"), *cells, fmt(mean, ".1f", empty="–")])
    lines = markdown_table(["configuration", "KV × full", *tasks, "mean"], body,
                            legend=f"RULER at {length} tokens; a cell is the score (0-100) and its sample count in "
                                   "parentheses; the mean (of the newest scores) only where every task is measured.")
    if conflicts:
        lines += ["", "Cells measured more than once with different results (newest folder first):"]
        lines += [f"- {c}" for c in conflicts]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m scripts.ruler_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    parser.add_argument("folders", nargs="+", type=Path, help="folders searched for evaluate.py JSON (recursively)")
    parser.add_argument("--length", type=count, required=True, help="the RULER prompt length (e.g. 4096 or 4k)")
    parser.add_argument("--tasks", type=list_of(str, "RULER task names"), default=NIAH3,
                        help=f"the columns (default {','.join(NIAH3)})")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file (atomically)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.out:
            check_writable_file(args.out)
        table = render(collect(ruler_results(args.folders), args.length), args.tasks, args.length)
    except ValueError as e:
        one_line_error(str(e))
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
