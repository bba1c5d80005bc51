"""The stores the strategies keep tokens in, and their layouts (every buffer: shape, dtype, what each slot holds).

A store is allocated once (static shapes, written in place, so a decode step compiles to one graph and replays as
a CUDA graph) and keeps everything per sequence in its first dimension: sequences of one batch have their own
lengths and ring positions, and one sequence can be reset alone. B = batch, H = KV heads, D = head_dim.

A cache attends over at most two stores (KVCache.attend_decode), named by what they hold: its recent store, the
tokens it keeps as they are in the model dtype (full's DenseStore: every token; a RingStore: sinks and window), and
its older store, the tokens past sinks and window it still holds (quantize_kv's QuantizedStore; under eviction a
DenseOlderStore or a QuantizedStore). The fused kernel calls them its "recent" and "older" stores.

DenseStore (full)
  k, v     (B, H, N, D) model dtype. Slot n of sequence b holds its position n.

RingStore (the recent store of compress_kv, quantize_kv and the eviction policies)
  k, v     (B, H, S + R, D) model dtype. Slots 0 .. S-1 hold positions 0 .. S-1 (the attention sinks); position
           p >= S goes to slot S + (p - S) % R, a ring of R slots that the newest token overwrites.
  pos      (B, S + R) int64: the position each slot of each sequence holds, -1 while empty.
  compress_kv: R = window_size. quantize_kv: R = window_size + flush group (below), because tokens leave the window
  a whole group at a time.

QuantizedStore (quantize_kv's older store: the tokens that left the window, in a format of kernels/formats.py)
  Token t of sequence b is position S + t; the first n_older(b) tokens are valid, a whole number of flush groups
  (F = group_size tokens when keys are per channel, else 1). Capacity M tokens plus one scratch flush group past
  the end, which the static decode step writes when no group completes (so its work and shapes never change).
  k_q, v_q           (B, H, M + F, D // per_byte): int8, float8_e4m3fn, or uint8 with 2 (4-bit) / 4 (2-bit) codes
                     a byte (their order: kernels/formats.py).
  k_scale (k_zero)   per-channel keys: (B, H, (M + F) / F, D), row t // F for token t;
                     per-token keys: (B, H, M + F, C), C = 1 (int8, fp8) or D / group_size (4/2-bit).
  v_scale (v_zero)   (B, H, M + F, C) per token.
  float16; zero-points only for the asymmetric formats. x = q * scale (+ zero).

PlaneStore (the eviction policies' older store with --fine_share: mixed precision by score)
  A QuantizedStore of the 2-bit format with per-token keys whose codes are the high halves of 4-bit codes
  (kernels/quantize.py quantize_planes): k_q, v_q hold each token's high 2-bit plane, the scales and zero-points
  are the 4-bit code's. The low planes of the E = fine_size tokens a head keeps at 4 bits sit apart, per sequence
  (not paged):
  k_lo, v_lo  (B, H, E + 1, D // 4) uint8, entry E the scratch entry.
  low_entry   (B, H, n_slots) int16: the low-plane entry of the token in each logical slot, -1 for a coarse one.
  A fine token dequantizes as (4 * hi + lo) * scale + zero, a coarse one as (4 * hi + 1.5) * scale + zero.

DenseOlderStore, QuantizedStore with per-token keys (the eviction policies' older store, kv_cache/evict.py)
  Slot n of each KV head holds a token of that head's own choosing (slots are filled in order and overwritten in
  place, head by head: write_heads); the first n_older slots are valid in every head. Head-adaptive budgets
  (--head_budget adaptive): the H lanes' first M slots (the head dim of these buffers, M = the policy's share of a
  head) are one run of H * M tokens, token f in slot f % M of lane f // M, that the heads share: head h holds
  n_older[b, h] consecutive tokens of it from older_start[b, h] on, in whatever lanes they fall. DenseOlderStore is a
  DenseStore in the model dtype that the fused kernel reads as a quantized store with unit scales (16-bit
  "payload").

Writes: the static decode step writes a buffer with index_put_ on the buffer itself, never a scatter_ into a view
of it (buf[rows]): under torch.compile a mutated view of a graph input is copied whole, written and copied back every
step (three passes over the whole cache of every layer: compiled full decoded at half eager's speed at 4k on the
CPU), while index_put_ on the input stays in place (as gpt-fast's k_cache[:, :, input_pos] = k).

Paged (kv_cache/paging.py): a store given a BlockPool keeps the same logical slots per sequence, but its buffers are
one pool for the whole batch, first dimension 1: (1, H, P, ...) with P = num_blocks * block_tokens physical slots
(per-channel key scales (1, H, P / F, D): a block is a whole number of key groups), and logical slot n of sequence b
lives at physical slot table[b, n // block_tokens] * block_tokens + n % block_tokens (physical_slots). Per-sequence
metadata (a ring's slot positions) stays per sequence. write / read / logical / kernel_inputs hide the difference
from the strategies.
"""
import torch
import torch.nn as nn
from torch import Tensor

from kernels.formats import Format, get_format
from kernels.quantize import dequantize_older, dequantize_planes, quantize_keys, quantize_planes, quantize_values


def bytes_of(x: Tensor) -> Tensor:
    """float8 codes as their bytes (a uint8 view), anything else as it is: float8 has no gather, scatter or
    index_put on some devices (the CPU among them), and moving the bytes moves the codes."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def write_rows(buf: Tensor, rows, slots: Tensor, x: Tensor):
    """buf[rows][i, :, slots[i, t]] = x[i, :, t] for x (R, H, T, ...): each sequence writes its own slots. rows: a
    slice (the first R sequences: the static decode step, one scatter) or an index tensor (prefill into chosen
    sequences)."""
    buf, x = bytes_of(buf), bytes_of(x)
    if isinstance(rows, slice):  # index_put_ on the buffer itself: compiled, it stays in place (module docstring)
        buf.index_put_((*sequences_and_heads(rows, x), slots.view(x.shape[0], 1, -1)), x)
    else:
        buf[rows[:, None], :, slots] = x.transpose(1, 2)


def sequences_and_heads(rows: slice, x: Tensor) -> tuple[Tensor, Tensor]:
    """Index tensors (R, 1, 1) and (1, H, 1) of the R sequences of slice `rows` and the H heads of x (R, H, ...):
    with a slot index (R, 1 or H, T), buf.index_put_ writes x into the buffer itself (module docstring: Writes)."""
    R, H = x.shape[:2]
    first = rows.start or 0
    return (torch.arange(first, first + R, device=x.device).view(R, 1, 1),
            torch.arange(H, device=x.device).view(1, H, 1))


def as_slice(rows):
    """An index tensor on the CPU naming consecutive sequences as the slice that names them (buffers read through it
    are views, where the index would gather a copy of every row); any other rows as they are."""
    if isinstance(rows, Tensor) and rows.device.type == "cpu" and rows.numel():
        first = int(rows[0])
        if torch.equal(rows, torch.arange(first, first + rows.numel(), dtype=rows.dtype)):
            return slice(first, first + rows.numel())
    return rows


def slot_index(slots: Tensor, shape) -> Tensor:
    """slots (R, T) as the scatter/gather index of a (R, H, T, D) tensor (a view: no copy)."""
    return slots.view(shape[0], 1, shape[2], 1).expand(shape)


def read_rows(buf: Tensor, rows, slots: Tensor) -> Tensor:
    """buf[rows][i, :, slots[i, t]] as (R, H, T, ...); rows as in write_rows."""
    if buf.dtype == torch.float8_e4m3fn:  # read the bytes (bytes_of)
        return read_rows(bytes_of(buf), rows, slots).view(torch.float8_e4m3fn)
    if isinstance(rows, slice):
        part = buf[rows]
        return part.gather(2, slot_index(slots, (part.shape[0], part.shape[1], slots.shape[1], part.shape[3])))
    return buf[rows[:, None], :, slots].transpose(1, 2)


def physical_slots(table: Tensor, rows, slots: Tensor, block_tokens: int) -> Tensor:
    """Logical slots (R, T) (or (R, H, T), per head) of sequences `rows` (slice or index tensor) -> physical slots
    of the pool (the module docstring's Paged formula)."""
    blocks = table[rows].long().gather(1, torch.div(slots, block_tokens, rounding_mode="floor").flatten(1))
    return blocks.view(slots.shape) * block_tokens + slots % block_tokens


def run_cells(run: Tensor, lane_tokens: int, n_slots: int) -> Tensor:
    """Token `run` of a head-shared store's run (the lanes' first lane_tokens slots, the layout above) -> its cell,
    lane * n_slots + slot, in a per-lane buffer of n_slots slots seen flat."""
    return run // lane_tokens * n_slots + run % lane_tokens


def write_heads(buf: Tensor, rows, slots: Tensor, x: Tensor, phys: Tensor = None, lanes: Tensor = None):
    """buf[rows][i, h, slots[i, h, t]] = x[i, h, t] for x (R, H, T, ...): each KV head writes its own slots.
    phys: the physical slots (R, H, T) of a pool buf (1, H, P, ...) instead (slots is then unused). lanes (R, H, T):
    head h's x[i, h, t] goes to lane (head dim) lanes[i, h, t] instead of h (a head-shared store's run)."""
    buf, x = bytes_of(buf), bytes_of(x)
    heads = torch.arange(x.shape[1], device=x.device).view(1, -1, 1) if lanes is None else lanes
    if phys is not None:
        buf[0][heads, phys] = x
    elif isinstance(rows, slice) and lanes is None:  # index_put_ on the buffer itself, as write_rows
        buf.index_put_((*sequences_and_heads(rows, x), slots), x)
    elif isinstance(rows, slice):  # one scatter over the rows' lanes x slots, seen flat
        part = buf[rows].flatten(1, 2)
        cells = (lanes * buf.shape[2] + slots).flatten(1)
        part.scatter_(1, cells.view(*cells.shape, *[1] * (x.dim() - 3)).expand(*cells.shape, *x.shape[3:]),
                      x.flatten(1, 2))
    else:
        buf[rows.view(-1, 1, 1), heads, slots] = x


def write_pool(buf: Tensor, phys: Tensor, x: Tensor):
    """buf[0, :, phys[i, t]] = x[i, :, t] for a pool buf (1, H, P, ...), x (R, H, T, ...): one scatter."""
    R, H, T = x.shape[:3]
    write_rows(buf, slice(0, 1), phys.reshape(1, R * T), x.transpose(0, 1).reshape(1, H, R * T, *x.shape[3:]))


def read_pool(buf: Tensor, phys: Tensor) -> Tensor:
    """buf[0, :, phys[i, t]] as (R, H, T, ...)."""
    R, T = phys.shape
    part = read_rows(buf, slice(0, 1), phys.reshape(1, R * T))
    return part.view(buf.shape[1], R, T, *buf.shape[3:]).transpose(0, 1)


class Store(nn.Module):
    """Reads and writes the buffers of a store by (sequence, logical slot), contiguous or paged."""

    def __init__(self, pool=None):
        super().__init__()
        self.pool = pool
        if pool is not None:  # the pool's table, shared by every layer (not KV storage: nbytes leaves it out)
            self.register_buffer("table", pool.table, persistent=False)

    POOLED = ("k", "v")  # the buffers that live in the pool when paged

    def pool_nbytes(self) -> int:
        """Bytes of this store's share of the pool (0 when contiguous)."""
        if self.pool is None:
            return 0
        return sum(getattr(self, name).nbytes for name in self.POOLED if getattr(self, name) is not None)

    def copy_blocks(self, src: list[int], dst: list[int]):
        """Paged: copy the contents of pool blocks src into blocks dst (every pooled buffer, its metadata rows
        too: a buffer of P / F rows holds block_tokens / F rows a block)."""
        for name in self.POOLED:
            buf = getattr(self, name)
            if buf is None:
                continue
            per_block = buf.shape[2] // self.pool.num_blocks
            offsets = torch.arange(per_block, device=buf.device)
            where = lambda blocks: (torch.tensor(blocks, device=buf.device)[:, None] * per_block + offsets).flatten()
            buf[:, :, where(dst)] = buf[:, :, where(src)]

    def n_rows(self, rows) -> int:
        """Paged: how many sequences `rows` (a slice or an index tensor) names."""
        return self.table[rows].shape[0]

    def physical(self, rows, slots: Tensor) -> Tensor:
        return physical_slots(self.table, rows, slots, self.pool.block_tokens)

    def write_buf(self, buf: Tensor, rows, slots: Tensor, x: Tensor):
        if self.pool is None:
            write_rows(buf, rows, slots, x)
        else:
            write_pool(buf, self.physical(rows, slots), x)

    def read_buf(self, buf: Tensor, rows, slots: Tensor) -> Tensor:
        if self.pool is None:
            return read_rows(buf, rows, slots)
        return read_pool(buf, self.physical(rows, slots))

    def write_raw(self, rows, slots: Tensor, raw: dict):
        """Write a store's stored form {buffer name: (R, H, T, ...)} (its raw()) at slots (R, T), the same in every
        head."""
        for name, x in raw.items():
            self.write_buf(getattr(self, name), rows, slots, x)

    def write_heads_buf(self, buffers: dict, rows, slots: Tensor, lanes: Tensor = None):
        """Write {buffer name: x (R, H, T, ...)} at per-head slots (R, H, T) of sequences `rows`, in lanes (R, H, T)
        when given (write_heads)."""
        phys = None if self.pool is None else self.physical(rows, slots)
        for name, x in buffers.items():
            write_heads(getattr(self, name), rows, slots, x, phys, lanes)

    def release(self, rows: Tensor) -> bool:
        """Paged: return the blocks of sequences `rows` to the pool (the data needs no clearing: reads are masked
        by lengths and positions). False when contiguous: the caller clears the rows itself."""
        if self.pool is None:
            return False
        self.pool.release(rows.tolist())
        return True


def ring_slots(pos, sink_size: int, ring_size: int):
    """The RingStore slot of each position (a tensor, or one position as an int: read on the host): sinks in
    place, later positions round the ring."""
    if isinstance(pos, int):
        return pos if pos < sink_size else sink_size + (pos - sink_size) % ring_size
    return torch.where(pos < sink_size, pos, sink_size + (pos - sink_size) % ring_size)


class DenseStore(Store):
    def __init__(self, batch_size, n_kv_head, n_slots, head_dim, dtype, device, pool=None):
        super().__init__(pool)
        self.n_slots = n_slots if pool is None else pool.space.n_slots
        shape = ((batch_size, n_kv_head, n_slots, head_dim) if pool is None else
                 (1, n_kv_head, pool.num_blocks * pool.block_tokens, head_dim))
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))

    def write(self, rows, slots: Tensor, k: Tensor, v: Tensor):
        self.write_buf(self.k, rows, slots, k)
        self.write_buf(self.v, rows, slots, v)

    def read(self, rows, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (R, H, T, D) in logical slots (R, T) of sequences `rows`."""
        return self.read_buf(self.k, rows, slots), self.read_buf(self.v, rows, slots)

    def logical(self, rows) -> tuple[Tensor, Tensor]:
        """Every slot of sequences `rows` as (R, H, n_slots, D): views when contiguous, a gathered copy when paged."""
        if self.pool is None:
            return self.k[rows], self.v[rows]
        slots = torch.arange(self.n_slots, device=self.k.device).expand(self.n_rows(rows), -1)
        return self.read(rows, slots)

    def kernel_inputs(self, R: int) -> dict:
        """The first R sequences as the fused decode kernel reads them (kernels/decode_attention.py): its recent
        ("recent") store's arguments."""
        if self.pool is None:
            return dict(recent_k=self.k[:R], recent_v=self.v[:R])
        return dict(recent_k=self.k, recent_v=self.v, recent_table=self.table[:R], recent_block=self.pool.block_tokens)

    def reset(self, rows: Tensor):
        if not self.release(rows):
            self.k[rows] = 0
            self.v[rows] = 0


class RingStore(DenseStore):
    def __init__(self, batch_size, n_kv_head, sink_size, ring_size, head_dim, dtype, device, pool=None):
        super().__init__(batch_size, n_kv_head, sink_size + ring_size, head_dim, dtype, device, pool)
        self.sink_size, self.ring_size = sink_size, ring_size
        # Paged, the logical slots are a whole number of blocks; the slots past sink_size + ring_size stay empty.
        self.register_buffer("pos", torch.full((batch_size, self.n_slots), -1, dtype=torch.long, device=device))

    def slots(self, pos):
        return ring_slots(pos, self.sink_size, self.ring_size)

    def write_positions(self, rows, pos: Tensor, k: Tensor, v: Tensor):
        """Store k, v (R, H, T, D) of positions pos (R, T) of sequences `rows` (a slice or an index tensor, as in
        write_rows; no two positions of one row in one slot)."""
        slots = self.slots(pos)
        self.write(rows, slots, k, v)
        if isinstance(rows, slice):  # per sequence, never paged
            self.pos[rows].scatter_(1, slots, pos)
        else:
            self.pos[rows[:, None], slots] = pos

    def reset(self, rows: Tensor):
        super().reset(rows)
        self.pos[rows] = -1


class DenseOlderStore(DenseStore):
    """An older store in the model dtype: a DenseStore of `capacity` slots plus a scratch slot (paged: a scratch
    block, never reserved, so on the null block) whose slots each KV head fills with its own tokens (write_heads);
    read by the fused kernel as a quantized store with unit scales, so the kernel's quantized path serves it
    unchanged."""

    def __init__(self, batch_size, n_kv_head, capacity, head_dim, dtype, device, pool=None):
        super().__init__(batch_size, n_kv_head, capacity + 1, head_dim, dtype, device, pool)
        self.capacity = capacity if pool is None else self.n_slots - pool.block_tokens
        # One float16 1.0 seen as every token's scale (stride 0): no memory, and not a buffer (nbytes leaves it out).
        self.unit_scale = torch.ones((1, 1, 1, 1), dtype=torch.float16, device=device)

    def write_heads(self, rows, slots: Tensor, k: Tensor, v: Tensor, lanes: Tensor = None):
        self.write_heads_buf(dict(k=k, v=v), rows, slots, lanes)

    def kernel_inputs(self, R: int) -> dict:
        """The kernel's older ("older") store arguments."""
        dense = super().kernel_inputs(R)
        k, v = dense["recent_k"], dense["recent_v"]
        inputs = dict(k_q=k, k_scale=self.unit_scale.expand(*k.shape[:3], 1), k_zero=None, v_q=v,
                      v_scale=self.unit_scale.expand(*v.shape[:3], 1), v_zero=None)
        if self.pool is not None:
            inputs.update(older_table=dense["recent_table"], older_block=dense["recent_block"])
        return inputs

    def dequantize(self, rows, n: int, dtype) -> tuple[Tensor, Tensor]:
        """Keys and values (R, H, n, D) of the first n slots of sequences `rows`."""
        if self.pool is None:
            return self.k[rows, :, :n].to(dtype), self.v[rows, :, :n].to(dtype)
        slots = torch.arange(n, device=self.k.device).expand(self.n_rows(rows), -1)
        return self.read(rows, slots)

    def raw(self, rows, n: int) -> dict:
        """The stored form of the first n slots of sequences `rows`: {buffer name: (R, H, n, ...)}."""
        return dict(zip(("k", "v"), self.dequantize(rows, n, self.k.dtype)))

    def encode(self, k: Tensor, v: Tensor) -> dict:
        """k, v (R, H, N, D) in the stored form (as raw returns it)."""
        return dict(k=k.to(self.k.dtype), v=v.to(self.v.dtype))


def flush_size(group_size: int, k_granularity: str) -> int:
    """Tokens that leave the window together: a key group when keys are scaled per channel, else one token."""
    return group_size if k_granularity == "channel" else 1


class QuantizedStore(Store):
    def __init__(self, batch_size, n_kv_head, capacity, head_dim, fmt: Format, group_size, k_granularity, device,
                 pool=None):
        super().__init__(pool)
        self.fmt, self.group_size, self.k_granularity, self.head_dim = fmt, group_size, k_granularity, head_dim
        self.flush_size = flush_size(group_size, k_granularity)
        if pool is None:
            self.capacity, n_tokens, batch = capacity, capacity + self.flush_size, batch_size
        else:  # the last logical block is the scratch group's: never reserved, so it maps to the null block
            if pool.block_tokens % self.flush_size:
                raise ValueError(f"paged quantized blocks of {pool.block_tokens} tokens do not hold whole key groups "
                                 f"of {self.flush_size}")
            self.capacity = pool.space.n_slots - pool.block_tokens
            n_tokens, batch = pool.num_blocks * pool.block_tokens, 1
        self.n_slots = n_tokens if pool is None else pool.space.n_slots  # logical tokens, the scratch group's too
        for name, (shape, dtype) in self.layout(fmt, group_size, k_granularity, n_tokens, head_dim).items():
            self.register_buffer(name, torch.zeros((batch, n_kv_head, *shape), dtype=dtype, device=device))
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

    POOLED = ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")

    KEY_META = (1, 2)  # all_buffers()' key scales and zero-points: a row per flush group with per-channel keys

    def all_buffers(self) -> tuple:
        """(k_q, k_scale, k_zero, v_q, v_scale, v_zero), zero-points None when symmetric."""
        return self.k_q, self.k_scale, self.k_zero, self.v_q, self.v_scale, self.v_zero

    def buffers_of(self, rows) -> tuple:
        """(k_q, k_scale, k_zero, v_q, v_scale, v_zero) of sequences `rows` (a count: the first ones, as views; a
        slice or an index tensor) of a contiguous store; zero-points None when symmetric."""
        rows = slice(0, rows) if isinstance(rows, int) else rows
        return tuple(None if t is None else t[rows] for t in self.all_buffers())

    def _key_rows(self, slots: Tensor) -> Tensor:
        """Rows of the key metadata for (physical or logical) token slots (R, N) in whole flush groups."""
        return slots[:, ::self.flush_size] // self.flush_size if self.k_granularity == "channel" else slots

    def kernel_inputs(self, rows) -> dict:
        """Sequences `rows` (a count: the first ones; a slice; an index tensor, which gathers a contiguous store's
        rows) as the fused decode kernel reads them (kernels/decode_attention.py): its older ("older") store's
        arguments."""
        names = ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")
        rows = slice(0, rows) if isinstance(rows, int) else rows
        if self.pool is None:
            return dict(zip(names, self.buffers_of(rows)))
        return dict(zip(names, self.all_buffers()), older_table=self.table[rows], older_block=self.pool.block_tokens)

    def append_target(self, R: int, start: Tensor) -> tuple:
        """(start, k_q, k_scale, k_zero, v_q, v_scale, v_zero) for kernels.quantize_append.quantize_into to write
        one flush group at logical token start[b] (R,) of each of the first R sequences: paged, the group's
        physical start (a group never straddles blocks) and the pool seen with batch stride 0."""
        if self.pool is None:
            return (start, *self.buffers_of(R))
        phys = self.physical(slice(0, R), start[:, None])[:, 0]
        return (phys, *(None if t is None else t.expand(R, *t.shape[1:]) for t in self.all_buffers()))

    def store(self, rows, tokens: Tensor, k: Tensor, v: Tensor):
        """Quantize k, v (R, H, N, D) into tokens `tokens` (R, N) of sequences `rows` (a slice or an index tensor);
        each row's tokens are whole flush groups in order."""
        self.write_codes(rows, tokens, self.quantize(k, v))

    def quantize(self, k: Tensor, v: Tensor) -> tuple:
        """k, v (R, H, N, D), whole flush groups, in the store's format: (k_q, k_scale, k_zero, v_q, v_scale,
        v_zero) as write_codes takes them, zero-points None when symmetric."""
        return (*quantize_keys(k, self.fmt, self.k_granularity, self.group_size),
                *quantize_values(v, self.fmt, self.group_size))

    def _code_slots(self, rows, tokens: Tensor) -> tuple:
        """(token slots, key-metadata rows) of tokens (R, N) of sequences `rows`: physical when paged."""
        slots = tokens if self.pool is None else self.physical(rows, tokens)
        return slots, self._key_rows(slots)

    def write_codes(self, rows, tokens: Tensor, codes: tuple):
        """Write quantize()'s codes of tokens (R, N) of sequences `rows`."""
        write = write_rows if self.pool is None else (lambda buf, _, where, x: write_pool(buf, where, x))
        slots, k_rows = self._code_slots(rows, tokens)
        for i, (buf, code) in enumerate(zip(self.all_buffers(), codes)):
            if code is not None:
                write(buf, rows, k_rows if i in self.KEY_META else slots, code)

    def read_codes(self, rows, tokens: Tensor) -> tuple:
        """What write_codes(rows, tokens, codes) wrote, read back: the same shapes, as a compiled step's flush
        writes when no group completes (kv_cache/quantize_kv.py)."""
        read = read_rows if self.pool is None else (lambda buf, _, where: read_pool(buf, where))
        slots, k_rows = self._code_slots(rows, tokens)
        return tuple(None if buf is None else read(buf, rows, k_rows if i in self.KEY_META else slots)
                     for i, buf in enumerate(self.all_buffers()))

    def encode(self, k: Tensor, v: Tensor) -> dict:
        """k, v (R, H, N, D) quantized, per-token keys ({buffer name: (R, H, N, ...)}): the eviction stores' form."""
        assert self.k_granularity == "token", "per-head slots need per-token key scales"
        encoded = (*quantize_keys(k, self.fmt, self.k_granularity, self.group_size),
                   *quantize_values(v, self.fmt, self.group_size))
        return {name: x for name, x in zip(self.POOLED, encoded) if x is not None}

    def write_heads(self, rows, slots: Tensor, k: Tensor, v: Tensor, lanes: Tensor = None):
        """Quantize k, v (R, H, T, D) into per-head token slots (R, H, T) of sequences `rows` (per-token keys), in
        lanes (R, H, T) when given."""
        self.write_heads_buf(self.encode(k, v), rows, slots, lanes)

    def raw(self, rows, n: int) -> dict:
        """The stored form of the first n tokens of sequences `rows` (per-token keys): {buffer name: (R, H, n, ...)}."""
        slots = torch.arange(n, device=self.k_q.device).expand(self.n_rows(rows) if self.pool is not None else
                                                                self.k_q[rows].shape[0], -1)
        return {name: self.read_buf(getattr(self, name), rows, slots) for name in self.POOLED
                if getattr(self, name) is not None}

    def dequantize(self, rows, n: int, dtype) -> tuple[Tensor, Tensor]:
        """Keys and values (R, H, n, D) in `dtype` of the first n tokens of sequences `rows` (n a whole number of
        flush groups)."""
        if self.pool is None:  # the first n tokens before the rows: an index tensor gathers only what is read
            groups = n // self.flush_size  # key metadata rows: a row per flush group (one token with per-token keys)
            buffers = tuple(None if t is None else t[:, :, :groups if i in self.KEY_META else n][rows]
                            for i, t in enumerate(self.all_buffers()))
        else:  # gather the first n logical tokens of each sequence out of the pool
            phys = self.physical(rows, torch.arange(n, device=self.k_q.device).expand(self.n_rows(rows), -1))
            k_rows = self._key_rows(phys)
            buffers = tuple(None if t is None else read_pool(t, k_rows if i in self.KEY_META else phys)
                            for i, t in enumerate(self.all_buffers()))
        return dequantize_older(*buffers, n, self.fmt, self.k_granularity, self.group_size, self.head_dim, dtype)

    def reset(self, rows: Tensor):
        if not self.release(rows):
            for buf in self.all_buffers():
                if buf is not None:
                    buf[rows] = 0


class PlaneStore(QuantizedStore):
    """The eviction policies' older store with mixed precision by score (the layout above): every kept token at 2
    bits, fine_size tokens a head at 4, chosen by the policy (kv_cache/evict.py). Demoting a token to 2 bits is
    forgetting its low-plane entry: nothing is quantized again."""

    PLANES = ("k_lo", "v_lo")
    MAX_FINE = 2 ** 15 - 1  # entries an int16 map can name

    def __init__(self, batch_size, n_kv_head, capacity, head_dim, fine_size, group_size, device, pool=None):
        super().__init__(batch_size, n_kv_head, capacity, head_dim, get_format("2"), group_size, "token", device,
                         pool)
        self.fine_size = fine_size
        for name in self.PLANES:
            self.register_buffer(name, torch.zeros(batch_size, n_kv_head, fine_size + 1, self.plane_bytes(head_dim),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("low_entry", torch.full((batch_size, n_kv_head, self.n_slots), -1,
                                                     dtype=torch.int16, device=device))

    @staticmethod
    def plane_bytes(head_dim: int) -> int:
        """Bytes of one token's 2-bit plane of keys (or values) in one KV head."""
        return head_dim // get_format("2").per_byte

    @classmethod
    def bytes_per_token(cls, group_size: int, head_dim: int, fine: float) -> float:
        """Bytes of one kept token in one KV head: the 2-bit store's, its int16 low-plane entry, and the fraction
        `fine` (fine_size / kept tokens) of a low plane of keys and values."""
        return (QuantizedStore.bytes_per_token(get_format("2"), group_size, "token", head_dim) + 2
                + fine * 2 * cls.plane_bytes(head_dim))

    def plane_rows(self, entry: Tensor) -> Tensor:
        """The low-plane rows of tokens whose entries are `entry`: the entry, or the scratch entry for a coarse one."""
        return torch.where(entry >= 0, entry, self.fine_size).long()

    def encode(self, k: Tensor, v: Tensor) -> dict:
        """k, v (R, H, N, D) in the stored form, both planes, low_entry 0: a token that has its low plane (raw()
        gives a stored token's entry, -1 when it has none)."""
        (k_q, k_lo, k_scale, k_zero), (v_q, v_lo, v_scale, v_zero) = (quantize_planes(x, self.group_size)
                                                                      for x in (k, v))
        return dict(k_q=k_q, k_scale=k_scale, k_zero=k_zero, v_q=v_q, v_scale=v_scale, v_zero=v_zero, k_lo=k_lo,
                    v_lo=v_lo, low_entry=torch.zeros(k.shape[:3], dtype=torch.int16, device=k.device))

    def write_heads(self, rows, slots: Tensor, k: Tensor, v: Tensor, lanes: Tensor = None,
                    low_entry: Tensor = None):
        """QuantizedStore.write_heads, each token's low plane to entry low_entry (R, H, T) (-1: a coarse token)."""
        self.write_heads_buf({**self.encode(k, v), "low_entry": low_entry}, rows, slots, lanes)

    def write_heads_buf(self, buffers: dict, rows, slots: Tensor, lanes: Tensor = None):
        """Store.write_heads_buf; buffers["low_entry"] (R, H, T) is each token's low-plane entry (-1: coarse), where
        its low planes buffers["k_lo"], buffers["v_lo"] go (the scratch entry for a coarse token)."""
        assert lanes is None, "mixed precision keeps each head in its own lane"
        buffers = dict(buffers)
        entry, planes = buffers.pop("low_entry"), {name: buffers.pop(name) for name in self.PLANES}
        super().write_heads_buf(buffers, rows, slots)
        write_heads(self.low_entry, rows, slots, entry.to(torch.int16))
        for name, x in planes.items():
            write_heads(getattr(self, name), rows, self.plane_rows(entry), x)

    def raw(self, rows, n: int) -> dict:
        """QuantizedStore.raw, with each token's low-plane entry (low_entry, -1: coarse) and its low planes (the
        scratch entry's bytes for a coarse token)."""
        stored = super().raw(rows, n)
        entry = self.low_entry[rows][:, :, :n]
        entries = self.plane_rows(entry)
        for name in self.PLANES:
            lo = getattr(self, name)[rows]
            stored[name] = lo.gather(2, entries[..., None].expand(*entries.shape, lo.shape[-1]))
        return {**stored, "low_entry": entry}

    def dequantize(self, rows, n: int, dtype) -> tuple[Tensor, Tensor]:
        stored = self.raw(rows, n)
        has_low = stored["low_entry"] >= 0
        return tuple(dequantize_planes(stored[f"{x}_q"], stored[f"{x}_lo"], has_low, stored[f"{x}_scale"],
                                       stored[f"{x}_zero"], self.group_size, dtype) for x in "kv")

    def kernel_inputs(self, R: int) -> dict:
        return dict(super().kernel_inputs(R), k_lo=self.k_lo[:R], v_lo=self.v_lo[:R],
                    older_fine=self.low_entry[:R])

    def reset(self, rows: Tensor):
        super().reset(rows)
        self.low_entry[rows] = -1
