"""The cache interface every strategy implements, its options, and the pieces strategies share: the sinks + window
options (SinkWindowOptions), the full cache's forward over a DenseStore (forward_full), RoPE by position and the
choice of decode-attention backend (one description of what to attend to, two backends).

A strategy is a policy: which tokens to keep and where they go (kv_cache/stores.py holds them). Its options are one
dataclass, resolved and checked once; the command-line options are generated from its fields.
"""
import argparse
import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kv_cache.paging import PageSpace, RowGroup, round_up
from kv_cache.stores import DenseStore, QuantizedStore, run_cells
from model import apply_rope

STRATEGIES: dict[str, type["KVCache"]] = {}
ATTN_IMPLS = ("triton", "cpu", "torch")
GROUP_SIZE = 32  # KIVI's group, the default of every --group_size: channels (per-channel keys: tokens) per scale


def register(cls):
    STRATEGIES[cls.name] = cls
    return cls


def option(default, help: str, choices=None):
    """A strategy option: a dataclass field that also declares its command-line flag."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class CacheOptions:
    """Options every strategy has. Subclasses add fields and extend check() (and derive(), for what follows from
    the options)."""
    attn_impl: Optional[str] = option(None, "decode step: triton = fused attention over the stored format (default "
                                            "on CUDA), cpu = a C kernel reading quantize_kv's stored codes "
                                            "(kernels/cpu_attention.py; default on the CPU where it builds), torch = "
                                            "PyTorch; prefill always uses PyTorch", choices=ATTN_IMPLS)

    def check(self, head_dim: int):
        """Raise ValueError with one line naming the fix when the options cannot work. It only checks: what follows
        from the options is derive()'s."""
        for f in dataclasses.fields(self):  # the flags' choices, for options that come from the API or a request
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and str(value) not in map(str, choices):
                names = [str(c) for c in choices]
                listed = " or ".join(names) if len(names) == 2 else ", ".join(names)
                raise ValueError(f"--{f.name} {value!r} is not supported: use {listed}")
        attn_impl_for(self.attn_impl)

    def derive(self, head_dim: int):
        """Fill in what follows from checked options (defaults that depend on other options, the format object):
        resolve() calls it once, after check(). Subclasses extend it."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            kind = hints[f.name]
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
            default = f"default {f.default}" if f.default is not None else None
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + (f" ({default})" if default else ""))

    @classmethod
    def resolve(cls, options, head_dim: int) -> "CacheOptions":
        """The options (a dict of flag values, or already an instance) checked, with what follows from them filled
        in (derive)."""
        if isinstance(options, cls):
            return options
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join('--' + u for u in unknown)}: this strategy takes "
                             f"{', '.join('--' + n for n in sorted(names))}")
        resolved = cls(**options)
        resolved.check(head_dim)
        resolved.derive(head_dim)
        return resolved


@dataclass
class SinkWindowOptions(CacheOptions):
    """The attention sinks and the recent window every compressing strategy keeps in the model dtype."""
    sink_size: int = option(16, "first tokens always kept in the model dtype, the attention sinks")
    window_size: int = option(32, "most recent tokens kept in the model dtype")

    def check(self, head_dim):
        super().check(head_dim)
        if not isinstance(self.sink_size, int) or self.sink_size < 0:
            raise ValueError(f"--sink_size must be a whole number >= 0 (got {self.sink_size})")
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"--window_size must be a whole number >= 1 (got {self.window_size}): the newest token "
                             "must stay")


class KVCache(nn.Module):
    """Storage for one layer's keys and values, and the attention over them.

    Storage is allocated once in __init__ (static shapes, written in place). forward() receives the new tokens'
    q (R, n_head, T, head_dim) and k, v (R, n_kv_head, T, head_dim) *before* RoPE, their positions input_pos: (T,)
    shared by the R sequences or (R, T) per sequence, each row consecutive and continuing what the cache holds for
    that sequence, the model's RoPE tables and rows (R,): which of the cache's sequences they are (None: the first
    R). It stores k, v and returns the attention output (R, n_head, T, head_dim) of the new tokens over everything
    the cache keeps. A decode step (T = 1, rows None) feeds the first R sequences, each at its own position; any
    other call is a prefill chunk, with the same positions in every row it feeds.
    """

    name = ""
    help = ""
    Options = CacheOptions
    whole_prompt = False  # the strategy needs each prompt in one prefill chunk (a policy scoring from its end)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser):
        """The strategy's command-line options (a subcommand of generate.py and scripts/evaluate.py)."""
        cls.Options.add_arguments(parser)

    @classmethod
    def check_options(cls, options, max_seq_length: int, head_dim: int, quiet: bool = False) -> CacheOptions:
        """The resolved options, or ValueError with one line naming the fix when they cannot work; quiet: no
        notices (a strategy may print one when the options work but do something the user may not expect)."""
        return cls.Options.resolve(options, head_dim)

    @classmethod
    def layer_options(cls, options: CacheOptions, layer_idx: int, n_layer: int) -> CacheOptions:
        """The options of layer layer_idx's cache out of a model's n_layer layers, from options resolved by
        check_options (each layer is its own cache object, so a strategy may give layers different options, e.g.
        quantize_kv --bits_per_layer); a one-line ValueError when they do not fit n_layer. Default: the same."""
        return options

    @classmethod
    def capacity(cls, options, max_seq_length: int):
        """How many tokens one sequence may hold in all; None when the cache can stream without end."""
        return max_seq_length

    @classmethod
    def bytes_per_token(cls, options, n_kv_head: int, head_dim: int, dtype) -> float:
        """Bytes one more stored token costs in one layer and one sequence (keys + values, metadata amortized);
        for quantize_kv, a token of the quantized store."""
        return 2 * n_kv_head * head_dim * dtype.itemsize

    @classmethod
    def page_space(cls, options, max_seq_length: int, block_size: int) -> PageSpace:
        """How the strategy's growing store is paged in blocks of about block_size tokens (kv_cache/paging.py).
        The full cache's: slot = position, so prompt blocks can be shared."""
        return PageSpace(block_size, round_up(max_seq_length, block_size), lambda n: min(n, max_seq_length),
                         sharable=True)

    def __init__(self, batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int, dtype, device,
                 options=None, pool=None, **option_values):
        """pool: a kv_cache.paging.BlockPool built from page_space(): the growing store is paged in it."""
        super().__init__()
        self.pool = pool
        self.batch_size, self.max_seq_length = batch_size, max_seq_length
        self.n_kv_head, self.head_dim, self.dtype = n_kv_head, head_dim, dtype
        self.opts = self.Options.resolve(option_values if options is None else options, head_dim)
        self.attn_impl = attn_impl_for(self.opts.attn_impl, device)
        if self.attn_impl == "triton":  # imported only when asked for: the torch path never needs triton
            from kernels.decode_attention import decode_attention
            self.decode_attention = decode_attention
        if self.attn_impl == "cpu":
            from kernels.cpu_attention import older_attention
            self.older_attention = older_attention
        # Sequences still decoding; a finished one (the engine's per-sequence EOS) costs the fused kernel nothing.
        self.register_buffer("active", torch.ones(batch_size, dtype=torch.bool, device=device))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                rows: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def is_decode(q: Tensor, rows: Optional[Tensor]) -> bool:
        """The static decode step: one token for each of the first R sequences. Any other call (a one-token prompt
        fed into chosen rows too) is a prefill chunk."""
        return q.shape[2] == 1 and rows is None

    @staticmethod
    def rows_and_positions(q: Tensor, input_pos: Tensor, rows: Optional[Tensor]):
        """(rows, positions (R, T)) of a call: rows stays an index tensor when given, else it is the slice of the
        first R sequences (views of the stores, written by one scatter: the static decode step's path)."""
        R, T = q.shape[0], q.shape[2]
        return (slice(0, R) if rows is None else rows), input_pos.reshape(-1, T).expand(R, T)

    def forward_full(self, store: DenseStore, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope_cos: Tensor,
                     rope_sin: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """The full cache's forward over `store` (slot = position): q and k rotated at their positions, k and v
        stored, attention over every slot up to each query's position (full's, and compress_kv's while it holds
        everything)."""
        decode = self.is_decode(q, rows)
        rows, pos = self.rows_and_positions(q, input_pos, rows)
        q, k = rotate_qk(q, k, pos, rope_cos, rope_sin)
        store.write(rows, pos, k, v)
        if decode:  # the first R sequences, each up to its own position
            return self.attend_decode(q, store, recent_last=pos[:, 0])
        # Prefill: attend over the whole buffer (static shapes, as gpt-fast), masking slots after each query.
        keys, values = store.logical(rows)
        mask = torch.arange(keys.shape[2], device=q.device) <= pos[0, :, None]
        return attend(q, keys, values, mask)

    def attend_decode(self, q: Tensor, recent, recent_last: Optional[Tensor] = None,
                      recent_pos: Optional[Tensor] = None, sink_size: int = 0, n_older: Optional[Tensor] = None,
                      older=None, scores: bool = False, older_read: Optional[int] = None,
                      older_start: Optional[Tensor] = None):
        """Decode attention of q (B, n_head, 1, D), already rotated, over the first B sequences of a cache's two
        stores (kv_cache/stores.py):
          recent  the tokens kept as they are, in the model dtype: sinks and window (a RingStore), or every token (a
                  DenseStore); contiguous or paged, or a (keys, values) pair (B, H, NH, D). Slots i <= recent_last[b]
                  (every slot when None) that, with recent_pos (B, NH) given, hold a token (recent_pos >= 0) not yet
                  in the older store (a sink, or position >= sink_size + n_older[b]).
          older   the tokens past sinks and window that the cache still holds (quantized, or chosen by an eviction
                  policy): its first n_older[b] (n_older (B, H): head h's first n_older[b, h]); None when the cache
                  has none. older_start (B, H): the older store is head-shared (the eviction policies' head-adaptive
                  layout, kv_cache/evict.py): its lanes' first older_read slots are one run of tokens, token f in
                  slot f % older_read of lane f // older_read, and head h holds n_older[b, h] of them from
                  older_start[b, h] on; its scores sit in the columns of the lanes' slots.
        One description, two backends: the fused Triton kernel (kernels/decode_attention.py, whose "recent" and "older"
        stores these are) reads the stores as they are, through the block table when paged; the torch path gathers,
        dequantizes, masks and runs SDPA.
        scores: also return each token's attention probability summed over the query heads of its KV head,
        (B, n_kv_head, M + NH): older token t in column t, recent slot i in column M + i (M: the older store's
        logical capacity, 0 without one), 0 where not attended (what eviction policies score tokens by); the kernel
        stores them as its softmax computes them, the torch path runs the softmax itself. older_read: the torch path
        reads only the first older_read older slots (n_older never passes it), so contiguous and paged stores,
        whose logical capacities differ, run the same arithmetic (default: the store's capacity)."""
        B = q.shape[0]
        is_store = isinstance(recent, DenseStore)
        if self.attn_impl == "triton":
            active = self.active[:B]
            recent_args = recent.kernel_inputs(B) if is_store else dict(recent_k=recent[0], recent_v=recent[1])
            n_slots = recent.n_slots if is_store else recent[0].shape[2]
            last = recent_last if recent_last is not None else torch.full((B,), n_slots - 1, device=q.device)
            older_args = {}
            if older is not None:
                older_args = dict(n_older=torch.where(active.view(B, *[1] * (n_older.dim() - 1)), n_older, 0),
                                  **older.kernel_inputs(B))
                if older_start is not None:
                    older_args.update(older_start=older_start, older_lane=older_read)
            result = self.decode_attention(q, **recent_args, recent_last=torch.where(active, last, -1),
                                           recent_pos=recent_pos, sink_size=sink_size, **older_args,
                                           return_scores=scores)
            if not scores:
                return result
            out, probs = result
            probs = per_kv_head(probs, self.n_kv_head)
            if older_start is not None:  # head h's row has its own tokens' columns in every lane: fold the rows
                H, lane_slots = self.n_kv_head, older.n_slots
                older_probs = probs[..., :H * lane_slots].unflatten(2, (H, lane_slots)).sum(1)
                probs = torch.cat([older_probs, probs[..., H * lane_slots:]], dim=2)
            return out, probs
        if is_store and recent_pos is None and recent_last is not None and not scores and q.device.type == "cpu" \
                and not torch.compiler.is_compiling():
            # Slots in position order (full's store): eager on the CPU, reading the batch's longest position costs
            # no device sync, so the step reads the slots held, not the whole allocation (a server's rows are
            # allocated for its longest request; compiled, the shapes stay static; scores keep every slot's column).
            held = int(recent_last.max()) + 1
            if recent.pool is None:
                recent_k, recent_v = recent.k[:B, :, :held], recent.v[:B, :, :held]
            else:
                recent_k, recent_v = recent.read(slice(0, B), torch.arange(held, device=q.device).expand(B, held))
        else:
            recent_k, recent_v = recent.logical(slice(0, B)) if is_store else recent
        if recent_pos is not None:  # ring slots hold their positions; with recent_last too they are filled in order
            first_recent = sink_size + (n_older[:, None] if older is not None else 0)
            keep = (recent_pos >= 0) & ((recent_pos < sink_size) | (recent_pos >= first_recent))
        else:
            keep = torch.arange(recent_k.shape[2], device=q.device) <= recent_last[:, None]
        if older is None:
            if scores:
                return attend_with_scores(q, recent_k, recent_v, keep)
            return attend(q, recent_k, recent_v, keep.view(B, 1, 1, -1))
        # The C kernel computes in float32: a float64 model (the tests' references) keeps the PyTorch path.
        # Not a PlaneStore (a QuantizedStore with low planes, which the C kernel does not read).
        if self.attn_impl == "cpu" and not scores and type(older) is QuantizedStore and q.dtype != torch.float64:
            return self.attend_codes(q, recent_k, recent_v, keep, older, n_older)
        H = recent_k.shape[1]
        lane = older_read or older.capacity
        older_k, older_v = older.dequantize(slice(0, B), lane, self.dtype)
        read, cells = lane, torch.arange(lane, device=q.device).expand(B, H, lane)  # each head's (lane, slot) read
        if older_start is not None:  # head-shared: each head's run out of the lanes' one (any head may hold it all)
            read = H * lane
            run = (older_start[:, :, None] + torch.arange(read, device=q.device)).clamp(max=read - 1)
            cells = run_cells(run, lane, older.n_slots)
            index = run[..., None].expand(B, H, read, older_k.shape[3])
            older_k, older_v = (x.reshape(B, 1, read, -1).expand(B, H, read, -1).gather(2, index)
                                for x in (older_k, older_v))
        older_keep = torch.arange(read, device=q.device) < n_older.view(B, -1, 1)  # (B, 1 or H, read)
        recent_keep = keep[:, None]
        if older_keep.shape[1] > 1:  # a count per head: a mask per query head
            older_keep, recent_keep = (x.expand(B, H, -1).repeat_interleave(q.shape[1] // H, dim=1)
                                       for x in (older_keep, recent_keep))
        if scores:  # older first, as the kernel lays the columns out: a token's column is its slot; unread score 0
            out, probs = attend_with_scores(q, torch.cat([older_k, recent_k], dim=2),
                                            torch.cat([older_v, recent_v], dim=2),
                                            torch.cat([older_keep, recent_keep], dim=2))
            older_probs = probs.new_zeros(B, H * older.n_slots)
            if older_start is None:
                older_probs = older_probs.view(B, H, -1).scatter_add_(2, cells, probs[..., :read])
            else:  # each head's probabilities to the lane and slot of its tokens
                older_probs = older_probs.scatter_add_(1, cells.flatten(1), probs[..., :read].flatten(1))
            return out, torch.cat([older_probs.view(B, H, -1), probs[..., read:]], dim=2)
        return attend(q, torch.cat([recent_k, older_k], dim=2), torch.cat([recent_v, older_v], dim=2),
                      torch.cat([recent_keep, older_keep], dim=2)[:, :, None])

    def attend_codes(self, q: Tensor, recent_k: Tensor, recent_v: Tensor, keep: Tensor, older: QuantizedStore,
                     n_older: Tensor, rows=None, chunk: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """attend_decode's torch path with --attn_impl cpu: one call of the C kernel (kernels/cpu_attention.py) reads
        the older store's codes where they are (never dequantized into a tensor: the bytes read per step shrink with
        the format, and only the n_older tokens held are read) and the recent tokens beside them.

        A prefill chunk too: q (R, n_head, T, D) of sequences `rows` (default the first R), whose T queries all see
        the older store's first n_older tokens and the recent slots `keep` marks, and causally the chunk's own keys
        and values, chunk = (k, v) (R, H, T, D). The kernel takes the T queries as T x n_head query heads (query
        head h * T + t reads KV head h // (n_head / H), as head h does) and returns its softmax partials; the
        chunk's own causal part, computed here, is merged with them (older_attention's formula). A chunk thus reads
        the codes once, where dequantizing the store for every chunk of every layer made a long prompt's prefill
        quadratic in its length with a large constant."""
        B, HQ, T, D = q.shape
        store = older.kernel_inputs(B if rows is None else rows)
        buffers = (store[name] for name in ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero"))
        scaled = q.float() * D ** -0.5
        acc, m, total = self.older_attention(scaled.reshape(B, HQ * T, D), *buffers, n_older, older.fmt,
                                             older.k_granularity, older.group_size, recent_k, recent_v, keep,
                                             store.get("older_table"), store.get("older_block", 0))
        if chunk is None:
            return (acc / total[..., None]).to(q.dtype).view(B, HQ, T, D)
        k, v = chunk
        H = k.shape[1]
        scores = (scaled.reshape(B, H, HQ // H * T, D) @ k.float().transpose(2, 3)).view(B, HQ, T, T)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        m_chunk = scores.amax(-1)  # finite: each query sees itself
        p = torch.exp(scores - m_chunk[..., None])
        acc_chunk = (p.view(B, H, -1, T) @ v.float()).view(B, HQ, T, D)
        m, total, acc = m.view(B, HQ, T), total.view(B, HQ, T), acc.view(B, HQ, T, D)
        m_both = torch.maximum(m, m_chunk)
        w, w_chunk = torch.exp(m - m_both), torch.exp(m_chunk - m_both)  # w = 0 where the kernel saw nothing
        out = (w[..., None] * acc + w_chunk[..., None] * acc_chunk) / (w * total + w_chunk * p.sum(-1))[..., None]
        return out.to(q.dtype)

    def row_groups(self) -> list[RowGroup]:
        """The batch's rows by KV configuration: here one group of every row (kv_cache/mixed.py holds several)."""
        return [RowGroup(self.name, 0, self.batch_size, self.pool, self.capacity(self.opts, self.max_seq_length))]

    def nbytes(self) -> int:
        """Bytes really allocated for this layer's cache: every buffer its stores hold (scales, zero-points and slot
        positions too); paged, the whole pool of this layer. The batch's active flags, the shared block table and
        --rotate's matrix (one per layer, not per token) are not KV storage."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if name.rsplit(".", 1)[-1] not in ("active", "table", "rotation"))

    def pool_nbytes(self) -> int:
        """Bytes of this layer's buffers that live in the shared block pool (0 when contiguous)."""
        return sum(module.pool_nbytes() for module in self.children())

    def copy_blocks(self, src: list, dst: list):
        """Copy pool blocks src into blocks dst in this layer's paged store (e.g. to give sequences copies of one
        prefilled sequence)."""
        for module in self.children():
            if getattr(module, "pool", None) is not None:
                module.copy_blocks(src, dst)

    def reset(self, rows: Optional[Tensor] = None):
        """Forget every stored token of sequences `rows` (all when None), so they can start again at position 0."""
        rows = torch.arange(self.batch_size, device=self.active.device) if rows is None else rows
        for module in self.children():
            module.reset(rows)
        self.active[rows] = True

    def finish(self, finished: Tensor):
        """finished (B,) bool: the sequences that have ended stop costing attention work (fused kernel) until they
        are reset. An elementwise update, so a decode loop calls it every step without a host sync."""
        self.active[:finished.shape[0]] &= ~finished


def rope_at(pos: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin of positions pos (R, T) (or (T,), the same for every row), shaped to rotate (R, heads, T, D)."""
    if pos.ndim == 2:
        pos = pos.unsqueeze(1)  # (R, 1, T): the tables come out (R, 1, T, D), broadcast over the heads
    return rope_cos[pos], rope_sin[pos]


def rotate(x: Tensor, pos: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
    """x (R, heads, T, D) rotated by positions pos (R, T) (or (T,))."""
    return apply_rope(x, *rope_at(pos, rope_cos, rope_sin))


def rotate_qk(q: Tensor, k: Tensor, pos: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> tuple[Tensor, Tensor]:
    """q and k rotated by the same positions (the tables gathered once)."""
    cos, sin = rope_at(pos, rope_cos, rope_sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def attn_impl_for(impl, device=None):
    """The decode implementation asked for, or the device's default (triton on CUDA when installed; on the CPU, cpu
    where its C kernel builds, else torch); a one-line ValueError when it cannot run there. device None: check the
    name only."""
    if impl is not None and impl not in ATTN_IMPLS:
        raise ValueError(f"--attn_impl {impl!r} is not available: use one of {', '.join(ATTN_IMPLS)}")
    if device is None:
        return impl
    has_triton = importlib.util.find_spec("triton") is not None
    on_cuda = torch.device(device).type == "cuda"
    if impl is None and torch.device(device).type == "cpu":
        from kernels.cpu_attention import available
        impl = "cpu" if available() else "torch"
    impl = impl or ("triton" if on_cuda and has_triton else "torch")
    if impl == "triton" and not has_triton:
        raise ValueError("--attn_impl triton needs the triton package (pip install triton): or use --attn_impl torch")
    if impl == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1" \
            and torch.device(device).type != "meta":
        raise ValueError("--attn_impl triton needs a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU "
                         "interpreter): use --attn_impl torch")
    if impl == "cpu" and torch.device(device).type not in ("cpu", "meta"):
        raise ValueError(f"--attn_impl cpu is the CPU's kernel, this cache is on {device}: use --attn_impl triton or "
                         "torch")
    if impl == "cpu" and torch.device(device).type == "cpu":
        from kernels.cpu_attention import load_error
        error = load_error()
        if error:
            raise ValueError(f"--attn_impl cpu cannot build its kernel ({error}): or use --attn_impl torch")
    return impl


def attention_probs(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention probabilities (B, n_head, T, S) in float32 of q (B, n_head, T, D) over keys k (B, n_kv_head,
    S, D); mask broadcastable to (B, 1, T, S), True = keep. A row that keeps nothing gets 0."""
    group = q.shape[1] // k.shape[1]
    logits = q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def per_kv_head(probs: Tensor, n_kv_head: int) -> Tensor:
    """Probabilities (B, n_head, ...) summed over the query heads that share each KV head: (B, n_kv_head, ...)."""
    return probs.unflatten(1, (n_kv_head, -1)).sum(2)


def attend_with_scores(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Decode attention of q (B, n_head, 1, D) over k, v (B, n_kv_head, S, D) with keep (B, S) (or (B, 1 or
    n_head, S): per query head), and the probabilities per KV head (B, n_kv_head, S) (attend_decode's scores)."""
    probs = attention_probs(q, k, (keep[:, None] if keep.dim() == 2 else keep)[:, :, None, :])
    out = (probs @ v.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)).to(q.dtype)
    return out, per_kv_head(probs[:, :, 0], k.shape[1])


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention of q (B, n_head, T, D) over k, v (B, n_kv_head, S, D); mask (T, S) or (B, 1, T, S), True =
    keep. Query heads are grouped onto KV heads (GQA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

