"""The stores the strategies keep tokens in, and their layouts (every buffer: shape, dtype, what each slot holds).

A store is allocated once (static shapes, written in place, so a decode step compiles to one graph and replays as
a CUDA graph) and keeps everything per sequence in its first dimension: sequences of one batch have their own
lengths and ring positions, and one sequence can be reset alone. B = batch, H = KV heads, D = head_dim.

DenseStore (full)
  k, v     (B, H, N, D) model dtype. Slot n of sequence b holds its position n.

RingStore (compress_kv, quantize_kv's 16-bit part)
  k, v     (B, H, S + R, D) model dtype. Slots 0 .. S-1 hold positions 0 .. S-1 (the attention sinks); position
           p >= S goes to slot S + (p - S) % R, a ring of R slots that the newest token overwrites.
  pos      (B, S + R) int64: the position each slot of each sequence holds, -1 while empty.
  compress_kv: R = window_size. quantize_kv: R = window_size + flush group (below), because tokens leave the window
  a whole group at a time.

QuantizedStore (quantize_kv's "mid" store: the tokens that left the window, in a format of kernels/formats.py)
  Token t of sequence b is position S + t; the first n_mid(b) tokens are valid, n_mid a whole number of flush groups
  (F = group_size tokens when keys are per channel, else 1). Capacity M tokens plus one scratch flush group past
  the end, which the static decode step writes when no group completes (so its work and shapes never change).
  k_q, v_q           (B, H, M + F, D // per_byte): int8, float8_e4m3fn, or uint8 with 2 (4-bit) / 4 (2-bit) codes
                     a byte.
  k_scale (k_zero)   per-channel keys: (B, H, (M + F) / F, D), row t // F for token t;
                     per-token keys: (B, H, M + F, C), C = 1 (int8, fp8) or D / group_size (4/2-bit).
  v_scale (v_zero)   (B, H, M + F, C) per token.
  float16; zero-points only for the asymmetric formats. x = q * scale (+ zero).
"""
import torch
import torch.nn as nn
from torch import Tensor

from kernels.formats import Format
from kernels.quantize import dequantize_mid, quantize_keys, quantize_values


def write_rows(buf: Tensor, rows, slots: Tensor, x: Tensor):
    """buf[rows][i, :, slots[i, t]] = x[i, :, t] for x (R, H, T, ...): each sequence writes its own slots. rows: a
    slice (the first R sequences: the static decode step, one scatter) or an index tensor (prefill into chosen
    sequences)."""
    if buf.dtype == torch.float8_e4m3fn:  # no float8 scatter / index_put on some devices: copy the bytes
        buf, x = buf.view(torch.uint8), x.view(torch.uint8)
    if isinstance(rows, slice):
        buf[rows].scatter_(2, slot_index(slots, x.shape), x)
    else:
        buf[rows[:, None], :, slots] = x.transpose(1, 2)


def slot_index(slots: Tensor, shape) -> Tensor:
    """slots (R, T) as the scatter/gather index of a (R, H, T, D) tensor (a view: no copy)."""
    return slots.view(shape[0], 1, shape[2], 1).expand(shape)


def read_rows(buf: Tensor, rows, slots: Tensor) -> Tensor:
    """buf[rows][i, :, slots[i, t]] as (R, H, T, ...); rows as in write_rows."""
    if isinstance(rows, slice):
        part = buf[rows]
        return part.gather(2, slot_index(slots, (part.shape[0], part.shape[1], slots.shape[1], part.shape[3])))
    return buf[rows[:, None], :, slots].transpose(1, 2)


def ring_slots(pos: Tensor, sink_size: int, ring_size: int) -> Tensor:
    """The RingStore slot of each position: sinks in place, later positions round the ring."""
    return torch.where(pos < sink_size, pos, sink_size + (pos - sink_size) % ring_size)


class DenseStore(nn.Module):
    def __init__(self, batch_size, n_kv_head, n_slots, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, n_slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))

    def write(self, rows, slots: Tensor, k: Tensor, v: Tensor):
        write_rows(self.k, rows, slots, k)
        write_rows(self.v, rows, slots, v)

    def reset(self, rows: Tensor):
        self.k[rows] = 0
        self.v[rows] = 0


class RingStore(DenseStore):
    def __init__(self, batch_size, n_kv_head, sink_size, ring_size, head_dim, dtype, device):
        super().__init__(batch_size, n_kv_head, sink_size + ring_size, head_dim, dtype, device)
        self.sink_size, self.ring_size = sink_size, ring_size
        self.register_buffer("pos", torch.full((batch_size, sink_size + ring_size), -1, dtype=torch.long,
                                               device=device))

    def slots(self, pos: Tensor) -> Tensor:
        return ring_slots(pos, self.sink_size, self.ring_size)

    def write_positions(self, rows, pos: Tensor, k: Tensor, v: Tensor):
        """Store k, v (R, H, T, D) of positions pos (R, T) of sequences `rows` (a slice or an index tensor, as in
        write_rows; no two positions of one row in one slot)."""
        slots = self.slots(pos)
        self.write(rows, slots, k, v)
        if isinstance(rows, slice):
            self.pos[rows].scatter_(1, slots, pos)
        else:
            self.pos[rows[:, None], slots] = pos

    def reset(self, rows: Tensor):
        super().reset(rows)
        self.pos[rows] = -1


def flush_size(group_size: int, k_granularity: str) -> int:
    """Tokens that leave the window together: a key group when keys are scaled per channel, else one token."""
    return group_size if k_granularity == "channel" else 1


class QuantizedStore(nn.Module):
    def __init__(self, batch_size, n_kv_head, capacity, head_dim, fmt: Format, group_size, k_granularity, device):
        super().__init__()
        self.fmt, self.group_size, self.k_granularity, self.head_dim = fmt, group_size, k_granularity, head_dim
        self.flush_size = flush_size(group_size, k_granularity)
        self.capacity = capacity
        for name, (shape, dtype) in self.layout(fmt, group_size, k_granularity, capacity + self.flush_size,
                                                head_dim).items():
            self.register_buffer(name, torch.zeros((batch_size, n_kv_head, *shape), dtype=dtype, device=device))
        if not fmt.asymmetric:
            self.register_buffer("k_zero", None)
            self.register_buffer("v_zero", None)

    @staticmethod
    def layout(fmt: Format, group_size: int, k_granularity: str, n_tokens: int, head_dim: int) -> dict:
        """name -> (shape after (B, H), dtype) of every buffer holding n_tokens tokens (the layout above)."""
        D = head_dim
        payload = ((n_tokens, D // fmt.per_byte), fmt.payload_dtype)
        channel_groups = D // fmt.channel_group(D, group_size)
        k_meta = (n_tokens // group_size, D) if k_granularity == "channel" else (n_tokens, channel_groups)
        v_meta = (n_tokens, channel_groups)
        layout = {"k_q": payload, "k_scale": (k_meta, torch.float16), "v_q": payload, "v_scale": (v_meta, torch.float16)}
        if fmt.asymmetric:
            layout.update(k_zero=(k_meta, torch.float16), v_zero=(v_meta, torch.float16))
        return layout

    @classmethod
    def bytes_per_token(cls, fmt: Format, group_size: int, k_granularity: str, head_dim: int) -> float:
        """Bytes of one stored token in one KV head: payload plus scales/zero-points amortized over their groups."""
        flush = flush_size(group_size, k_granularity)
        layout = cls.layout(fmt, group_size, k_granularity, flush, head_dim)
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in layout.values()) / flush

    def buffers_of(self, rows) -> tuple:
        """(k_q, k_scale, k_zero, v_q, v_scale, v_zero) of sequences `rows` (a count: the first ones, as views; a
        slice or an index tensor); zero-points None when symmetric."""
        rows = slice(0, rows) if isinstance(rows, int) else rows
        return tuple(None if t is None else t[rows]
                     for t in (self.k_q, self.k_scale, self.k_zero, self.v_q, self.v_scale, self.v_zero))

    def store(self, rows, tokens: Tensor, k: Tensor, v: Tensor):
        """Quantize k, v (R, H, N, D) into mid tokens tokens (R, N) of sequences `rows` (a slice or an index tensor);
        each row's tokens are whole flush groups in order."""
        k_q, k_scale, k_zero = quantize_keys(k, self.fmt, self.k_granularity, self.group_size)
        v_q, v_scale, v_zero = quantize_values(v, self.fmt, self.group_size)
        k_rows = tokens[:, ::self.flush_size] // self.flush_size if self.k_granularity == "channel" else tokens
        write_rows(self.k_q, rows, tokens, k_q)
        write_rows(self.k_scale, rows, k_rows, k_scale)
        write_rows(self.v_q, rows, tokens, v_q)
        write_rows(self.v_scale, rows, tokens, v_scale)
        if k_zero is not None:
            write_rows(self.k_zero, rows, k_rows, k_zero)
            write_rows(self.v_zero, rows, tokens, v_zero)

    def dequantize(self, rows, n: int, dtype) -> tuple[Tensor, Tensor]:
        """Keys and values (R, H, n, D) in `dtype` of the first n tokens of sequences `rows`."""
        return dequantize_mid(*self.buffers_of(rows), n, self.fmt, self.k_granularity, self.group_size, self.head_dim, dtype)

    def reset(self, rows: Tensor):
        for buf in self.buffers():
            buf[rows] = 0
