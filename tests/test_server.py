"""serve.py, live: a server started here on a free loopback port (a tiny random checkpoint with SmolLM2's tokenizer
and chat template, float64, three KV configurations in one batch), driven by the real openai client and httpx.

References: the offline engine (engine.py) on the same checkpoint, each request alone in a cache of its
configuration: greedy (and seeded) outputs must be the same tokens. Every loop here is bounded in count and time."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import runner
from cli_options import parse_strategy_options
from engine import Engine, SamplingParams
from llm import chat_tokens, prompt_tokens
from test_generate_cli import TINY, write_tiny
from tokenizer import load_tokenizer, save_gguf_tokenizer

REPO_DIR = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
MAX_SEQ_LENGTH = 160
CONFIGS = {"full": ("full", []), "int4": ("quantize_kv", ["--bits", "4", "--sink_size", "4", "--window_size", "8",
                                                           "--group_size", "16"]),
           "snap": ("snapkv", ["--budget", "48", "--sink_size", "4", "--window_size", "8", "--then_bits", "4"])}
KV_ARGS = ["--kv", "full", "--kv", "int4=quantize_kv:bits=4,sink_size=4,window_size=8,group_size=16",
           "--kv", "snap=snapkv:budget=48,sink_size=4,window_size=8,then_bits=4"]
PROMPTS = ["Once upon a time,", "The capital of France is", "def fibonacci(n):", "Über the hills",
           "1, 2, 3, 4,", "Dear Sir or Madam,"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_gguf_path):
    root = tmp_path_factory.mktemp("server")
    save_gguf_tokenizer(smollm2_gguf_path, root / "tokenizer")
    return write_tiny(root / "tiny", root / "tokenizer")


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KVCACHE_API_KEY": API_KEY}
    proc = subprocess.Popen([sys.executable, str(REPO_DIR / "serve.py"), "--checkpoint_path", str(checkpoint),
                             *KV_ARGS, "--max_batch_size", "4", "--max_seq_length", str(MAX_SEQ_LENGTH),
                             "--block_size", "8", "--dtype", "float64", "--port", str(port),
                             "--max_prompt_tokens", "100", "--max_body_bytes", "20000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO_DIR)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the server did not start in 240 s"
        time.sleep(0.5)
    yield base
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert b"Traceback" not in out, out.decode()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(checkpoint):
    """The offline engine's tokens for (kv, prompt ids, params): each request alone in its configuration's cache."""
    model = runner.load_model(checkpoint, torch.device("cpu"), torch.float64)
    tokenizer = load_tokenizer(checkpoint)
    done = {}

    def run(kv, ids, max_tokens, temperature=0.0, seed=None):
        key = (kv, tuple(ids), max_tokens, temperature, seed)
        if key not in done:
            strategy, argv = CONFIGS[kv]
            runner.setup_cache(model, strategy, parse_strategy_options(strategy, argv), 1, MAX_SEQ_LENGTH, quiet=True)
            params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                                    stop_ids=tuple(sorted(tokenizer.eos_ids)))
            done[key] = Engine(model, prefill_chunk_size=512).generate([ids], params)[0].tokens
        return done[key]

    run.tokenizer = tokenizer
    return run


def metrics(server) -> dict:
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_idle(server, timeout=60):
    """Until nothing runs or waits and every configuration's pool is empty; the metrics then."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        busy = sum(v for k, v in m.items() if k.startswith(("vllm:num_requests", "kvcache_blocks_used")))
        if busy == 0:
            return m
        assert time.monotonic() < deadline, f"still busy after {timeout} s: {m}"
        time.sleep(0.2)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("kv", list(CONFIGS))
def test_completions_equal_the_offline_engine(client, offline, kv):
    """Greedy, each configuration (by model name and by the kv_cache field), streaming and not: the offline
    engine's tokens; usage counts them."""
    ids = prompt_tokens(offline.tokenizer, PROMPTS[0])
    want = offline(kv, ids, 12)
    out = client.completions.create(model=f"{client.models.list().data[0].id}:{kv}", prompt=PROMPTS[0],
                                    max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert choice.token_ids == want
    assert choice.text == offline.tokenizer.decode([t for t in want if t not in offline.tokenizer.eos_ids])
    assert choice.finish_reason == ("stop" if want[-1] in offline.tokenizer.eos_ids else "length")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(want))
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                       extra_body={"kv_cache": kv})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_uses_the_template_and_streams(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    want = offline("int4", chat_tokens(offline.tokenizer, messages), 10)
    text = offline.tokenizer.decode([t for t in want if t not in offline.tokenizer.eos_ids])
    out = client.chat.completions.create(model="tiny:int4", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny:int4", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(want)


def test_sampling_options_n_seed_and_stop(client, offline):
    """n choices with a seed: choice i is the offline engine's draw with seed + i; a stop string cuts the text
    (finish_reason stop) and ends the request; stop_token_ids end it too."""
    ids = prompt_tokens(offline.tokenizer, PROMPTS[1])
    out = client.completions.create(model="tiny:full", prompt=PROMPTS[1], max_tokens=8, temperature=0.9, seed=5,
                                    n=3, top_p=1.0, extra_body={"return_token_ids": True})
    assert [c.token_ids for c in out.choices] == [offline("full", ids, 8, 0.9, 5 + i) for i in range(3)]
    greedy = offline.tokenizer.decode(offline("full", ids, 12))
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    cut = client.completions.create(model="tiny:full", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.find(stop)] and cut.choices[0].finish_reason == "stop"
    tokens = offline("full", ids, 12)
    stop_id = tokens[2]
    by_id = client.completions.create(model="tiny:full", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                      extra_body={"stop_token_ids": [stop_id], "return_token_ids": True})
    assert by_id.choices[0].token_ids == tokens[:tokens.index(stop_id) + 1]
    assert by_id.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny:full", "tiny:int4", "tiny:snap"]
    assert httpx.get(f"{server}/health").status_code == 200  # no key needed


# ---------------------------------------------------------------- concurrency, disconnects


def test_32_concurrent_clients_over_three_configurations(client, offline, server):
    """32 requests at once over full / int4 / snap (12 rows in all, so some wait): every one answered exactly once
    with the tokens of its run alone; afterwards nothing runs and every pool is empty."""
    jobs = [(list(CONFIGS)[i % 3], PROMPTS[i % len(PROMPTS)], 4 + i % 7) for i in range(32)]

    def ask(job):
        kv, prompt, max_tokens = job
        out = client.completions.create(model=f"tiny:{kv}", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        extra_body={"return_token_ids": True})
        return out.id, out.choices[0].token_ids

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs, timeout=600))
    assert len({rid for rid, _ in answers}) == 32
    for (kv, prompt, max_tokens), (_, tokens) in zip(jobs, answers):
        assert tokens == offline(kv, prompt_tokens(offline.tokenizer, prompt), max_tokens), (kv, prompt)
    wait_idle(server)


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    """A stream closed after its first chunk: the request is aborted at the next step, its blocks return."""
    before = metrics(server).get('vllm:request_success_total{finished_reason="abort",model_name="tiny"}', 0)
    body = {"model": "tiny:full", "prompt": PROMPTS[2], "max_tokens": 140, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert "choices" in json.loads(line[6:])
                break
    after = wait_idle(server)
    assert after['vllm:request_success_total{finished_reason="abort",model_name="tiny"}'] == before + 1


# ---------------------------------------------------------------- bad and hostile input


def post(server, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}{path}", json=None if raw is not None else body, content=raw,
                      headers={**headers, "content-type": "application/json"}, timeout=60)


BAD = {
    "malformed_json": ("/v1/completions", None, b'{"prompt": "x",', 400, "not valid JSON"),
    "unknown_configuration": ("/v1/completions", {"prompt": "x", "kv_cache": "int3"}, None, 400,
                              "unknown KV configuration 'int3': choose one of full, int4, snap"),
    "unknown_model": ("/v1/completions", {"prompt": "x", "model": "llama:full"}, None, 404, "does not exist"),
    "model_and_field_disagree": ("/v1/completions", {"prompt": "x", "model": "tiny:full", "kv_cache": "int4"},
                                 None, 400, "give one of them"),
    "negative_max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": -5}, None, 400, "max_tokens"),
    "absurd_max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, None, 400,
                          "but a sequence holds 160"),
    "prompt_over_the_limit": ("/v1/completions", {"prompt": "hello " * 150, "max_tokens": 1}, None, 400,
                              "--max_prompt_tokens"),
    "wrong_type": ("/v1/completions", {"prompt": "x", "temperature": "hot"}, None, 400, "temperature"),
    "no_prompt": ("/v1/completions", {"max_tokens": 3}, None, 400, "prompt"),
    "empty_messages": ("/v1/chat/completions", {"messages": []}, None, 400, "messages is empty"),
    "bad_role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None, 400, "role"),
    "logprobs": ("/v1/completions", {"prompt": "x", "logprobs": 2}, None, 400, "not supported"),
    "top_p_zero": ("/v1/completions", {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    "too_many_choices": ("/v1/completions", {"prompt": "x", "n": 1000}, None, 400, "n"),
    "body_too_large": ("/v1/completions", {"prompt": "x" * 30000}, None, 413, "--max_body_bytes"),
    "bad_stop_token": ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**9]}, None, 400, "stop_token_ids"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_a_clear_error_and_leaks_nothing(server, name):
    path, body, raw, status, message = BAD[name]
    response = post(server, path, body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"], error
    assert "Traceback" not in response.text
    wait_idle(server)


def test_the_api_key_guards_every_route_but_health(server):
    assert post(server, "/v1/completions", {"prompt": "x"}, key=None).status_code == 401
    assert post(server, "/v1/completions", {"prompt": "x"}, key="wrong").status_code == 401
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_bad_start_up_options_are_one_line(checkpoint):
    for argv, message in [(["--kv", "x=quantize_kv:bits=3"], "invalid choice"),
                          (["--kv", "x=nosuch"], "unknown strategy 'nosuch'"),
                          (["--kv", "x=quantize_kv:bits"], "is not OPTION=VALUE"),
                          (["--kv", "full", "--kv", "full"], "--kv names must differ")]:
        result = subprocess.run([sys.executable, str(REPO_DIR / "serve.py"), "--checkpoint_path", str(checkpoint),
                                 *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
