"""quantize_kv: selective quantization. The first sink_size and the most recent window_size tokens stay in the model
dtype (a RingStore); older tokens are quantized into a QuantizedStore (the "mid" store) as they leave the window and
are dequantized on the fly inside attention. Layouts: kv_cache/stores.py; formats: kernels/formats.py.

  --bits 8    (default) symmetric int8, one scale per token and head.
  --bits fp8  float8 e4m3 payload, one scale per token and head.
  --bits 4/2  KIVI (Liu et al., 2024): asymmetric, keys per channel over groups of group_size tokens, values per
              token over groups of group_size channels, packed 2 or 4 per byte. The 16-bit window doubles as KIVI's
              residual: tokens leave it a whole group at a time, so the ring holds window_size + group_size slots
              and between window_size and window_size + group_size - 1 recent tokens stay 16-bit.
  --k_granularity token|channel: per-token keys (flushed one token at a time) or per-channel keys (flushed a
              group at a time). Default channel for 4/2 bits, token for 8/fp8; every combination works.

Choices made here:
  * --group_size (default 32) must divide head_dim when values are grouped by channels (4/2 bits): a ValueError
    names a divisor instead of silently using another group size (keys and values share the option).
  * With sink_size + window_size >= max_seq_length nothing ever leaves the window: the cache is then exactly the full
    cache (same outputs, max_seq_length 16-bit slots, no quantized store) and check_options prints a one-line notice.
  * Keys are quantized after RoPE at their absolute positions (as KIVI), so attention needs no re-rotation.
  * Scales and zero-points are float16, rounded outward so the quantization error bound holds (kernels/quantize.py).

Decode (one token per sequence, each at its own position) is static: the slot, the flush of a group that has just
left the window (written to the scratch group when none has) and the masks are tensor arithmetic on the positions.
A prefill chunk attends to what the cache held before it plus itself causally in full precision, then its old
tokens are quantized. With --attn_impl triton (the default on CUDA) one fused kernel reads the stores as they are
and the flush quantizes straight from the ring in Triton; prefill runs in PyTorch either way.
"""
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from kernels.formats import FORMATS, get_format
from kv_cache.base import KVCache, attend, option, register, rotate_qk
from kv_cache.compress_kv import SinkWindowOptions
from kv_cache.paging import PageSpace, round_up
from kv_cache.stores import QuantizedStore, RingStore, flush_size

K_GRANULARITIES = ("token", "channel")


@dataclass
class QuantizeOptions(SinkWindowOptions):
    bits: str = option("8", "8: int8 per token; 4, 2: KIVI asymmetric, packed; fp8: e4m3", choices=list(FORMATS))
    group_size: int = option(32, "KIVI group: tokens per key scale, channels per value scale")
    k_granularity: Optional[str] = option(None, "key scales per token or per channel (default: channel for 4/2 "
                                                "bits, else token)", choices=K_GRANULARITIES)

    def check(self, head_dim):
        super().check(head_dim)
        self.format = get_format(self.bits)
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"--group_size must be a whole number >= 1 (got {self.group_size})")
        self.k_granularity = self.k_granularity or self.format.default_k_granularity
        if self.k_granularity not in K_GRANULARITIES:
            raise ValueError(f"--k_granularity {self.k_granularity!r} is not supported: use token or channel")
        if self.format.asymmetric:
            if head_dim % self.format.per_byte:
                raise ValueError(f"head_dim {head_dim} cannot be packed {self.format.per_byte} codes per byte: use "
                                 "--bits 8")
            if head_dim % self.group_size:
                divisor = max(d for d in range(1, min(self.group_size, head_dim) + 1) if head_dim % d == 0)
                raise ValueError(f"--group_size {self.group_size} must divide head_dim {head_dim} (values are "
                                 f"grouped by channels): use e.g. --group_size {divisor}")
        self.flush_size = flush_size(self.group_size, self.k_granularity)

    def mid_capacity(self, max_seq_length: int) -> int:
        """Tokens the quantized store can hold: what does not fit in sinks + window, in whole flush groups."""
        return round_up(max(0, max_seq_length - self.sink_size - self.window_size), self.flush_size)

    def n_mid(self, length: int) -> int:
        """Tokens in the quantized store once a sequence holds `length` tokens: whole flush groups that have left
        sinks + window."""
        return max(0, length - self.sink_size - self.window_size) // self.flush_size * self.flush_size


@register
class QuantizeKVCache(KVCache):
    name = "quantize_kv"
    help = "sinks and window in the model dtype, older tokens int8 / KIVI int4, int2 / fp8"
    Options = QuantizeOptions

    @classmethod
    def check_options(cls, options, max_seq_length, head_dim, quiet=False):
        opts = super().check_options(options, max_seq_length, head_dim)
        if opts.sink_size + opts.window_size >= max_seq_length and not quiet:
            print(f"quantize_kv: sink_size + window_size >= max_seq_length ({max_seq_length}): nothing is quantized, "
                  "the cache behaves exactly as full", file=sys.stderr)
        return opts

    @classmethod
    def bytes_per_token(cls, options, n_kv_head, head_dim, dtype):
        """Bytes per token of the quantized store: payload plus scales/zero-points amortized over their groups."""
        opts = cls.Options.resolve(options, head_dim)
        return n_kv_head * QuantizedStore.bytes_per_token(opts.format, opts.group_size, opts.k_granularity, head_dim)

    @classmethod
    def page_space(cls, options, max_seq_length, block_size):
        """Paged: the quantized store, in blocks of block_size tokens rounded up to whole flush groups (KIVI's
        per-channel key groups never straddle a block), one more logical block for the scratch group. The 16-bit
        sinks and window stay per sequence. Everything in sinks + window (no quantized store): the ring, as full."""
        opts = cls.Options.resolve(options, None)
        capacity = opts.mid_capacity(max_seq_length)
        if not capacity:  # slot = position as in full, but the ring's slot positions are per sequence: not shared
            return dataclasses.replace(super().page_space(options, max_seq_length, block_size), sharable=False)
        block = math.lcm(block_size, opts.flush_size)
        capacity = round_up(capacity, block)
        return PageSpace(block, capacity + block, lambda n: min(opts.n_mid(n), capacity))

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options=None, pool=None,
                 **option_values):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options, pool,
                         **option_values)
        opts = self.opts
        self.sink_size, self.window_size, self.flush_size = opts.sink_size, opts.window_size, opts.flush_size
        self.quantize_into = None
        if self.attn_impl == "triton":
            from kernels.quantize_append import quantize_into, triton_quantize_supported
            # The decode flush quantizes in Triton too where its power-of-two tiles fit the layout.
            if triton_quantize_supported(head_dim, opts.group_size):
                self.quantize_into = quantize_into
        self.mid_size = opts.mid_capacity(max_seq_length)  # 0: everything fits in sinks + window, as full
        if self.mid_size:
            self.ring = RingStore(batch_size, n_kv_head, self.sink_size, self.window_size + self.flush_size, head_dim,
                                  dtype, device)
            self.mid = QuantizedStore(batch_size, n_kv_head, self.mid_size, head_dim, opts.format, opts.group_size,
                                      opts.k_granularity, device, pool)
            self.mid_size = self.mid.capacity  # paged: rounded up to whole blocks; the scratch group follows it
        else:  # slot = position, as the full cache
            self.ring = RingStore(batch_size, n_kv_head, 0, max_seq_length, head_dim, dtype, device, pool)
            self.mid = None

    def _hi_keep(self, ring_pos, n_mid):
        """16-bit slots holding a token that is not (yet) in the mid store."""
        S = self.sink_size
        return (ring_pos >= 0) & ((ring_pos < S) | (ring_pos >= S + n_mid))

    def forward(self, q, k, v, input_pos, rope_cos, rope_sin, rows=None):
        decode = self.is_decode(q, rows)
        rows, pos = self.rows_and_positions(q, input_pos, rows)
        q, k = rotate_qk(q, k, pos, rope_cos, rope_sin)
        if decode:
            return self._decode(q, k, v, pos, rows)
        return self._prefill(q, k, v, pos, rows)

    def _decode(self, q, k, v, pos, rows):
        R, S, W, F = q.shape[0], self.sink_size, self.window_size, self.flush_size
        ring = self.ring
        ring.write_positions(rows, pos, k, v)
        if self.mid is None:
            return self.attend_decode(q, ring, hi_last=pos[:, 0], hi_pos=ring.pos[:R])
        n_past = pos[:, 0] + 1 - S - W  # tokens of each sequence that have left sinks + window
        n_mid = n_past.clamp(min=0) // F * F
        # The group that completes now is the ring's oldest F tokens; when none completes, the (meaningless)
        # group is quantized into the scratch group so the step's work and shapes never change.
        arange = torch.arange(F, device=q.device)
        group_pos = pos + 1 - W - F + arange  # (R, F)
        completes = (n_past >= F) & (n_past % F == 0)
        start = torch.where(completes, group_pos[:, 0] - S, self.mid_size)  # (R,)
        group_slots = ring.slots(group_pos).clamp(min=0)
        if self.quantize_into is not None:
            # Straight from the (contiguous) ring into the mid store at `start`: no gathered copy, no host sync.
            self.quantize_into(ring.k[:R], ring.v[:R], group_slots, *self.mid.append_target(R, start))
        else:
            self.mid.store(rows, start[:, None] + arange, *ring.read(rows, group_slots))
        return self.attend_decode(q, ring, hi_pos=ring.pos[:R], sink_size=S, n_mid=n_mid, mid=self.mid)

    def _prefill(self, q, k, v, pos, rows):
        R, T, S = q.shape[0], q.shape[2], self.sink_size
        first = int(pos[0, 0])
        chunk_pos = pos[0]
        n_mid_before, n_mid_after = self.opts.n_mid(first), self.opts.n_mid(first + T)
        ring_k, ring_v = self.ring.logical(rows)
        # The chunk attends to what the cache held before it (quantized tokens dequantized) and to itself causally.
        keys, values = [ring_k], [ring_v]
        masks = [self._hi_keep(self.ring.pos[rows], n_mid_before)[:, None, None, :].expand(-1, 1, T, -1)]
        if n_mid_before:
            k_mid, v_mid = self.mid.dequantize(rows, n_mid_before, self.dtype)
            keys.append(k_mid)
            values.append(v_mid)
            masks.append(torch.ones(R, 1, T, n_mid_before, dtype=torch.bool, device=q.device))
        keys.append(k)
        values.append(v)
        masks.append(torch.ones(T, T, dtype=torch.bool, device=q.device).tril().expand(R, 1, T, T))
        out = attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(masks, dim=-1))
        if n_mid_after > n_mid_before:  # tokens that left the window: from the ring first, then from the chunk
            moved = torch.arange(S + n_mid_before, S + n_mid_after, device=q.device)
            ring_slots = self.ring.slots(moved[moved < first])
            chunk_idx = moved[moved >= first] - first
            self.mid.store(rows, (moved - S).expand(R, -1),
                           torch.cat([ring_k[:, :, ring_slots], k[:, :, chunk_idx]], dim=2),
                           torch.cat([ring_v[:, :, ring_slots], v[:, :, chunk_idx]], dim=2))
        idx = ((chunk_pos < S) | (chunk_pos >= S + n_mid_after)).nonzero().squeeze(1)
        self.ring.write_positions(rows, pos[:, idx], k[:, :, idx], v[:, :, idx])
        return out
