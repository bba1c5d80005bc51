"""kernels/cpu_attention: the C kernel's softmax partials over quantize_kv's stored codes against float64 PyTorch
(kernels/reference.dequantize_ref of the same buffers), for every format, both key layouts, the specialised and the
generic head sizes, rows of different lengths (empty ones too), under torch.compile, and its one-line refusals; and
quantize_kv's --attn_impl cpu path, which decodes the PyTorch path's tokens."""
import copy

import pytest
import torch

import engine
import kv_cache
import runner
from kernels import cpu_attention
from kernels.formats import FORMATS, get_format
from kernels.reference import dequantize_ref
from kv_cache.base import attn_impl_for
from kv_cache.stores import QuantizedStore
from model import ModelArgs, Transformer, rope_tables

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler with OpenMP")

GROUP = 32


def filled_store(fmt, k_granularity, n_older, H=3, D=64, seed=0):
    """A QuantizedStore of len(n_older) sequences with random keys and values quantized into its first
    max(n_older) tokens (whole flush groups)."""
    torch.manual_seed(seed)
    B = len(n_older)
    capacity = max(256, -(-max(n_older) // GROUP) * GROUP)
    store = QuantizedStore(B, H, capacity, D, get_format(fmt), GROUP, k_granularity, "cpu")
    n = -(-max(n_older) // GROUP) * GROUP
    if n:
        k = torch.randn(B, H, n, D) * 2 + torch.randn(1, H, 1, D)  # channel offsets: what per-channel keys are for
        v = torch.randn(B, H, n, D)
        store.store(slice(0, B), torch.arange(n).expand(B, n), k, v)
    return store


def partials_ref(q, store, n_older):
    """(acc, m, l) of older_attention in float64, from the store's buffers dequantized by the reference."""
    k_q, k_scale, k_zero, v_q, v_scale, v_zero = store.all_buffers()
    D = q.shape[-1]
    keys, values = dequantize_ref(k_q, k_scale, k_zero, D), dequantize_ref(v_q, v_scale, v_zero, D)
    B, HQ, _ = q.shape
    G = HQ // keys.shape[1]
    acc = torch.zeros(B, HQ, D, dtype=torch.float64)
    m = torch.full((B, HQ), float("-inf"), dtype=torch.float64)
    l = torch.zeros(B, HQ, dtype=torch.float64)
    for b, n in enumerate(n_older):
        if n == 0:
            continue
        k = keys[b, :, :n].repeat_interleave(G, dim=0)  # (HQ, n, D)
        v = values[b, :, :n].repeat_interleave(G, dim=0)
        s = (q[b].double()[:, None, :] @ k.transpose(-1, -2))[:, 0]  # (HQ, n)
        m[b] = s.amax(-1)
        p = (s - m[b, :, None]).exp()
        l[b], acc[b] = p.sum(-1), (p[:, None, :] @ v)[:, 0]
    return acc, m, l


def check(fmt, k_granularity, n_older, D=64, H=3, G=3, seed=0):
    store = filled_store(fmt, k_granularity, n_older, H=H, D=D, seed=seed)
    q = torch.randn(len(n_older), H * G, D) / D ** 0.5
    n = torch.tensor(n_older)
    acc, m, l = cpu_attention.older_attention(q, *store.all_buffers(), n, fmt, k_granularity, GROUP)
    acc_ref, m_ref, l_ref = partials_ref(q, store, n_older)
    torch.testing.assert_close(m.double(), m_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l.double(), l_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acc.double(), acc_ref, rtol=1e-4, atol=1e-4)
    return acc, m, l


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("D", [64, 128, 96])  # 64 and 128 are compiled as constants; 96 runs the generic copy
def test_partials_match_float64(fmt, D):
    k_granularity = get_format(fmt).default_k_granularity
    # Rows of different lengths, one empty; per-token keys also a length that is not a whole group.
    lengths = [0, 544, 96] if k_granularity == "channel" else [0, 545, 77]
    acc, m, l = check(fmt, k_granularity, lengths, D=D)
    assert m[0].eq(float("-inf")).all() and l[0].eq(0).all() and acc[0].eq(0).all()  # the empty row's definition


@pytest.mark.parametrize("fmt", ["4", "2"])
def test_asymmetric_formats_with_per_token_keys(fmt):
    check(fmt, "token", [300, 33])


def test_long_rows_split_over_threads_merge_exactly_once():
    """Rows longer than one work item (the kernel cuts them into chunks per thread and merges the partials): the
    same sums as the reference, whatever the thread count."""
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 4):
            torch.set_num_threads(n_threads)
            check("8", "token", [4096], H=1, G=2, seed=n_threads)
            check("4", "channel", [2048, 1024], H=2, G=1, seed=n_threads)
    finally:
        torch.set_num_threads(threads)


def paged(store, page, seed=0):
    """The store's buffers moved into a pool of shuffled blocks (batch dim 1) with one spare block a sequence,
    NaN (or 0x7f) wherever no token was put, and the block table that maps each sequence's tokens: the layout of a
    paged QuantizedStore (kv_cache/stores.py)."""
    buffers = store.all_buffers()
    B, H, N = buffers[0].shape[:3]
    blocks = N // page
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(B * (blocks + 1), generator=gen)[:B * blocks].view(B, blocks)
    pool = []
    for t in buffers:
        if t is None:
            pool.append(None)
            continue
        rows = page * t.shape[2] // N  # rows a block: page tokens, or page / F key groups
        out = torch.full((1, H, B * (blocks + 1) * rows, *t.shape[3:]), float("nan")).to(t.dtype) \
            if t.dtype == torch.float16 else torch.full((1, H, B * (blocks + 1) * rows, *t.shape[3:]), 0x7f,
                                                      dtype=torch.uint8).view(t.dtype)
        where = (table[:, :, None] * rows + torch.arange(rows)).flatten(1)  # (B, blocks * rows)
        for b in range(B):
            out[0, :, where[b]] = t[b, :, :blocks * rows]
        pool.append(out)
    return pool, table.int()


@pytest.mark.parametrize("fmt, k_granularity, page", [("4", "channel", 32), ("4", "channel", 64), ("8", "token", 16),
                                                      ("2", "token", 16), ("fp8", "token", 48)])
def test_paged_store_is_the_contiguous_one_bit_for_bit(fmt, k_granularity, page):
    """A pool read through its block table (blocks smaller and larger than the kernel's 32-token blocks, shuffled,
    the unused rows poisoned) gives exactly the contiguous store's partials: the same arithmetic in the same order."""
    lengths = [576, 0, 96]
    store = filled_store(fmt, k_granularity, lengths)
    q = torch.randn(3, 9, 64) / 8
    n = torch.tensor(lengths)
    pool, table = paged(store, page)
    got = cpu_attention.older_attention(q, *pool, n, fmt, k_granularity, GROUP, table=table, page=page)
    want = cpu_attention.older_attention(q, *store.all_buffers(), n, fmt, k_granularity, GROUP)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_a_row_is_the_same_in_any_batch():
    """Work is cut into chunks fixed in token space: a sequence's partials do not depend on the other rows of its
    batch or on the thread count (batched decoding equals one by one, bit for bit)."""
    lengths = [1600, 64, 900]
    store = filled_store("2", "channel", lengths)
    q = torch.randn(3, 9, 64) / 8
    together = cpu_attention.older_attention(q, *store.all_buffers(), torch.tensor(lengths), "2", "channel", GROUP)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for b, n in enumerate(lengths):
            alone = cpu_attention.older_attention(q[b:b + 1], *store.buffers_of(slice(b, b + 1)), torch.tensor([n]),
                                                  "2", "channel", GROUP)
            for x, y in zip(alone, together):
                assert torch.equal(x[0], y[b]), f"row {b}"
    finally:
        torch.set_num_threads(threads)


def test_compiled_call_matches_eager():
    store = filled_store("4", "channel", [320])
    q = torch.randn(1, 9, 64)
    n = torch.tensor([320])
    call = lambda q, n: cpu_attention.older_attention(q, *store.all_buffers(), n, "4", "channel", GROUP)  # noqa: E731
    compiled = torch.compile(call, fullgraph=True)
    for got, want in zip(compiled(q, n), call(q, n)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_library_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCACHE_CACHE", str(tmp_path))
    # -O0: a library of its own (the flags are in its name's key), built in a second rather than the -O3 one's ten
    monkeypatch.setattr(cpu_attention, "FLAGS", [f for f in cpu_attention.FLAGS if not f.startswith("-O")] + ["-O0"])
    before = cpu_attention.builds
    path = cpu_attention.build()
    assert path.parent == tmp_path and path.exists() and cpu_attention.builds == before + 1
    assert cpu_attention.build() == path and cpu_attention.builds == before + 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


@pytest.mark.parametrize("change, message", [
    (dict(n_older=torch.tensor([999])), "past the store's 288 tokens"),
    (dict(n_older=torch.tensor([32, 32])), "n_older must be (B,) = (1,)"),
    (dict(q=torch.randn(1, 8, 64)), "HQ a multiple of H"),
    (dict(k_granularity="row"), "use 'token' or 'channel'"),
    (dict(k_zero=None), "k_zero must be given for int4"),
    (dict(q=torch.randn(1, 9, 64, device="meta")), "older_attention is the CPU kernel"),
])
def test_bad_arguments_get_one_line(change, message):
    store = filled_store("4", "channel", [64])
    args = dict(zip(("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero"), store.all_buffers()))
    args = dict(q=torch.randn(1, 9, 64), **args, n_older=torch.tensor([64]), fmt="4", k_granularity="channel",
                group_size=GROUP) | change
    with pytest.raises(ValueError, match=None) as error:
        cpu_attention.older_attention(**args)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- the cache's --attn_impl cpu path

ARGS = ModelArgs(vocab_size=96, dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128,
                 max_position_embeddings=256)
FORMATS_AT_HEAD_16 = {"int8": dict(bits="8"), "fp8": dict(bits="fp8"), "int4": dict(bits="4", group_size=8),
                      "int2": dict(bits="2", group_size=8),
                      "int4-token-keys": dict(bits="4", group_size=8, k_granularity="token")}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", FORMATS_AT_HEAD_16)
def test_quantize_kv_decodes_the_torch_paths_tokens(name):
    """quantize_kv with --attn_impl cpu on a ragged batch (a row with no older token yet, rows with several groups)
    decodes the PyTorch path's greedy tokens, eager, compiled into one graph, and paged (the kernel reading the
    pool through the block table)."""
    torch.manual_seed(0)
    model = Transformer(ARGS).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, ARGS.vocab_size, (n,), generator=gen).tolist() for n in (3, 23, 41)]
    new_tokens = 12
    out = {}
    for impl, decode_fn in (("torch", runner.decode_one_token), ("cpu", runner.decode_one_token),
                            ("cpu-compiled", torch.compile(runner.decode_one_token, backend="aot_eager",
                                                           fullgraph=True)), ("cpu-paged", runner.decode_one_token)):
        options = dict(sink_size=4, window_size=8, attn_impl=impl.split("-")[0], **FORMATS_AT_HEAD_16[name])
        runner.setup_cache(model, "quantize_kv", options, len(batch), 41 + new_tokens,
                           block_size=8 if impl == "cpu-paged" else None)
        assert (model.caches()[0].older.pool is not None) == (impl == "cpu-paged")
        assert model.caches()[0].attn_impl == impl.split("-")[0]
        rows = engine.generate_batch(model, batch, new_tokens, decode_fn=decode_fn)["sequences"]
        out[impl] = [row["tokens"] for row in rows]
    assert out["cpu"] == out["torch"] and out["cpu-compiled"] == out["torch"] and out["cpu-paged"] == out["torch"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", FORMATS_AT_HEAD_16)
def test_the_one_call_decode_step_is_the_torch_paths(name):
    """quantize_kv's eager CPU decode (DecodeStep: the flush, the ring write and the attention in C calls, the
    positions read on the host) against the PyTorch path on the same float32 inputs: a ragged batch (3, 23 and 41
    tokens) decoding 30 steps across flushes, the step fed 3 rows, then 2, then 3 again. The outputs agree to float32
    rounding; the ring (keys, values, slot positions) and the older store are the same bytes."""
    cls = kv_cache.STRATEGIES["quantize_kv"]
    B, H, HQ, D, M = 3, 2, 4, 16, 96
    cos, sin = rope_tables(ARGS, M)
    caches = {impl: cls(B, M, H, D, torch.float32, "cpu", sink_size=4, window_size=8, attn_impl=impl,
                        **FORMATS_AT_HEAD_16[name]) for impl in ("cpu", "torch")}
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 23, 41]
    for b, n in enumerate(lengths):
        q, k, v = (torch.randn(1, heads, n, D, generator=gen) for heads in (HQ, H, H))
        for cache in caches.values():
            cache(q, k, v, torch.arange(n), cos, sin, torch.tensor([b]))
    for step in range(30):
        R = 2 if 10 <= step < 20 else 3
        q, k, v = (torch.randn(R, heads, 1, D, generator=gen) for heads in (HQ, H, H))
        pos = torch.tensor(lengths[:R])[:, None]
        out = {impl: cache(q, k, v, pos, cos, sin) for impl, cache in caches.items()}
        torch.testing.assert_close(out["cpu"], out["torch"], rtol=1e-5, atol=1e-5)
        lengths[:R] = [n + 1 for n in lengths[:R]]
    assert caches["cpu"]._step is not None and caches["torch"].decode_step(HQ) is None
    for name_, buffer in caches["torch"].named_buffers():
        assert torch.equal(dict(caches["cpu"].named_buffers())[name_], buffer), name_
    # A copy (its step holds raw pointers into the original's buffers) builds its own step and decodes alike.
    twin = copy.deepcopy(caches["cpu"])
    q, k, v = (torch.randn(3, heads, 1, D, generator=gen) for heads in (HQ, H, H))
    pos = torch.tensor(lengths)[:, None]
    torch.testing.assert_close(twin(q, k, v, pos, cos, sin), caches["cpu"](q, k, v, pos, cos, sin), rtol=0, atol=0)
    assert twin._step is not caches["cpu"]._step


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", FORMATS_AT_HEAD_16)
@pytest.mark.parametrize("rows", [None, [2, 0]])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_chunked_prefill_reads_the_codes_as_the_torch_path_dequantizes_them(name, rows, paged):
    """A prompt fed 7 tokens at a time into quantize_kv (sinks 4, window 8: from the third chunk on each chunk sees
    quantized tokens): with --attn_impl cpu each chunk reads the older store's codes in the C kernel and merges its
    own causal part with the kernel's partials; the PyTorch path dequantizes the store and runs SDPA over all of
    it. Same logits to float32 rounding, same stored bytes, in the first rows (views) or chosen ones (an index
    tensor, rows 2 and 0 of 3), contiguous or paged."""
    torch.manual_seed(0)
    model = Transformer(ARGS).eval().requires_grad_(False)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 61), generator=torch.Generator().manual_seed(1))
    index = None if rows is None else torch.tensor(rows)
    logits, buffers = {}, {}
    for impl in ("torch", "cpu"):
        options = dict(sink_size=4, window_size=8, attn_impl=impl, **FORMATS_AT_HEAD_16[name])
        runner.setup_cache(model, "quantize_kv", options, 3, 64, block_size=8 if paged else None)
        logits[impl] = runner.prefill(model, tokens, chunk_size=7, rows=index)
        buffers[impl] = {key: b.clone() for key, b in model.caches()[0].named_buffers()}
    assert model.caches()[0].opts.n_older(61) >= 40  # most of the prompt went through the older store
    torch.testing.assert_close(logits["cpu"], logits["torch"], rtol=1e-4, atol=1e-4)
    for key, buffer in buffers["torch"].items():
        assert torch.equal(buffers["cpu"][key], buffer), key


def test_the_cpu_kernel_is_the_cpu_default():
    assert attn_impl_for(None, "cpu") == "cpu" and attn_impl_for("torch", "cpu") == "torch"


def test_attn_impl_cpu_is_refused_off_the_cpu_in_one_line():
    with pytest.raises(ValueError, match="--attn_impl cpu is the CPU's kernel.*use --attn_impl triton or torch"):
        attn_impl_for("cpu", "cuda")
