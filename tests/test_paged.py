"""Paged KV (kv_cache/paging.py), continuous batching (scheduler.py), chunked prefill and prefix sharing.

References: the contiguous cache of the same strategy (paged must equal it, float64), each prompt run alone (a batch
of one, the same code), the unchunked prefill, the unshared pool; the pool's accounting against an explicit count of
who holds which block (BlockPool.check), under random interleavings drawn by hypothesis."""
import pytest
import torch
import torch._dynamo
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters

from conftest import reset_dynamo
import engine
import memory
import runner
import scheduler
from kv_cache.paging import BlockPool, PageSpace, PoolExhausted
from model import ModelArgs, Transformer
from test_batch import ARGS, CASES as BATCH_CASES

# The model and the strategies and bit widths of the batch tests (tests/test_batch.py), plus a quantize_kv whose
# sinks + window hold everything (its ring is the paged store then).
CASES = {**BATCH_CASES,
         "quantize_kv-as-full": ("quantize_kv", dict(sink_size=32, window_size=64, bits="4", group_size=8))}
PROMPT_LENGTHS = [7, 1, 23, 41]
NEW_TOKENS, MAX_SEQ_LENGTH, CHUNK = 14, 64, 5
EOS = (3, 7)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ARGS).double().eval().requires_grad_(False)


def prompts(lengths=PROMPT_LENGTHS, seed=1, vocab_size=ARGS.vocab_size):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


class Recorder:
    """A decode_fn that keeps every step's logits (the greedy choice is made from them as decode_one_token does)."""

    def __init__(self, pool=None):
        self.logits, self.pool, self.held = [], pool, None

    def __call__(self, model, token, input_pos, sampling):
        logits = model(token, input_pos)
        self.logits.append(logits.clone())
        if self.pool is not None:  # blocks per sequence at the last step (a sequence returns them when it ends)
            self.held = [len(blocks) for blocks in self.pool.held]
        return runner.sample(logits[:, -1], sampling, input_pos)


def run(model, name, block_size=None, num_blocks=None, batch=4, chunk=CHUNK, eos=()):
    strategy, opts = CASES[name]
    pool = runner.setup_cache(model, strategy, opts, batch, MAX_SEQ_LENGTH, quiet=True, block_size=block_size,
                                num_blocks=num_blocks)
    recorder = Recorder(pool)
    out = engine.generate_batch(model, prompts(), NEW_TOKENS, eos_ids=eos, prefill_chunk=chunk, decode_fn=recorder)
    return out, torch.stack(recorder.logits), pool, recorder.held


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_equals_contiguous(model, name, block_size):
    """Every strategy and format, ragged prompts, chunked prefill, float64: the same logits at every decode step
    (bit for bit) and the same tokens; the pool accounts for every block, and a sequence holds just the blocks of
    what its store keeps."""
    want, want_logits, *_ = run(model, name)
    got, got_logits, pool, held = run(model, name, block_size)
    assert torch.equal(got["tokens"], want["tokens"])
    assert torch.equal(got_logits, want_logits)
    pool.check()
    space = pool.space
    for row, ids in enumerate(prompts()):
        stored = len(ids) + NEW_TOKENS - 1  # the last new token is sampled, never written
        assert held[row] == space.blocks_for(stored), (row, held[row])


def test_pool_sizes(model):
    """Blocks hold what the strategy keeps: full grows with the sequence, compress_kv stops at sinks + window,
    quantize_kv pages its quantized store only, in blocks of whole key groups."""
    full = run(model, "full", 4)[3]
    assert full == [-(-(n + NEW_TOKENS - 1) // 4) for n in PROMPT_LENGTHS]
    compress = run(model, "compress_kv", 4)[3]
    assert max(compress) == (4 + 8) // 4  # sinks + window, however long the sequence
    _, _, int4_pool, int4 = run(model, "quantize_kv-int4", 4)
    assert int4_pool.block_tokens == 8  # 4 rounded up to the key group of 8
    for row, n in enumerate(PROMPT_LENGTHS):
        in_older = max(0, n + NEW_TOKENS - 1 - 12) // 8 * 8
        assert int4[row] == -(-in_older // 8)


def test_pool_nbytes(model):
    """The pool's bytes are num_blocks x block bytes per layer; memory.predicted_pool_bytes (meta device) agrees with the
    real caches."""
    for name in ("full", "compress_kv", "quantize_kv-int4"):
        strategy, opts = CASES[name]
        pool = runner.setup_cache(model, strategy, opts, 4, MAX_SEQ_LENGTH, quiet=True, block_size=4, num_blocks=9)
        held = memory.allocated_kv_bytes(model)
        fixed, per_block = memory.predicted_pool_bytes(ARGS, strategy, opts, 4, MAX_SEQ_LENGTH, 4, torch.float64)
        assert held == fixed + 9 * per_block
        assert sum(c.pool_nbytes() for c in model.caches()) == 9 * per_block
        assert pool.num_blocks == 9


def test_pool_exhausted_is_a_clear_error(model):
    strategy, opts = CASES["full"]
    pool = runner.setup_cache(model, strategy, opts, 4, MAX_SEQ_LENGTH, quiet=True, block_size=4, num_blocks=6)
    with pytest.raises(PoolExhausted, match="free block"):
        for row in range(4):
            pool.reserve(row, 12)
    # The engine admits by worst case, so it never runs the pool dry: the batch waits for blocks instead.
    out = engine.generate_batch(model, prompts([7, 1, 5, 3]), NEW_TOKENS)
    assert out["peak_running"] < 4 and all(len(s["tokens"]) == NEW_TOKENS for s in out["sequences"])
    pool.check()
    assert pool.used == 0


@pytest.mark.parametrize("name", ["full", "compress_kv", "quantize_kv-int4", "quantize_kv-int8"])
@pytest.mark.parametrize("paged", [False, True])
def test_continuous_batching_equals_one_by_one(model, name, paged):
    """Eight ragged prompts (some end at an EOS) through 3 rows: each sequence as if it ran alone, token for token;
    a small pool makes admission wait for blocks."""
    texts = prompts([7, 1, 23, 41, 5, 30, 12, 9], seed=2)
    strategy, opts = CASES[name]
    alone = []
    for ids in texts:
        runner.setup_cache(model, strategy, opts, 1, MAX_SEQ_LENGTH, quiet=True)
        alone.append(engine.generate_batch(model, [ids], NEW_TOKENS, eos_ids=EOS, prefill_chunk=CHUNK)
                     ["sequences"][0])
    pool = runner.setup_cache(model, strategy, opts, 3, MAX_SEQ_LENGTH, quiet=True, block_size=4 if paged else None,
                                num_blocks=16 if paged else None)
    ended = []
    out = engine.generate_batch(model, texts, NEW_TOKENS, eos_ids=EOS, prefill_chunk=CHUNK,
                                        on_step=lambda step: ended.extend(r.id for r in step.finished))
    assert out["sequences"] == alone
    assert sorted(ended) == list(range(len(texts)))
    assert any(seq["finish_reason"] == "stop" for seq in alone)
    assert out["peak_running"] <= 3
    if paged:
        pool.check()
        assert pool.used == 0 and pool.peak_used <= pool.usable


def test_continuous_batching_refuses_a_prompt_that_never_fits(model):
    strategy, opts = CASES["full"]
    runner.setup_cache(model, strategy, opts, 2, MAX_SEQ_LENGTH, quiet=True, block_size=4, num_blocks=6)
    with pytest.raises(ValueError, match="prompt 1 .* needs 14 blocks .* pool has 5"):
        engine.generate_batch(model, prompts([3, 40]), NEW_TOKENS)


def test_prefix_sharing_equals_unshared(model):
    """Copies of one prompt and prompts that share a prefix: the same tokens as the contiguous cache; shared blocks
    are stored once (reference-counted) and return to the pool only when their last holder ends."""
    base = prompts([21], seed=3)[0]
    texts = [base, base, base[:17] + [5, 6, 7, 8], base[:9]]
    runner.setup_cache(model, "full", {}, 4, MAX_SEQ_LENGTH)
    want = engine.generate_batch(model, texts, NEW_TOKENS, prefill_chunk=CHUNK)
    pool = runner.setup_cache(model, "full", {}, 4, MAX_SEQ_LENGTH, block_size=4)
    at_last_step = {}

    def snapshot(model, token, input_pos, sampling):  # the pool while every sequence still runs
        pool.check()
        at_last_step.update(held=[list(h) for h in pool.held], refs=list(pool.refs), used=pool.used)
        return runner.decode_one_token(model, token, input_pos, sampling)

    got = engine.generate_batch(model, texts, NEW_TOKENS, prefill_chunk=CHUNK, decode_fn=snapshot)
    assert torch.equal(got["tokens"], want["tokens"])
    held, refs = at_last_step["held"], at_last_step["refs"]
    # base: 5 full prompt blocks (the 6th holds its last token: always its own); row 1 shares all 5, row 2 the
    # first 4 (block 5 differs), row 3 the first 2 (its own third block holds its last token).
    shared = [sum(refs[b] > 1 for b in blocks) for blocks in held]
    assert shared == [5, 5, 4, 2]
    assert held[1][:5] == held[0][:5] and held[2][:4] == held[0][:4]
    unshared = sum(-(-(len(ids) + NEW_TOKENS - 1) // 4) for ids in texts)
    assert at_last_step["used"] == unshared - (5 + 4 + 2)
    assert all(refs[b] == 4 for b in held[1][:2])  # rows 0 to 3 hold them: one release leaves 3 holders
    pool.check()  # every sequence ended: each block free or cached, none leaked
    assert pool.used == 0


def test_prefix_cache_serves_the_next_run(model, monkeypatch):
    """A prompt's full blocks stay cached when its sequence ends: the next run of the same prompt (as the next
    --num_samples sample) computes only its last block, gets the same tokens, and a cached block is handed out
    again only when no free block is left."""
    ids = prompts([22], seed=7)[0]
    pool = runner.setup_cache(model, "full", {}, 1, MAX_SEQ_LENGTH, block_size=4, num_blocks=11)
    fed = []
    real_prefill = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda m, tokens, *a, **k: fed.append(tokens.shape[1]) or
                        real_prefill(m, tokens, *a, **k))
    first = engine.generate_batch(model, [ids], NEW_TOKENS)
    second = engine.generate_batch(model, [ids], NEW_TOKENS)
    assert fed == [22, 22 - 20]  # 5 full blocks of the 22-token prompt come from the cache
    assert torch.equal(first["tokens"], second["tokens"])
    pool.check()
    pool.release()
    assert len(pool.cached) == 5 and pool.used == 0
    engine.generate_batch(model, [prompts([40], seed=8)[0]], 1)  # 10 blocks: the 5 free, then 5 cached ones
    pool.check()
    # the first prompt's 5 cached blocks were handed out (their index entries dropped); the 40-token prompt's 10
    # blocks are the cached ones now that it ended
    assert len(pool.cached) == 10
    assert not pool.prefix_index.keys() - set(pool._prefix_keys(prompts([40], seed=8)[0], 10))


def test_chunked_prefill_equals_unchunked_full(model):
    """The full cache: a prompt fed in chunks of any size gives the logits of one pass, float64."""
    ids = torch.tensor(prompts([45], seed=4))
    runner.setup_cache(model, "full", {}, 1, MAX_SEQ_LENGTH)
    want = runner.prefill(model, ids)
    for chunk in (1, 7, 16, 44):
        runner.setup_cache(model, "full", {}, 1, MAX_SEQ_LENGTH)
        got = runner.prefill(model, ids, chunk_size=chunk)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        runner.setup_cache(model, "full", {}, 1, MAX_SEQ_LENGTH)
        assert torch.equal(runner.prefill(model, ids, chunk_size=chunk, last_only=True), got[:, -1:])


@pytest.mark.parametrize("name", ["full", "quantize_kv-int4", "compress_kv"])
def test_paged_decode_compiles_once(model, name):
    """Continuous batching over a paged pool, the decode step compiled (aot_eager: dynamo's graph capture without
    inductor's code generation): one graph, no recompiles as sequences grow, end and are admitted, no graph breaks,
    and the eager tokens."""
    texts = prompts([7, 1, 23, 41, 5], seed=5)
    strategy, opts = CASES[name]
    runner.setup_cache(model, strategy, opts, 2, MAX_SEQ_LENGTH, quiet=True, block_size=4)
    want = engine.generate_batch(model, texts, NEW_TOKENS, eos_ids=EOS, prefill_chunk=CHUNK)
    reset_dynamo()
    counters.clear()
    compiled = torch.compile(runner.decode_one_token, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = engine.generate_batch(model, texts, NEW_TOKENS, eos_ids=EOS, prefill_chunk=CHUNK,
                                            decode_fn=compiled)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert got["sequences"] == want["sequences"]


# ---------------------------------------------------------------- the pool's accounting, property-based

OPS = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 3), st.integers(0, 40)),
    st.tuples(st.just("release"), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("share"), st.integers(0, 3), st.integers(0, 2)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_block_accounting_under_random_interleavings(ops):
    """Admissions (with and without a shared prefix), growth and ends in any order: after every step each block is
    free or held by exactly its reference count of sequences, the table matches the held lists, the null block is
    never handed out, and a failed reservation changes nothing."""
    space = PageSpace(4, 40, lambda n: min(n, 40), sharable=True)
    pool = BlockPool(13, space, 4, "cpu")
    stems = [[1] * 9, [1] * 8 + [2], [3] * 13]
    lengths = [0] * 4
    for op, row, arg in ops:
        if op == "reserve":
            before = (list(pool.free), list(pool.cached), [list(h) for h in pool.held])
            try:
                pool.reserve(row, max(arg, lengths[row]))
                lengths[row] = max(arg, lengths[row])
            except PoolExhausted:
                assert (pool.free, list(pool.cached), pool.held) == before
        elif op == "release":
            pool.release([row])
            lengths[row] = 0
        elif not pool.held[row]:
            ids = stems[arg]
            shared = pool.share_prefix(row, ids)
            assert shared % 4 == 0 and shared < len(ids)
            try:
                pool.reserve(row, len(ids))
                lengths[row] = len(ids)
                pool.publish_prefix(row, ids)
            except PoolExhausted:
                pool.release([row])
                lengths[row] = 0
        pool.check()
        assert pool.used == len({b for h in pool.held for b in h})
    pool.release()
    pool.check()
    assert pool.used == 0 and pool.available == pool.usable
    assert set(pool.cached) == set(pool.prefix_index.values())  # what stays indexed is exactly the cached blocks


# ---------------------------------------------------------------- the fused kernels through the block table

TRITON_CASES = ["full", "compress_kv-original", "quantize_kv-int8", "quantize_kv-int4", "quantize_kv-fp8",
                "h2o-then-int4", "snapkv-adaptive", "tova-mixed"]  # eviction: kept runs in pages, lanes, planes


@pytest.mark.parametrize("name", TRITON_CASES)
def test_paged_triton_decode_matches_contiguous_torch(name):
    """--attn_impl triton (the fused decode kernel reading pages through the table, the decode flush quantizing
    into paged blocks) against the contiguous PyTorch path, ragged prompts across flushes: logits agree at every
    step, and the quantized pool holds byte for byte what the PyTorch path writes into the same pool."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, dim=64, n_layer=1, n_head=2, n_kv_head=1, intermediate_size=64, head_dim=32)
    tiny = Transformer(args).eval().requires_grad_(False)
    texts = prompts([9, 26], seed=6, vocab_size=args.vocab_size)
    strategy, opts = CASES[name]
    results = {}
    for impl, block_size in (("torch", None), ("torch", 4), ("triton", 4)):
        runner.setup_cache(tiny, strategy, dict(opts, attn_impl=impl), 2, 48, quiet=True, block_size=block_size)
        recorder = Recorder()
        out = engine.generate_batch(tiny, texts, 12, prefill_chunk=8, decode_fn=recorder)
        buffers = {k: b.clone() for k, b in tiny.caches()[0].named_buffers()}
        results[impl, block_size] = out["tokens"], torch.stack(recorder.logits), buffers
    want_tokens, want_logits, _ = results["torch", None]
    got_tokens, got_logits, got_buffers = results["triton", 4]
    assert torch.equal(got_tokens, want_tokens)
    assert (got_logits - want_logits).norm() <= 1e-5 * want_logits.norm()
    for key, buf in results["torch", 4][2].items():
        if key.startswith("older."):
            assert torch.equal(got_buffers[key].view(torch.uint8), buf.view(torch.uint8)), key
