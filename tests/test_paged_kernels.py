"""Paged stores in kernels/decode_attention.py (block tables, as vLLM's PagedAttention): the same logical cache laid
out contiguously (batch in dim 0) and scattered into a pool of shuffled blocks gives the same kernel output, exactly
(the same values meet the same tile arithmetic in the same order; only the addresses differ), and both match the
float64 reference, whose own paged path (unpage, then the unpaged reference) equals its unpaged one exactly.

Pool blocks that no sequence owns (block 0, the null block every unused table entry points to, and a few spare
ones) hold NaN (NaN bytes in fp8 payloads, NaN scales beside random int payloads), and so do the logical slots the
kernel must not read (masked recent slots, metadata past n_older): a single such element read poisons the output.
Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so the shapes stay small.
"""
import math
import zlib

import pytest
import torch

from conftest import reset_dynamo
from kernels.decode_attention import decode_attention
from kernels.reference import decode_attention_ref, unpage
from kernels.quantize import quantize_keys, quantize_values
from test_kernels import DEVICE, TOL, poison_empty, rel_err, ring_state  # noqa: F401  (poison_empty: autouse)


def garbage(like: torch.Tensor, shape, gen) -> torch.Tensor:
    """Contents of pool rows nobody owns: NaN (float, and fp8 through its NaN byte 0x7F) or random bytes (the int
    payloads, whose scales are NaN there)."""
    if like.dtype == torch.float8_e4m3fn:
        return torch.full(shape, 0x7F, dtype=torch.uint8).view(like.dtype)
    if like.is_floating_point():
        return torch.full(shape, float("nan"), dtype=like.dtype)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(like.dtype)


def block_table(used: list, max_blocks: int, n_pool: int, dtype, gen) -> torch.Tensor:
    """(B, max_blocks): sequence b's first used[b] logical blocks on distinct, shuffled pool blocks (never block 0,
    the null block), every later entry 0."""
    free = (torch.randperm(n_pool - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(used), max_blocks, dtype=dtype)
    for b, n in enumerate(used):
        table[b, :n] = torch.tensor(free[:n], dtype=dtype)
        free = free[n:]
    return table


def page(logical: torch.Tensor, table: torch.Tensor, block: int, n_pool: int, gen, tokens_per_row: int = 1):
    """Scatter a logical store (B, H, rows, ...) into a pool (1, H, n_pool * block // tokens_per_row, ...) of
    garbage, block by block as the table says (written independently of kernels.reference.unpage)."""
    r = block // tokens_per_row
    pool = garbage(logical, (1, logical.shape[1], n_pool * r, *logical.shape[3:]), gen)
    for b in range(logical.shape[0]):
        for j, blk in enumerate(table[b].tolist()):
            if blk:
                pool[0, :, blk * r:(blk + 1) * r] = logical[b, :, j * r:(j + 1) * r]
    return pool


def paged_case(name, dtype, B, HQ, H, D, kind, F, paged, recent_block, older_block):
    """q, the logical (contiguous) inputs and the paged ones of one case. kind: "full" (the full cache: recent_last
    per sequence, no recent_pos), "ring" (a ring without an older store), or an older format ("8", "fp8", "4", "2": keys
    per token for 8-bit, per channel over F tokens for KIVI, values per token in channel groups of F). With B 3:
    sequence 0 is short, sequence 1 long, sequence 2 finished (recent_last -1, n_older 0, recent_pos all -1)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(B, HQ, 1, D, generator=gen).to(dtype)
    hb, mb = recent_block or 16, older_block or 32  # the unpaged store's capacity still comes in whole blocks
    finished = B == 3
    live = B - finished
    logical, n_older = {}, [0] * B
    if kind == "full":
        NH = 5 * hb
        recent_last = torch.tensor([37, 69, -1][:B] if B == 3 else [69])
    else:
        # A ring of window + flush slots after sink_size sinks (kv_cache/stores.py); flush F tokens at a time.
        sink, flush = 4, F if kind in ("4", "2") else 1
        window = 24 if flush == 1 else 8
        ring = window + flush
        NH = math.ceil((sink + ring) / hb) * hb  # slots past sink + ring stay empty (recent_pos -1)
        if kind == "ring":  # short: the ring not yet filled; long: wrapped a few times
            positions = [sink + ring - 6, sink + ring + 50][-live:]
        else:
            positions = [sink + window + 45, sink + window + 121][-live:]
        recent_pos = torch.full((B, NH), -1, dtype=torch.int64)
        for b, pos in enumerate(positions):
            row, n = ring_state(pos, sink, ring, flush, window)
            recent_pos[b, :sink + ring] = row
            n_older[b] = n if kind != "ring" else 0
        recent_last = torch.tensor([min(pos, sink + ring - 1) for pos in positions] + [-1] * finished)
        logical.update(recent_pos=recent_pos, sink_size=sink)
    recent_k = torch.randn(B, H, NH, D, generator=gen).to(dtype)
    recent_v = torch.randn(B, H, NH, D, generator=gen).to(dtype)
    for b in range(B):  # the slots the kernel must not read hold NaN
        masked = torch.arange(NH) > recent_last[b]
        if kind != "full":
            p = logical["recent_pos"][b]
            masked |= (p < 0) | ((p >= logical["sink_size"]) & (p < logical["sink_size"] + n_older[b]))
        recent_k[b, :, masked] = recent_v[b, :, masked] = float("nan")
    logical.update(recent_last=recent_last)
    pages = dict(logical)
    n_hi_blocks = [math.ceil((int(last) + 1) / hb) for last in recent_last]
    if "recent" in paged:
        n_pool = sum(n_hi_blocks) + 3  # the null block and two spare ones
        recent_table = block_table(n_hi_blocks, NH // hb, n_pool, torch.int32, gen)
        pool_k, pool_v = (page(t, recent_table, hb, n_pool, gen).expand(B, -1, -1, -1) for t in (recent_k, recent_v))
        pages.update(recent_k=pool_k, recent_v=pool_v, recent_table=recent_table, recent_block=hb)
    else:
        pages.update(recent_k=recent_k, recent_v=recent_v)
    if kind not in ("full", "ring"):
        axis = "token" if kind in ("8", "fp8") else "channel"
        kf = F if axis == "channel" else 1  # tokens per key metadata row
        max_blocks = math.ceil(max(n_older) / mb) + 1  # room past every sequence's n_older
        M = max_blocks * mb
        k = torch.randn(B, H, M, D, generator=gen) * 2
        k[..., 3] *= 10  # an outlier channel
        v = torch.randn(B, H, M, D, generator=gen)
        older = dict(zip(("k_q", "k_scale", "k_zero"), quantize_keys(k, kind, axis, F)))
        older.update(zip(("v_q", "v_scale", "v_zero"), quantize_values(v, kind, F)))
        for b, n in enumerate(n_older):  # metadata past n_older must not be read
            older["k_scale"][b, :, n // kf:] = float("nan")
            older["v_scale"][b, :, n:] = float("nan")
        logical.update(n_older=torch.tensor(n_older), **older)
        pages.update(n_older=logical["n_older"])
        if "older" in paged:
            used = [math.ceil(n / mb) for n in n_older]
            n_pool = sum(used) + 3
            older_table = block_table(used, max_blocks, n_pool, torch.int64, gen)
            for t_name, t in older.items():
                per_row = kf if t_name in ("k_scale", "k_zero") else 1
                pages[t_name] = None if t is None else page(t, older_table, mb, n_pool, gen, per_row)
            pages.update(older_table=older_table, older_block=mb)
        else:
            pages.update(older)
    to_device = lambda d: {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in d.items()}  # noqa
    return q.to(DEVICE), dict(recent_k=recent_k, recent_v=recent_v, **to_device(logical)), to_device(pages), finished


CASES = [
    # name, dtype, B, n_head, n_kv_head, D, kind, group F, paged stores, recent_block, older_block
    ("full-hi-b3-gqa4", torch.bfloat16, 3, 8, 2, 64, "full", 1, "recent", 16, 0),
    ("ring-hi-b3-gqa3-fp32", torch.float32, 3, 6, 2, 64, "ring", 1, "recent", 16, 0),
    ("int8-hi-b1-gqa4-d32-fp32", torch.float32, 1, 4, 1, 32, "8", 1, "recent", 32, 0),
    ("int8-older-b3-gqa4", torch.bfloat16, 3, 8, 2, 64, "8", 1, "older", 0, 16),
    ("fp8-both-b1-gqa3", torch.bfloat16, 1, 6, 2, 64, "fp8", 1, "recent+older", 16, 32),
    ("int4-kivi32-both-b3-gqa4-fp32", torch.float32, 3, 8, 2, 64, "4", 32, "recent+older", 32, 32),
    ("int2-kivi16-older-b3-gqa3", torch.bfloat16, 3, 6, 2, 64, "2", 16, "older", 0, 16),
    ("int4-kivi16-both-b1-gqa4-d128", torch.bfloat16, 1, 4, 1, 128, "4", 16, "recent+older", 16, 32),
    # head_dim 48 pads the tile to 64: scales gathered element by element (not _group_tile)
    ("int4-kivi16-gather-both-b3-gqa4-d48-fp32", torch.float32, 3, 4, 1, 48, "4", 16, "recent+older", 16, 16),
]


@pytest.mark.parametrize("name,dtype,B,HQ,H,D,kind,F,paged,recent_block,older_block", CASES, ids=[c[0] for c in CASES])
def test_paged_decode_attention(name, dtype, B, HQ, H, D, kind, F, paged, recent_block, older_block):
    q, logical, pages, finished = paged_case(name, dtype, B, HQ, H, D, kind, F, paged, recent_block, older_block)
    ref = decode_attention_ref(q, **logical)
    assert torch.equal(decode_attention_ref(q, **pages), ref)  # the reference's paged path: unpage, then as before
    if finished:
        assert torch.equal(ref[-1], torch.zeros_like(ref[-1]))
    # Whole 64-token tiles over several blocks, one split each; and 16-token tiles (under a 32-token key group:
    # one metadata row for the tile) over several splits.
    for config in (dict(), dict(block_n=16, splits=(3, 2))):
        out = decode_attention(q, **logical, **config)
        out_paged = decode_attention(q, **pages, **config)
        assert out_paged.shape == q.shape and out_paged.dtype == dtype
        assert torch.equal(out_paged, out), (name, config)
        assert rel_err(out_paged, ref) < TOL[dtype], (name, config)
        live = B - finished
        assert rel_err(out_paged[:live], ref[:live]) < TOL[dtype], (name, config)  # not hidden by the batch norm
        if finished:
            assert torch.equal(out_paged[-1], torch.zeros_like(out_paged[-1])), (name, config)


def test_unpage_is_the_slot_formula():
    """unpage reads logical slot n of sequence b from pool slot table[b, n // block] * block + n % block, and per-
    channel metadata (F tokens a row) from pool row table[b, t // block] * block // F + (t % block) // F."""
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(1, 2, 6 * 8, 3, generator=gen)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]])
    out = unpage(pool.expand(2, -1, -1, -1), table, 8)
    for b in range(2):
        for n in range(24):
            assert torch.equal(out[b, :, n], pool[0, :, int(table[b, n // 8]) * 8 + n % 8])
    meta = unpage(pool[:, :, :24], table, 8, tokens_per_row=2)  # 4 rows a block
    for b in range(2):
        for t in range(0, 24, 2):
            assert torch.equal(meta[b, :, t // 2], pool[0, :, (int(table[b, t // 8]) * 8 + t % 8) // 2])


def test_paged_validation():
    """Malformed tables, blocks and pools are one-line ValueErrors, before any launch."""
    q, logical, pages, _ = paged_case("validation", torch.float32, 3, 4, 1, 32, "4", 16, "recent+older", 16, 16)
    bad = {
        "recent_table has shape": dict(recent_table=pages["recent_table"][:2]),
        "recent_table has dtype": dict(recent_table=pages["recent_table"].float()),
        "recent_block is 0": dict(recent_block=0),
        "older_block 8 is not a multiple": dict(older_block=8, older_table=pages["older_table"].repeat_interleave(2, 1)),
        "paged recent_k has batch dim 2": dict(recent_k=pages["recent_k"][:1].expand(2, -1, -1, -1)),
        "not whole blocks": dict(recent_k=pages["recent_k"][:, :, :-1], recent_v=pages["recent_v"][:, :, :-1]),
        "recent_pos has": dict(recent_pos=logical["recent_pos"][:, :-1]),
        "without its block table": dict(recent_table=None),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            decode_attention(q, **dict(pages, **change))
        assert "\n" not in str(e.value)


def test_paged_op_under_torch_compile():
    """The paged call is the registered op under torch.compile (schema and fake tensors checked), traces into one
    graph with fullgraph=True, and gives the eager result, expanded (stride-0) pools included."""
    import torch._dynamo

    q, _, pages, _ = paged_case("compile", torch.float32, 3, 4, 1, 32, "4", 16, "recent+older", 16, 16)
    names = ("recent_k", "recent_v", "recent_last", "recent_pos", "n_older", "k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero",
             "recent_table", "older_table")
    tensors = [pages[n] for n in names]

    def step(q, *tensors):
        kw = dict(zip(names, tensors))
        return decode_attention(q, **kw, sink_size=pages["sink_size"], recent_block=16, older_block=16) * 2

    eager = step(q, *tensors)
    args = (q, *(pages[n] for n in names[:4]), pages["sink_size"], *(pages[n] for n in names[4:11]), -1, -1, 0,
            pages["recent_table"], 16, pages["older_table"], 16)
    torch.library.opcheck(torch.ops.kvcache.decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    reset_dynamo()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    assert torch.equal(compiled(q, *tensors), eager)


@pytest.mark.parametrize("name,dtype,B,HQ,H,D,kind,F,paged,recent_block,older_block", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_decode_attention_scores(name, dtype, B, HQ, H, D, kind, F, paged, recent_block, older_block):
    """return_scores: the probabilities the kernel's softmax computed, stored as it goes (eviction policies read
    them), equal the float64 reference's, contiguous and paged alike; the output is the plain call's, exactly."""
    q, logical, pages, finished = paged_case(name, dtype, B, HQ, H, D, kind, F, paged, recent_block, older_block)
    ref_out, ref_probs = decode_attention_ref(q, **logical, return_scores=True)
    assert torch.equal(ref_out, decode_attention_ref(q, **logical))
    live = B - finished
    assert torch.allclose(ref_probs[:live].sum(-1), torch.ones(live, HQ, dtype=torch.float64))
    for config in (dict(), dict(block_n=16, splits=(3, 2))):
        out, probs = decode_attention(q, **logical, **config, return_scores=True)
        out_paged, probs_paged = decode_attention(q, **pages, **config, return_scores=True)
        assert torch.equal(out, decode_attention(q, **logical, **config)), (name, config)
        assert torch.equal(out_paged, out) and torch.equal(probs_paged, probs), (name, config)
        assert probs.shape == ref_probs.shape and probs.dtype == torch.float32
        assert (probs - ref_probs).abs().max() < 10 * TOL[dtype] * ref_probs.abs().max(), (name, config)
        if finished:
            assert torch.equal(probs[-1], torch.zeros_like(probs[-1]))


def test_decode_attention_scores_compile(monkeypatch):
    """Under torch.compile the scores come from the opaque op kvcache::decode_attention_scores (its fake tensor
    gives the shapes), in one graph, equal to eager."""
    monkeypatch.undo()  # inductor's own torch.empty buffers must not be poisoned (it fills some under autograd)
    reset_dynamo()
    q, logical, pages, _ = paged_case("scores-compile", torch.float32, 3, 4, 2, 32, "4", 16, "recent+older", 16, 16)
    torch.library.opcheck(torch.ops.kvcache.decode_attention_scores.default,
                          (q, pages["recent_k"], pages["recent_v"], pages["recent_last"], pages["recent_pos"], pages["sink_size"],
                           pages["n_older"], pages["k_q"], pages["k_scale"], pages["k_zero"], pages["v_q"],
                           pages["v_scale"], pages["v_zero"], 1, 1, 16, pages["recent_table"], 16, pages["older_table"],
                           16), test_utils=("test_schema", "test_faketensor"))
    step = torch.compile(lambda q: decode_attention(q, **pages, return_scores=True), fullgraph=True)
    out, probs = step(q)
    ref_out, ref_probs = decode_attention(q, **pages, return_scores=True)
    assert torch.equal(out, ref_out) and torch.equal(probs, ref_probs)


HEAD_SHARED_CASES = [  # name, dtype, n_head, n_kv_head, D, format ("dense": the model dtype, unit scales), group
    ("dense-fp32", torch.float32, 6, 3, 32, "dense", 32),
    ("int8-bf16", torch.bfloat16, 6, 3, 64, "8", 64),
    ("int2-token-fp32", torch.float32, 9, 3, 64, "2", 16),
]


@pytest.mark.parametrize("name,dtype,HQ,H,D,kind,group", HEAD_SHARED_CASES, ids=[c[0] for c in HEAD_SHARED_CASES])
def test_head_shared_older_store(name, dtype, HQ, H, D, kind, group):
    """The eviction stores' head-adaptive layout (older_start): the H lanes' first `lane` slots are one run of
    tokens and each head reads its own stretch of it, across lanes. Sequence 0's heads hold 5, 36 and 19 tokens
    (head 1 spills over two lanes), sequence 1's a lane each, sequence 2 is finished. Output and scores (slot t of
    lane l in column l * M + t) match the float64 reference, contiguous and paged (shuffled blocks) alike; the
    slots no head holds are NaN."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    B, lane, block, NH = 3, 24, 8, 12
    M = lane + block  # a lane's logical slots: the run's share, then a scratch block (as the caches lay it out)
    start = torch.tensor([[0, 5, 41], [0, 24, 48], [0, 24, 48]])
    n_older = torch.tensor([[5, 36, 19], [7, 3, 20], [0, 0, 0]])
    q = torch.randn(B, HQ, 1, D, generator=gen).to(dtype)
    recent_k, recent_v = (torch.randn(B, H, NH, D, generator=gen).to(dtype) for _ in range(2))
    recent_last = torch.tensor([NH - 1, 6, -1])
    k, v = torch.randn(B, H, M, D, generator=gen) * 2, torch.randn(B, H, M, D, generator=gen)
    if kind == "dense":
        older = dict(k_q=k.to(dtype), v_q=v.to(dtype), k_zero=None, v_zero=None)
        older.update(k_scale=torch.ones(1, 1, 1, 1, dtype=torch.float16).expand(B, H, M, 1),
                     v_scale=torch.ones(1, 1, 1, 1, dtype=torch.float16).expand(B, H, M, 1))
    else:
        older = dict(zip(("k_q", "k_scale", "k_zero"), quantize_keys(k, kind, "token", group)))
        older.update(zip(("v_q", "v_scale", "v_zero"), quantize_values(v, kind, group)))
    held = torch.zeros(B, H * lane, dtype=torch.bool)  # which tokens of each sequence's run some head holds
    for b in range(B):
        for h in range(H):
            held[b, start[b, h]:start[b, h] + n_older[b, h]] = True
    unheld = torch.cat([~held.view(B, H, lane), torch.ones(B, H, M - lane, dtype=torch.bool)], dim=2)
    for t_name in ("k_q", "v_q") if kind == "dense" else ("k_scale", "v_scale"):
        older[t_name] = older[t_name].clone()
        older[t_name][unheld] = float("nan")
    logical = dict(recent_k=recent_k, recent_v=recent_v, recent_last=recent_last, n_older=n_older, older_start=start,
                   older_lane=lane, **older)
    pages = dict(logical)
    used = [3, 3, 0]  # the run's blocks of each lane (the scratch block is never reserved: the null block)
    n_pool = sum(used) + 3
    table = block_table(used, M // block, n_pool, torch.int32, gen)
    for t_name, t in older.items():
        if t is not None and t.stride(2):
            pages[t_name] = page(t, table, block, n_pool, gen)
    if kind == "dense":
        pages.update(k_scale=older["k_scale"][:1, :, :1].expand(1, H, n_pool * block, 1),
                     v_scale=older["v_scale"][:1, :, :1].expand(1, H, n_pool * block, 1))
    pages.update(older_table=table, older_block=block)
    logical, pages = ({n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in d.items()}
                      for d in (logical, pages))
    q = q.to(DEVICE)
    ref_out, ref_probs = decode_attention_ref(q, **logical, return_scores=True)
    assert torch.equal(ref_out[2], torch.zeros_like(ref_out[2]))
    for config in (dict(), dict(block_n=16, splits=(3, 2))):
        out, probs = decode_attention(q, **logical, **config, return_scores=True)
        out_paged, probs_paged = decode_attention(q, **pages, **config, return_scores=True)
        assert torch.equal(out_paged, out) and torch.equal(probs_paged, probs), (name, config)
        assert rel_err(out[:2], ref_out[:2]) < TOL[dtype], (name, config)
        assert probs.shape == ref_probs.shape
        assert (probs - ref_probs).abs().max() < 10 * TOL[dtype] * ref_probs.abs().max(), (name, config)
        assert torch.equal(decode_attention(q, **logical, **config), out)
