"""Evaluate every strategy of the matrix and render a markdown table and three plots.

    python scripts/run_matrix.py                      # the default CPU matrix, into outputs/matrix/
    python scripts/run_matrix.py --list               # the entries, one per line (a Slurm array runs one each)
    python scripts/run_matrix.py --only 0,3 --out outputs/run1 --max_tokens 2048   # evaluate.py options pass through
    python scripts/run_matrix.py --render --out outputs/run1                        # table + plots from the JSONs

The matrix: full; compress_kv 16/32; quantize_kv 16/32 at 8, 4, 2 bits and fp8; and each compressed one again with
a larger window (--windows; 16/128 by default, 64/256 in the GPU run). Each entry writes DIR/NN_name.json
(evaluate.py's object); the table goes to DIR/table.md and the plots to DIR/kv_memory.png,
DIR/perplexity_vs_position.png and DIR/retrieval_vs_length.png.

With evaluate.py's defaults (256-token contexts, token-by-token perplexity) the whole matrix fits in under 30 minutes
on a 2-core CPU with SmolLM2-135M in float32 (see README, "Evaluation"). MATRIX_DEFAULTS adds --max_position 256,
which sizes the caches of fixed capacity (full, quantize_kv) as if the model's context were 256 tokens, and a
512-token stream, so the perplexity-by-position plot shows compress_kv carrying on where they stop; on a GPU, pass
--max_position 0 (the model's own 8192) and a longer stream (scripts/slurm/env.sh does).
"""
import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
from scripts import evaluate  # noqa: E402

BITS = ("8", "4", "2", "fp8")
# The CPU default's contexts are 256 tokens: a 64/256 cache would hold all of them, so its larger window is 16/128.
WINDOWS = "16/32,16/128"
# Added to evaluate.py's own defaults for the matrix; options given on the command line come later and win.
MATRIX_DEFAULTS = ["--stream_tokens", "512", "--max_position", "256"]


def sink_windows(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in pair.split("/")) for pair in text.split(",") if pair]


def build_matrix(windows=WINDOWS) -> list[tuple[str, list[str]]]:
    """(label, strategy argv) of every entry: full, then per sink/window pair compress_kv and quantize_kv x BITS."""
    matrix = [("full", ["full"])]
    for sink, window in sink_windows(windows):
        sink_window = ["--sink_size", str(sink), "--window_size", str(window)]
        matrix.append((f"compress_kv {sink}/{window}", ["compress_kv"] + sink_window))
        for bits in BITS:
            name = bits if bits == "fp8" else f"int{bits}"
            matrix.append((f"quantize_kv {sink}/{window} {name}", ["quantize_kv"] + sink_window + ["--bits", bits]))
    return matrix


def file_name(index: int, label: str) -> str:
    return f"{index:02d}_{label.replace(' ', '_').replace('/', '-')}.json"


def run(matrix, indices, out_dir: Path, settings: list[str]):
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tokenizer = checkpoint_path = None
    for index in tqdm(indices, desc="matrix", unit="strategy"):
        label, strategy_argv = matrix[index]
        args, options = evaluate.parse(strategy_argv + MATRIX_DEFAULTS + settings)
        if model is None:  # every entry shares the checkpoint, device and dtype: load once
            model, tokenizer, checkpoint_path = evaluate.load(args)
        result = {"label": label, "index": index,
                  **evaluate.evaluate(model, tokenizer, args.strategy, options, args, checkpoint_path)}
        evaluate.write_json(result, out_dir / file_name(index, label))
        tqdm.write(evaluate.summary(result))


# ---------------------------------------------------------------- rendering


def load_results(out_dir: Path) -> list[dict]:
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    results = [r for r in results if "strategy" in r and "kv_bytes" in r]
    if not results:
        raise ValueError(f"no evaluation JSON in {out_dir}: run scripts/run_matrix.py --out {out_dir} first")
    return sorted(results, key=lambda r: r.get("index", len(results)))


def label(r: dict) -> str:
    return r.get("label") or evaluate.describe(r["strategy"], r["options"])


def fmt(value, spec, default="–"):
    return default if value is None else format(value, spec)


def render_table(results: list[dict]) -> str:
    full = next((r for r in results if r["strategy"] == "full"), None)
    first = results[0]
    # The run's contexts are short; the memory a cache saves shows at the model's whole context (the memory curve's end).
    long_tokens = max(n for n, _ in first["kv_bytes_by_tokens"])
    full_long = full and dict(full["kv_bytes_by_tokens"]).get(long_tokens)
    lines = [
        f"Device {first['device']}, {first['dtype']}; checkpoint {first['checkpoint']}; corpus {first['data']}.",
        f"Perplexity over {first['tokens']} tokens streamed {first['chunk_size']} at a time; ROUGE-L over "
        f"{len(first.get('continuations', []))} greedy continuations; retrieval over "
        f"{len(first.get('retrieval_samples', []))} prompts (lengths {sorted({s['length'] for s in first.get('retrieval_samples', [])})}); "
        f"prompts fed {first['prefill_chunk']} tokens at a time; KV bytes for {first['kv_tokens']} tokens.",
        "",
        "| Strategy | Perplexity | vs full | ROUGE-L | ROUGE-L vs full | Retrieval | Tokens/s | KV MiB | × full "
        f"| KV MiB at {long_tokens} | × full |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        long_bytes = dict(r["kv_bytes_by_tokens"]).get(long_tokens)
        long_ratio = long_bytes / full_long if long_bytes and full_long else None
        change = "–"
        if full and r["perplexity"] is not None and full["perplexity"] is not None:
            delta = r["perplexity"] - full["perplexity"]
            change = f"{delta:+.2f} ({100 * delta / full['perplexity']:+.1f}%)"
        lines.append(f"| {label(r)} | {fmt(r['perplexity'], '.2f')} | {change} | {fmt(r['rouge_l'], '.4f')} | "
                     f"{fmt(r['rouge_l_vs_full'], '.4f')} | {fmt(r['retrieval_accuracy'], '.2f')} | "
                     f"{fmt(r['tokens_per_s'], '.2f')} | {r['kv_bytes'] / 2**20:.2f} | {r['kv_ratio']:.3f} | "
                     f"{fmt(long_bytes and long_bytes / 2**20, '.1f')} | {fmt(long_ratio, '.3f')} |")
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
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
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


def render(out_dir: Path) -> str:
    results = load_results(out_dir)
    table = render_table(results)
    (out_dir / "table.md").write_text(table)
    plots = render_plots(results, out_dir)
    print(table)
    print(f"wrote {out_dir / 'table.md'}, " + ", ".join(str(p) for p in plots))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=evaluate.OUTPUTS / "matrix", help="folder for JSON, table, plots")
    parser.add_argument("--only", type=evaluate.int_list, default=None, help="comma-separated entry indices (--list)")
    parser.add_argument("--windows", default=WINDOWS,
                        help=f"sink/window pairs of the compressed entries (default {WINDOWS}; the GPU run: 16/32,64/256)")
    parser.add_argument("--list", action="store_true", help="print the entries and exit")
    parser.add_argument("--render", action="store_true", help="only render the table and plots from --out's JSON")
    args, settings = parser.parse_known_args(argv)
    try:
        matrix = build_matrix(args.windows)
    except ValueError:
        sys.exit(f"error: --windows {args.windows!r} is not a list of sink/window pairs such as 16/32,64/256")
    if args.list:
        for i, (name, strategy_argv) in enumerate(matrix):
            print(f"{i}\t{name}\t{' '.join(strategy_argv)}")
        return
    try:
        if not args.render:
            indices = args.only if args.only is not None else range(len(matrix))
            bad = [i for i in indices if not 0 <= i < len(matrix)]
            if bad:
                raise ValueError(f"--only {bad} is out of range: the matrix has entries 0..{len(matrix) - 1} (--list)")
            if args.only is None:  # a whole run replaces the folder's results (an array task adds its own)
                for stale in args.out.glob("[0-9][0-9]_*.json"):
                    stale.unlink()
            started = datetime.datetime.now()
            run(matrix, indices, args.out, settings)
            with open(args.out / "commands.txt", "a") as log:  # what ran, when, where and for how long
                log.write(f"{started:%Y-%m-%d %H:%M} on {platform.node()} ({torch.get_num_threads()} threads), "
                          f"{(datetime.datetime.now() - started).total_seconds():.0f} s: python scripts/run_matrix.py "
                          f"{' '.join(argv if argv is not None else sys.argv[1:])}\n")
        render(args.out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
