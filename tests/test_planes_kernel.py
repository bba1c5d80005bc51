"""Mixed precision by score in kernels/decode_attention.py: an older store in planes (k_lo, v_lo, older_fine), every
kept token's high 2-bit plane in the 2-bit payload and the low planes of the fine tokens apart (never paged), against
the float64 reference, contiguous and paged.

The codes are real (kernels/quantize.py quantize_planes on random data). Each (sequence, head) keeps about half its
older tokens fine, on shuffled low-plane entries; the entries no token uses hold random bytes and the metadata past
n_older is NaN, so a read of the wrong row or past n_older fails. Sequence 2 is finished (output 0). Without a GPU
the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so the shapes stay small.
"""
import math
import zlib

import pytest
import torch

from conftest import reset_dynamo
from kernels.decode_attention import decode_attention
from kernels.quantize import dequantize_planes, quantize_keys, quantize_planes, quantize_values
from kernels.reference import decode_attention_ref, dequantize_ref, low_plane_ref
from test_kernels import DEVICE, TOL, poison_empty, rel_err  # noqa: F401  (poison_empty: autouse)
from test_paged_kernels import block_table, page

N_OLDER = [41, 13, 0]  # per sequence; sequence 2 finished
E = 32  # low-plane entries per (sequence, head): more than half of N_OLDER[0], so some stay unused


def planes_case(name, dtype, HQ, H, D, group, older_block=0):
    """q, the logical (contiguous) inputs of a store in planes and, with older_block, the paged ones (payload, scales
    and zero-points in a pool of shuffled blocks; the low planes and older_fine as they are). older_fine has a slot
    past the older store's capacity M (a scratch slot) and random entries past n_older, which no one reads."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    B, NH, block = len(N_OLDER), 16, older_block or 16
    max_blocks = math.ceil(max(N_OLDER) / block) + 1  # room past every sequence's n_older
    M = max_blocks * block
    q = torch.randn(B, HQ, 1, D, generator=gen).to(dtype)
    recent_k, recent_v = (torch.randn(B, H, NH, D, generator=gen).to(dtype) for _ in range(2))
    recent_last = torch.tensor([NH - 1, 6, -1])
    for b in range(B):  # the slots the kernel must not read
        recent_k[b, :, recent_last[b] + 1:] = recent_v[b, :, recent_last[b] + 1:] = float("nan")
    k, v = torch.randn(B, H, M, D, generator=gen) * 2, torch.randn(B, H, M, D, generator=gen)
    k[..., 3] *= 10  # an outlier channel
    older_fine = torch.randint(-1, E, (B, H, M + 1), generator=gen, dtype=torch.int16)
    for b, n in enumerate(N_OLDER):
        for h in range(H):
            fine = torch.randperm(n, generator=gen)[:(n + 1) // 2]
            older_fine[b, h, :n] = -1
            older_fine[b, h, fine] = torch.randperm(E, generator=gen)[:len(fine)].to(torch.int16)
    older, planes = {}, dict(older_fine=older_fine)
    for x_name, x in (("k", k), ("v", v)):
        hi, lo, scale, zero = quantize_planes(x, group)
        store = torch.randint(0, 256, (B, H, E, D // 4), generator=gen, dtype=torch.uint8)  # unused rows: garbage
        scale = scale.clone()
        for b, n in enumerate(N_OLDER):
            for h in range(H):
                entries = older_fine[b, h, :n]
                store[b, h, entries[entries >= 0].long()] = lo[b, h, :n][entries >= 0]
            scale[b, :, n:] = float("nan")  # metadata past n_older must not be read
        older.update({f"{x_name}_q": hi, f"{x_name}_scale": scale, f"{x_name}_zero": zero})
        planes[f"{x_name}_lo"] = store
    logical = dict(recent_k=recent_k, recent_v=recent_v, recent_last=recent_last, n_older=torch.tensor(N_OLDER),
                   **older, **planes)
    pages = None
    if older_block:
        used = [math.ceil(n / block) for n in N_OLDER]
        n_pool = sum(used) + 3  # the null block and two spare ones
        table = block_table(used, max_blocks, n_pool, torch.int64, gen)
        pages = dict(logical, older_table=table, older_block=block,
                     **{t_name: page(t, table, block, n_pool, gen) for t_name, t in older.items()})
    to_device = lambda d: {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in d.items()}  # noqa
    return q.to(DEVICE), to_device(logical), pages and to_device(pages)


def check(q, inputs, ref_out, ref_probs, dtype, config):
    """The kernel's output and scores (return_scores) against the reference; returns the output."""
    out = decode_attention(q, **inputs, **config)
    out_scores, probs = decode_attention(q, **inputs, **config, return_scores=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out_scores, out), config
    assert rel_err(out[:2], ref_out[:2]) < TOL[dtype], config  # the live sequences, not hidden by the batch norm
    assert torch.equal(out[2], torch.zeros_like(out[2])), config
    assert probs.shape == ref_probs.shape and probs.dtype == torch.float32
    assert (probs - ref_probs).abs().max() < 10 * TOL[dtype] * ref_probs.abs().max(), config
    return out


def test_reference_planes_are_quantize_planes():
    """The reference's store in planes dequantizes as kernels/quantize.py dequantize_planes defines it: a fine
    token's low plane read through older_fine, a coarse one's COARSE_LOW."""
    _, logical, _ = planes_case("reference", torch.float32, 2, 2, 64, 16)
    k_q, k_lo, fine = logical["k_q"], logical["k_lo"], logical["older_fine"].long()
    n = N_OLDER[1]  # the tokens every live sequence holds
    entries = fine[:2, :, :n]
    low = low_plane_ref(k_lo[:2], entries)
    ours = dequantize_ref(k_q[:2, :, :n], logical["k_scale"][:2, :, :n], logical["k_zero"][:2, :, :n], 64, low)
    lo = torch.stack([torch.stack([k_lo[b, h, entries[b, h].clamp_min(0)] for h in range(2)]) for b in range(2)])
    theirs = dequantize_planes(k_q[:2, :, :n], lo, entries >= 0, logical["k_scale"][:2, :, :n],
                               logical["k_zero"][:2, :, :n], 16, torch.float64)
    assert (entries >= 0).any() and (entries < 0).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)


PLANE_CASES = [  # name, dtype, n_head, n_kv_head, D, channels per scale
    ("gqa3-d64-bf16", torch.bfloat16, 6, 2, 64, 16),
    ("gqa3-d64-fp32", torch.float32, 6, 2, 64, 32),
    # head_dim 48 pads the tile to 64: scales gathered element by element, the packed rows masked past 12 bytes
    ("gqa2-d48-fp32", torch.float32, 4, 2, 48, 16),
]


@pytest.mark.parametrize("name,dtype,HQ,H,D,group", PLANE_CASES, ids=[c[0] for c in PLANE_CASES])
def test_planes_decode_attention(name, dtype, HQ, H, D, group):
    """A contiguous store in planes: output and scores match the float64 reference, in whole 64-token tiles and
    in 16-token tiles over several splits."""
    q, logical, _ = planes_case(name, dtype, HQ, H, D, group)
    ref_out, ref_probs = decode_attention_ref(q, **logical, return_scores=True)
    for config in (dict(), dict(block_n=16, splits=(3, 2))):
        check(q, logical, ref_out, ref_probs, dtype, config)


def test_planes_paged():
    """The payload, scales and zero-points paged (NaN-poisoned spare blocks), the low planes and older_fine not:
    the output and scores equal the contiguous store's exactly, and the reference's."""
    dtype = torch.float32
    q, logical, pages = planes_case("paged", dtype, 6, 2, 64, 16, older_block=16)
    ref_out, ref_probs = decode_attention_ref(q, **logical, return_scores=True)
    assert torch.equal(decode_attention_ref(q, **pages), ref_out)
    for config in (dict(), dict(block_n=16, splits=(3, 2))):
        out = check(q, pages, ref_out, ref_probs, dtype, config)
        assert torch.equal(out, decode_attention(q, **logical, **config)), config


def test_planes_matter():
    """The same store with every token coarse (older_fine all -1) attends to other values: it matches the
    all-coarse reference and is far from the mixed one, so a kernel that ignored the low planes would fail."""
    dtype = torch.float32
    q, logical, _ = planes_case("coarse", dtype, 6, 2, 64, 16)
    mixed = decode_attention(q, **logical)
    coarse = dict(logical, older_fine=torch.full_like(logical["older_fine"], -1))
    out = decode_attention(q, **coarse)
    ref = decode_attention_ref(q, **coarse)
    assert rel_err(out[:2], ref[:2]) < TOL[dtype]
    assert rel_err(out[:2], mixed[:2]) > 1000 * TOL[dtype]
    assert rel_err(mixed[:2], decode_attention_ref(q, **logical)[:2]) < TOL[dtype]


def test_planes_validation():
    """Planes with a store they do not fit, or malformed, are one-line ValueErrors, before any launch."""
    q, logical, _ = planes_case("validation", torch.float32, 2, 2, 32, 16)
    M = logical["k_q"].shape[2]
    k, v = torch.randn(3, 2, M, 32), torch.randn(3, 2, M, 32)
    int8 = dict(zip(("k_q", "k_scale", "k_zero"), quantize_keys(k, "8", "token", 32)))
    int8.update(zip(("v_q", "v_scale", "v_zero"), quantize_values(v, "8", 32)))
    kivi_keys = dict(zip(("k_q", "k_scale", "k_zero"), quantize_keys(k, "2", "channel", 16)))
    fine = logical["older_fine"]
    bad = {
        "need 2-bit keys and values": int8,
        "need 2-bit keys and values with per-token": kivi_keys,
        "not supported with older_start": dict(older_start=torch.zeros(3, 2, dtype=torch.int64), older_lane=16),
        "come all three": dict(v_lo=None),
        "come all three, with an older store": dict(k_lo=None, v_lo=None),
        "older_fine has shape": dict(older_fine=fine.int()),
        f"older_fine has shape .* S >= {M}": dict(older_fine=fine[:, :, :M - 1]),
        "k_lo has shape": dict(k_lo=logical["k_lo"][..., :4]),
        "v_lo has shape": dict(v_lo=logical["v_lo"].to(torch.int8)),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            decode_attention(q, **dict(logical, **change))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="come all three, with an older store"):
        decode_attention(q, logical["recent_k"], logical["recent_v"], recent_last=logical["recent_last"],
                         **{n: logical[n] for n in ("k_lo", "v_lo", "older_fine")})


def test_planes_op_under_torch_compile():
    """The planes flow through the registered ops (their schema is DecodeInputs'): schema and fake tensors check,
    and the call traces into one graph with fullgraph=True and gives the eager result."""
    q, logical, pages = planes_case("compile", torch.float32, 2, 1, 32, 16, older_block=16)
    torch.library.opcheck(torch.ops.kvcache.decode_attention_scores.default, (q,), pages,
                          test_utils=("test_schema", "test_faketensor"))
    step = lambda q: decode_attention(q, **pages, return_scores=True)  # noqa: E731
    eager = step(q)
    reset_dynamo()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)(q)
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
