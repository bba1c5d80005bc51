"""The reference quantization functions (kernels/quantize.py): bit packing, codes against float64 recomputation, and
the rounding-error bound of each format, in the quantized-store layouts of kv_cache/stores.py."""
import pytest
import torch

from kernels.quantize import (dequantize_asym, dequantize_block, dequantize_older, dequantize_scaled,
                              pack_bits, quantize_asym, quantize_block, quantize_fp8, quantize_int8, quantize_keys,
                              quantize_values, unpack_bits)


def sample(*shape, seed=0):
    """Keys/values-like data: normal, a few outlier channels, one constant row and one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] *= 20  # outlier channel, as real keys have
    x[..., 0, :] = 0.0
    x[..., 1, :] = 1.5
    return x


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_bits(q, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits, 64), q)


def test_pack_bit_layout():
    """Element i goes to byte i // (8/b), bits (i % (8/b))*b upward."""
    assert pack_bits(torch.tensor([0xA, 0x5, 0x1, 0xF], dtype=torch.uint8), 4).tolist() == [0x5A, 0xF1]
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3, 3, 3, 3], dtype=torch.uint8), 2).tolist() == [
        1 | 2 << 2 | 3 << 4, 0xFF]


def slack(x):
    return 1e-6 * (x.abs() + 1)  # float32 arithmetic inside the quantizer


def ratio(x, scale):
    """x / scale in float64, 0 for all-zero groups (scale 0, every code 0)."""
    return torch.where(scale > 0, x / scale.clamp_min(1e-300), 0.0)


def assert_within(err, bound):
    excess = (err - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"


@pytest.mark.parametrize("dim", [-1, -2])
def test_int8_error_bound(dim):
    x = sample(2, 3, 16, 64)
    q, scale = quantize_int8(x, dim)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and q.abs().max() <= 127
    x64, s64 = x.double(), scale.double()
    assert (q.double() - torch.round(ratio(x64, s64))).abs().max() <= 1  # codes as float64 would round them, ties aside
    err = (x64 - q.double() * s64).abs()
    assert_within(err, s64 / 2 + slack(x64))
    assert torch.equal(dequantize_scaled(q, scale, torch.float32), (q.float() * scale.float()))
    assert (s64 * 127 >= x64.abs().amax(dim, keepdim=True)).all()  # the scale covers the range (rounded up)
    assert (s64 * 127 <= x64.abs().amax(dim, keepdim=True) * (1 + 2 ** -10) + 1e-7).all()  # ... and barely more


def test_fp8_error_bound():
    x = sample(2, 3, 16, 64)
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float16
    y, s64 = ratio(x.double(), scale.double()), scale.double()
    assert y.abs().max() <= 448 * (1 + 1e-6)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normals, absolute 2^-10 below 2^-6 (subnormals).
    err = (x.double() - dequantize_scaled(q, scale, torch.float64)).abs()
    assert_within(err, (y.abs() * 2 ** -4 + 2 ** -10) * s64 + slack(x.double()))
    assert not dequantize_scaled(q, scale, torch.float32).isnan().any()


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dim", [-1, -2])
def test_asym_error_bound(bits, dim):
    x = sample(2, 3, 16, 64) + 3.0  # off-centre, so the zero-point matters
    q, scale, zero = quantize_asym(x, bits, dim)
    assert q.dtype == torch.uint8 and q.max() <= (1 << bits) - 1
    assert scale.dtype == zero.dtype == torch.float16
    x64, s64, z64 = x.double(), scale.double(), zero.double()
    assert (q.double() - torch.round(ratio(x64 - z64, s64)).clamp(0, (1 << bits) - 1)).abs().max() <= 1
    err = (x64 - dequantize_asym(q, scale, zero, torch.float64)).abs()
    assert_within(err, s64 / 2 + slack(x64))
    assert (z64 <= x64.amin(dim, keepdim=True)).all()  # zero-point rounded down, scale up: no code is clamped


@pytest.mark.parametrize("bits,axis", [(8, "token"), (8, "channel"), ("fp8", "token"), ("fp8", "channel"),
                                       (4, "token"), (4, "channel"), (2, "token"), (2, "channel")])
def test_block_layout_and_bound(bits, axis):
    B, H, N, D, G = 2, 3, 32, 64, 16
    x = sample(B, H, N, D, seed=3)
    q, scale, zero = quantize_block(x, bits, axis, G)
    payload = D * bits // 8 if bits in (4, 2) else D
    per_token_groups = D // G if bits in (4, 2) else 1
    meta = (B, H, N // G, D) if axis == "channel" else (B, H, N, per_token_groups)
    assert q.shape == (B, H, N, payload) and scale.shape == meta
    assert (zero is None) == (bits in (8, "fp8")) and (zero is None or zero.shape == meta)
    out = dequantize_block(q, scale, zero, bits, axis, G, D, torch.float64)
    # Expand the metadata back to one scale per element, as the layout says.
    if axis == "channel":
        s = scale.double().repeat_interleave(G, 2)
    else:
        s = scale.double().repeat_interleave(D // scale.shape[-1], 3)
    err = (x.double() - out).abs()
    if bits == "fp8":
        assert_within(err, (ratio(x.double().abs(), s) * 2 ** -4 + 2 ** -10) * s + slack(x.double()))
    else:
        assert_within(err, s / 2 + slack(x.double()))


def test_channel_keys_have_one_scale_per_channel():
    """KIVI keys: an outlier channel gets its own scale and does not spoil the others (per-token scales would)."""
    k = torch.randn(1, 1, 32, 64, generator=torch.Generator().manual_seed(0))
    k[..., 5] *= 100
    _, scale, _ = quantize_keys(k, 4, "channel", 32)
    assert scale.shape == (1, 1, 1, 64)
    assert scale[0, 0, 0, 5] > 20 * scale[0, 0, 0, :5].max()
    err_channel = (dequantize_block(*quantize_keys(k, 4, "channel", 32), 4, "channel", 32, 64, torch.float32) - k)
    err_token = (dequantize_block(*quantize_keys(k, 4, "token", 32), 4, "token", 32, 64, torch.float32) - k)
    assert err_channel[..., :5].abs().mean() < err_token[..., :5].abs().mean() / 5


@pytest.mark.parametrize("bits,k_granularity", [(8, "token"), ("fp8", "token"), (4, "channel"), (2, "channel"),
                                                (4, "token")])
def test_dequantize_older_first_n_tokens(bits, k_granularity):
    """dequantize_older reads the first n tokens of a store written group by group, as quantize_kv writes it."""
    B, H, D, G, n_groups = 2, 2, 32, 16, 3
    k, v = sample(B, H, G * n_groups, D, seed=4), sample(B, H, G * n_groups, D, seed=5)
    parts = {name: [] for name in ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")}
    for i in range(0, G * n_groups, G):  # one flush group at a time
        quantized = quantize_keys(k[:, :, i:i + G], bits, k_granularity, G) + quantize_values(v[:, :, i:i + G], bits, G)
        for name, t in zip(parts, quantized):
            parts[name].append(t)
    store = {name: None if ts[0] is None else torch.cat(ts, 2) for name, ts in parts.items()}
    n = 2 * G
    k_out, v_out = dequantize_older(**store, n=n, bits=bits, k_granularity=k_granularity, group_size=G, D=D,
                                  dtype=torch.float32)
    assert k_out.shape == v_out.shape == (B, H, n, D)
    k_ref = dequantize_block(*quantize_keys(k[:, :, :n], bits, k_granularity, G), bits, k_granularity, G, D,
                             torch.float32)
    v_ref = dequantize_block(*quantize_values(v[:, :, :n], bits, G), bits, "token", G, D, torch.float32)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
