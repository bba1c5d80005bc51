"""What the scripts share: the run header (date, device, versions, commit, command), timing on the device, cleanup
between rows, the copy bandwidth, one number formatter, one markdown table writer and one list parser."""
import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import time
from pathlib import Path

import torch

from runner import synchronize

REPO_DIR = Path(__file__).resolve().parent.parent
# Where results go unless a folder is given: ignored by git (.gitignore: /outputs/*). Results are kept under
# outputs/results/ by choice, with --out.
LOCAL_OUT = REPO_DIR / "outputs" / "local"
MiB, GiB = 2**20, 2**30


# ---------------------------------------------------------------- the run header


def command_line(module: str, argv, python: str = "python") -> str:
    """The command that ran, quoted (shlex) so that it runs again as written: python -m MODULE ARGS."""
    return shlex.join([python, "-m", module, *map(str, argv)])


def git_commit(path: Path = None) -> str:
    """HEAD (-dirty when tracked files changed), and a word when `path` (the script) is not the committed one."""
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=REPO_DIR, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("describe", "--always", "--dirty", "--abbrev=12") or "unknown"
        state = git("status", "--porcelain", "--", str(path)) if path else ""
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not state:
        return commit
    name = Path(path).resolve().relative_to(REPO_DIR)
    return f"{commit} ({name} {'untracked' if state.startswith('??') else 'modified'})"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    name = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} (cpu, {os.cpu_count()} cores)"


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_header(device: torch.device, module: str, argv, script: Path = None, python: str = "python") -> dict:
    """What every result file starts with: when, where, with what and how it ran."""
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device_name(device),
                torch=torch.__version__, triton=version("triton"), transformers=version("transformers"),
                python=platform.python_version(), commit=git_commit(script), command=command_line(module, argv, python))


def header_lines(header: dict) -> list[str]:
    """The header as markdown bullets."""
    return [f"- device: {header['device']}",
            f"- torch {header['torch']}, triton {header['triton']}, transformers {header['transformers']}, "
            f"python {header['python']}",
            f"- commit: {header['commit']}",
            f"- command: `{header['command']}`"]


# ---------------------------------------------------------------- timing and cleanup


def timed(fn, device: torch.device) -> float:
    """Seconds fn() takes on the device: CUDA events around it, or the host clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def release(model, device: torch.device):
    """Drop the model's caches and every compiled graph (and its CUDA-graph memory pool) before the next row."""
    if model is not None:
        for layer in model.layers:
            layer.attention.kv_cache = None
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    n_bytes = GiB if device.type == "cuda" else 64 * MiB
    src = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    seconds = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(20))
    return 2 * n_bytes / seconds


# ---------------------------------------------------------------- tables


def fmt(value, spec: str = "", unit: float = 1, empty: str = "") -> str:
    """value / unit formatted with spec (e.g. fmt(seconds, ".3f", 1e-3) in ms), or `empty` without a value."""
    return empty if value is None else format(value / unit if unit != 1 else value, spec)


def markdown_table(headers: list, rows: list, legend: str = None) -> list[str]:
    """A markdown table (a header row, the separator, one line per row of cells) and, after a blank line, its
    legend; as lines."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines + (["", legend] if legend else [])


# ---------------------------------------------------------------- command-line values


def count(text: str) -> int:
    """A whole number, k meaning x1024: "4k" is 4096."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def list_of(item=count, what: str = "whole numbers (e.g. 256,4k,32k)", empty: bool = False):
    """An argparse type: a comma-separated list of item(entry) values (empty entries skipped); an empty list only
    when `empty` (e.g. "" to skip a part). A bad entry is one line saying what is accepted."""
    def parse(text):
        try:
            values = [item(x.strip()) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
        if not values and not empty:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list: give {what}")
        return values
    return parse


def name_list(choices):
    """An argparse type: a comma-separated list of names out of `choices`."""
    def name(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(text)
        return text

    def parse(text):
        try:
            return list_of(name, f"names from {','.join(choices)}")(text)
        except argparse.ArgumentTypeError:
            unknown = [x for x in text.split(",") if x and x not in choices]
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'}: "
                                             f"choose from {','.join(choices)}") from None
    return parse


def check_once(option: str, values: list, what: str = "value", show=str):
    """A one-line ValueError when a list names a value twice (it would be measured, and weigh, twice)."""
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"{option} lists {', '.join(map(show, twice))} more than once: give each {what} once")


def length_range(text: str) -> tuple[int, int]:
    """An argparse type: LO-HI, two whole numbers with 1 <= LO <= HI."""
    try:
        low, high = (count(x) for x in text.split("-"))
    except ValueError:
        low = high = None
    if low is None or not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range LOW-HIGH (e.g. 16-256) with 1 <= LO <= HI")
    return low, high


def plot_roofline(rows: list[dict], label_of, path: Path, title: str):
    """`path` (a PNG): decode tokens/s against context, one panel per batch size, one colour per label_of(row);
    measured points as solid lines, each label's roofline (batch / roofline_s: the bytes a step must read over the
    measured bandwidth) dashed in the same colour. rows: decode rows with context, batch, tokens_per_s, roofline_s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("tokens_per_s") and r.get("roofline_s")]
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(label_of(r) for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, batch in zip(axes[0], batches):
        for i, label in enumerate(labels):
            points = sorted({r["context"]: r for r in rows if r["batch"] == batch and label_of(r) == label}.values(),
                            key=lambda r: r["context"])
            if not points:
                continue
            x, colour = [r["context"] for r in points], cycle[i % len(cycle)]
            ax.plot(x, [r["tokens_per_s"] for r in points], "o-", color=colour, label=label)
            ax.plot(x, [batch / r["roofline_s"] for r in points], "--", color=colour, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s (all sequences)")
        ax.set_title(f"batch {batch}: measured (solid) vs roofline (dashed)")
        ax.grid(True, which="both", alpha=0.3)
    labelled = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(labelled.values(), labelled.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees half a PNG
    print(f"wrote {path}")
