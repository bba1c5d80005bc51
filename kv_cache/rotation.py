"""--rotate: an orthogonal transform of every head's keys (and values: --rotate_parts) before they are stored (QuaRot,
Ashkboos et al., 2024; llama.cpp rotates K and V before quantizing them). A few channels of a key carry most of its
magnitude (outlier channels), and a low-bit format spends its range on them; a Hadamard rotation spreads every channel
over all the others, so the codes of one token share one scale far better.

Attention is exact under any orthogonal R (in exact arithmetic): q.k = (qR).(kR), so a cache that rotates q and k as
they arrive (after RoPE) stores, quantizes and attends over rotated keys only: the stores, the Triton kernel, the C
kernel, paging and the eviction policies' scores (attention probabilities, unchanged) need nothing new. Values may be
rotated the same way, sum p (vR) = (sum p v) R, with the output un-rotated once per head by R^T (--rotate_parts
keys_values); by default (auto) they are where keys are quantized per token, and not where per channel, as measured
(applied_parts). The 16-bit sinks and window are rotated too (one rounding in the model dtype, as storing them
unrotated), so every key a query meets is in one basis.

  hadamard         R = H / sqrt(D), Sylvester's Hadamard matrix (entries +-1), D a power of two.
  signed_hadamard  R = diag(s) H / sqrt(D) with a fixed pseudo-random sign per channel (seed 0; QuaRot's
                   randomized Hadamard): a channel pattern that happens to line up with H's rows is broken up too.
The transform runs as a D x D matmul in float32 (float64 for float64 models): at D = 64 or 128 that is faster in
PyTorch than the O(D log D) butterfly, which pays only in a dedicated kernel.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from kv_cache.base import CacheOptions, option

ROTATIONS = ("auto", "none", "hadamard", "signed_hadamard")
ROTATE_PARTS = ("auto", "keys", "keys_values")


@dataclass
class RotateOptions(CacheOptions):
    """The --rotate option of the strategies that quantize (quantize_kv, the eviction stores' --then_bits)."""
    rotate: str = option("auto", "rotate each head's keys (--rotate_parts) before storing them (hadamard, or "
                                 "signed_hadamard with a fixed random sign per channel): low-bit codes lose less; "
                                 "auto: hadamard for the 4- and 2-bit formats where head_dim is a power of two, "
                                 "else none", choices=list(ROTATIONS))
    rotate_parts: str = option("auto", "what --rotate rotates: keys (with the queries), or keys_values (values "
                                       "too, the attention output rotated back); auto: keys where keys are quantized "
                                       "per channel (quantize_kv's 4/2-bit default), keys_values where per token "
                                       "(the eviction stores), as measured best on SmolLM2 int2",
                               choices=list(ROTATE_PARTS))

    def check(self, head_dim):
        super().check(head_dim)  # the choices of --rotate and --rotate_parts (CacheOptions.check)
        if self.rotate == "none" and self.rotate_parts != "auto":
            raise ValueError(f"--rotate_parts {self.rotate_parts} names what --rotate rotates, and --rotate none "
                             "rotates nothing: drop --rotate_parts, or use --rotate hadamard")
        if self.rotates() and head_dim is not None and not power_of_two(head_dim):
            raise ValueError(f"--rotate {self.rotate} needs a power-of-two head_dim (Sylvester's Hadamard matrix; "
                             f"this model's is {head_dim}): use --rotate none")

    def rotates(self) -> bool:
        """A rotation was asked for by name (auto decides per format: applied_rotation)."""
        return self.rotate not in ("auto", "none")

    def applied_parts(self, k_granularity: str) -> str:
        """What a store whose keys are quantized per k_granularity ("channel" or "token") rotates: --rotate_parts as
        given, or for auto keys only with per-channel keys and keys and values with per-token ones. Measured on
        SmolLM2 int2 (docs/results.md, "Which parts to rotate"): per-channel keys (quantize_kv) lose less with the
        values left alone (RULER 86.7 against 70.0, streamed perplexity +2.8 % against +3.0 %), per-token keys (the
        eviction stores' kept tokens) with the values rotated too (perplexity 28.30 against 28.90)."""
        if self.rotate_parts != "auto":
            return self.rotate_parts
        return "keys" if k_granularity == "channel" else "keys_values"

    def applied_rotation(self, fmt, head_dim: int) -> str:
        """The rotation a store in format fmt (None: the model dtype) gets: --rotate as given, or for auto hadamard
        for the 4- and 2-bit formats with a power-of-two head_dim (measured on int2: the logits' KL to full's 2.6x
        lower, streamed perplexity +6.2 % -> +2.8 % with the keys rotated; docs/results.md, "Rotated low-bit storage"
        and "Which parts to rotate"), none for the rest (int8 and fp8 lose next to nothing, and the model dtype
        nothing, to rounding)."""
        if self.rotate != "auto":
            return self.rotate
        low_bits = fmt is not None and fmt.per_byte > 1
        return "hadamard" if low_bits and power_of_two(head_dim) else "none"


def power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def hadamard(n: int, dtype=torch.float64) -> Tensor:
    """Sylvester's n x n Hadamard matrix (n a power of two), entries +-1: H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_matrix(rotate: str, head_dim: int, dtype, device) -> Tensor:
    """The orthogonal R (head_dim x head_dim) of --rotate (not "none"), in float32 or float64 (the model's, if
    wider): x is stored as x @ R."""
    r = hadamard(head_dim) / head_dim ** 0.5
    if rotate == "signed_hadamard":
        signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(0)) * 2 - 1
        r = signs[:, None].double() * r
    return r.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def register_rotation(cache, rotation: str, parts: str, head_dim: int, dtype, device):
    """Give a cache the matrix of `rotation` (as applied: applied_rotation) as its buffer `rotation` (not KV
    storage: KVCache.nbytes leaves it out; not saved), and the flags its forward reads: cache.rotate (q and k are
    rotated) and cache.rotate_values (v too, the output rotated back; --rotate_parts keys_values)."""
    cache.rotate = rotation != "none"
    cache.rotate_values = cache.rotate and parts == "keys_values"
    if cache.rotate:
        cache.register_buffer("rotation", rotation_matrix(rotation, head_dim, dtype, device), persistent=False)


def rotate_in(cache, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v as a cache with register_rotation's flags stores and attends them: q and k rotated, and v where
    cache.rotate_values (--rotate_parts keys_values); the attention output then goes through rotate_out."""
    if not cache.rotate:
        return q, k, v
    if cache.rotate_values:
        return rotated_together((q, k, v), cache.rotation)
    return (*rotated_together((q, k), cache.rotation), v)


def rotate_out(cache, out: Tensor) -> Tensor:
    """The attention output of rotate_in's tokens in the model's basis: rotated values' output rotated back."""
    return rotated(out, cache.rotation, inverse=True) if cache.rotate_values else out


def rotated(x: Tensor, r: Tensor, inverse: bool = False) -> Tensor:
    """x (..., D) @ r (inverse: @ r.T), computed in r's precision and returned in x's dtype, as one batched product
    of 1 x D rows: every row goes through the same (1 x D) @ (D x D) product whatever rows are beside it, so a row's
    result never depends on the batch (one (N x D) @ (D x D) matmul's blocking, and so its rounding, may change with
    N: batched decoding must equal one sequence alone). One op: at decode's few rows ~8x faster on the CPU than the
    log2(D) stages of a Walsh-Hadamard butterfly in PyTorch ops
    (outputs/results/cpu_speed_2026-12-04/rotation_micro.txt)."""
    return _row_products(x.reshape(-1, 1, x.shape[-1]), r.T if inverse else r).reshape(x.shape).to(x.dtype)


def rotated_together(parts: tuple[Tensor, ...], r: Tensor) -> tuple[Tensor, ...]:
    """rotated() of each of parts (same dtype, e.g. q, k, v) in one product: a decode step's rotation is a few
    hundred rows, so what it costs is ops, not arithmetic (each row's result is the one rotated() gives it)."""
    D = parts[0].shape[-1]
    out = _row_products(torch.cat([x.reshape(-1, 1, D) for x in parts]), r).to(parts[0].dtype)
    return tuple(y.reshape(x.shape) for y, x in zip(out.split([x.numel() // D for x in parts]), parts))


def _row_products(rows: Tensor, m: Tensor) -> Tensor:
    """rows (N, 1, D) @ m (D, D), each row its own product, in m's precision."""
    return torch.bmm(rows.to(m.dtype), m.expand(rows.shape[0], *m.shape))
