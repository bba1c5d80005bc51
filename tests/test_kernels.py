"""Triton kernels against their PyTorch references (float64 attention; the quantization functions of
kernels/quantize.py, bit for bit), the caches' --attn_impl triton decode step against --attn_impl torch, the
registered ops under torch.compile, and the kernels' sm_90 machine code. Without a GPU the kernels run under
TRITON_INTERPRET=1 (set in conftest.py before triton is imported), so the shapes stay small; every output buffer is
poisoned first (NaN, or 0xAB bytes) so an unwritten element cannot pass."""
import os
import zlib

import pytest
import torch
import triton

from conftest import held_state, reset_dynamo
from kernels.decode_attention import decode_attention
from kernels.reference import decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rel_err(out, ref):
    assert not out.isnan().any(), "output not fully written (NaN poison left)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every torch.empty the kernels allocate starts as NaN, so an unwritten element cannot pass."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def ring_state(pos, sink, ring, n_older_group, window):
    """recent_pos and n_older after positions 0..pos were stored (kv_cache/stores.py)."""
    recent_pos = torch.full((sink + ring,), -1, dtype=torch.int64)
    for p in range(pos + 1):
        recent_pos[p if p < sink else sink + (p - sink) % ring] = p
    n_older = max(0, (pos + 1 - sink - window) // n_older_group) * n_older_group
    return recent_pos, n_older


def random_older(kind, B, H, M, D, F, G, gen):
    """A random older store (payload, scale, zero) whose scale rows cover F tokens and columns G channels."""
    scale_shape = (B, H, M // F, D // G)
    if kind in ("int8", "fp8"):
        if kind == "int8":
            q = torch.randint(-127, 128, (B, H, M, D), generator=gen, dtype=torch.int8)
        else:
            q = (torch.randn(B, H, M, D, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return q, torch.rand(scale_shape, generator=gen).add(0.5).div(127).half(), None
    bits = int(kind[3:])
    q = torch.randint(0, 256, (B, H, M, D * bits // 8), generator=gen, dtype=torch.uint8)
    scale = torch.rand(scale_shape, generator=gen).add(0.5).div(2**bits - 1).half()
    return q, scale, torch.randn(scale_shape, generator=gen).half()


CASES = [
    # name, dtype, B, n_head, n_kv_head, D, older kind, key scale (tokens, channels), value scale channels
    ("full-fp32", torch.float32, 2, 4, 2, 32, None, None, None),
    ("full-bf16-gqa3-d40", torch.bfloat16, 1, 6, 2, 40, None, None, None),
    ("int8-fp32", torch.float32, 2, 4, 2, 32, "int8", (1, 32), 32),
    ("int8-bf16", torch.bfloat16, 1, 6, 2, 32, "int8", (1, 32), 32),
    ("int8-keys-per-channel-fp32", torch.float32, 1, 4, 2, 32, "int8", (8, 1), 32),
    ("fp8-fp32", torch.float32, 1, 4, 2, 32, "fp8", (1, 32), 32),
    ("int4-kivi-fp32", torch.float32, 2, 4, 2, 32, "int4", (8, 1), 8),
    ("int2-kivi-bf16", torch.bfloat16, 1, 6, 2, 64, "int2", (8, 1), 16),
    ("int4-keys-per-token-fp32", torch.float32, 1, 4, 1, 32, "int4", (1, 8), 8),
    ("int4-kivi-d48-fp32", torch.float32, 1, 2, 1, 48, "int4", (8, 1), 16),  # padded channels: gathered scales
]


@pytest.mark.parametrize("name,dtype,B,HQ,H,D,kind,k_group,v_group", CASES, ids=[c[0] for c in CASES])
def test_decode_attention(name, dtype, B, HQ, H, D, kind, k_group, v_group):
    gen = torch.Generator().manual_seed(int(os.environ.get("SEED", zlib.crc32(name.encode()))))
    q = torch.randn(B, HQ, 1, D, generator=gen).to(dtype).to(DEVICE)
    if kind is None:
        # Full cache: the last slot per sequence, neither filling a tile nor the buffer.
        NH = 75
        recent_k = torch.randn(B, H, NH, D, generator=gen).to(dtype).to(DEVICE)
        recent_v = torch.randn(B, H, NH, D, generator=gen).to(dtype).to(DEVICE)
        args = dict(recent_last=torch.tensor([36, 69][:B], device=DEVICE))
    else:
        sink, window, flush = 4, 8, k_group[0]
        ring = window + flush
        pos = 4 + window + 3 * 16 + 5  # older holds a few tiles and a partial one
        recent_pos, n_older = ring_state(pos, sink, ring, flush, window)
        M = 80  # capacity beyond n_older (the unused tail holds garbage the kernel must not read)
        recent_k = torch.randn(B, H, sink + ring, D, generator=gen).to(dtype).to(DEVICE)
        recent_v = torch.randn(B, H, sink + ring, D, generator=gen).to(dtype).to(DEVICE)
        k_q, k_scale, k_zero = random_older(kind, B, H, M, D, *k_group, gen)
        v_q, v_scale, v_zero = random_older(kind, B, H, M, D, 1, v_group, gen)
        to_device = lambda t: None if t is None else t.to(DEVICE)
        args = dict(recent_pos=recent_pos.to(DEVICE), sink_size=sink, n_older=torch.tensor([n_older], device=DEVICE),
                    k_q=to_device(k_q), k_scale=to_device(k_scale), k_zero=to_device(k_zero),
                    v_q=to_device(v_q), v_scale=to_device(v_scale), v_zero=to_device(v_zero))
    ref = decode_attention_ref(q, recent_k, recent_v, **args)
    for splits in [(3, 2), (1, 1)] if kind else [(0, 3)]:
        out = decode_attention(q, recent_k, recent_v, splits=splits, block_n=16, **args)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], (name, splits)
    if dtype == torch.bfloat16:  # the dots over bfloat16 operands (a tune_decode variant): within bf16's tolerance
        out = decode_attention(q, recent_k, recent_v, splits=(1, 1) if kind else (0, 2), block_n=16,
                               dot_precision="bf16", **args)
        assert rel_err(out, ref) < TOL[dtype], (name, "bf16 dots")


PER_SEQUENCE_CASES = [
    # name, dtype, n_head, n_kv_head, D, older kind, key scale (tokens, channels), value scale channels
    ("ring-fp32", torch.float32, 4, 2, 32, None, None, None),  # compress_kv: a ring, no older store
    ("int8-fp32", torch.float32, 4, 2, 32, "int8", (1, 32), 32),
    ("int4-kivi-bf16", torch.bfloat16, 6, 2, 32, "int4", (8, 1), 8),
]


@pytest.mark.parametrize("name,dtype,HQ,H,D,kind,k_group,v_group", PER_SEQUENCE_CASES,
                         ids=[c[0] for c in PER_SEQUENCE_CASES])
def test_decode_attention_per_sequence(name, dtype, HQ, H, D, kind, k_group, v_group, monkeypatch):
    """A batch of different prompts: each sequence has its own recent_pos row, recent_last and n_older. Sequence 0 has not
    filled its ring, sequence 1 has wrapped its ring several times (older holds a few tiles and a partial one; read
    with sequence 0's row, its ring slots would count as older tokens), sequence 2 is finished (recent_pos all -1,
    recent_last -1, n_older 0): it loads no tile and its output is exactly 0."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"per-sequence-{name}".encode()))
    sink, window, flush = 4, 8, k_group[0] if kind else 1
    ring = window + flush
    NH, M = sink + ring, 80
    states = [ring_state(pos, sink, ring, flush, window) for pos in (sink + ring - 3, 4 + window + 3 * 16 + 5)]
    recent_pos = torch.stack([pos for pos, _ in states] + [torch.full((NH,), -1, dtype=torch.int64)])
    n_older = torch.tensor([n for _, n in states] + [0]) if kind else torch.zeros(3, dtype=torch.int64)
    recent_last = torch.tensor([sink + ring - 3, NH - 1, -1])  # the last slot written: slots fill in order, then wrap
    assert len(set(map(tuple, recent_pos.tolist()))) == 3 and (not kind or n_older[1] > n_older[0])
    B = 3
    q = torch.randn(B, HQ, 1, D, generator=gen).to(dtype).to(DEVICE)
    recent_k = torch.randn(B, H, NH, D, generator=gen).to(dtype).to(DEVICE)
    recent_v = torch.randn(B, H, NH, D, generator=gen).to(dtype).to(DEVICE)
    args = dict(recent_last=recent_last.to(DEVICE), recent_pos=recent_pos.to(DEVICE), sink_size=sink)
    batched = dict(recent_k=recent_k, recent_v=recent_v, recent_pos=args["recent_pos"])  # every input with rows per sequence
    if kind:
        k_q, k_scale, k_zero = random_older(kind, B, H, M, D, *k_group, gen)
        v_q, v_scale, v_zero = random_older(kind, B, H, M, D, 1, v_group, gen)
        to_device = lambda t: None if t is None else t.to(DEVICE)
        older = dict(k_q=to_device(k_q), k_scale=to_device(k_scale), k_zero=to_device(k_zero),
                   v_q=to_device(v_q), v_scale=to_device(v_scale), v_zero=to_device(v_zero))
        args.update(n_older=n_older.to(DEVICE), **older)
        batched.update((n, t) for n, t in older.items() if t is not None)
    ref = decode_attention_ref(q, recent_k, recent_v, **args)
    assert torch.equal(ref[2], torch.zeros_like(ref[2]))

    loads = []  # (program, addresses of every lane, mask)
    if DEVICE == "cpu":  # the interpreter shows every load: its program and addresses, masked lanes included
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        masked_load = builder.create_masked_load

        def recording_load(ptrs, mask, *rest):
            loads.append((builder.grid_idx[0], ptrs.data.reshape(-1).astype("int64"), mask.data.reshape(-1)))
            return masked_load(ptrs, mask, *rest)

        monkeypatch.setattr(builder, "create_masked_load", recording_load)
    for splits in [(3, 2), (1, 1)] if kind else [(0, 3)]:
        loads.clear()
        out = decode_attention(q, recent_k, recent_v, splits=splits, block_n=16, **args)
        assert out.shape == q.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], (name, splits)
        assert rel_err(out[:2], ref[:2]) < TOL[dtype], (name, splits)  # not hidden by the batch's norm
        assert torch.equal(out[2], torch.zeros_like(out[2])), (name, splits)
        if DEVICE == "cpu":
            assert loads
            # No program, its own included (empty loops), reads its rows: compared on the lanes that load, since a
            # masked-off lane's address is arbitrary (it once fell into v_scale's row 2 by where the allocator put it).
            for tensor, t in batched.items():  # sequence 2's rows of every input
                lo = t.data_ptr() + 2 * t.stride(0) * t.element_size()
                hi = t.data_ptr() + 3 * t.stride(0) * t.element_size()
                for program, addresses, mask in loads:
                    hit = (addresses >= lo) & (addresses < hi)
                    assert not (hit & mask).any(), (name, splits, tensor, program)


def test_decode_attention_op():
    """The registered op (what torch.compile sees): schema, fake-tensor shapes and eager results agree."""
    gen = torch.Generator().manual_seed(1)
    B, HQ, H, D, M = 1, 2, 1, 16, 16
    q = torch.randn(B, 1, HQ, D, generator=gen).to(DEVICE).transpose(1, 2)  # as the model hands it over
    recent_k, recent_v = (torch.randn(B, H, 8, D, generator=gen).to(DEVICE) for _ in range(2))
    k_q, v_q = (torch.randint(-127, 128, (B, H, M, D), generator=gen, dtype=torch.int8).to(DEVICE) for _ in range(2))
    k_scale, v_scale = (torch.rand(B, H, M, 1, generator=gen).half().to(DEVICE) for _ in range(2))
    args = (q, recent_k, recent_v, torch.tensor([6], device=DEVICE), None, 0, torch.tensor([5], device=DEVICE),
            k_q, k_scale, None, v_q, v_scale, None, 1, 1, 16)
    torch.library.opcheck(torch.ops.kvcache.decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    # Per sequence: a recent_pos row, recent_last and n_older each, the second sequence finished.
    B = 2
    q = torch.randn(B, 1, HQ, D, generator=gen).to(DEVICE).transpose(1, 2)
    recent_k, recent_v = (torch.randn(B, H, 8, D, generator=gen).to(DEVICE) for _ in range(2))
    k_q, v_q = (torch.randint(-127, 128, (B, H, M, D), generator=gen, dtype=torch.int8).to(DEVICE) for _ in range(2))
    k_scale, v_scale = (torch.rand(B, H, M, 1, generator=gen).half().to(DEVICE) for _ in range(2))
    recent_pos = torch.tensor([[0, 1, 2, 3, 12, 13, 10, 11], [-1] * 8], device=DEVICE)
    args = (q, recent_k, recent_v, torch.tensor([7, -1], device=DEVICE), recent_pos, 4, torch.tensor([6, 0], device=DEVICE),
            k_q, k_scale, None, v_q, v_scale, None, 1, 1, 16)
    torch.library.opcheck(torch.ops.kvcache.decode_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- quantize-on-append into the older store

QUANT_CASES = [  # bits, key axis, group_size
    (8, "token", 32), ("fp8", "token", 32), (8, "channel", 8), (4, "channel", 8), (2, "channel", 8),
    (4, "token", 8), (2, "token", 16),
]


def poisoned_mid_store(bits, axis, group, B, H, M, D) -> dict:
    """An older store of M tokens in the layout the cache allocates (kv_cache/stores.py), poisoned: 0xAB bytes in the
    payloads, NaN in the metadata."""
    from kernels.formats import get_format
    from kv_cache.stores import QuantizedStore

    layout = QuantizedStore.layout(get_format(bits), group, axis, M, D)
    store = {name: torch.full((B, H, *shape), 0xAB, dtype=torch.uint8).view(dtype).to(DEVICE)
             for name, (shape, dtype) in layout.items() if dtype.itemsize == 1}
    store.update({name: torch.full((B, H, *shape), float("nan"), dtype=dtype, device=DEVICE)
                  for name, (shape, dtype) in layout.items() if dtype.itemsize > 1})
    return store


def quantize_into_of(impl: str, bits):
    """The flush kernel of `impl`: Triton (kernels/quantize_append.py) or C (kernels/cpu_attention.py, the CPU's
    eager flush: int8 and the asymmetric formats)."""
    if impl == "triton":
        from kernels.quantize_append import quantize_into
        return quantize_into
    from kernels import cpu_attention
    if DEVICE != "cpu" or not cpu_attention.available():
        pytest.skip("the C flush runs on the CPU, with a C compiler")
    if not cpu_attention.quantize_supported(bits, torch.float32):
        pytest.skip(f"the C flush does not write {bits} (the PyTorch route does)")
    return cpu_attention.quantize_into


@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("bits,axis,group", QUANT_CASES, ids=[f"{b}-{a}-{g}" for b, a, g in QUANT_CASES])
def test_quantize_into(bits, axis, group, impl):
    """The flush kernel (Triton, or C on the CPU) writes exactly (bit for bit) what the PyTorch reference
    quantize_keys / quantize_values give, at the token offset in a device tensor, reading its source rows through
    an index; nothing else changes."""
    from kernels.quantize import quantize_keys, quantize_values
    quantize_into = quantize_into_of(impl, bits)

    gen = torch.Generator().manual_seed(zlib.crc32(f"{bits}{axis}{group}".encode()))
    B, H, D, M = 2, 2, 32, 48
    F = group if axis == "channel" else 1
    store = poisoned_mid_store(bits, axis, group, B, H, M, D)
    before = {name: t.clone() for name, t in store.items()}
    src_k = torch.randn(B, H, 20, D, generator=gen) * 3
    src_k[..., 3] *= 20  # an outlier channel
    src_k[:, :, 2] = 0  # an all-zero token: scale 0
    src_v = torch.randn(B, H, 20, D, generator=gen)
    N = 2 * F if F > 1 else 3
    rows = torch.randperm(20, generator=gen)[:N]
    start = 2 * F if F > 1 else 5
    quantize_into(src_k.to(DEVICE), src_v.to(DEVICE), rows.to(DEVICE), torch.tensor([start], device=DEVICE),
                  store["k_q"], store["k_scale"], store.get("k_zero"), store["v_q"], store["v_scale"],
                  store.get("v_zero"))
    expected = dict(zip(["k_q", "k_scale", "k_zero"], quantize_keys(src_k[:, :, rows], bits, axis, group)))
    expected.update(zip(["v_q", "v_scale", "v_zero"], quantize_values(src_v[:, :, rows], bits, group)))
    as_bytes = lambda t: t.cpu().contiguous().view(torch.uint8)
    for name, t in store.items():
        per_row = F if name.startswith("k_") and name != "k_q" else 1  # tokens per metadata row
        lo, hi = start // per_row, (start + N) // per_row
        assert torch.equal(as_bytes(t[:, :, lo:hi]), as_bytes(expected[name])), name
        untouched = torch.ones(t.shape[2], dtype=torch.bool)
        untouched[lo:hi] = False
        assert torch.equal(as_bytes(t[:, :, untouched]), as_bytes(before[name][:, :, untouched])), name


@pytest.mark.parametrize("impl", ["triton", "cpu"])
@pytest.mark.parametrize("bits,axis,group", QUANT_CASES, ids=[f"{b}-{a}-{g}" for b, a, g in QUANT_CASES])
def test_quantize_into_per_sequence(bits, axis, group, impl):
    """Each sequence flushes its own ring slots (rows (B, N)) into its own older position (start (B,)): sequence b's
    store holds exactly what the reference path writes for it alone, and nothing else changes."""
    from kernels.quantize import quantize_keys, quantize_values
    quantize_into = quantize_into_of(impl, bits)

    gen = torch.Generator().manual_seed(zlib.crc32(f"per-sequence-{bits}{axis}{group}".encode()))
    B, H, D, M = 3, 2, 32, 48
    F = group if axis == "channel" else 1
    store = poisoned_mid_store(bits, axis, group, B, H, M, D)
    before = {name: t.clone() for name, t in store.items()}
    src_k = torch.randn(B, H, 20, D, generator=gen) * 3
    src_k[..., 3] *= 20  # an outlier channel
    src_k[:, :, 2] = 0  # an all-zero token: scale 0
    src_v = torch.randn(B, H, 20, D, generator=gen)
    N = 2 * F if F > 1 else 3
    rows = torch.stack([torch.randperm(20, generator=gen)[:N] for _ in range(B)])
    starts = [0, 3 * F, F] if F > 1 else [5, 0, 11]  # every sequence at its own older position
    quantize_into(src_k.to(DEVICE), src_v.to(DEVICE), rows.to(DEVICE), torch.tensor(starts, device=DEVICE),
                  store["k_q"], store["k_scale"], store.get("k_zero"), store["v_q"], store["v_scale"],
                  store.get("v_zero"))
    as_bytes = lambda t: t.cpu().contiguous().view(torch.uint8)
    for b, start in enumerate(starts):
        expected = dict(zip(["k_q", "k_scale", "k_zero"],
                            quantize_keys(src_k[b:b + 1, :, rows[b]], bits, axis, group)))
        expected.update(zip(["v_q", "v_scale", "v_zero"], quantize_values(src_v[b:b + 1, :, rows[b]], bits, group)))
        for name, t in store.items():
            per_row = F if name.startswith("k_") and name != "k_q" else 1  # tokens per metadata row
            lo, hi = start // per_row, (start + N) // per_row
            assert torch.equal(as_bytes(t[b:b + 1, :, lo:hi]), as_bytes(expected[name])), (b, name)
            untouched = torch.ones(t.shape[2], dtype=torch.bool)
            untouched[lo:hi] = False
            assert torch.equal(as_bytes(t[b, :, untouched]), as_bytes(before[name][b, :, untouched])), (b, name)


def test_quantize_into_op():
    """The registered op declares its mutations (schema check) and traces with fake tensors."""
    import kernels.quantize_append  # noqa: F401  (registers the op)

    B, H, D, M = 1, 1, 16, 8
    k, v = torch.randn(B, H, 4, D, device=DEVICE), torch.randn(B, H, 4, D, device=DEVICE)
    args = (k, v, torch.tensor([2, 0], device=DEVICE), torch.tensor([4], device=DEVICE),
            torch.zeros(B, H, M, D // 2, dtype=torch.uint8, device=DEVICE),
            torch.zeros(B, H, M // 2, D, dtype=torch.float16, device=DEVICE),
            torch.zeros(B, H, M // 2, D, dtype=torch.float16, device=DEVICE),
            torch.zeros(B, H, M, D // 2, dtype=torch.uint8, device=DEVICE),
            torch.zeros(B, H, M, 2, dtype=torch.float16, device=DEVICE),
            torch.zeros(B, H, M, 2, dtype=torch.float16, device=DEVICE))
    torch.library.opcheck(torch.ops.kvcache.quantize_into.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    # Per sequence: rows (B, N) and start (B,).
    B = 2
    k, v = torch.randn(B, H, 4, D, device=DEVICE), torch.randn(B, H, 4, D, device=DEVICE)
    store = [torch.zeros(B, *t.shape[1:], dtype=t.dtype, device=DEVICE) for t in args[4:]]
    args = (k, v, torch.tensor([[2, 0], [3, 1]], device=DEVICE), torch.tensor([4, 2], device=DEVICE), *store)
    torch.library.opcheck(torch.ops.kvcache.quantize_into.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- the caches' decode step: triton path vs torch path

E2E_CASES = [
    ("full", {}),
    ("compress_kv", dict(sink_size=4, window_size=8)),
    ("compress_kv", dict(sink_size=4, window_size=8, rope_positions="original")),
    ("quantize_kv", dict(sink_size=4, window_size=8, bits="8")),
    ("quantize_kv", dict(sink_size=4, window_size=8, bits="fp8")),
    ("quantize_kv", dict(sink_size=4, window_size=8, bits="4", group_size=8)),
    ("quantize_kv", dict(sink_size=4, window_size=8, bits="2", group_size=8)),
    ("quantize_kv", dict(sink_size=4, window_size=8, bits="4", group_size=8, k_granularity="token")),
    # Eviction: the kernel's scores drive who stays (budget 18: 6 kept slots, full from position 18 on).
    ("h2o", dict(sink_size=4, window_size=8, budget=18)),
    ("tova", dict(sink_size=4, window_size=8, budget=18, then_bits="4", group_size=8, rotate="hadamard")),
    ("quantize_kv", dict(sink_size=4, window_size=8, bits="2", group_size=8, rotate="signed_hadamard")),
    # head-adaptive budgets (two KV heads sharing their slots): each head's run read across lanes
    ("snapkv", dict(sink_size=4, window_size=8, budget=18, head_budget="adaptive", then_bits="4", group_size=8)),
    ("h2o", dict(sink_size=4, window_size=8, budget=18, head_budget="adaptive")),
    # mixed precision by score: each token's low plane read where its entry says, demotions as tova decodes
    ("tova", dict(sink_size=4, window_size=8, budget=18, then_bits="2", fine_share=0.5, group_size=8)),
    # expected attention's prompt scores, int4 kept tokens rotated by --rotate auto
    ("expected_attention", dict(sink_size=4, window_size=8, budget=18, then_bits="4", group_size=8)),
]


@pytest.mark.parametrize("strategy,options", E2E_CASES, ids=[f"{s}-{o}" for s, o in E2E_CASES])
def test_cache_decode_triton_matches_torch(strategy, options):
    """A tiny random model generates through each cache with --attn_impl triton (fused decode attention and
    quantize-on-append) and torch: the logits agree at every step, across flushes and a second prefill chunk."""
    import kv_cache
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    n_kv_head = 2 if options.get("head_budget") == "adaptive" else 1
    args = ModelArgs(vocab_size=64, dim=64, n_layer=1, n_head=2, n_kv_head=n_kv_head, intermediate_size=64,
                     head_dim=32)
    model = Transformer(args).to(DEVICE).eval().requires_grad_(False)
    tokens = torch.randint(0, 64, (2, 30), device=DEVICE)
    # Decode steps at positions 10-19 and 24-29: KIVI groups (8 tokens past sinks 4 + window 8) flush at 19 and 27.
    schedule = [10] + [1] * 10 + [4] + [1] * 6
    max_seq_length = 30
    logits = {}
    for impl in ("torch", "triton"):
        cls = kv_cache.STRATEGIES[strategy]
        model.setup_caches(lambda i: cls(2, max_seq_length, args.n_kv_head, args.head_dim, torch.float32, DEVICE,
                                         **options, attn_impl=impl), max_seq_length)
        assert model.layers[0].attention.kv_cache.attn_impl == impl
        out, pos = [], 0
        for n in schedule:
            out.append(model(tokens[:, pos:pos + n], torch.arange(pos, pos + n, device=DEVICE)))
            pos += n
        logits[impl] = torch.cat(out, dim=1)
        if impl == "triton" and strategy == "quantize_kv":
            stores = held_state(model.layers[0].attention.kv_cache)
        elif strategy == "quantize_kv":
            torch_stores = held_state(model.layers[0].attention.kv_cache)
    assert rel_err(logits["triton"], logits["torch"]) < 1e-5
    if strategy == "quantize_kv":  # the quantize-on-append kernel wrote what the PyTorch reference writes
        for name, buf in torch_stores.items():
            assert torch.equal(stores[name].view(torch.uint8), buf.view(torch.uint8)), name


def test_triton_decode_step_is_one_graph():
    """With --attn_impl triton the decode step still compiles to one graph (the kernels are opaque registered ops,
    the quantize op's writes to the older store functionalized) and computes what the eager step computes."""
    import torch._dynamo

    import kv_cache
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, dim=64, n_layer=1, n_head=2, n_kv_head=1, intermediate_size=64, head_dim=32)
    model = Transformer(args).to(DEVICE).eval().requires_grad_(False)
    tokens = torch.randint(0, 64, (1, 21), device=DEVICE)
    options = dict(sink_size=4, window_size=8, bits="4", group_size=8, attn_impl="triton")

    def setup():
        cls = kv_cache.STRATEGIES["quantize_kv"]
        model.setup_caches(lambda i: cls(1, 21, 1, 32, torch.float32, DEVICE, **options), 21)
        model(tokens[:, :17], torch.arange(17, device=DEVICE))

    steps = [(tokens[:, t:t + 1], torch.tensor([t], device=DEVICE)) for t in range(17, 21)]  # a flush at 19
    setup()
    eager = [model(*step) for step in steps]
    setup()
    reset_dynamo()
    compiled_step = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    compiled = [compiled_step(*step) for step in steps]
    assert rel_err(torch.cat(compiled), torch.cat(eager)) < 1e-6


def test_kernels_compile_for_h100():
    """Without a GPU: every kernel compiles for sm_90 with Triton's own ptxas, and its PTX shows what the interpreter
    cannot: tensor-core dots and 16-byte pipelined loads in decode attention, IEEE division and no fused multiply-add
    in quantize-on-append (tests/compile_sm90.py)."""
    import subprocess
    import sys
    from pathlib import Path

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton has no NVIDIA backend")
    script = Path(__file__).parent / "compile_sm90.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
