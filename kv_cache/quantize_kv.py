"""quantize_kv: selective quantization. The first sink_size and the most recent window_size tokens stay in the model
dtype (the "hi" store, a ring); older tokens are quantized into the "mid" store as they leave the window and are
dequantized on the fly inside attention. Layouts: notes/cache_spec.md.

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

Decode (one token) is static: the slot, the flush of a group that has just left the window (written to a scratch
group when none has) and the masks are tensor arithmetic on input_pos. A prefill chunk attends to what the cache held
before it plus itself causally in full precision, then its old tokens are quantized. Decode attention is
`_attend_decode` (--attn_impl torch: dequantize, then attend) or `_attend_decode_triton` (--attn_impl triton, the
default on CUDA: one fused kernel reads the stores as they are, and the flush quantizes straight from the ring in
Triton); prefill is `_prefill`, in PyTorch either way.
"""
import sys

import torch
from torch import Tensor

from kernels.quantize import dequantize_mid, quantize_keys, quantize_values
from kv_cache.base import KVCache, add_attn_impl_argument, attend, attn_impl_for, register
from kv_cache.compress_kv import add_sink_window_arguments, sink_window
from model import apply_rope

BITS = {"8": 8, "4": 4, "2": 2, "fp8": "fp8"}
GROUP_SIZE = 32


def quant_config(options: dict, head_dim: int) -> dict:
    """The options resolved (defaults filled in) and checked, or a one-line ValueError."""
    sink_size, window_size = sink_window(options)
    bits_name = str(options.get("bits", "8"))
    if bits_name not in BITS:
        raise ValueError(f"--bits {bits_name} is not supported: use 8, 4, 2 or fp8")
    bits = BITS[bits_name]
    group_size = options.get("group_size", GROUP_SIZE)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"--group_size must be a whole number >= 1 (got {group_size})")
    k_granularity = options.get("k_granularity") or ("channel" if bits in (4, 2) else "token")
    if k_granularity not in ("token", "channel"):
        raise ValueError(f"--k_granularity {k_granularity!r} is not supported: use token or channel")
    if bits in (4, 2):
        if head_dim % (8 // bits):
            raise ValueError(f"head_dim {head_dim} cannot be packed {8 // bits} codes per byte: use --bits 8")
        if head_dim % group_size:
            divisor = max(d for d in range(1, min(group_size, head_dim) + 1) if head_dim % d == 0)
            raise ValueError(f"--group_size {group_size} must divide head_dim {head_dim} (values are grouped by "
                             f"channels): use e.g. --group_size {divisor}")
    attn_impl_for(options)  # checks the name; the default depends on the device (resolved in __init__)
    flush_size = group_size if k_granularity == "channel" else 1
    return dict(sink_size=sink_size, window_size=window_size, bits=bits, group_size=group_size,
                k_granularity=k_granularity, flush_size=flush_size)


def mid_capacity(cfg: dict, max_seq_length: int) -> int:
    """Tokens the quantized store can hold: what does not fit in sinks + window, in whole flush groups."""
    S, W, F = cfg["sink_size"], cfg["window_size"], cfg["flush_size"]
    return -(-max(0, max_seq_length - S - W) // F) * F


def mid_layout(cfg: dict, n_tokens: int, head_dim: int) -> dict:
    """name -> (shape after (B, H), dtype) of every mid-store buffer holding n_tokens tokens."""
    bits, G, D = cfg["bits"], cfg["group_size"], head_dim
    payload_dtype = {8: torch.int8, "fp8": torch.float8_e4m3fn}.get(bits, torch.uint8)
    payload = (n_tokens, D if bits in (8, "fp8") else D * bits // 8)
    channel_groups = 1 if bits in (8, "fp8") else D // G  # per-token scales: per head, or per group_size channels
    k_meta = (n_tokens // G, D) if cfg["k_granularity"] == "channel" else (n_tokens, channel_groups)
    v_meta = (n_tokens, channel_groups)
    layout = {"k_q": (payload, payload_dtype), "k_scale": (k_meta, torch.float16),
              "v_q": (payload, payload_dtype), "v_scale": (v_meta, torch.float16)}
    if bits in (4, 2):
        layout.update(k_zero=(k_meta, torch.float16), v_zero=(v_meta, torch.float16))
    return layout


def _raw(payload: Tensor) -> Tensor:
    """fp8 payloads are copied as bytes: index_copy_ has no float8 implementation on some devices."""
    return payload.view(torch.uint8) if payload.dtype == torch.float8_e4m3fn else payload


@register
class QuantizeKVCache(KVCache):
    name = "quantize_kv"
    help = "sinks and window in the model dtype, older tokens int8 / KIVI int4, int2 / fp8"

    @classmethod
    def add_arguments(cls, parser):
        add_sink_window_arguments(parser)
        parser.add_argument("--bits", choices=list(BITS), default="8",
                            help="8: int8 per token (default); 4, 2: KIVI asymmetric, packed; fp8: e4m3")
        parser.add_argument("--group_size", type=int, default=GROUP_SIZE,
                            help=f"KIVI group: tokens per key scale, channels per value scale (default {GROUP_SIZE})")
        parser.add_argument("--k_granularity", choices=["token", "channel"], default=None,
                            help="key scales per token or per channel (default: channel for 4/2 bits, else token)")
        add_attn_impl_argument(parser)

    @classmethod
    def check_options(cls, options, max_seq_length, head_dim):
        cfg = quant_config(options, head_dim)
        if cfg["sink_size"] + cfg["window_size"] >= max_seq_length:
            print(f"quantize_kv: sink_size + window_size >= max_seq_length ({max_seq_length}): nothing is quantized, "
                  "the cache behaves exactly as full", file=sys.stderr)

    @classmethod
    def bytes_per_token(cls, options, n_kv_head, head_dim, dtype):
        """Bytes per token of the quantized store: payload plus scales/zero-points amortized over their groups."""
        cfg = quant_config(options, head_dim)
        F = cfg["flush_size"]
        n_bytes = 0
        for shape, buf_dtype in mid_layout(cfg, F, head_dim).values():
            n_bytes += torch.Size(shape).numel() * buf_dtype.itemsize
        return n_kv_head * n_bytes / F

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, **options):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device)
        cfg = quant_config(options, head_dim)
        self.sink_size, self.window_size, self.flush_size = cfg["sink_size"], cfg["window_size"], cfg["flush_size"]
        self.bits, self.group_size, self.k_granularity = cfg["bits"], cfg["group_size"], cfg["k_granularity"]
        self.use_attn_impl(options, device)
        if self.attn_impl == "triton":
            from kernels.quantize_append import quantize_into, triton_quantize_supported
            # The decode flush quantizes in Triton too where its power-of-two tiles fit the layout.
            self.quantize_into = quantize_into if triton_quantize_supported(head_dim, self.group_size) else None
        self.ring_size = self.window_size + self.flush_size
        self.mid_size = mid_capacity(cfg, max_seq_length)  # 0: everything fits in sinks + window, as full
        n_hi = self.sink_size + self.ring_size if self.mid_size else max_seq_length
        hi_shape = (batch_size, n_kv_head, n_hi, head_dim)
        self.register_buffer("hi_k", torch.zeros(hi_shape, dtype=dtype, device=device))
        self.register_buffer("hi_v", torch.zeros(hi_shape, dtype=dtype, device=device))
        self.register_buffer("hi_pos", torch.full((n_hi,), -1, dtype=torch.long, device=device))  # -1: empty
        self.register_buffer("k_zero", None)  # zero-points exist for the asymmetric 4/2-bit formats only
        self.register_buffer("v_zero", None)
        if self.mid_size:
            # One scratch flush group past the end: the static decode step writes there when no group completes.
            for name, (shape, buf_dtype) in mid_layout(cfg, self.mid_size + self.flush_size, head_dim).items():
                self.register_buffer(name, torch.zeros((batch_size, n_kv_head, *shape), dtype=buf_dtype, device=device))

    def reset(self):
        super().reset()
        self.hi_pos.fill_(-1)

    def _slots(self, pos: Tensor) -> Tensor:
        S = self.sink_size
        return torch.where(pos < S, pos, S + (pos - S) % self.ring_size)

    def _n_mid(self, last_pos: int) -> int:
        """Tokens in the mid store once positions up to last_pos are stored (host arithmetic, for prefill)."""
        F = self.flush_size
        return max(0, last_pos + 1 - self.sink_size - self.window_size) // F * F

    def _store_mid(self, B: int, tokens: Tensor, k: Tensor, v: Tensor):
        """Quantize k, v (B, H, N, D) (N a multiple of the flush group) into mid-store tokens `tokens` (N,)."""
        k_q, k_scale, k_zero = quantize_keys(k, self.bits, self.k_granularity, self.group_size)
        v_q, v_scale, v_zero = quantize_values(v, self.bits, self.group_size)
        k_rows = tokens[::self.flush_size] // self.flush_size if self.k_granularity == "channel" else tokens
        _raw(self.k_q[:B]).index_copy_(2, tokens, _raw(k_q))
        self.k_scale[:B].index_copy_(2, k_rows, k_scale)
        _raw(self.v_q[:B]).index_copy_(2, tokens, _raw(v_q))
        self.v_scale[:B].index_copy_(2, tokens, v_scale)
        if k_zero is not None:
            self.k_zero[:B].index_copy_(2, k_rows, k_zero)
            self.v_zero[:B].index_copy_(2, tokens, v_zero)

    def _dequantize(self, B: int, n: int) -> tuple[Tensor, Tensor]:
        k_zero = None if self.k_zero is None else self.k_zero[:B]
        v_zero = None if self.v_zero is None else self.v_zero[:B]
        return dequantize_mid(self.k_q[:B], self.k_scale[:B], k_zero, self.v_q[:B], self.v_scale[:B], v_zero,
                              n, self.bits, self.k_granularity, self.group_size, self.head_dim, self.dtype)

    def _hi_keep(self, n_mid) -> Tensor:
        """16-bit slots holding a token that is not (yet) in the mid store."""
        pos = self.hi_pos
        return (pos >= 0) & ((pos < self.sink_size) | (pos >= self.sink_size + n_mid))

    def forward(self, q, k, v, input_pos: Tensor, rope_cos, rope_sin):
        cos, sin = rope_cos[input_pos], rope_sin[input_pos]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q.shape[2] == 1:
            return self._decode(q, k, v, input_pos)
        return self._prefill(q, k, v, input_pos)

    def _decode(self, q, k, v, input_pos):
        B, S, W, F = q.shape[0], self.sink_size, self.window_size, self.flush_size
        slot = self._slots(input_pos)
        self.hi_k[:B].index_copy_(2, slot, k)
        self.hi_v[:B].index_copy_(2, slot, v)
        self.hi_pos.index_copy_(0, slot, input_pos)
        n_mid = torch.zeros_like(input_pos)
        if self.mid_size:
            n_past = input_pos + 1 - S - W  # tokens that have left sinks + window
            n_mid = n_past.clamp(min=0) // F * F
            # The group that completes now is the ring's oldest F tokens; when none completes, the (meaningless)
            # group is quantized into the scratch group so the step's work and shapes never change.
            arange = torch.arange(F, device=q.device)
            group_pos = input_pos + 1 - W - F + arange
            completes = (n_past >= F) & (n_past % F == 0)
            start = torch.where(completes, group_pos[:1] - S, self.mid_size)
            group_slots = self._slots(group_pos).clamp(min=0)
            if self.attn_impl == "triton" and self.quantize_into is not None:
                # Straight from the ring into the mid store at `start`: no gathered copy, no host sync.
                self.quantize_into(self.hi_k[:B], self.hi_v[:B], group_slots, start, *self._mid_store(B))
            else:
                self._store_mid(B, start + arange, self.hi_k[:B].index_select(2, group_slots),
                                self.hi_v[:B].index_select(2, group_slots))
        if self.attn_impl == "triton":
            return self._attend_decode_triton(q, n_mid, input_pos)
        return self._attend_decode(q, self._hi_keep(n_mid), n_mid)

    def _mid_store(self, B: int) -> tuple:
        """(k_q, k_scale, k_zero, v_q, v_scale, v_zero) of the first B sequences; zero-points None when symmetric."""
        return tuple(None if t is None else t[:B]
                     for t in (self.k_q, self.k_scale, self.k_zero, self.v_q, self.v_scale, self.v_zero))

    def _attend_decode_triton(self, q, n_mid: Tensor, input_pos: Tensor) -> Tensor:
        """The fused kernel: reads the hi slots and the first n_mid quantized tokens as stored, dequantizing tiles in
        registers (kernels/decode_attention.py)."""
        B = q.shape[0]
        if not self.mid_size:  # everything fits in the hi store, filled in position order
            return self.decode_attention(q, self.hi_k[:B], self.hi_v[:B], hi_last=input_pos, hi_pos=self.hi_pos)
        k_q, k_scale, k_zero, v_q, v_scale, v_zero = self._mid_store(B)
        return self.decode_attention(q, self.hi_k[:B], self.hi_v[:B], hi_pos=self.hi_pos, sink_size=self.sink_size,
                                     n_mid=n_mid, k_q=k_q, k_scale=k_scale, k_zero=k_zero, v_q=v_q,
                                     v_scale=v_scale, v_zero=v_zero)

    def _attend_decode(self, q, hi_keep: Tensor, n_mid: Tensor) -> Tensor:
        """Attention of the decode query q (B, n_head, 1, D), rotated, over the hi slots in hi_keep (n_hi,) and the
        first n_mid (1,) tokens of the mid store. torch: dequantize the whole store, mask, attend."""
        B = q.shape[0]
        if not self.mid_size:
            return attend(q, self.hi_k[:B], self.hi_v[:B], hi_keep[None])
        k_mid, v_mid = self._dequantize(B, self.mid_size)
        mid_keep = torch.arange(self.mid_size, device=q.device) < n_mid
        return attend(q, torch.cat([self.hi_k[:B], k_mid], dim=2), torch.cat([self.hi_v[:B], v_mid], dim=2),
                      torch.cat([hi_keep, mid_keep])[None])

    def _prefill(self, q, k, v, input_pos):
        B, T, S = q.shape[0], q.shape[2], self.sink_size
        first = int(input_pos[0])
        n_mid_before, n_mid_after = self._n_mid(first - 1), self._n_mid(first + T - 1)
        # The chunk attends to what the cache held before it (quantized tokens dequantized) and to itself causally.
        keys, values = [self.hi_k[:B]], [self.hi_v[:B]]
        masks = [self._hi_keep(n_mid_before).expand(T, -1)]
        if n_mid_before:
            k_mid, v_mid = self._dequantize(B, n_mid_before)
            keys.append(k_mid)
            values.append(v_mid)
            masks.append(torch.ones(T, n_mid_before, dtype=torch.bool, device=q.device))
        keys.append(k)
        values.append(v)
        masks.append(torch.ones(T, T, dtype=torch.bool, device=q.device).tril())
        out = attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(masks, dim=1))
        if n_mid_after > n_mid_before:  # tokens that left the window: from the ring first, then from the chunk
            pos = torch.arange(S + n_mid_before, S + n_mid_after, device=q.device)
            ring_slots = self._slots(pos[pos < first])
            chunk_idx = pos[pos >= first] - first
            self._store_mid(B, pos - S,
                            torch.cat([self.hi_k[:B].index_select(2, ring_slots), k[:, :, chunk_idx]], dim=2),
                            torch.cat([self.hi_v[:B].index_select(2, ring_slots), v[:, :, chunk_idx]], dim=2))
        idx = ((input_pos < S) | (input_pos >= S + n_mid_after)).nonzero().squeeze(1)
        pos = input_pos[idx]
        slot = self._slots(pos)
        self.hi_k[:B].index_copy_(2, slot, k[:, :, idx])
        self.hi_v[:B].index_copy_(2, slot, v[:, :, idx])
        self.hi_pos.index_copy_(0, slot, pos)
        return out
