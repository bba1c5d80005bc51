"""compress_kv's memory at both ends: flat over a 100,000-token stream (the cache's bytes and the process's RSS), and
never more than the full cache's for a run shorter than sinks + window (with the same outputs).

Small random models on the CPU: the stream is prefill chunks with a few decode steps between them, so it covers both
paths and runs in seconds.
"""
import gc
import os

import pytest
import torch

import kv_cache
from model import ModelArgs, Transformer

MiB = 2**20


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(dtype=torch.float32, **overrides) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(**{**dict(vocab_size=96, dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=32,
                               intermediate_size=128, max_position_embeddings=256), **overrides})
    return Transformer(args).to(dtype).eval().requires_grad_(False)


def setup(model, strategy, options, max_seq_length, rope_length=None, batch_size=1):
    cls = kv_cache.STRATEGIES[strategy]
    a, w = model.args, model.tok_embeddings.weight
    model.setup_caches(lambda i: cls(batch_size, max_seq_length, a.n_kv_head, a.head_dim, w.dtype, w.device,
                                     **options), rope_length or max_seq_length)


def cache_bytes(model) -> int:
    return sum(cache.nbytes() for cache in model.caches())


def rss_bytes() -> int:
    """The process's resident memory now (not its peak): /proc/self/statm counts pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- 100k tokens

STREAM, CHUNK, DECODE_STEPS = 100_000, 512, 4
SINK, WINDOW = 4, 60


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from /proc (Linux)")
def test_compress_kv_memory_is_flat_over_100k_tokens():
    model = tiny_model()
    # RoPE tables for sinks + window + one chunk: with cache positions the model never sees a larger position.
    setup(model, "compress_kv", dict(sink_size=SINK, window_size=WINDOW), STREAM, rope_length=SINK + WINDOW + CHUNK)
    buffers = {name: (b.data_ptr(), b.shape) for c in model.caches() for name, b in c.named_buffers()}
    a = model.args
    full_bytes = 2 * a.n_layer * a.n_kv_head * a.head_dim * STREAM * 4  # what the full cache would hold at the end
    tokens = torch.randint(0, a.vocab_size, (1, STREAM), generator=torch.Generator().manual_seed(1))
    samples, pos, logits = {}, 0, None  # tokens streamed -> (cache bytes, RSS)
    with torch.inference_mode():
        while pos < STREAM:
            n = min(CHUNK, STREAM - pos)
            logits = model(tokens[:, pos:pos + n], torch.arange(pos, pos + n))
            pos += n
            for _ in range(min(DECODE_STEPS, STREAM - pos)):
                logits = model(tokens[:, pos:pos + 1], torch.tensor([pos]))
                pos += 1
            if pos >= 1000 and (not samples or pos // 10_000 > max(samples) // 10_000 or pos == STREAM):
                gc.collect()
                samples[pos] = (cache_bytes(model), rss_bytes())
    assert logits.isfinite().all()
    first, last = min(samples), max(samples)
    table = ", ".join(f"{t}: cache {b / MiB:.3f} MiB, RSS {r / MiB:.1f} MiB" for t, (b, r) in samples.items())
    growth = max(r for _, r in samples.values()) - samples[first][1]
    message = (f"{table}; RSS growth after {first} tokens {growth / MiB:.2f} MiB (the full cache would hold "
               f"{full_bytes / MiB:.1f} MiB at {last} tokens)")
    assert first < 2000 and last == STREAM, message
    assert len({b for b, _ in samples.values()}) == 1, message  # the cache's bytes never change
    assert {name: (b.data_ptr(), b.shape) for c in model.caches() for name, b in c.named_buffers()} == buffers
    assert growth < 8 * MiB, message  # flat: a leak of even 1/12 of the full cache's bytes would show


# ---------------------------------------------------------------- a run shorter than sinks + window

SCHEDULE = [10, 1, 1, 1, 1, 1]  # a 10-token prompt and 5 decode steps: 15 tokens
DEFAULTS = dict(sink_size=16, window_size=32)


def stream(model, tokens, schedule=SCHEDULE):
    out, pos = [], 0
    for n in schedule:
        out.append(model(tokens[:, pos:pos + n], torch.arange(pos, pos + n)))
        pos += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("rope_positions", ["cache", "original"])
def test_short_compress_kv_run_is_sized_as_full_with_the_same_outputs(rope_positions):
    """compress_kv 16/32 sized for a 15-token run (generate.py sizes the cache for prompt + new tokens): the full
    cache's bytes, not 48 slots' (3.2x), and the outputs of the 48-slot cache."""
    model, n = tiny_model(torch.float64), sum(SCHEDULE)
    tokens = torch.randint(0, 96, (2, n), generator=torch.Generator().manual_seed(2))
    options = dict(DEFAULTS, rope_positions=rope_positions)
    with torch.inference_mode():
        setup(model, "full", {}, n, batch_size=2)
        full_bytes, full_out = cache_bytes(model), stream(model, tokens)
        setup(model, "compress_kv", options, n, batch_size=2)
        short_bytes, short_out = cache_bytes(model), stream(model, tokens)
        setup(model, "compress_kv", options, 64, batch_size=2)  # room to stream: sinks + window, 48 slots
        ring_bytes, ring_out = cache_bytes(model), stream(model, tokens)
    assert short_bytes <= full_bytes < ring_bytes, (short_bytes, full_bytes, ring_bytes)
    assert ring_bytes > 3 * full_bytes  # what the 15-token run allocated before
    assert torch.equal(short_out, full_out)
    torch.testing.assert_close(short_out, ring_out, rtol=0, atol=1e-10)


def test_capacity_follows_the_sizing():
    cls = kv_cache.STRATEGIES["compress_kv"]
    assert cls.capacity(DEFAULTS, 15) == 15  # sized as full: it holds the run it was sized for, no more
    assert cls.capacity(DEFAULTS, 47) == 47
    assert cls.capacity(DEFAULTS, 48) is None  # sinks + window fit: it streams without end
    assert cls.capacity({}, 128) is None
