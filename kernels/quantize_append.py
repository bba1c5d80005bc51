"""Quantize-and-pack on append, in Triton: the decode step's flush writes straight into quantize_kv's older store
(the decode kernel's "older" store).

The PyTorch reference is kernels/quantize.py (quantize_keys / quantize_values): this kernel performs the same float32
operations in the same order (metadata rounded outward to float16, round half to even), so the tests require equal
bytes. It lives in its own file because triton is imported only when --attn_impl triton asks for it (the PyTorch
functions serve every platform, triton is Linux-only). Source rows are read through an index (the ring, the recent
store, at decode: no gathered copy), and the token offset in the store comes in a device tensor: no host sync,
static shapes (CUDA-graph-able). Both may be shared by the batch or given per sequence (each sequence flushes its
own ring slots into its own tokens of the older store), read with a batch stride (0 when shared). Keys and values go
in one launch. The format of each store is read off its buffers' shapes (kernels.formats.older_format): scale
rows cover F tokens and scale columns G channels.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.decode_attention import per_batch, per_batch_rows
from kernels.formats import older_format


@triton.jit
def _round_half_even(y):
    # For |y| < 2**22, adding and taking away 1.5 * 2**23 rounds y to an integer, ties to even (as torch.round).
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_e4m3(y):
    """y (float32, |y| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, still in float32. The cast
    to float8 that follows is then exact; Triton's CPU interpreter mis-rounds values that carry into the exponent."""
    exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_exponent = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; below 2**-6 the spacing stays 2**-9
    ulp = ((ulp_exponent + 127) << 23).to(tl.float32, bitcast=True)
    rounded = _round_half_even(tl.math.div_rn(y, ulp)) * ulp
    # A small negative value that rounds to zero keeps its sign, as torch's cast stores it (-0, byte 0x80).
    return tl.where(rounded == 0, y * 0.0, rounded)


@triton.jit
def _f16_outward(x, UP: tl.constexpr):
    """x (float32) rounded to float16, then one step further up (UP) or down when rounding went the other way: the
    Triton twin of kernels.quantize._half_up / _half_down."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    if UP:
        # Next float16 toward +inf: magnitude +1 for positives and +0, -1 for negatives, -0 -> smallest positive.
        nxt = tl.where(h.to(tl.float32) < 0, bits - 1, tl.where(bits == -32768, 1, bits + 1))
        wrong = h.to(tl.float32) < x
    else:
        # Next float16 toward -inf: magnitude -1 for positives, +1 for negatives and -0, +0 -> smallest negative.
        nxt = tl.where(h.to(tl.float32) > 0, bits - 1, tl.where(bits == 0, -32767, bits + 1))
        wrong = h.to(tl.float32) > x
    return tl.where(wrong, nxt.to(tl.int16).to(tl.float16, bitcast=True), h)


@triton.jit
def _spread(t, BLOCK_T: tl.constexpr, F: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    """Per-group values (BLOCK_T // F, D // G) repeated over their F tokens and G channels: (BLOCK_T, D)."""
    return tl.reshape(tl.broadcast_to(t[:, None, :, None], (BLOCK_T // F, F, D // G, G)), (BLOCK_T, D))


@triton.jit
def _quantize_store(src_ptr, rows_ptr, n_rows, start, payload_ptr, scale_ptr, zero_ptr, b, h,
                    stride_xb, stride_xh, stride_xn, stride_pb, stride_ph, stride_pn, stride_sb, stride_sh, stride_sn,
                    D: tl.constexpr, PER_BYTE: tl.constexpr, F: tl.constexpr, G: tl.constexpr,
                    ASYM: tl.constexpr, FP8: tl.constexpr, BLOCK_T: tl.constexpr):
    """Quantize BLOCK_T source rows (tile program_id(1)) of one (batch, head) into older tokens start + i. Divisions
    are div_rn (IEEE, as torch): Triton's `/` is approximate on NVIDIA GPUs."""
    BITS: tl.constexpr = 8 // PER_BYTE
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    mask_t = offs_t < n_rows
    rows = tl.load(rows_ptr + offs_t, mask=mask_t, other=0)
    x = tl.load(src_ptr + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + offs_d[None, :],
                mask=mask_t[:, None], other=0.0).to(tl.float32)

    # Group statistics over F tokens x G channels: (BLOCK_T // F, D // G).
    x4 = tl.reshape(x, (BLOCK_T // F, F, D // G, G))
    if ASYM:
        LEVELS: tl.constexpr = (1 << BITS) - 1.0
        zero = _f16_outward(tl.min(tl.min(x4, 3), 1), UP=False)
        scale = _f16_outward(tl.math.div_rn(tl.max(tl.max(x4, 3), 1) - zero.to(tl.float32), LEVELS), UP=True)
    else:
        LEVELS: tl.constexpr = 448.0 if FP8 else 127.0
        scale = _f16_outward(tl.math.div_rn(tl.max(tl.max(tl.abs(x4), 3), 1), LEVELS), UP=True)
    scale32 = scale.to(tl.float32)
    rcp = tl.where(scale32 > 0, tl.math.div_rn(1.0, tl.maximum(scale32, 1.1754943508222875e-38)), 0.0)
    if ASYM:
        y = (x - _spread(zero.to(tl.float32), BLOCK_T, F, D, G)) * _spread(rcp, BLOCK_T, F, D, G)
    else:
        y = x * _spread(rcp, BLOCK_T, F, D, G)

    # Payload: int8, float8 e4m3, or 2 / 4 codes packed into each byte (element i at bits (i % per_byte) * bits).
    dst = payload_ptr + b * stride_pb + h * stride_ph + (start + offs_t)[:, None] * stride_pn
    if FP8:
        tl.store(dst + offs_d[None, :], _round_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0)).to(tl.float8e4nv),
                 mask=mask_t[:, None])
    elif not ASYM:
        tl.store(dst + offs_d[None, :], tl.minimum(tl.maximum(_round_half_even(y), -127.0), 127.0).to(tl.int8),
                 mask=mask_t[:, None])
    else:
        codes = tl.minimum(tl.maximum(_round_half_even(y), 0.0), LEVELS).to(tl.uint8)
        if PER_BYTE == 2:
            lo, hi = tl.split(tl.reshape(codes, (BLOCK_T, D // 2, 2)))
            packed = lo | (hi << 4)
        else:
            even, odd = tl.split(tl.reshape(codes, (BLOCK_T, D // 4, 2, 2)))  # elements 4j + {0, 2}, 4j + {1, 3}
            c0, c2 = tl.split(even)
            c1, c3 = tl.split(odd)
            packed = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
        offs_p = tl.arange(0, D // PER_BYTE)
        tl.store(dst + offs_p[None, :], packed, mask=mask_t[:, None])

    # Metadata rows: token start + i has scale row (start + i) // F.
    offs_r = (start // F + tl.program_id(1) * (BLOCK_T // F) + tl.arange(0, BLOCK_T // F))
    offs_c = tl.arange(0, D // G)
    meta = b * stride_sb + h * stride_sh + offs_r[:, None] * stride_sn + offs_c[None, :]
    mask_r = (tl.program_id(1) * (BLOCK_T // F) + tl.arange(0, BLOCK_T // F)) < n_rows // F
    tl.store(scale_ptr + meta, scale, mask=mask_r[:, None])
    if ASYM:
        tl.store(zero_ptr + meta, zero, mask=mask_r[:, None])


@triton.jit
def _quantize_kv_kernel(
    k_ptr, v_ptr, rows_ptr, n_rows, start_ptr, stride_rowsb, stride_start,
    kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kqb, stride_kqh, stride_kqn, stride_ksb, stride_ksh, stride_ksn,
    stride_vqb, stride_vqh, stride_vqn, stride_vsb, stride_vsh, stride_vsn,
    H: tl.constexpr, D: tl.constexpr,
    K_PER_BYTE: tl.constexpr, K_F: tl.constexpr, K_G: tl.constexpr,
    V_PER_BYTE: tl.constexpr, V_F: tl.constexpr, V_G: tl.constexpr,
    ASYM: tl.constexpr, FP8: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = (tl.program_id(0) // H).to(tl.int64)  # batch offsets can pass 2**31 elements in a large cache
    h = tl.program_id(0) % H
    start = tl.load(start_ptr + b * stride_start).to(tl.int32)
    rows_ptr += b * stride_rowsb
    if tl.program_id(2) == 0:
        _quantize_store(k_ptr, rows_ptr, n_rows, start, kq_ptr, ks_ptr, kz_ptr, b, h,
                        stride_kb, stride_kh, stride_kn, stride_kqb, stride_kqh, stride_kqn,
                        stride_ksb, stride_ksh, stride_ksn, D, K_PER_BYTE, K_F, K_G, ASYM, FP8, BLOCK_T)
    else:
        _quantize_store(v_ptr, rows_ptr, n_rows, start, vq_ptr, vs_ptr, vz_ptr, b, h,
                        stride_vb, stride_vh, stride_vn, stride_vqb, stride_vqh, stride_vqn,
                        stride_vsb, stride_vsh, stride_vsn, D, V_PER_BYTE, V_F, V_G, ASYM, FP8, BLOCK_T)


def triton_quantize_supported(head_dim: int, group_size: int) -> bool:
    """The Triton path needs power-of-two head_dim and group_size (its tiles are powers of two)."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0
    return pow2(head_dim) and pow2(group_size)


def quantize_into(k: Tensor, v: Tensor, rows: Tensor, start: Tensor, k_q: Tensor, k_scale: Tensor,
                  k_zero: Optional[Tensor], v_q: Tensor, v_scale: Tensor, v_zero: Optional[Tensor]):
    """Quantize k[b, :, rows[b]] and v[b, :, rows[b]] (k, v: (B, H, ., D)) into older tokens start[b] .. start[b] + N - 1
    of sequence b of the store (k_q, k_scale, k_zero, v_q, v_scale, v_zero), exactly as quantize_keys /
    quantize_values + index_copy_. rows: int64 device tensor (N,) shared by the batch or (B, N) per sequence, N a
    multiple of the key group when keys are per channel; start: device tensor (1,) shared or (B,) per sequence,
    each a multiple of that group. Every sequence writes N tokens. The older buffers may be views of the first B
    sequences. Under torch.compile this is the op torch.ops.kvcache.quantize_into (mutating the store); eager calls
    launch directly."""
    args = (k, v, rows, start, k_q, k_scale, k_zero, v_q, v_scale, v_zero)
    if torch.compiler.is_compiling():
        torch.ops.kvcache.quantize_into(*args)
    else:
        _quantize_into(*args)


def _quantize_into(k: Tensor, v: Tensor, rows: Tensor, start: Tensor, k_q: Tensor, k_scale: Tensor,
                   k_zero: Optional[Tensor], v_q: Tensor, v_scale: Tensor, v_zero: Optional[Tensor]) -> None:
    B, H, _, D = k.shape
    k_pb, k_f, k_g = older_format(k_q, k_scale, D)
    v_pb, v_f, v_g = older_format(v_q, v_scale, D)
    rows, stride_rowsb = per_batch_rows(rows, B, "rows")
    start, stride_start = per_batch(start, B)
    N = rows.shape[-1]
    if N % k_f or N % v_f:
        raise ValueError(f"{N} tokens do not fill whole scale groups of {k_f} tokens")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("quantize_into needs head_dim contiguous in k and v")
    block_t = max(k_f, v_f, min(triton.next_power_of_2(N), 16))
    _quantize_kv_kernel[(B * H, triton.cdiv(N, block_t), 2)](
        k, v, rows, N, start, stride_rowsb, stride_start,
        k_q, k_scale, k_scale if k_zero is None else k_zero, v_q, v_scale, v_scale if v_zero is None else v_zero,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_q.stride(0), k_q.stride(1), k_q.stride(2), k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        v_q.stride(0), v_q.stride(1), v_q.stride(2), v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        H=H, D=D, K_PER_BYTE=k_pb, K_F=k_f, K_G=k_g, V_PER_BYTE=v_pb, V_F=v_f, V_G=v_g,
        ASYM=k_zero is not None, FP8=k_q.dtype == torch.float8_e4m3fn, BLOCK_T=block_t,
        num_warps=max(1, min(4, block_t * D // 256)), enable_fp_fusion=False,  # x * rcp must round before the
    )                                                                           # rounding trick adds to it


torch.library.custom_op("kvcache::quantize_into", _quantize_into,
                        mutates_args=("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")).register_fake(
    lambda *args: None)
