"""The engine (engine.py) and its scheduler (scheduler.py).

Admission is host-side bookkeeping, tested here without a model against explicit counts of rows and blocks. The
engine is tested against its own one-by-one runs (a request run alone, greedy or seeded) as requests join while
others run, are aborted, mix sampling settings and stop tokens in one batch; float64, the batch tests' tiny model."""
import pytest
import torch

import memory
import runner
from engine import Engine, SamplingParams, generate_batch
from kv_cache.paging import BlockPool, PageSpace, RowGroup
from model import Transformer
from scheduler import Request, Scheduler, tokens_stored
from test_batch import ARGS
from test_paged import CASES, prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
MAX_SEQ_LENGTH = 64


# ---------------------------------------------------------------- admission, without a model


def full_space(block: int = 4, max_seq_length: int = MAX_SEQ_LENGTH) -> PageSpace:
    return PageSpace(block, max_seq_length, lambda n: min(n, max_seq_length), sharable=True)


def request(i, prompt_len, new_tokens):
    return Request(i, [1] * prompt_len, SamplingParams(max_new_tokens=new_tokens), 0)


def test_admission_by_rows_and_worst_case_blocks():
    """Rows first come first served; a request waits until the free blocks cover its worst case on top of what the
    running ones may still take (no overtaking); one that can never fit is refused with the limit named."""
    pool = BlockPool(11, full_space(), 3, "cpu")  # 10 usable blocks of 4 tokens
    scheduler = Scheduler([RowGroup("full", 0, 3, pool, MAX_SEQ_LENGTH)])
    a, b, c, d = request(0, 10, 7), request(1, 5, 4), request(2, 3, 2), request(3, 1, 1)
    assert [scheduler.worst_case_blocks(r) for r in (a, b, c, d)] == [4, 2, 1, 1]  # tokens_stored: 16, 8, 4, 1
    for r in (a, b, c, d):
        scheduler.add(r)
    assert scheduler.admit() == [a, b, c] and [r.row for r in (a, b, c)] == [0, 1, 2]
    assert scheduler.admit() == []  # d waits for a row
    scheduler.finish(b, "stop")
    assert scheduler.admit() == [d] and d.row == 1
    with pytest.raises(ValueError, match=r"prompt 9 \(40 tokens\) \+ max_new_tokens 5 needs 11 blocks of 4 tokens "
                                         r"but the pool has 10"):
        scheduler.check_fits(request(9, 40, 5), "prompt 9")


def test_a_request_waits_for_blocks_the_running_ones_may_take():
    pool = BlockPool(9, full_space(), 2, "cpu")  # 8 usable
    scheduler = Scheduler([RowGroup("full", 0, 2, pool, MAX_SEQ_LENGTH)])
    big, small = request(0, 20, 5), request(1, 8, 5)  # 6 and 3 blocks at worst
    scheduler.add(big)
    scheduler.add(small)
    assert scheduler.admit() == [big]
    pool.reserve(big.row, 20)  # its prompt: 5 blocks taken, 1 more promised
    assert scheduler.promised_blocks(scheduler.groups["full"]) == 1
    assert scheduler.admit() == []  # 3 free but 1 promised: 2 < 3
    scheduler.finish(big, "length")
    pool.release([big.row])
    assert scheduler.admit() == [small]


def test_a_sequence_beyond_what_a_row_holds_is_refused():
    scheduler = Scheduler([RowGroup("compress_kv", 0, 2, None, 24)])
    with pytest.raises(ValueError, match=r"the prompt \(20 tokens\) \+ max_new_tokens \(5\) = 25 tokens but a "
                                         r"sequence holds 24"):
        scheduler.check_fits(request(0, 20, 5))
    scheduler.check_fits(request(0, 20, 4))
    assert tokens_stored(20, 4) == 23


# ---------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ARGS).double().eval().requires_grad_(False)


def alone(model, ids, params, name="full"):
    strategy, opts = CASES[name]
    runner.setup_cache(model, strategy, opts, 1, MAX_SEQ_LENGTH, quiet=True)
    return Engine(model, prefill_chunk_size=5).generate([ids], params)[0].tokens


@pytest.mark.parametrize("name", ["full", "quantize_kv-int4"])
@pytest.mark.parametrize("paged", [False, True])
def test_requests_join_while_others_run_and_abort_frees_their_row(model, name, paged):
    """Requests added between steps, one aborted mid-run: every other request's tokens are those of its run alone
    (greedy and seeded sampling, different max_new_tokens and stop ids, in one batch); the aborted one's row and
    blocks serve the next; the pool is empty at the end."""
    texts = prompts([7, 1, 23, 12, 5], seed=4)
    params = [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=6, temperature=0.9, seed=11),
              SamplingParams(max_new_tokens=12, temperature=1.3, top_k=5, seed=3),
              SamplingParams(max_new_tokens=8, stop_ids=(3, 7)), SamplingParams(max_new_tokens=9, top_p=0.5,
                                                                                temperature=1.0, seed=5)]
    want = [alone(model, ids, p, name) for ids, p in zip(texts, params)]
    strategy, opts = CASES[name]
    pool = runner.setup_cache(model, strategy, opts, 2, MAX_SEQ_LENGTH, quiet=True,
                              block_size=4 if paged else None, num_blocks=16 if paged else None)
    engine = Engine(model, prefill_chunk_size=5)
    ids = [engine.add_request(texts[0], params[0]), engine.add_request(texts[1], params[1])]
    doomed = engine.add_request(texts[2], SamplingParams(max_new_tokens=30))
    finished, steps = {}, 0
    while engine.has_unfinished():
        out = engine.step()
        steps += 1
        finished.update({r.id: r for r in out.finished})
        if steps == 2:  # online: requests arrive while others decode
            ids.append(engine.add_request(texts[2], params[2]))
        if steps == 3:
            aborted = engine.abort(doomed)
            assert aborted.finish_reason == "abort"
            ids += [engine.add_request(texts[3], params[3]), engine.add_request(texts[4], params[4])]
    assert [finished[i].tokens for i in ids] == want
    assert engine.abort(ids[0]) is None  # already ended
    assert doomed not in finished  # an aborted request is not reported as finished by a step
    if paged:
        pool.check()
        assert pool.used == 0


def test_decode_tokens_count_only_running_requests(model):
    """Rows that ended (or never started) are not counted as generated tokens."""
    runner.setup_cache(model, *CASES["full"], 3, MAX_SEQ_LENGTH, quiet=True)
    texts = prompts([4, 6, 5], seed=9)
    out = generate_batch(model, texts, 10, eos_ids=())
    assert out["decode_tokens"] == 3 * 9 and out["generated_tokens"] == 30
    engine = Engine(model)
    done = engine.generate(texts, [SamplingParams(max_new_tokens=n) for n in (2, 10, 5)])
    assert [len(r.tokens) for r in done] == [2, 10, 5]
    assert engine.stats.decode_tokens == 1 + 9 + 4 and engine.stats.decode_steps == 9


def test_bad_requests_are_one_line_errors(model):
    runner.setup_cache(model, *CASES["full"], 2, MAX_SEQ_LENGTH, quiet=True)
    engine = Engine(model)
    for params, message in [(SamplingParams(max_new_tokens=0), "max_new_tokens must be at least 1"),
                            (SamplingParams(temperature=-1), "temperature must be >= 0"),
                            (SamplingParams(top_p=0), r"top_p must be in \(0, 1\]"),
                            (SamplingParams(max_new_tokens=60), "holds 64")]:
        with pytest.raises(ValueError, match=message):
            engine.add_request([1, 2, 3, 4, 5], params)
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="model has 96 embeddings"):
        engine.add_request([96], SamplingParams())
    assert not engine.has_unfinished()


# ---------------------------------------------------------------- several KV configurations in one batch


MIXED = [("full", 2, None), ("quantize_kv-int4", 2, 12), ("compress_kv", 1, None)]  # name, rows, pool blocks


def setup_mixed(model, paged):
    configs = [(name, *CASES[name], rows, blocks if paged else None) for name, rows, blocks in MIXED]
    return runner.setup_mixed_cache(model, configs, MAX_SEQ_LENGTH, block_size=4 if paged else None)


@pytest.mark.parametrize("paged", [False, True])
def test_a_mixed_batch_decodes_each_request_as_its_configuration_alone(model, paged):
    """Requests of three configurations (full, quantize_kv int4, compress_kv) share every decode step: each gets the
    tokens of its configuration's cache alone; more requests than rows wait for a row of their own configuration;
    an unknown configuration is a one-line error; the pools end empty."""
    texts = prompts([7, 19, 4, 23, 12, 9, 30], seed=6)
    kinds = ["full", "quantize_kv-int4", "compress_kv", "quantize_kv-int4", "full", "compress_kv", "full"]
    params = SamplingParams(max_new_tokens=9, temperature=0.7, seed=2)
    want = [alone(model, ids, params, kind) for ids, kind in zip(texts, kinds)]
    pools = setup_mixed(model, paged)
    engine = Engine(model, prefill_chunk_size=5)
    with pytest.raises(ValueError, match="unknown KV configuration 'int3': choose one of full, quantize_kv-int4"):
        engine.add_request(texts[0], params, kv="int3")
    got, rows = run_mixed(engine, texts, kinds, params)
    assert got == want
    groups = {g.name: g for g in engine.groups}
    assert all(groups[kind].start <= row < groups[kind].stop for kind, row in zip(kinds, rows))
    assert engine.scheduler.peak_running == 5
    for pool in pools:
        if pool is not None:
            pool.check()
            assert pool.used == 0


def run_mixed(engine, texts, kinds, params):
    """Every request of its kind through the engine; the tokens in request order, and the rows each one used."""
    ids = [engine.add_request(ids, params, kv=kind) for ids, kind in zip(texts, kinds)]
    done, rows = {}, {}
    while engine.has_unfinished():
        for request in engine.step().finished:
            done[request.id], rows[request.id] = request.tokens, request.row
    return [done[i] for i in ids], [rows[i] for i in ids]


def test_a_mixed_batch_compiles_to_one_graph(model):
    """The decode step over a mixed batch (three sub-caches per layer, paged) is one graph: no recompiles as
    requests of every configuration join and end, no graph break, the eager tokens."""
    from torch._dynamo.utils import counters
    from conftest import reset_dynamo
    texts = prompts([5, 11, 3, 8, 14], seed=8)
    kinds = ["full", "quantize_kv-int4", "compress_kv", "full", "quantize_kv-int4"]
    params = SamplingParams(max_new_tokens=7)
    setup_mixed(model, paged=True)
    eager, _ = run_mixed(Engine(model), texts, kinds, params)
    reset_dynamo()
    counters.clear()
    compiled = torch.compile(runner.decode_one_token, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, _ = run_mixed(Engine(model, compiled), texts, kinds, params)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert got == eager


def test_the_default_pool_runs_what_it_was_sized_for(model):
    """Paged quantize_kv whose sinks + window hold a whole short run pages nothing: the default pool still has a
    block beside the null block, and the run is the contiguous one's (issue: 'a pool of 1 block(s) holds nothing')."""
    options = dict(sink_size=4, window_size=8, bits="4", group_size=16)
    texts = prompts([2, 3], seed=3)
    runner.setup_cache(model, "quantize_kv", options, 1, 6, quiet=True)
    want = generate_batch(model, texts, 3)["sequences"]
    pool = runner.setup_cache(model, "quantize_kv", options, 1, 6, quiet=True, block_size=16)
    assert pool.num_blocks == memory.default_num_blocks(pool.space, 1, 6)
    assert memory.default_num_blocks(PageSpace(16, 16, lambda n: 0), 1, 6) == 2  # pages nothing: still a block
    assert generate_batch(model, texts, 3)["sequences"] == want
