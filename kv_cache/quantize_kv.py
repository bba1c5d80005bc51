"""quantize_kv: selective quantization. The first sink_size and the most recent window_size tokens stay in the model
dtype (a RingStore); older tokens are quantized into a QuantizedStore (the older store) as they leave the window and
are dequantized on the fly inside attention. Layouts: kv_cache/stores.py; formats: kernels/formats.py.

  --bits 8    (default) symmetric int8, one scale per token and head.
  --bits fp8  float8 e4m3 payload, one scale per token and head.
  --bits 4/2  KIVI (Liu et al., 2024): asymmetric, keys per channel over groups of group_size tokens, values per
              token over groups of group_size channels, packed 2 or 4 per byte. The 16-bit window doubles as KIVI's
              residual: tokens leave it a whole group at a time, so the ring holds window_size + group_size slots
              and between window_size and window_size + group_size - 1 recent tokens stay 16-bit.
  --k_granularity token|channel: per-token keys (flushed one token at a time) or per-channel keys (flushed a
              group at a time). Default channel for 4/2 bits, token for 8/fp8; every combination works.
  --bits_per_layer "8:0-1,28-29;2:*": a format per layer (overrides --bits; the spec's grammar:
              kv_cache/layer_spec.py). Each layer is its own cache object, so layer i's cache simply gets layer i's
              options (layer_options): the other options (--group_size, --k_granularity, ...) hold for every layer,
              and a layer's key granularity defaults to its own format's.
  --key_rope post|pre: keys quantized after RoPE at their absolute positions (post, default, as KIVI: attention
              needs no re-rotation), or before it (pre, as KVQuant: per-channel key statistics are not smeared by
              the position-dependent rotation) and rotated after dequantization, inside attention.
  --rotate hadamard|signed_hadamard: every head's q and k (and v, the output rotated back, per --rotate_parts)
              rotated by an orthogonal Hadamard matrix after RoPE (kv_cache/rotation.py): outlier channels
              are spread over the head before quantization; the stores and kernels see rotated tokens only. Not
              with --key_rope pre.

Choices made here:
  * --group_size (default 32) must divide head_dim when values are grouped by channels (4/2 bits): a ValueError
    names a divisor instead of silently using another group size (keys and values share the option).
  * With sink_size + window_size >= max_seq_length nothing ever leaves the window: the cache is then exactly the full
    cache (same outputs, max_seq_length 16-bit slots, no older store) and check_options prints a one-line notice.
  * Keys are quantized after RoPE at their absolute positions (as KIVI) by default, so attention needs no
    re-rotation. With --key_rope pre the 16-bit ring holds unrotated keys too (see _decode for why), and both the
    ring and the dequantized older keys are rotated where they are attended; older token t is position sink_size + t.
  * Per-layer formats share one block table when paged: the page space is that of every format at once (blocks a
    multiple of each flush group, as many slots as the layer that quantizes soonest needs; page_space).
  * Scales and zero-points are float16, rounded outward so the quantization error bound holds (kernels/quantize.py).

Decode (one token per sequence, each at its own position) is static: the slot, the flush of a group that has just
left the window (written to the scratch group when none has) and the masks are tensor arithmetic on the positions.
A prefill chunk attends to what the cache held before it plus itself causally in full precision, then its old
tokens are quantized. With --attn_impl triton (the default on CUDA) one fused kernel reads the stores as they are
and the flush quantizes straight from the ring in Triton; prefill dequantizes the held tokens in PyTorch. With
--attn_impl cpu (the CPU's default) decode and prefill chunks alike read the codes in the C kernel.
"""
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from kernels.formats import FORMATS, get_format
from kv_cache.base import GROUP_SIZE, KVCache, SinkWindowOptions, attend, option, register, rotate, rotate_qk
from kv_cache.layer_spec import BITS_PER_LAYER_EXAMPLE, layer_bits, parse_bits_per_layer
from kv_cache.paging import PageSpace, round_up
from kv_cache.rotation import RotateOptions, register_rotation, rotate_in, rotate_out
from kv_cache.stores import QuantizedStore, RingStore, as_slice, flush_size

K_GRANULARITIES = ("token", "channel")
KEY_ROPES = ("post", "pre")
@dataclass
class QuantizeOptions(SinkWindowOptions, RotateOptions):
    bits: str = option("8", "8: int8 per token; 4, 2: KIVI asymmetric, packed; fp8: e4m3", choices=list(FORMATS))
    group_size: int = option(GROUP_SIZE, "KIVI group: tokens per key scale, channels per value scale")
    k_granularity: Optional[str] = option(None, "key scales per token or per channel (default: channel for 4/2 "
                                                "bits, else token)", choices=K_GRANULARITIES)
    bits_per_layer: Optional[str] = option(None, "a format per layer, overriding --bits: BITS:LAYERS entries "
                                                 "separated by ';', LAYERS a comma list of indices and ranges a-b "
                                                 "or * (last: every layer not named before), e.g. "
                                                 f"{BITS_PER_LAYER_EXAMPLE}")
    key_rope: str = option("post", "quantize keys after RoPE at their absolute positions (post), or before it and "
                                   "rotate them after dequantization inside attention (pre, as KVQuant)",
                           choices=KEY_ROPES)

    def check(self, head_dim):
        super().check(head_dim)  # the choices of --key_rope, --k_granularity, --bits (CacheOptions.check)
        if self.key_rope == "pre" and self.rotates():
            raise ValueError(f"--rotate {self.rotate} rotates keys after RoPE (a rotation of the channels does not "
                             "commute with RoPE's): drop --key_rope pre, or use --rotate none")
        if self.bits_per_layer is not None:
            # Every format the spec names, checked as its --bits would be (k_granularity's default is each format's).
            for bits, _ in parse_bits_per_layer(self.bits_per_layer):
                self.layer_format(bits).check(head_dim)
            return
        fmt = get_format(self.bits)
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"--group_size must be a whole number >= 1 (got {self.group_size})")
        if fmt.asymmetric:
            if head_dim % fmt.per_byte:
                raise ValueError(f"head_dim {head_dim} cannot be packed {fmt.per_byte} codes per byte: use --bits 8")
            if head_dim % self.group_size:
                divisor = max(d for d in range(1, min(self.group_size, head_dim) + 1) if head_dim % d == 0)
                raise ValueError(f"--group_size {self.group_size} must divide head_dim {head_dim} (values are "
                                 f"grouped by channels): use e.g. --group_size {divisor}")

    def derive(self, head_dim):
        super().derive(head_dim)
        if self.bits_per_layer is not None:
            # No single format: each layer's cache is built from the options of its format (layer_options).
            self.format_options = {}
            for bits, _ in parse_bits_per_layer(self.bits_per_layer):
                layer = self.layer_format(bits)
                layer.derive(head_dim)
                self.format_options[bits] = layer
            return
        self.format = get_format(self.bits)
        self.k_granularity = self.k_granularity or self.format.default_k_granularity
        self.flush_size = flush_size(self.group_size, self.k_granularity)

    def layer_format(self, bits: str) -> "QuantizeOptions":
        """These options with one format for every layer, --bits bits (not yet derived)."""
        return dataclasses.replace(self, bits=bits, bits_per_layer=None)

    def formats(self) -> list["QuantizeOptions"]:
        """The single-format options of every format the layers use: this one, or one per --bits_per_layer format."""
        return list(self.format_options.values()) if self.bits_per_layer is not None else [self]

    def older_capacity(self, max_seq_length: int) -> int:
        """Tokens the older store can hold: what does not fit in sinks + window, in whole flush groups."""
        return round_up(max(0, max_seq_length - self.sink_size - self.window_size), self.flush_size)

    def n_older(self, length: int) -> int:
        """Tokens in the older store once a sequence holds `length` tokens: whole flush groups that have left
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
    def layer_options(cls, options, layer_idx, n_layer):
        """Layer layer_idx's options: with --bits_per_layer, the options of that layer's format (checked against
        the model's n_layer layers: a one-line ValueError for a spec that does not fit it)."""
        if options.bits_per_layer is None:
            return options
        return options.format_options[layer_bits(options.bits_per_layer, n_layer)[layer_idx]]

    @classmethod
    def bytes_per_token(cls, options, n_kv_head, head_dim, dtype):
        """Bytes per token of the quantized store: payload plus scales/zero-points amortized over their groups."""
        opts = cls.Options.resolve(options, head_dim)
        if opts.bits_per_layer is not None:
            raise ValueError("--bits_per_layer: bytes per token differ by layer: ask each layer's options "
                             "(layer_options), or count the caches (memory.predicted_kv_bytes)")
        return n_kv_head * QuantizedStore.bytes_per_token(opts.format, opts.group_size, opts.k_granularity, head_dim)

    @classmethod
    def page_space(cls, options, max_seq_length, block_size):
        """Paged: the quantized store, in blocks of block_size tokens rounded up to whole flush groups (KIVI's
        per-channel key groups never straddle a block), one more logical block for the scratch group. The 16-bit
        sinks and window stay per sequence. Everything in sinks + window (no quantized store): the ring, as full.
        Per-layer formats share the block table, so the space serves every format the layers use: blocks of whole
        flush groups of each, and a sequence holds the slots of the format that quantizes soonest (its smallest
        flush group); a layer of a larger group leaves the tail of its last block unused. Every format of a valid
        spec is used by some layer (layer_bits refuses a '*' that names none), so this space is no larger than
        the layers need."""
        layers = cls.Options.resolve(options, None).formats()
        capacity = max(opts.older_capacity(max_seq_length) for opts in layers)
        if not capacity:  # slot = position as in full, but the ring's slot positions are per sequence: not shared
            return dataclasses.replace(super().page_space(options, max_seq_length, block_size), sharable=False)
        block = math.lcm(block_size, *(opts.flush_size for opts in layers))
        capacity = round_up(capacity, block)
        return PageSpace(block, capacity + block, lambda n: min(max(opts.n_older(n) for opts in layers), capacity))

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options=None, pool=None,
                 **option_values):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options, pool,
                         **option_values)
        opts = self.opts
        if opts.bits_per_layer is not None:
            raise ValueError("--bits_per_layer gives each layer its own format: build layer i's cache with "
                             "options=QuantizeKVCache.layer_options(options, i, n_layer) (runner.cache_factory does)")
        self.sink_size, self.window_size, self.flush_size = opts.sink_size, opts.window_size, opts.flush_size
        self.quantize_into = None  # the decode flush in one kernel call: Triton, or C on the CPU (eager steps)
        if self.attn_impl == "triton":
            from kernels.quantize_append import quantize_into, triton_quantize_supported
            # The decode flush quantizes in Triton too where its power-of-two tiles fit the layout.
            if triton_quantize_supported(head_dim, opts.group_size):
                self.quantize_into = quantize_into
        elif self.attn_impl == "cpu":
            from kernels import cpu_attention
            if cpu_attention.quantize_supported(opts.format, dtype):
                self.quantize_into = cpu_attention.quantize_into
        self.older_size = opts.older_capacity(max_seq_length)  # 0: everything fits in sinks + window, as full
        if self.older_size:
            self.ring = RingStore(batch_size, n_kv_head, self.sink_size, self.window_size + self.flush_size, head_dim,
                                  dtype, device)
            self.older = QuantizedStore(batch_size, n_kv_head, self.older_size, head_dim, opts.format,
                                        opts.group_size, opts.k_granularity, device, pool)
            self.older_size = self.older.capacity  # paged: rounded up to whole blocks; the scratch group follows it
        else:  # slot = position, as the full cache
            self.ring = RingStore(batch_size, n_kv_head, 0, max_seq_length, head_dim, dtype, device, pool)
            self.older = None
        # --rotate: q and k (and v) rotated as they arrive, the output back (kv_cache/rotation.py); nothing is
        # quantized without an older store, and then the rotation would change nothing but rounding. Keys quantized
        # before RoPE are never rotated (auto: none).
        rotation = "none" if opts.key_rope == "pre" or self.older is None else opts.applied_rotation(opts.format,
                                                                                                     head_dim)
        register_rotation(self, rotation, opts.applied_parts(opts.k_granularity), head_dim, dtype, device)
        self._step = None  # the C kernel's one-call eager decode step, built on first use (decode_step)
        # Nothing is ever quantized without an older store: then --key_rope pre changes nothing and post's path runs.
        self.pre_rope = opts.key_rope == "pre" and self.older is not None
        if self.pre_rope and self.attn_impl == "triton" and (head_dim < 16 or head_dim & (head_dim - 1)):
            raise ValueError(f"--key_rope pre with --attn_impl triton needs a power-of-two head_dim >= 16 (the "
                             f"fused kernel rotates whole tiles; this model's is {head_dim}): use --attn_impl torch")

    def _recent_keep(self, ring_pos, n_older):
        """Ring slots holding a token that is not (yet) in the older store."""
        S = self.sink_size
        return (ring_pos >= 0) & ((ring_pos < S) | (ring_pos >= S + n_older))

    def forward(self, q, k, v, input_pos, rope_cos, rope_sin, rows=None):
        decode = self.is_decode(q, rows)
        rows, pos = self.rows_and_positions(q, input_pos, rows)
        q, k_rot = rotate_qk(q, k, pos, rope_cos, rope_sin)
        rope = (rope_cos, rope_sin)
        q, k_rot, v = rotate_in(self, q, k_rot, v)
        stored_k = k if self.pre_rope else k_rot  # what the ring and the older store hold
        if decode:
            out = self._decode(q, stored_k, v, pos, rows, rope)
        else:
            out = self._prefill(q, k_rot, stored_k, v, pos, rows, rope)
        return rotate_out(self, out)

    def _attended(self, keys, ring_pos, rope):
        """Ring keys (R, H, slots, D) and the older store as attention reads them: as stored (post), or rotated by
        each slot's position and a view of the older store that rotates its dequantized keys (pre)."""
        if not self.pre_rope:
            return keys, self.older
        return rotate(keys, ring_pos.clamp(min=0), *rope), PreRopeOlder(self.older, *rope, self.sink_size)

    def __getstate__(self):
        """Copies and pickles leave the C step out: it holds raw pointers into this cache's buffers (a copy builds
        its own on first use)."""
        return dict(self.__dict__, _step=None)

    def decode_step(self, n_head: int):
        """kernels.cpu_attention.DecodeStep over this cache's ring and older store where it serves (the C kernel,
        eager, a float32 ring, keys stored after RoPE), else None; rebuilt when the buffers have moved."""
        if self.attn_impl != "cpu" or self.older is None or self.pre_rope or self.dtype != torch.float32 \
                or torch.compiler.is_compiling():
            return None
        ring, older = self.ring, self.older
        if self._step is None or self._step.bound_to != (ring.k.data_ptr(), older.k_q.data_ptr()):
            from kernels.cpu_attention import DecodeStep
            self._step = DecodeStep(older.kernel_inputs(self.batch_size), older.fmt, older.k_granularity,
                                    older.group_size, ring.k, ring.v, ring.pos, self.sink_size, n_head,
                                    self.flush_size)
        return self._step

    def _decode(self, q, k, v, pos, rows, rope):
        R, S, W, F = q.shape[0], self.sink_size, self.window_size, self.flush_size
        ring = self.ring
        step = self.decode_step(q.shape[1])
        if step is not None:
            return self._decode_cpu(step, q, k, v, pos)
        ring.write_positions(rows, pos, k, v)
        if self.older is None:
            return self.attend_decode(q, ring, recent_last=pos[:, 0], recent_pos=ring.pos[:R])
        n_past = pos[:, 0] + 1 - S - W  # tokens of each sequence that have left sinks + window
        n_older = n_past.clamp(min=0) // F * F
        completes = (n_past >= F) & (n_past % F == 0)
        # Eager on the CPU, asking whether a group completes costs nothing (no device to wait for), and with
        # per-channel keys none does on 31 steps of 32: those steps skip the flush and its index arithmetic.
        # Elsewhere every step flushes, so the step's work and shapes never change: when no group completes,
        # the (meaningless) group goes to the scratch group (compiled on the CPU, unquantized: below).
        compiling = torch.compiler.is_compiling()
        quantize_into = None if compiling and self.attn_impl == "cpu" else self.quantize_into  # C: eager only
        if self.attn_impl == "triton" or q.device.type != "cpu" or compiling or bool(completes.any()):
            # The group that completes now is the ring's oldest F tokens.
            arange = torch.arange(F, device=q.device)
            group_pos = pos + 1 - W - F + arange  # (R, F)
            start = torch.where(completes, group_pos[:, 0] - S, self.older_size)  # (R,)
            group_slots = ring.slots(group_pos).clamp(min=0)
            # --key_rope pre: the ring holds unrotated keys, so the flush quantizes them as they are, from the
            # same ring slots, in Triton or PyTorch alike. (Un-rotating rotated ring keys before quantizing would
            # instead round twice in the model dtype, and cost an inverse rotation of every flushed group.) What
            # attention reads is then rotated: the ring's S + W + F slots each step (a small copy) and the
            # dequantized older keys, inside the fused kernel's tiles or after the PyTorch path dequantizes them.
            if quantize_into is not None:
                # Straight from the (contiguous) ring into the older store at `start` in one call (Triton, or C on
                # the CPU): no gathered copy, no host sync.
                quantize_into(ring.k[:R], ring.v[:R], group_slots, *self.older.append_target(R, start))
            else:
                tokens = start[:, None] + arange
                k_group, v_group = ring.read(rows, group_slots)
                if compiling and q.device.type == "cpu" and F > 1 and self.older.fmt.asymmetric:
                    # Compiled on the CPU, a branch costs no device sync: the group is quantized on the one step
                    # in F where one completes; on the others the scratch group's bytes are written back as they
                    # are (torch.cond: the branches may not write, so the write stays outside, unconditional; and
                    # they return tensors only, so only the asymmetric formats, whose codes carry zero points:
                    # F > 1 is theirs, per-channel groups).
                    # (contiguous: the branches' outputs must agree in layout, and a paged read is a transposed view)
                    codes = torch.cond(completes.any(),
                                       lambda k, v: tuple(c.contiguous() for c in self.older.quantize(k, v)),
                                       lambda k, v: tuple(c.contiguous() for c in self.older.read_codes(rows, tokens)),
                                       (k_group, v_group))
                else:
                    codes = self.older.quantize(k_group, v_group)
                self.older.write_codes(rows, tokens, codes)
        recent, older = ring, self.older
        if self.pre_rope:
            ring_k, ring_v = ring.logical(slice(0, R))
            ring_k, older = self._attended(ring_k, ring.pos[:R], rope)
            recent = (ring_k, ring_v)
        return self.attend_decode(q, recent, recent_pos=ring.pos[:R], sink_size=S, n_older=n_older, older=older)

    def _decode_cpu(self, step, q, k, v, pos):
        """_decode eager on the CPU in one C call (decode_step): the positions read on the host (no device to wait
        for), what each sequence holds follows from the options' own formula, and the flush runs only on the steps
        where a group leaves the window, then the step's token is written into the ring and attention runs."""
        R, W, F = q.shape[0], self.window_size, self.flush_size
        ring, opts = self.ring, self.opts
        positions = pos[:, 0].tolist()
        held = [opts.n_older(p + 1) for p in positions]
        completes = [n > opts.n_older(p) for n, p in zip(held, positions)]
        index = held + [ring.slots(p) for p in positions]
        flushing = any(completes)
        if flushing:  # each row's completed group (the ring's oldest F tokens), or the scratch group's
            index += [n - F if done else self.older_size for n, done in zip(held, completes)]
            index += [max(0, ring.slots(p + 1 - W - F + i)) for p in positions for i in range(F)]
        index = torch.tensor(index)
        n_older, new_slot = index[:R], index[R:2 * R]
        flush = (index[3 * R:].view(R, F), index[2 * R:3 * R]) if flushing else None
        if flushing and not step.flushes:  # the PyTorch route, before the step (fp8)
            group_slots, start = flush
            self.older.store(slice(0, R), start[:, None] + torch.arange(F), *ring.read(slice(0, R), group_slots))
            flush = None
        # The token is written after the flush: the ring's W + F slots past the sinks hold the flushed group and the
        # window, never the slot the new token takes.
        out = step(q[:, :, 0] * q.shape[-1] ** -0.5, n_older, k[:, :, 0], v[:, :, 0], new_slot, pos[:, 0], flush)
        return out[:, :, None]

    def _prefill(self, q, k_rot, k, v, pos, rows, rope):
        """k_rot: the chunk's keys rotated (attended); k: as stored (rotated, or unrotated with --key_rope pre)."""
        R, T, S = q.shape[0], q.shape[2], self.sink_size
        first = int(pos[0, 0])
        chunk_pos = pos[0]
        n_older_before, n_older_after = self.opts.n_older(first), self.opts.n_older(first + T)
        rows = as_slice(rows)
        ring_k, ring_v = self.ring.logical(rows)
        ring_pos = self.ring.pos[rows]
        keep = self._recent_keep(ring_pos, n_older_before)
        # The chunk attends to what the cache held before it (quantized tokens dequantized) and to itself causally.
        if n_older_before and self.attn_impl == "cpu" and not self.pre_rope and q.dtype != torch.float64:
            # The C kernel reads the older store's codes as decode does (float32: a float64 model, the tests'
            # reference, keeps the PyTorch path).
            n_older = torch.full((R,), n_older_before, dtype=torch.int64)
            out = self.attend_codes(q, ring_k, ring_v, keep, self.older, n_older, rows, chunk=(k_rot, v))
        else:
            attended_k, older = self._attended(ring_k, ring_pos, rope)
            keys, values = [attended_k], [ring_v]
            masks = [keep[:, None, None, :].expand(-1, 1, T, -1)]
            if n_older_before:
                older_k, older_v = older.dequantize(rows, n_older_before, self.dtype)
                keys.append(older_k)
                values.append(older_v)
                masks.append(torch.ones(R, 1, T, n_older_before, dtype=torch.bool, device=q.device))
            keys.append(k_rot)
            values.append(v)
            masks.append(torch.ones(T, T, dtype=torch.bool, device=q.device).tril().expand(R, 1, T, T))
            out = attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(masks, dim=-1))
        if n_older_after > n_older_before:  # tokens that left the window: from the ring first, then from the chunk
            moved = torch.arange(S + n_older_before, S + n_older_after, device=q.device)
            ring_slots = self.ring.slots(moved[moved < first])
            chunk_idx = moved[moved >= first] - first
            self.older.store(rows, (moved - S).expand(R, -1),
                             torch.cat([ring_k[:, :, ring_slots], k[:, :, chunk_idx]], dim=2),
                             torch.cat([ring_v[:, :, ring_slots], v[:, :, chunk_idx]], dim=2))
        idx = ((chunk_pos < S) | (chunk_pos >= S + n_older_after)).nonzero().squeeze(1)
        self.ring.write_positions(rows, pos[:, idx], k[:, :, idx], v[:, :, idx])
        return out


class PreRopeOlder:
    """The older store as attention reads it under --key_rope pre: keys were quantized before RoPE, and its token t
    (position sink_size + t) is rotated after dequantization. KVCache.attend_decode takes it in place of the
    store: its PyTorch path dequantizes through dequantize() below; its fused kernel gets the RoPE tables from
    kernel_inputs() and rotates each dequantized key tile in registers (kernels/decode_attention.py)."""

    def __init__(self, store: QuantizedStore, rope_cos, rope_sin, sink_size: int):
        self.store, self.rope_cos, self.rope_sin, self.sink_size = store, rope_cos, rope_sin, sink_size
        self.capacity, self.n_slots = store.capacity, store.n_slots

    def dequantize(self, rows, n: int, dtype):
        k, v = self.store.dequantize(rows, n, dtype)
        # Tokens past the tables' end are never attended (they lie past n_older): any row serves them.
        pos = (self.sink_size + torch.arange(n, device=k.device)).clamp(max=self.rope_cos.shape[0] - 1)
        return rotate(k, pos, self.rope_cos, self.rope_sin), v

    def kernel_inputs(self, R: int) -> dict:
        return dict(self.store.kernel_inputs(R), k_rope_cos=self.rope_cos, k_rope_sin=self.rope_sin)
