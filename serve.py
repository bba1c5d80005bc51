"""An OpenAI-compatible server whose requests choose their KV compression, decoded together in one batch.

    python serve.py --kv full --kv int4=quantize_kv:bits=4,sink_size=16,window_size=32 \\
        --kv snap512=snapkv:budget=512,then_bits=4 --max_batch_size 8 --port 8000

Each --kv NAME=STRATEGY:OPTION=VALUE,... is a KV configuration (any registered strategy and its options, checked at
start-up as the command line checks them) with --max_batch_size rows of the batch and a paged pool of its own. A
request picks one by model name (`smollm2-135m:int4`) or by a `kv_cache` field in its body (the openai client's
extra_body); the first is the default. Every configuration's rows decode in the same step (kv_cache/mixed.py), one
pass over the weights for all of them. Routes: POST /v1/completions, POST /v1/chat/completions (the checkpoint's
chat template), GET /v1/models, GET /health, GET /metrics (Prometheus).

The engine runs in one thread of its own (EngineLoop); HTTP handlers talk to it through its inbox and get tokens
back through asyncio queues, so a slow client never stalls the batch, and a request that disconnects is aborted
(its row and blocks free at the next step).
"""
import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

import kv_cache
from checkpoint import default_checkpoint_path
from cli_options import check_checkpoint_path, parse_strategy_options, positive_number, resolve_device_dtype, \
    whole_number
from engine import Engine, SamplingParams
from kv_cache.paging import DEFAULT_BLOCK_SIZE
from llm import chat_tokens, prompt_tokens
from memory import blocks_in, format_bytes, predicted_pool_bytes
from runner import compile_decode, decode_one_token, load_model, setup_mixed_cache

MAX_N = 16  # choices per request


# ---------------------------------------------------------------- configurations


def parse_kv_spec(text: str) -> tuple[str, str, dict]:
    """NAME=STRATEGY:OPTION=VALUE,... (or STRATEGY alone, named after itself) -> (name, strategy, options),
    options parsed by the strategy's own command-line parser; a one-line ValueError naming the fix."""
    name, _, rest = text.partition("=") if "=" in text.split(":")[0] else (text.split(":")[0], "", text)
    strategy, _, option_text = rest.partition(":")
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"--kv {text!r}: the name must be letters, digits, - _ . (e.g. --kv int4=quantize_kv:bits=4)")
    argv = []
    for item in filter(None, option_text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--kv {text!r}: {item!r} is not OPTION=VALUE (e.g. bits=4)")
        argv += [f"--{key}", value]
    return name, strategy, parse_strategy_options(strategy, argv)


# ---------------------------------------------------------------- the engine's thread


class EngineLoop:
    """Runs engine.step() in its own thread while requests wait or run. Handlers call add() / abort() from the
    event loop; each request's events (("token", id), ("end", reason), ("error", message)) reach its asyncio
    queue."""

    def __init__(self, engine: Engine, metrics):
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[int, tuple] = {}  # request id -> (event loop, asyncio queue)
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    async def add(self, prompt: list[int], params: SamplingParams, kv: str) -> tuple[int, asyncio.Queue]:
        """Queue a request; its id and event queue. ValueError (one line) when it can never run."""
        loop = asyncio.get_running_loop()
        done, events = loop.create_future(), asyncio.Queue()
        self.inbox.put(("add", prompt, params, kv, loop, events, done))
        return await done, events

    def abort(self, request_id: int):
        self.inbox.put(("abort", request_id))

    def _send(self, request_id: int, event):
        sink = self.sinks.get(request_id)
        if sink is not None:
            loop, events = sink
            loop.call_soon_threadsafe(events.put_nowait, event)

    def _handle(self, message):
        if message[0] == "add":
            _, prompt, params, kv, loop, events, done = message
            try:
                request_id = self.engine.add_request(prompt, params, kv)
            except ValueError as e:
                loop.call_soon_threadsafe(_settle, done, None, e)
                return
            self.sinks[request_id] = (loop, events)
            loop.call_soon_threadsafe(_settle, done, request_id, None)
        else:
            request = self.engine.abort(message[1])
            if request is not None:
                self.metrics.finished.labels(self.metrics.labels["model_name"], "abort").inc()
                self._send(request.id, ("end", "abort"))
                self.sinks.pop(request.id, None)

    def run(self):
        while True:
            try:  # block only while there is nothing to decode
                self._handle(self.inbox.get(timeout=None if not self.engine.has_unfinished() else 0))
                while True:
                    self._handle(self.inbox.get_nowait())
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                self.metrics.update_engine(self.engine)
                continue
            try:
                out = self.engine.step()
            except Exception as e:  # one failed step must not stop the server: its requests fail, others go on
                message = f"{type(e).__name__}: {' '.join(str(e).split())}"
                for request in list(self.engine.scheduler.running.values()):
                    self.engine.abort(request.id)
                    self._send(request.id, ("error", message))
                    self.sinks.pop(request.id, None)
                continue
            for request, token in out.tokens:
                self._send(request.id, ("token", token))
            for request in out.finished:
                self._send(request.id, ("end", request.finish_reason))
                self.sinks.pop(request.id, None)
            self.metrics.update_engine(self.engine)


def _settle(future, result, error):
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


# ---------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics, vLLM's names where they exist."""

    def __init__(self, model_name: str, groups):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self.labels = labels
        self.running = Gauge("vllm:num_requests_running", "Requests in the batch", ["model_name"], registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a row or blocks", ["model_name"],
                             registry=r)
        self.blocks_used = Gauge("kvcache_blocks_used", "KV blocks held by running requests, per KV configuration",
                                 ["model_name", "kv"], registry=r)
        self.blocks_total = Gauge("kvcache_blocks_total", "KV blocks of the configuration's pool",
                                  ["model_name", "kv"], registry=r)
        self.usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of the configuration's KV blocks in use",
                           ["model_name", "kv"], registry=r)
        buckets = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", ["model_name", "kv"],
                              buckets=buckets, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens", ["model_name", "kv"],
                             buckets=buckets, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency", ["model_name", "kv"],
                             buckets=buckets, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens", ["model_name"], registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", ["model_name"], registry=r)
        self.finished = Counter("vllm:request_success", "Finished requests", ["model_name", "finished_reason"],
                                registry=r)
        for g in groups:
            self.blocks_total.labels(model_name, g.name).set(g.pool.usable if g.pool is not None else 0)
            self.blocks_used.labels(model_name, g.name).set(0)

    def update_engine(self, engine: Engine):
        name = self.labels["model_name"]
        self.running.labels(name).set(len(engine.scheduler.running))
        self.waiting.labels(name).set(sum(map(len, engine.scheduler.waiting.values())))
        for g in engine.groups:
            if g.pool is not None:
                self.blocks_used.labels(name, g.name).set(g.pool.used)
                self.usage.labels(name, g.name).set(g.pool.used / g.pool.usable)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# ---------------------------------------------------------------- the API's bodies


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    kv_cache: Optional[str] = None  # the KV configuration (or name it in model: "smollm2-135m:int4")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # -1 or 0: every token (vLLM takes -1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[dict] = None
    return_token_ids: bool = False
    logprobs: Union[bool, int, None] = None
    echo: bool = False
    best_of: Optional[int] = None


class CompletionBody(Body):
    prompt: Union[str, list[str], list[int]]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None


class ChatBody(Body):
    messages: list[Message]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------- the server


class Server:
    def __init__(self, model_name: str, tokenizer, loop: EngineLoop, metrics: Metrics, max_prompt_tokens: int):
        self.model_name, self.tokenizer, self.loop, self.metrics = model_name, tokenizer, loop, metrics
        self.max_prompt_tokens = max_prompt_tokens
        self.groups = {g.name: g for g in loop.engine.groups}
        self.default_kv = loop.engine.groups[0].name

    def model_ids(self) -> list[str]:
        return [self.model_name] + [f"{self.model_name}:{name}" for name in self.groups]

    def resolve_kv(self, body: Body) -> str:
        kv = None
        if body.model is not None and body.model != self.model_name:
            base, colon, suffix = body.model.partition(":")
            if base != self.model_name or not colon:
                raise APIError(404, f"the model {body.model!r} does not exist: this server serves "
                                    f"{', '.join(self.model_ids())}", "model", "not_found_error")
            kv = suffix
        if body.kv_cache is not None:
            if kv is not None and kv != body.kv_cache:
                raise APIError(400, f"model names KV configuration {kv!r} but kv_cache is {body.kv_cache!r}: give "
                                    "one of them", "kv_cache")
            kv = body.kv_cache
        kv = kv or self.default_kv
        if kv not in self.groups:
            raise APIError(400, f"unknown KV configuration {kv!r}: choose one of {', '.join(self.groups)}",
                           "kv_cache")
        return kv

    def params(self, body: Body, prompt_len: int, kv: str, default_max: Optional[int]) -> list[SamplingParams]:
        for field_name, unsupported in (("logprobs", body.logprobs), ("echo", body.echo or None),
                                        ("best_of", body.best_of if body.best_of not in (None, 1) else None)):
            if unsupported:
                raise APIError(400, f"{field_name} is not supported by this server: leave it out", field_name)
        max_tokens = body.max_completion_tokens or body.max_tokens
        capacity = self.groups[kv].capacity
        if max_tokens is None:
            max_tokens = default_max or max(1, capacity - prompt_len)
        stop_ids = set(self.tokenizer.eos_ids) | set(body.stop_token_ids or ())
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in stop_ids):
            raise APIError(400, f"stop_token_ids must be token ids in 0..{vocab - 1}", "stop_token_ids")
        return [SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                               top_p=body.top_p, seed=None if body.seed is None else body.seed + i,
                               stop_ids=tuple(sorted(stop_ids)))
                for i in range(body.n)]

    def check_prompt(self, ids: list[int]):
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} token(s) but this server takes at most "
                                f"{self.max_prompt_tokens} (--max_prompt_tokens)", "prompt")

    def stops(self, body: Body) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")
        return stops


class Choice:
    """One sequence's text as its tokens arrive: decoded whole each time (multi-byte characters print whole), cut at
    the first stop string; text that could still be the start of a stop string is held back while streaming."""

    def __init__(self, tokenizer, stop_ids, stops: list[str]):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, set(stop_ids), stops
        self.ids, self.text, self.sent, self.finish_reason, self.stopped = [], "", 0, None, False

    def add(self, token: int):
        self.ids.append(token)
        if token in self.stop_ids:
            return
        text = self.tokenizer.decode([t for t in self.ids if t not in self.stop_ids])
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text

    def delta(self, final: bool = False) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            for stop in self.stops:  # hold back a possible start of a stop string
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:k]):
                        end -= k
                        break
        out, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out


def create_app(server: Server, api_key: str = None, max_body_bytes: int = 1 << 20):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="kvcache server")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse(error_body("a valid API key is needed: send Authorization: Bearer KEY",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return JSONResponse(error_body(f"the body has {length} bytes but this server takes at most "
                                           f"{max_body_bytes} (--max_body_bytes)"), status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first['msg']}" if where else first["msg"]
        if first.get("type") == "json_invalid":
            message, where = f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", ""
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "kvcache"}
                                           for name in server.model_ids()]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        kv = server.resolve_kv(body)
        if isinstance(body.prompt, list) and body.prompt and all(isinstance(p, int) for p in body.prompt):
            prompts = [list(body.prompt)]
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not texts:
                raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", "prompt")
            prompts = [prompt_tokens(server.tokenizer, text) for text in texts]
        return await respond(body, request, kv, prompts, "text_completion", default_max=16)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        kv = server.resolve_kv(body)
        if not body.messages:
            raise APIError(400, "messages is empty: give at least one message", "messages")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(
                part.get("text", "") for part in (m.content or []) if isinstance(part, dict))
            messages.append({"role": m.role, "content": content})
        try:
            ids = chat_tokens(server.tokenizer, messages)
        except ValueError as e:
            raise APIError(400, str(e).replace("--chat: ", "chat: ").replace("drop --chat", "use /v1/completions"),
                           "messages")
        return await respond(body, request, kv, [ids], "chat.completion", default_max=None)

    async def start(body, kv, prompts):
        """Queue every choice of every prompt; a one-line 400 (and nothing left queued) when one cannot run."""
        started = []
        try:
            for p, ids in enumerate(prompts):
                server.check_prompt(ids)
                for i, params in enumerate(server.params(body, len(ids), kv, None)):
                    request_id, events = await server.loop.add(ids, params, kv)
                    started.append((p * body.n + i, ids, request_id, events, params))
        except (ValueError, APIError) as e:
            for _, _, request_id, _, _ in started:
                server.loop.abort(request_id)
            if isinstance(e, APIError):
                raise
            raise APIError(400, " ".join(str(e).split()).replace("--max_seq_length", "--max_seq_length of the "
                                                                                      "server"), "max_tokens")
        return started

    async def respond(body, request, kv, prompts, kind, default_max):
        if default_max is not None and body.max_tokens is None and body.max_completion_tokens is None:
            body.max_tokens = default_max
        stops = server.stops(body)
        started = await start(body, kv, prompts)
        model_id = body.model or server.model_name
        created, rid = int(time.time()), f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        choices = {index: Choice(server.tokenizer, params.stop_ids, stops)
                   for index, _, _, _, params in started}
        prompt_total = sum(len(ids) for _, ids, _, _, _ in started[::body.n])
        server.metrics.prompt_tokens.labels(server.model_name).inc(prompt_total)
        chat_kind = kind == "chat.completion"

        def chunk(index, text, finish_reason, first=False):
            if chat_kind:
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) \
                    if finish_reason is None or text else {}
                choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
            return {"id": rid, "object": "chat.completion.chunk" if chat_kind else "text_completion",
                    "created": created, "model": model_id, "choices": [choice]}

        async def events_of(index, request_id, events):
            """(index, kind, value) for each event of one choice, ending with its end."""
            arrived = last = time.perf_counter()
            got_first = False
            while True:
                kind_, value = await events.get()
                now = time.perf_counter()
                if kind_ == "token":
                    hist = server.metrics.ttft if not got_first else server.metrics.itl
                    hist.labels(server.model_name, kv).observe(now - (arrived if not got_first else last))
                    got_first, last = True, now
                    server.metrics.generation_tokens.labels(server.model_name).inc()
                    choice = choices[index]
                    choice.add(value)
                    if choice.stopped:
                        server.loop.abort(request_id)
                        yield index, "end", "stop"
                        return
                    yield index, "token", value
                else:
                    server.metrics.e2e.labels(server.model_name, kv).observe(now - arrived)
                    yield index, kind_, value
                    return

        merged: asyncio.Queue = asyncio.Queue()  # every choice's events as they come

        async def pump(index, request_id, events):
            async for item in events_of(index, request_id, events):
                await merged.put(item)

        pumps = [asyncio.create_task(pump(index, request_id, events))
                 for index, _, request_id, events, _ in started]

        finished = set()

        def abort_unfinished():
            for index, _, request_id, _, _ in started:
                if index not in finished:
                    server.loop.abort(request_id)

        def finish_reason(index, value):
            reason = "stop" if value == "stop" or choices[index].stopped else value
            server.metrics.finished.labels(server.model_name, reason).inc()
            return reason

        def usage():
            completion = sum(len(c.ids) for c in choices.values())
            return {"prompt_tokens": prompt_total, "completion_tokens": completion,
                    "total_tokens": prompt_total + completion}

        if body.stream:
            async def stream():
                first = {index: True for index in choices}
                try:
                    while len(finished) < len(started):
                        index, kind_, value = await merged.get()
                        if kind_ == "error":
                            finished.add(index)
                            yield f"data: {json.dumps(error_body(value, 'server_error'))}\n\n"
                            continue
                        if kind_ == "token":
                            text = choices[index].delta()
                            if text or (chat_kind and first[index]):
                                yield f"data: {json.dumps(chunk(index, text, None, first[index]))}\n\n"
                                first[index] = False
                            continue
                        finished.add(index)
                        text = choices[index].delta(final=True)
                        yield f"data: {json.dumps(chunk(index, text, finish_reason(index, value)))}\n\n"
                    if body.stream_options and body.stream_options.get("include_usage"):
                        last = {**chunk(0, "", None), "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (or the stream ended): nothing keeps running for it
                    abort_unfinished()
                    for task in pumps:
                        task.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream")

        results, error = {}, None
        try:
            while len(finished) < len(started):
                try:
                    index, kind_, value = await asyncio.wait_for(merged.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if kind_ == "error":
                    error = value
                if kind_ != "token":
                    finished.add(index)
                    if kind_ == "end":
                        results[index] = finish_reason(index, value)
        finally:
            abort_unfinished()
            for task in pumps:
                task.cancel()
        if error is not None:
            raise APIError(500, error, kind="server_error")
        out_choices = []
        for index in sorted(choices):
            c = choices[index]
            item = ({"index": index, "message": {"role": "assistant", "content": c.text}} if chat_kind else
                    {"index": index, "text": c.text, "logprobs": None})
            item["finish_reason"] = results[index]
            if body.return_token_ids:
                item["token_ids"] = c.ids
            out_choices.append(item)
        return {"id": rid, "object": kind, "created": created, "model": model_id, "choices": out_choices,
                "usage": usage()}

    return app


# ---------------------------------------------------------------- start-up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")
    parser.add_argument("--checkpoint_path", type=Path, default=None,
                        help="as generate.py (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served_model_name", default=None, help="the model's name in the API (default: the "
                                                                     "checkpoint folder's name)")
    parser.add_argument("--kv", action="append", metavar="NAME=STRATEGY:OPTION=VALUE,...",
                        help="a KV configuration requests can choose (repeat it; the first is the default; "
                             "default: full)")
    parser.add_argument("--max_batch_size", type=whole_number(1), default=4,
                        help="rows of the batch per KV configuration (requests decoding at once)")
    parser.add_argument("--max_seq_length", type=whole_number(2), default=None,
                        help="tokens a request may reach, prompt included (default: the model's context)")
    parser.add_argument("--block_size", type=whole_number(1), default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--kv_memory_gb", type=positive_number, default=None,
                        help="GiB of KV blocks per configuration (default: every row can reach --max_seq_length)")
    parser.add_argument("--prefill_chunk_size", type=whole_number(1), default=512)
    parser.add_argument("--max_prompt_tokens", type=whole_number(1), default=None,
                        help="the longest prompt accepted (default: --max_seq_length - 1)")
    parser.add_argument("--max_body_bytes", type=whole_number(1), default=1 << 20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU (float64: reference runs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    parser.add_argument("--seed", type=int, default=0, help="requests without a seed draw from seed + their number")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=whole_number(0, "", 65535), default=8000)
    parser.add_argument("--api_key", default=os.environ.get("KVCACHE_API_KEY"),
                        help="require Authorization: Bearer KEY on every route but /health (default: "
                             "$KVCACHE_API_KEY)")
    return parser


def build_server(args) -> tuple[Server, list]:
    """Load, set up the mixed cache and the engine; print each configuration's capacity. One-line ValueErrors."""
    device, dtype = resolve_device_dtype(args.device, None if args.dtype == "float64" else args.dtype)
    dtype = torch.float64 if args.dtype == "float64" else dtype
    specs = [parse_kv_spec(text) for text in (args.kv or ["full"])]
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--kv names must differ, got {', '.join(names)}")
    checkpoint_path = args.checkpoint_path or default_checkpoint_path()
    check_checkpoint_path(checkpoint_path)
    for _, strategy, options in specs:
        kv_cache.base.attn_impl_for(options.get("attn_impl"), device)
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer(checkpoint_path)
    torch.manual_seed(args.seed)
    model = load_model(checkpoint_path, device, dtype)
    max_seq_length = args.max_seq_length or model.args.max_position_embeddings
    configs = []
    for name, strategy, options in specs:
        num_blocks = None
        if args.kv_memory_gb is not None:
            fixed, per_block = predicted_pool_bytes(model.args, strategy, options, args.max_batch_size,
                                                    max_seq_length, args.block_size, dtype)
            num_blocks = blocks_in(args.kv_memory_gb * 2**30, fixed, per_block)
            if num_blocks < 2:
                raise ValueError(f"--kv_memory_gb {args.kv_memory_gb} holds no block of {name} ("
                                 f"{format_bytes(per_block)} a block beside {format_bytes(fixed)}): raise it")
        configs.append((name, strategy, options, args.max_batch_size, num_blocks))
    setup_mixed_cache(model, configs, max_seq_length, block_size=args.block_size)
    decode_fn = compile_decode() if args.compile else decode_one_token
    engine = Engine(model, decode_fn, args.prefill_chunk_size, seed=args.seed)
    model_name = args.served_model_name or (checkpoint_path if checkpoint_path.is_dir() else
                                            checkpoint_path.parent).name
    print(f"model {model_name}: {checkpoint_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"params, {dtype}, {device}), rows of {max_seq_length} tokens")
    for (name, strategy, options), g in zip(specs, engine.groups):
        pool = g.pool
        per_request = pool.space.blocks_for(min(max_seq_length, g.capacity) - 1) if pool is not None else 0
        fits = min(g.stop - g.start, pool.usable // max(per_request, 1)) if pool is not None else g.stop - g.start
        shown = {k: v for k, v in options.items() if v is not None}
        print(f"kv {name}: {strategy} {shown}; {g.stop - g.start} rows, "
              + (f"{pool.usable} blocks of {pool.block_tokens} tokens ({pool.usable * pool.block_tokens} tokens of "
                 f"KV); " if pool is not None else "")
              + f"up to {fits} requests of {min(max_seq_length, g.capacity)} tokens at once")
    metrics = Metrics(model_name, engine.groups)
    loop = EngineLoop(engine, metrics)
    max_prompt = args.max_prompt_tokens or max_seq_length - 1
    return Server(model_name, tokenizer, loop, metrics, max_prompt), engine.groups


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        server, _ = build_server(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    import uvicorn
    server.loop.start()
    app = create_app(server, args.api_key, args.max_body_bytes)
    print(f"serving on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
