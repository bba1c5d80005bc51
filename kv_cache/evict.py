"""Eviction under a fixed budget, the machinery every eviction policy shares (kv_cache/snapkv.py, h2o.py, tova.py):
a policy only says how tokens are scored; this file keeps the tokens, evicts the lowest-scored ones and frees what
it evicts (constant memory, contiguous or paged).

A sequence keeps at most --budget tokens per KV head:
  * the first sink_size tokens and the most recent window_size ones in the model dtype, the recent store (a
    RingStore shared by the heads, as compress_kv's), never evicted;
  * older_size = budget - sink_size - window_size older tokens that each KV head chooses by its policy's scores, in
    the per-head older store (layout: kv_cache/stores.py): the model dtype (DenseOlderStore) or, with --then_bits,
    quantized per token (QuantizedStore: int8 / fp8 per token, KIVI int4 / int2 values and keys per token in channel
    groups; KIVI's per-channel keys need groups of consecutive tokens, which eviction breaks). The first n_older
    slots of every head are valid (the same count for all heads: each step moves one token per head); each token's
    position and score sit beside it (older_pos, older_score).

Keys are rotated at their absolute positions before they are stored (as full, quantize_kv), so an older token needs
no re-rotation wherever it sits; attention reads the ring as the recent store (slots 0 .. min(p, S + W - 1)) and
the first n_older tokens of the older store, and the fused kernel returns every token's attention probability with
the output (kernels/decode_attention.py return_scores), from which the policy updates the scores: no second pass
over keys.

Decode (static shapes, no host sync; one token per sequence at its own position p): the token leaving the window
(position p - W, in the ring slot p overwrites) moves into the older store while it has room; when it is full, it
replaces the head's lowest-scored older token if it scores higher (policy.replaces), else it is dropped (written to
the scratch slot). Then p is stored in the ring, attention runs, and the policy folds this step's probabilities
into the scores of every stored token (policy.update).

Prefill (a chunk of T tokens at the same positions in each row it feeds): the chunk attends to what the cache holds
plus itself causally in full precision (SDPA); the policy scores every held and new token from the attention of
the queries it names (policy.score_queries); sinks and the last window_size tokens go to the ring, and each head
keeps the best-scored min(older_size, candidates) of the rest, compacted into its first slots (tokens already in
the older store are copied in their stored form, not quantized twice). A policy that needs the whole prompt in view
(SnapKV's observation window is the prompt's end) asks for it with whole_prompt: the engine then prefills it in one
chunk (runner.py).

Sizing: a budget at least the tokens a sequence ever holds (max_seq_length) never evicts, and would allocate up to
budget / max_seq_length times the full cache (26x for a 10-token run at the default 256): the cache is then the full
cache (as compress_kv's Sizing), a DenseStore of max_seq_length slots with full's forward, bytes and outputs. Paged, the older store is cut into blocks taken as it fills (PageSpace below) and the ring stays per
sequence; what a sequence evicts is overwritten in its own blocks, which return to the pool when it ends.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kernels.formats import FORMATS, get_format
from kv_cache.base import (GROUP_SIZE, KVCache, SinkWindowOptions, attend, attention_probs, option, per_kv_head,
                           rotate_qk)
from kv_cache.paging import PageSpace, round_up
from kv_cache.rotation import RotateOptions, rotated, rotation_matrix
from kv_cache.stores import DenseOlderStore, DenseStore, QuantizedStore, RingStore


@dataclass
class Chunk:
    """A prefill chunk as it came into the cache, for policies that score from the queries themselves: its queries
    before RoPE (R, n_head, T, D), the position after its last and the model's RoPE tables."""
    q: Tensor
    end: int
    rope_cos: Tensor
    rope_sin: Tensor


@dataclass
class EvictOptions(SinkWindowOptions, RotateOptions):
    budget: int = option(256, "tokens kept per sequence and KV head in all: sinks + window + the policy's choice")
    then_bits: Optional[str] = option(None, "store the tokens the policy keeps (beyond sinks and window) in this "
                                            "format: 8, 4, 2 or fp8 (default: the model dtype)",
                                      choices=list(FORMATS))
    group_size: int = option(GROUP_SIZE, "--then_bits 4/2: channels per scale (keys and values per token)")

    def check(self, head_dim):
        super().check(head_dim)
        if not isinstance(self.budget, int) or self.budget <= self.sink_size + self.window_size:
            raise ValueError(f"--budget {self.budget} leaves no room beyond --sink_size {self.sink_size} + "
                             f"--window_size {self.window_size}: use --budget {self.sink_size + self.window_size + 1} "
                             "or more, or compress_kv for sinks + window alone")
        if self.rotate != "none" and self.then_bits is None:
            raise ValueError(f"--rotate {self.rotate} rotates the tokens that are quantized: add --then_bits (e.g. 4 "
                             "or 2), or drop --rotate")
        fmt = None if self.then_bits is None else get_format(self.then_bits)
        if fmt is not None and fmt.asymmetric and head_dim is not None:
            if head_dim % self.group_size or head_dim % fmt.per_byte:
                raise ValueError(f"--group_size {self.group_size} must divide head_dim {head_dim} for --then_bits "
                                 f"{self.then_bits}: use e.g. --group_size {math.gcd(self.group_size, head_dim)}")

    def derive(self, head_dim):
        super().derive(head_dim)
        self.format = None if self.then_bits is None else get_format(self.then_bits)

    @property
    def older_size(self) -> int:
        """Slots per head for the policy's choice (beyond sinks and window)."""
        return self.budget - self.sink_size - self.window_size

    def n_older(self, length: int) -> int:
        """Tokens in the older store once a sequence has seen `length` tokens: every token past sinks + window, up to
        the room."""
        return min(self.older_size, max(0, length - self.sink_size - self.window_size))


class EvictionCache(KVCache):
    """Base of the eviction policies: subclasses set name, help, Options and the scoring methods below."""

    Options = EvictOptions
    replaces = True  # when the older store is full, a token leaving the window may replace the lowest-scored one

    # ------------------------------------------------------------ the policy (override these)

    def score_queries(self, T: int) -> slice:
        """The queries of a T-token prefill chunk whose attention scores the tokens."""
        return slice(0, T)

    def prefill_scores(self, probs: Tensor, old: Tensor, pos: Tensor) -> Tensor:
        """Scores (R, H, N) of the N tokens a chunk's queries attended to, from their probabilities (R, H, Q, N)
        (summed over each KV head's query heads), the tokens' scores before the chunk, old (R, H, N) (0 for the
        chunk's own), and their positions pos (R, H, N) (-1: an empty slot, probability 0)."""
        raise NotImplementedError

    def update(self, scores: Tensor, probs: Tensor) -> Tensor:
        """Scores after a decode step whose attention probabilities (per KV head) are probs (same shape)."""
        raise NotImplementedError

    def prompt_attention(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, chunk) -> Tensor:
        """What prefill_scores scores from, (R, H, Q, N): by default the attention probabilities of the queries
        score_queries names, summed over each KV head's query heads. q (R, n_head, T, D) as attended (rotated),
        keys and values (R, H, N, D) every token the chunk sees, mask (R, 1, T, N); chunk: the chunk's Chunk (its
        queries before RoPE and the RoPE tables), for a policy that scores from the queries themselves."""
        queries = self.score_queries(q.shape[2])
        return per_kv_head(attention_probs(q[:, :, queries], keys, mask[:, :, queries]), self.n_kv_head)

    # ------------------------------------------------------------ storage

    @classmethod
    def holds_everything(cls, options, max_seq_length) -> bool:
        """The budget holds every token a run can have: nothing is ever evicted (Sizing above)."""
        return cls.Options.resolve(options, None).budget >= max_seq_length

    @classmethod
    def capacity(cls, options, max_seq_length):
        if cls.holds_everything(options, max_seq_length):
            return max_seq_length  # sized as the full cache: it cannot hold more
        return None  # constant memory: streams without end

    @classmethod
    def bytes_per_token(cls, options, n_kv_head, head_dim, dtype):
        """Bytes of one token of the older store in one layer and sequence: its stored form plus its score and
        position."""
        opts = cls.Options.resolve(options, head_dim)
        stored = (2 * head_dim * dtype.itemsize if opts.format is None else
                  QuantizedStore.bytes_per_token(opts.format, opts.group_size, "token", head_dim))
        return n_kv_head * (stored + 4 + 4)

    @classmethod
    def page_space(cls, options, max_seq_length, block_size):
        """Paged: the older store, in blocks taken as it fills, and one more logical block for the scratch slot
        (never reserved: the null block). The ring stays per sequence."""
        if cls.holds_everything(options, max_seq_length):
            return super().page_space(options, max_seq_length, block_size)
        opts = cls.Options.resolve(options, None)
        n_slots = round_up(opts.older_size, block_size) + block_size
        return PageSpace(block_size, n_slots, opts.n_older)

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options=None, pool=None,
                 **option_values):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options, pool,
                         **option_values)
        opts = self.opts
        self.sink_size, self.window_size, self.older_size = opts.sink_size, opts.window_size, opts.older_size
        self.as_full = self.holds_everything(opts, max_seq_length)
        if self.as_full:  # nothing to evict: exactly the full cache's storage, no scores
            self.store = DenseStore(batch_size, n_kv_head, max_seq_length, head_dim, dtype, device, pool)
            return
        self.ring = RingStore(batch_size, n_kv_head, self.sink_size, self.window_size, head_dim, dtype, device)
        if opts.format is None:
            self.older = DenseOlderStore(batch_size, n_kv_head, opts.older_size, head_dim, dtype, device, pool)
        else:
            self.older = QuantizedStore(batch_size, n_kv_head, opts.older_size, head_dim, opts.format,
                                        opts.group_size, "token", device, pool)
        self.scratch = self.older.capacity  # the slot a dropped token is written to
        self.rotate = opts.rotate != "none"  # q, k, v in, output out (kv_cache/rotation.py): scores are unchanged
        if self.rotate:  # not KV storage: nbytes() leaves it out
            self.register_buffer("rotation", rotation_matrix(opts.rotate, head_dim, dtype, device), persistent=False)
        n_ring, n_older_slots = self.ring.n_slots, self.older.n_slots
        self.register_buffer("ring_score", torch.zeros(batch_size, n_kv_head, n_ring, device=device))
        self.register_buffer("older_score", torch.zeros(batch_size, n_kv_head, n_older_slots, device=device))
        self.register_buffer("older_pos", torch.full((batch_size, n_kv_head, n_older_slots), -1, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("n_older", torch.zeros(batch_size, dtype=torch.long, device=device))

    def reset(self, rows=None):
        super().reset(rows)
        if self.as_full:
            return
        rows = slice(None) if rows is None else rows
        self.ring_score[rows] = 0
        self.older_score[rows] = 0
        self.older_pos[rows] = -1
        self.n_older[rows] = 0

    def older_tokens(self, row: int) -> list[list[int]]:
        """Per KV head, the positions sequence `row` keeps beyond sinks and window, sorted (for tests and reports)."""
        n = int(self.n_older[row])
        return [sorted(head[:n]) for head in self.older_pos[row].tolist()]

    # ------------------------------------------------------------ attention

    def forward(self, q, k, v, input_pos, rope_cos, rope_sin, rows=None):
        if self.as_full:
            return self.forward_full(self.store, q, k, v, input_pos, rope_cos, rope_sin, rows)
        decode = self.is_decode(q, rows)
        rows, pos = self.rows_and_positions(q, input_pos, rows)
        chunk = None if decode else Chunk(q, int(pos[0, -1]) + 1, rope_cos, rope_sin)
        q, k = rotate_qk(q, k, pos, rope_cos, rope_sin)
        if self.rotate:
            q, k, v = (rotated(x, self.rotation) for x in (q, k, v))
        out = self._decode(q, k, v, pos) if decode else self._prefill(q, k, v, pos, rows, chunk)
        return rotated(out, self.rotation.T) if self.rotate else out

    def _decode(self, q, k, v, pos):
        R, H, S, W = q.shape[0], self.n_kv_head, self.sink_size, self.window_size
        rows, ring = slice(0, R), self.ring
        slot = ring.slots(pos)  # (R, 1): the ring slot p takes, whose token (if older) leaves the window
        leaving_pos = ring.pos[:R].gather(1, slot)  # (R, 1), -1 while the ring fills
        leaves = (leaving_pos[:, 0] >= S) & (leaving_pos[:, 0] < pos[:, 0])  # a finished row repeats p: no move
        head_slot = slot[:, None, :].expand(R, H, 1)
        leaving_score = self.ring_score[:R].gather(2, head_slot)[..., 0]  # (R, H)
        n_older = self.n_older[:R]
        has_room = n_older < self.older_size
        lowest, lowest_slot = self.older_score[:R, :, :self.older_size].min(-1)  # (R, H)
        replace = (leaving_score > lowest) if self.replaces else torch.zeros_like(lowest, dtype=torch.bool)
        target = torch.where(has_room[:, None], n_older[:, None], torch.where(replace, lowest_slot, self.scratch))
        target = torch.where(leaves[:, None], target, self.scratch)[..., None]  # (R, H, 1)
        self.older.write_heads(rows, target, *ring.read(rows, slot))
        self.older_pos[:R].scatter_(2, target, leaving_pos[:, None, :].expand(R, H, 1).int())
        self.older_score[:R].scatter_(2, target, leaving_score[..., None])
        self.n_older[:R] += leaves & has_room
        ring.write_positions(rows, pos, k, v)
        self.ring_score[:R].scatter_(2, head_slot, 0.0)
        recent_last = pos[:, 0].clamp(max=ring.n_slots - 1)  # the ring fills slots 0, 1, ... in order, then wraps
        out, probs = self.attend_decode(q, ring, recent_last=recent_last, n_older=self.n_older[:R], older=self.older,
                                        scores=True, older_read=self.older_size)
        n_older_slots = self.older.n_slots
        self.older_score[:R] = self.update(self.older_score[:R], probs[..., :n_older_slots])
        self.ring_score[:R] = self.update(self.ring_score[:R], probs[..., n_older_slots:])
        return out

    def _prefill(self, q, k, v, pos, rows, chunk):
        R, H, T = q.shape[0], self.n_kv_head, q.shape[2]
        S, W, first = self.sink_size, self.window_size, int(pos[0, 0])
        end = first + T
        n_before, n_after = self.opts.n_older(first), self.opts.n_older(end)
        ring_k, ring_v = self.ring.logical(rows)
        ring_pos = self.ring.pos[rows]
        older_k, older_v = self.older.dequantize(rows, n_before, self.dtype)
        keys, values = torch.cat([older_k, ring_k, k], dim=2), torch.cat([older_v, ring_v, v], dim=2)
        # Every token the chunk sees: older (per head), ring, chunk; positions (R, H, N), -1 for empty ring slots.
        chunk_pos = pos[:, None, :].expand(R, H, T)
        all_pos = torch.cat([self.older_pos[rows, :, :n_before].long(), ring_pos[:, None, :].expand(R, H, -1),
                             chunk_pos], dim=2)
        held = torch.ones(R, 1, T, n_before + ring_pos.shape[1], dtype=torch.bool, device=q.device)
        held[..., n_before:] = (ring_pos >= 0)[:, None, None, :]
        mask = torch.cat([held, torch.ones(T, T, dtype=torch.bool, device=q.device).tril().expand(R, 1, T, T)], -1)
        out = attend(q, keys, values, mask)
        probs = self.prompt_attention(q, keys, values, mask, chunk)  # (R, H, Q, N)
        old = torch.cat([self.older_score[rows, :, :n_before], self.ring_score[rows],
                         torch.zeros(R, H, T, device=q.device)], dim=2)
        scores = self.prefill_scores(probs, old, all_pos)
        in_ring = (all_pos >= 0) & ((all_pos < S) | (all_pos >= end - W))
        candidate = (all_pos >= S) & (all_pos < end - W)
        if n_after:
            # Each head keeps its best-scored candidates, in position order, as the stored form: the older store's as
            # they are, the ring's and the chunk's quantized now (a token is quantized once).
            # Ties (a pooled score over a short prompt) go to the earlier position: a stable sort by score of the
            # tokens in position order, so the choice never depends on the layout (heads per rank, paging).
            by_pos = all_pos.argsort(dim=-1, stable=True)
            ranked = scores.masked_fill(~candidate, float("-inf")).gather(2, by_pos).sort(dim=-1, descending=True,
                                                                                        stable=True).indices
            best = by_pos.gather(2, ranked[..., :n_after])
            chosen = all_pos.gather(2, best).sort(-1)
            best = best.gather(2, chosen.indices)
            stored = self.older.raw(rows, n_before)
            fresh = self.older.encode(torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2))
            slots = torch.arange(n_after, device=q.device).expand(R, -1)
            self.older.write_raw(rows, slots, {
                name: torch.cat([stored[name], x], dim=2).gather(
                    2, best.view(*best.shape, 1).expand(*best.shape, x.shape[-1])) for name, x in fresh.items()})
            self.older_pos[rows, :, :n_after] = chosen.values.int()
            self.older_score[rows, :, :n_after] = scores.gather(2, best)
        self.n_older[rows] = n_after
        # The ring keeps sinks and the last W tokens: the chunk's are stored, and every ring token gets its score.
        idx = ((pos[0] < S) | (pos[0] >= end - W)).nonzero().squeeze(1)
        self.ring.write_positions(rows, pos[:, idx], k[:, :, idx], v[:, :, idx])
        ring_scores = scores.masked_fill(~in_ring, 0.0)
        ring_slot = self.ring.slots(all_pos.clamp(min=0)).masked_fill(~in_ring, self.ring.n_slots)
        new_ring_score = torch.zeros(R, H, self.ring.n_slots + 1, device=q.device)
        self.ring_score[rows] = new_ring_score.scatter_add_(2, ring_slot, ring_scores)[..., :-1]
        return out
