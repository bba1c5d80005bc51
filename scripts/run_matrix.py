"""Evaluate every strategy of the matrix and render a markdown table and three plots.

    python -m scripts.run_matrix                      # the default CPU matrix, into outputs/matrix/
    python -m scripts.run_matrix --list               # the entries, one per line (a Slurm array runs one each)
    python -m scripts.run_matrix --only 0,3 --out outputs/run1 --max_tokens 2048 --max_position 0   # evaluate.py's
    python -m scripts.run_matrix --render --out outputs/run1                        # table + plots from the JSONs

The matrix is scripts/presets.py's list: the entries without sinks and window (full) once; those with them
(compress_kv; quantize_kv at 8, 4, 2 bits and fp8) at each sink/window pair of --windows (16/32 and 16/128 by
default, 64/256 in the GPU run); then the eviction entries (snapkv, h2o, tova, expected_attention, h2o with int4
storage, snapkv with int2) at --budget tokens for each pair that leaves room in the budget. Each entry writes
DIR/NN_name.json (evaluate.py's object); the table goes to DIR/table.md and the plots to DIR/kv_memory.png,
DIR/perplexity_vs_position.png and DIR/retrieval_vs_length.png, every file written atomically.

Run again with the same --out, it resumes: an entry whose JSON is complete and was made with the same settings (the
JSON keeps them) is skipped, and said so; missing or stale ones are computed again, and a stale result is kept in
DIR/superseded/ (never deleted: a name taken there gets a number). Every option, evaluate.py's included, is checked
for every entry before any file is touched or any entry runs. A whole run (no --only) that completes moves the
results of entries it does not have (another --windows) to DIR/superseded/ too. The table marks (‡) a row made with
other settings than its first row, and says which.

RULER: evaluate.py's --ruler TASKS (or all), --ruler_lengths and --ruler_samples pass through like its other options
(a length above the matrix's --max_position 256 needs --max_position 0 or larger); the table then has a RULER column
(the mean score) and, with --ruler_by_task, one per task (its mean over the lengths). A changed RULER option makes
the earlier JSONs stale, as any other option; results made without RULER still resume a run without it.

With evaluate.py's defaults (256-token contexts, token-by-token perplexity) its first 11 entries fit in under 30 minutes
on a 2-core CPU with SmolLM2-135M in float32 (see README, "Evaluation"). MATRIX_DEFAULTS adds --max_position 256,
which sizes the caches of fixed capacity (full, quantize_kv) as if the model's context were 256 tokens, and a
512-token stream, so the perplexity-by-position plot shows compress_kv carrying on where they stop; on a GPU, pass
--max_position 0 (the model's own 8192) and a longer stream (scripts/slurm/env.sh does).
"""
import argparse
import datetime
import io
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from atomic import atomic_write_bytes, atomic_write_text, check_writable_file
from cli_options import one_line_error
from scripts import evaluate
from scripts.common import check_once, command_line, fmt, list_of, markdown_table
from scripts.presets import PRESETS

# The CPU default's contexts are 256 tokens: a 64/256 cache would hold all of them, so its larger window is 16/128.
WINDOWS = "16/32,16/128"
# The eviction entries' tokens per sequence and KV head: half of the CPU matrix's 256-token contexts by default (the
# GPU run passes a larger one).
BUDGET = 128
MARK = "‡"  # a row made with other settings than the table's first
# Added to evaluate.py's own defaults for the matrix; options given on the command line come later and win.
MATRIX_DEFAULTS = ["--stream_tokens", "512", "--max_position", "256"]


def sink_windows(text: str) -> list[tuple[int, int]]:
    """"16/32,64/256" -> [(16, 32), (64, 256)], or a one-line ValueError."""
    try:
        pairs = [tuple(int(n) for n in pair.split("/")) for pair in text.split(",") if pair]
    except ValueError:
        pairs = None
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--windows {text!r} is not a list of sink/window pairs such as 16/32,64/256")
    check_once("--windows", pairs, "pair", show=lambda pair: "/".join(map(str, pair)))
    return pairs


def build_matrix(windows=WINDOWS, budget=BUDGET) -> list[tuple[str, list[str]]]:
    """(label, strategy argv) of every entry of scripts/presets.py: those without sinks and window once; then per
    sink/window pair those with them; then (after them, so the earlier entries keep their numbers) per pair that
    leaves room in --budget, those with a budget."""
    pairs = sink_windows(windows)
    plain = [p for p in PRESETS if not p.takes("sink_size")]
    windowed = [p for p in PRESETS if p.takes("sink_size") and not p.takes("budget")]
    evicting = [p for p in PRESETS if p.takes("budget")]
    matrix = [(p.label(), [p.strategy, *p.strategy_argv()]) for p in plain]
    for sink, window in pairs:
        matrix += [(p.label(sink, window), [p.strategy, *p.strategy_argv(sink, window)]) for p in windowed]
    for sink, window in pairs:
        if sink + window < budget:
            matrix += [(p.label(sink, window, budget), [p.strategy, *p.strategy_argv(sink, window, budget)])
                       for p in evicting]
    return matrix


def file_name(index: int, label: str) -> str:
    return f"{index:02d}_{label.replace(' ', '_').replace('/', '-')}.json"


def select(only, matrix) -> list[int]:
    """The entry indices to run: --only's, checked, or every entry."""
    if only is None:
        return list(range(len(matrix)))
    bad = [i for i in only if not 0 <= i < len(matrix)]
    if not only or bad:
        raise ValueError(f"--only {bad or 'with no index'} is out of range: the matrix has entries "
                         f"0..{len(matrix) - 1} (--list)")
    check_once("--only", only, "index")
    return only


def make_jobs(matrix, indices, out_dir: Path, settings: list[str]) -> list[dict]:
    """Each entry's parsed evaluate.py arguments, checked (a bad option fails here, before anything runs), and its
    JSON path."""
    jobs = []
    for index in indices:
        label, strategy_argv = matrix[index]
        args, options = evaluate.parse(strategy_argv + MATRIX_DEFAULTS + settings)
        if args.json:
            raise ValueError("--json: run_matrix.py writes one JSON per entry into --out DIR; drop --json")
        path = out_dir / file_name(index, label)
        if args.profile:  # one trace per entry, not each overwriting the last
            args.profile = f"{args.profile}_{path.stem}"
        jobs.append({"index": index, "label": label, "args": args, "options": options, "path": path})
    return jobs


def finished(path: Path, settings: dict) -> str | None:
    """Why the entry's JSON is kept ("complete": a whole result made with these settings), or why not; None when
    there is none."""
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"
    if not isinstance(result, dict) or "seconds" not in result:
        return "incomplete"
    return "complete" if result.get("settings") == settings else "stale"


def run(jobs) -> int:
    """Evaluate every job whose JSON is not complete with its settings; the number evaluated."""
    states = [finished(job["path"], evaluate.run_settings(job["args"], job["options"])) for job in jobs]
    todo = [job for job, state in zip(jobs, states) if state != "complete"]
    planned = []
    if todo:
        # The evaluate.py options are the same for every entry (an entry only adds its strategy's): load and read
        # once, then check every entry against the model before the first one runs.
        first = todo[0]["args"]
        model, tokenizer, checkpoint_path = evaluate.load(first)
        inputs = evaluate.prepare(tokenizer, first)
        planned = [evaluate.plan(model, job["args"].strategy, job["options"], job["args"], inputs, tokenizer)
                   for job in todo]
    for job, state in zip(jobs, states):
        if state == "complete":
            print(f"skipped {job['path'].name}: complete, made with the same settings")
        elif state is not None:
            print(f"redoing {job['path'].name}: {'made with other settings' if state == 'stale' else state} "
                  f"(kept in {SUPERSEDED}/ once the new result is written)")
    if not todo:
        return 0
    for job, plan in evaluate.progress(list(zip(todo, planned)), desc="matrix", unit="strategy", leave=True):
        args = job["args"]
        result = {"label": job["label"], "index": job["index"],
                  **evaluate.evaluate(model, tokenizer, args.strategy, job["options"], args, checkpoint_path, plan)}
        if job["path"].exists():  # the earlier result stays where it was until this one is complete
            set_aside(job["path"])
        evaluate.write_json(result, job["path"])
        tqdm.write(evaluate.summary(result))
    return len(todo)


SUPERSEDED = "superseded"


def set_aside(path: Path) -> Path:
    """Move a result to superseded/ beside it, never over one already there (a taken name gets .1, .2, ...)."""
    folder = path.parent / SUPERSEDED
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 0
    while target.exists():
        n += 1
        target = folder / f"{path.stem}.{n}{path.suffix}"
    os.replace(path, target)
    return target


def set_aside_others(out_dir: Path, jobs):
    """After a whole run: results of entries this matrix does not have (another --windows) would mix into the table;
    move them to DIR/superseded/ rather than delete them."""
    names = {job["path"].name for job in jobs}
    others = [p for p in sorted(out_dir.glob("[0-9][0-9]_*.json")) if p.name not in names]
    for path in others:
        set_aside(path)
    if others:
        print(f"moved {len(others)} results of entries not in this matrix to {out_dir / SUPERSEDED}: "
              + ", ".join(p.name for p in others))


def log_command(out_dir: Path, started, argv):
    """Append what ran (quoted: it runs again as written), when, where and for how long to DIR/commands.txt
    (rewritten whole, atomically)."""
    log = out_dir / "commands.txt"
    old = log.read_text() if log.exists() else ""
    atomic_write_text(log, old + f"{started:%Y-%m-%d %H:%M} on {platform.node()} ({torch.get_num_threads()} threads), "
                                 f"{(datetime.datetime.now() - started).total_seconds():.0f} s: "
                                 f"{command_line(__spec__.name, argv)}\n")


# ---------------------------------------------------------------- rendering


def load_results(out_dir: Path) -> list[dict]:
    """Every evaluation result in the folder; a file that is not one (a leftover of an older, non-atomic version)
    is named on stderr and left out, so the table still shows the others."""
    results = []
    for path in sorted(out_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            print(f"warning: {path} is not readable JSON: left out of the table (run its entry again)", file=sys.stderr)
            continue
        if isinstance(result, dict) and "strategy" in result and "kv_bytes" in result:
            results.append(result)
    if not results:
        raise ValueError(f"no evaluation JSON in {out_dir}: run python -m scripts.run_matrix --out {out_dir} first")
    return sorted(results, key=lambda r: r.get("index", len(results)))


def label(r: dict) -> str:
    return r.get("label") or evaluate.describe(r["strategy"], r["options"])


def num(value, spec, unit=1):
    return fmt(value, spec, unit, empty="–")


def other_settings(results: list[dict]) -> dict[int, str]:
    """{row: what differs} for the rows made with other settings than the first row's (their own strategy and
    options apart), e.g. "max_tokens 16 (first row: 24)". Rows that predate recorded settings are not compared."""
    reference = results[0].get("settings")
    if reference is None:
        return {}
    ignore = ("strategy", "options")
    differ = {}
    for i, r in enumerate(results[1:], 1):
        settings = r.get("settings")
        if settings is None:
            continue
        keys = sorted((set(settings) | set(reference)) - set(ignore))
        changed = [k for k in keys if settings.get(k) != reference.get(k)]
        if changed:
            differ[i] = ", ".join(f"{k} {settings.get(k)} (first row: {reference.get(k)})" for k in changed)
    return differ


def ruler_columns(results: list[dict], by_task: bool) -> tuple[list[str], list]:
    """The RULER columns when any row has RULER scores: the mean, then (by_task) each task's mean over its lengths;
    (headers, row -> cells). A row without RULER shows dashes."""
    scored = [r for r in results if r.get("ruler_mean") is not None]
    if not scored:
        return [], lambda r: []
    tasks = list(dict.fromkeys(task for r in scored for task in r["ruler"])) if by_task else []

    def cells(r):
        by_task_scores = r.get("ruler") or {}
        means = [sum(by_task_scores[t].values()) / len(by_task_scores[t]) if t in by_task_scores else None
                 for t in tasks]
        return [num(r.get("ruler_mean"), ".1f")] + [num(m, ".1f") for m in means]

    return ["RULER"] + [f"RULER {task}" for task in tasks], cells


def ruler_line(results: list[dict]) -> str:
    r = next((r for r in results if r.get("ruler_mean") is not None), None)
    if r is None:
        return ""
    lengths = sorted({s["length"] for s in r["ruler_samples"]})
    per_cell = len(r["ruler_samples"]) // (len(r["ruler"]) * len(lengths))
    return (f" RULER: {len(r['ruler'])} tasks at {lengths} tokens, {per_cell} samples each, "
            f"{r.get('ruler_template', '?')} prompt template, scored 0-100 by RULER's string match.")


def render_table(results: list[dict], ruler_by_task: bool = False) -> str:
    full = next((r for r in results if r["strategy"] == "full"), None)
    first = results[0]
    ruler_headers, ruler_cells = ruler_columns(results, ruler_by_task)
    differ = other_settings(results)
    # The run's contexts are short; the memory a cache saves shows at the model's whole context (the memory curve's end).
    long_tokens = max(n for n, _ in first["kv_bytes_by_tokens"])
    full_long = full and dict(full["kv_bytes_by_tokens"]).get(long_tokens)
    lines = [
        f"Device {first['device']}, {first['dtype']}; checkpoint {first['checkpoint']}; corpus {first['data']}.",
        f"Perplexity over {first['tokens']} tokens streamed ({evaluate.streamed(first)}); ROUGE-L over "
        f"{len(first.get('continuations', []))} greedy continuations; retrieval over "
        f"{len(first.get('retrieval_samples', []))} prompts (lengths {sorted({s['length'] for s in first.get('retrieval_samples', [])})}); "
        f"prompts fed {first['prefill_chunk']} tokens at a time; KV bytes for {first['kv_tokens']} tokens."
        + ruler_line(results)
        + (f" Rows marked {MARK} were made with other settings (below): not comparable as they stand." if differ else ""),
        "",
    ]
    headers = ["Strategy", "Perplexity", "vs full", "ROUGE-L", "ROUGE-L vs full", "Retrieval", *ruler_headers,
               "Tokens/s", "KV MiB", "× full", f"KV MiB at {long_tokens}", "× full"]
    rows = []
    for i, r in enumerate(results):
        long_bytes = dict(r["kv_bytes_by_tokens"]).get(long_tokens)
        long_ratio = long_bytes / full_long if long_bytes and full_long else None
        change = "–"
        if full and r["perplexity"] is not None and full["perplexity"] is not None:
            delta = r["perplexity"] - full["perplexity"]
            change = f"{delta:+.2f} ({100 * delta / full['perplexity']:+.1f}%)"
        rows.append([label(r) + (f" {MARK}" if i in differ else ""), num(r["perplexity"], ".2f"), change,
                     num(r["rouge_l"], ".4f"), num(r["rouge_l_vs_full"], ".4f"), num(r["retrieval_accuracy"], ".2f"),
                     *ruler_cells(r), num(r["tokens_per_s"], ".2f"), f"{r['kv_bytes'] / 2**20:.2f}",
                     f"{r['kv_ratio']:.3f}", num(long_bytes, ".1f", 2**20), num(long_ratio, ".3f")])
    lines += markdown_table(headers, rows)
    lines += [f"{MARK} {label(results[i])}: {what}" for i, what in differ.items()]
    return "\n".join(lines) + "\n"


def render_plots(results: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # Colour: the strategy and its bits; line: the sink/window pair (solid for the first, dashed for the next...).
    colours, pairs = {}, {}

    def style(r):
        if r["strategy"] == "full":
            return {"color": "black", "linestyle": "-", "label": label(r)}
        colour = colours.setdefault((r["strategy"], r["options"].get("bits")), f"C{len(colours)}")
        pair = pairs.setdefault((r["options"].get("sink_size"), r["options"].get("window_size")), len(pairs))
        return {"color": colour, "linestyle": ["-", "--", ":", "-."][pair % 4], "label": label(r)}

    def save(fig, ax, name):
        # Outside the axes: strategies that tie draw on top of each other, and the legend must not hide the data.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(out_dir / name, png.getvalue())
        written.append(out_dir / name)

    def figure(rows, xy, marker, **axes):
        """One curve (xy(r) -> x, y) per result row on fresh axes."""
        fig, ax = plt.subplots(figsize=(10, 5))
        for r in rows:
            ax.plot(*xy(r), marker=marker, **style(r))
        ax.set(**axes)
        ax.grid(alpha=0.3)
        return fig, ax

    def memory_mib(r):
        tokens, nbytes = zip(*r["kv_bytes_by_tokens"])
        return tokens, [b / 2**20 for b in nbytes]

    fig, ax = figure(results, memory_mib, ".", xscale="log", yscale="log",
                     xlabel="tokens in the sequence (prompt + generated)", ylabel="KV cache MiB allocated",
                     title=f"KV cache memory ({results[0]['dtype']}, all layers, one sequence)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    save(fig, ax, "kv_memory.png")

    def perplexity_by_position(r):
        curve = r["nll_by_position"]
        x = [min((i + 0.5) * curve["bin"], curve["tokens"]) for i in range(len(curve["mean_nll"]))]
        return x, [math.exp(n) for n in curve["mean_nll"]]

    streams = [r for r in results if r.get("nll_by_position")]
    if streams:
        fig, ax = figure(streams, perplexity_by_position, ".", yscale="log", xlabel="position in the stream",
                         ylabel=f"perplexity (mean over {streams[0]['nll_by_position']['bin']} tokens)",
                         title="Perplexity along a stream, fed one chunk at a time through the cache")
        max_position = streams[0]["max_position"]
        ax.axvline(max_position, color="grey", linestyle=":", label=f"capacity of full/quantize_kv ({max_position})")
        save(fig, ax, "perplexity_vs_position.png")

    def accuracy_by_length(r):
        by_length = {}
        for sample in r["retrieval_samples"]:
            by_length.setdefault(sample["length"], []).append(sample["correct"])
        lengths = sorted(by_length)
        return lengths, [sum(by_length[n]) / len(by_length[n]) for n in lengths]

    scored = [r for r in results if r.get("retrieval_samples")]
    if scored:
        tasks = sorted({sample["task"] for sample in scored[0]["retrieval_samples"]})
        fig, ax = figure(scored, accuracy_by_length, "o", xlabel="context length (tokens)", ylabel="accuracy",
                         ylim=(-0.05, 1.05), title=f"Retrieval accuracy ({', '.join(tasks)}; mean over depths)")
        save(fig, ax, "retrieval_vs_length.png")
    return written


def render(out_dir: Path, ruler_by_task: bool = False) -> str:
    results = load_results(out_dir)
    table = render_table(results, ruler_by_task)
    atomic_write_text(out_dir / "table.md", table)
    plots = render_plots(results, out_dir)
    print(table)
    print(f"wrote {out_dir / 'table.md'}, " + ", ".join(str(p) for p in plots))
    return table


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m scripts.run_matrix", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # a prefix of an evaluate.py option must pass through
    parser.error = one_line_error
    parser.add_argument("--out", type=Path, default=evaluate.OUTPUTS / "matrix", help="folder for JSON, table, plots")
    parser.add_argument("--only", type=list_of(int, "entry indices (e.g. 0,3)"), default=None, help="comma-separated entry indices (--list)")
    parser.add_argument("--windows", default=WINDOWS,
                        help=f"sink/window pairs of the compressed entries (default {WINDOWS}; the GPU run: 16/32,64/256)")
    parser.add_argument("--budget", type=int, default=BUDGET,
                        help=f"tokens the eviction entries keep per sequence and KV head (default {BUDGET})")
    parser.add_argument("--list", action="store_true", help="check the options, print the entries and exit")
    parser.add_argument("--render", action="store_true", help="only render the table and plots from --out's JSON")
    parser.add_argument("--ruler_by_task", action="store_true",
                        help="a table column per RULER task (its mean over --ruler_lengths) besides the RULER mean")
    return parser.parse_known_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, settings = parse_args(argv)
    try:
        if args.render:
            if settings or args.only is not None or args.list:
                raise ValueError("--render only reads --out DIR (and --ruler_by_task): drop the other options")
            render(args.out, args.ruler_by_task)
            return
        matrix = build_matrix(args.windows, args.budget)
        indices = select(args.only, matrix)
        jobs = make_jobs(matrix, indices, args.out, settings)  # every option of every entry, before any file
        if args.list:
            for i, (name, strategy_argv) in enumerate(matrix):
                print(f"{i}\t{name}\t{' '.join(strategy_argv)}")
            return
        check_writable_file(args.out / "table.md")
        for job in jobs:
            evaluate.check_output_paths(job["args"])
        started = datetime.datetime.now()
        if run(jobs):
            log_command(args.out, started, argv)
        if args.only is None:
            set_aside_others(args.out, jobs)
        render(args.out, args.ruler_by_task)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --max_tokens, --stream_tokens, --retrieval_lengths or "
                 "--ruler_lengths")


if __name__ == "__main__":
    main()
