"""Reference (PyTorch) quantization of keys and values for quantize_kv, in the quantized store's layout (payload
packing and scale shapes: kv_cache/stores.py, QuantizedStore).

Everything is computed in float32; scales and zero-points are stored as float16 (as KIVI does). The float16 metadata
is rounded *outward* (scales up, zero-points down) before the payload is computed from it, so every value stays
inside the representable range and no clamp ever fires: the rounding error bound (scale/2 for the integer formats)
holds with the stored metadata, not just with the float32 one.

x is (B, H, N, D): KV heads, tokens, head_dim. Axis "token": one scale per token and group of channels (the whole
head for 8-bit/fp8, group_size channels for 4/2-bit); axis "channel": one scale per channel and group of group_size
tokens (KIVI keys; N a multiple of group_size).
"""
import torch
from torch import Tensor

from kernels.formats import get_format

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127


def _half_up(x: Tensor) -> Tensor:
    """x (float32) rounded up to float16, so a scale never shrinks (which would push values out of range)."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _half_down(x: Tensor) -> Tensor:
    """x (float32) rounded down to float16, so a zero-point never rises above the group minimum."""
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _divide(x: Tensor, d: float) -> Tensor:
    """x / d rounded as IEEE division on every device: CUDA divides by a Python number as a multiplication by its
    reciprocal (one ulp off now and then), so d comes as a tensor on x's device (the Triton flush uses div_rn)."""
    return x / torch.full((), d, dtype=x.dtype, device=x.device)


def _reciprocal(scale: Tensor) -> Tensor:
    """1/scale in float32, 0 where the scale is 0 (an all-zero group: every code is 0 and dequantizes to 0)."""
    scale = scale.float()
    return torch.where(scale > 0, 1.0 / scale.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(scale))


# ---------------------------------------------------------------- bit packing

def pack_bits(q: Tensor, bits: int) -> Tensor:
    """uint8 codes q (..., D) in [0, 2^bits) -> (..., D*bits/8): element i goes to byte i // (8/bits), bits
    (i % (8/bits))*bits upward (little end first)."""
    per_byte = 8 // bits
    q = q.to(torch.uint8).unflatten(-1, (q.shape[-1] // per_byte, per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (q << shifts).sum(-1, dtype=torch.uint8)  # the fields do not overlap, so the sum is a bitwise or


def unpack_bits(packed: Tensor, bits: int, D: int) -> Tensor:
    """Inverse of pack_bits: (..., D*bits/8) uint8 -> codes (..., D) uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    q = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.flatten(-2)[..., :D]


# ---------------------------------------------------------------- element formats

def quantize_int8(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric int8 over `dim` (kept as size 1 in the scale): scale = amax/127, q = round(x/scale)."""
    x = x.float()
    scale = _half_up(_divide(x.abs().amax(dim, keepdim=True), INT8_MAX))
    q = torch.round(x * _reciprocal(scale)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_scaled(q: Tensor, scale: Tensor, dtype) -> Tensor:
    """The symmetric formats (int8 and fp8): x = q * scale."""
    return (q.float() * scale.float()).to(dtype)


def quantize_fp8(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """float8_e4m3fn payload with scale = amax/448 over `dim`. The clamp only guards float32 rounding at the top
    (e4m3fn has no infinity: an out-of-range cast is NaN on some devices)."""
    x = x.float()
    scale = _half_up(_divide(x.abs().amax(dim, keepdim=True), FP8_MAX))
    q = (x * _reciprocal(scale)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_asym(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric b-bit over `dim` (kept as size 1): zero = min, scale = (max-min)/(2^b-1), q = round((x-zero)/scale)
    as unpacked uint8 codes."""
    x = x.float()
    levels = (1 << bits) - 1
    zero = _half_down(x.amin(dim, keepdim=True))
    scale = _half_up(_divide(x.amax(dim, keepdim=True) - zero.float(), levels))
    q = torch.round((x - zero.float()) * _reciprocal(scale)).clamp_(0, levels).to(torch.uint8)
    return q, scale, zero


def dequantize_asym(q: Tensor, scale: Tensor, zero: Tensor, dtype) -> Tensor:
    return (q.float() * scale.float() + zero.float()).to(dtype)


# ---------------------------------------------------------------- key/value blocks in the cache layout

def quantize_block(x: Tensor, bits, axis: str, group_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """x (B, H, N, D) -> (payload, scale, zero or None) in the older-store layout of `axis` ("token" or "channel");
    bits: a kernels/formats.py format or its --bits name."""
    fmt = get_format(bits)
    B, H, N, D = x.shape
    if axis == "channel":
        groups = x.reshape(B, H, N // group_size, group_size, D)
        reduce_dim = -2
    else:
        g = fmt.channel_group(D, group_size)
        groups = x.reshape(B, H, N, D // g, g)
        reduce_dim = -1
    zero = None
    if fmt.asymmetric:
        q, scale, zero = quantize_asym(groups, fmt.bits, reduce_dim)
        zero = zero.squeeze(reduce_dim)
    elif fmt.payload_dtype == torch.float8_e4m3fn:
        q, scale = quantize_fp8(groups, reduce_dim)
    else:
        q, scale = quantize_int8(groups, reduce_dim)
    q = q.reshape(B, H, N, D)
    if fmt.per_byte > 1:
        q = pack_bits(q, fmt.bits)
    return q, scale.squeeze(reduce_dim), zero


def dequantize_block(q: Tensor, scale: Tensor, zero: Tensor | None, bits, axis: str, group_size: int, D: int,
                     dtype) -> Tensor:
    """Inverse of quantize_block: payload (B, H, N, ·) and metadata -> (B, H, N, D) in `dtype`."""
    fmt = get_format(bits)
    if fmt.per_byte > 1:
        q = unpack_bits(q, fmt.bits, D)
    B, H, N, _ = q.shape
    if axis == "channel":
        q = q.reshape(B, H, N // group_size, group_size, D)
        scale, zero = scale.unsqueeze(-2), None if zero is None else zero.unsqueeze(-2)
    else:
        g = fmt.channel_group(D, group_size)
        q = q.reshape(B, H, N, D // g, g)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
    x = dequantize_asym(q, scale, zero, dtype) if fmt.asymmetric else dequantize_scaled(q, scale, dtype)
    return x.reshape(B, H, N, D)


def quantize_keys(k: Tensor, bits, k_granularity: str, group_size: int):
    """Keys (B, H, F, D) of one flush group (F = group_size tokens when per channel) -> (k_q, k_scale, k_zero)."""
    return quantize_block(k, bits, k_granularity, group_size)


def quantize_values(v: Tensor, bits, group_size: int):
    """Values (B, H, N, D) -> (v_q, v_scale, v_zero): always per token (groups of channels)."""
    return quantize_block(v, bits, "token", group_size)


def dequantize_older(k_q, k_scale, k_zero, v_q, v_scale, v_zero, n: int, bits, k_granularity: str, group_size: int,
                     D: int, dtype) -> tuple[Tensor, Tensor]:
    """16-bit (dtype) keys and values (B, H, n, D) of the first n tokens of a cache's quantized older store (n a
    multiple of the flush group when keys are per channel)."""
    kg = n // group_size if k_granularity == "channel" else n
    k = dequantize_block(k_q[:, :, :n], k_scale[:, :, :kg], None if k_zero is None else k_zero[:, :, :kg], bits,
                         k_granularity, group_size, D, dtype)
    v = dequantize_block(v_q[:, :, :n], v_scale[:, :, :n], None if v_zero is None else v_zero[:, :, :n], bits,
                         "token", group_size, D, dtype)
    return k, v


# ---------------------------------------------------------------- two planes (mixed precision by score)

COARSE_LOW = 1.5  # a coarse token's missing low plane: the centre of the four codes it stands for


def quantize_planes(x: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, H, N, D) -> (hi, lo, scale, zero): the 4-bit asymmetric code per token (groups of group_size channels)
    split into its high and low 2-bit planes, each packed as the 2-bit format. A token kept with both planes
    dequantizes as the 4-bit code (4 * hi + lo); with the high plane alone, as 4 * hi + COARSE_LOW: a 2-bit code of
    the same scale and zero-point whose levels sit at its bins' centres."""
    D = x.shape[-1]
    q, scale, zero = quantize_block(x, "4", "token", group_size)
    codes = unpack_bits(q, 4, D)
    return pack_bits(codes >> 2, 2), pack_bits(codes & 3, 2), scale, zero


def plane_codes(hi: Tensor, lo: Tensor, fine: Tensor, D: int) -> Tensor:
    """The float32 codes (..., D) of packed planes hi, lo (..., D // 4); fine (...) bool: the tokens whose low plane
    is held (elsewhere lo is not read)."""
    low = torch.where(fine[..., None], unpack_bits(lo, 2, D).float(), COARSE_LOW)
    return unpack_bits(hi, 2, D).float() * 4 + low


def dequantize_planes(hi: Tensor, lo: Tensor, fine: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                      dtype) -> Tensor:
    """Tokens (B, H, N, D) in `dtype` from their planes (quantize_planes), fine (B, H, N) as in plane_codes."""
    D = hi.shape[-1] * 4
    codes = plane_codes(hi, lo, fine, D).unflatten(-1, (D // group_size, group_size))
    return (codes * scale.float()[..., None] + zero.float()[..., None]).flatten(-2).to(dtype)
