"""compress_kv: StreamingLLM (Xiao et al., 2023). The cache keeps the first sink_size tokens (attention sinks) and the
most recent window_size tokens in the model dtype and evicts everything between, so its memory is constant however
long the stream runs: a RingStore of sink_size + window_size slots per sequence, overwritten in place.

Rotary positions, `--rope_positions`:
  * cache (default, as StreamingLLM): keys are stored unrotated and rotated at attention time by their rank inside
    the cache (sinks 0..S-1, then the window in position order); the query by its own rank. Every position the model
    sees is below sink_size + window_size (+ the chunk length during prefill), so generation stays fluent far past
    the model's trained context, which is the point of a streaming cache. (The RoPE tables need only
    sink_size + window_size + the longest prefill chunk rows.)
  * original: keys are rotated once at their absolute positions and stored rotated. Cheaper per step, but past the
    trained context the model meets rotary angles it never saw and degrades; the RoPE tables must cover every
    absolute position of the stream.

Decode (one token per sequence, each at its own position) writes the token, then attends to what its sequence
keeps; slots, ranks and masks are tensor arithmetic on the positions (no host sync). A prefill chunk attends to what
the cache kept before the chunk plus the chunk itself causally, then keeps the chunk's sinks and last window_size
tokens. Any chunk length works, so prompts longer than the cache are fed in chunks (capacity None).

Sizing: when sink_size + window_size > max_seq_length, a run that fits max_seq_length never evicts anything, and
S + W slots would cost up to (S + W) / max_seq_length times the full cache (3.2x for a 15-token run with 16/32). The
cache is then the full cache: a DenseStore of max_seq_length slots, full's forward (KVCache.forward_full), full's
bytes and outputs, and capacity max_seq_length (a longer stream needs --max_seq_length >= sink_size + window_size to
stream on).
"""
from dataclasses import dataclass

import torch

from kv_cache.base import KVCache, SinkWindowOptions, attend, option, register, rotate, rotate_qk
from kv_cache.paging import PageSpace, round_up
from kv_cache.stores import DenseStore, RingStore

ROPE_POSITIONS = ("cache", "original")


@dataclass
class CompressOptions(SinkWindowOptions):
    rope_positions: str = option("cache", "rotate keys by their rank inside the cache (fluent past the trained "
                                          "context) or by their original absolute position", choices=ROPE_POSITIONS)


def holds_everything(opts: SinkWindowOptions, max_seq_length: int) -> bool:
    """Sinks + window outnumber the tokens the cache is sized for: within max_seq_length nothing is ever evicted."""
    return opts.sink_size + opts.window_size > max_seq_length


@register
class CompressKVCache(KVCache):
    name = "compress_kv"
    help = "StreamingLLM: keep the first sink_size and the last window_size tokens, evict the middle"
    Options = CompressOptions

    @classmethod
    def capacity(cls, options, max_seq_length):
        if holds_everything(cls.Options.resolve(options, None), max_seq_length):
            return max_seq_length  # sized as the full cache (see Sizing above): it cannot hold more
        return None  # constant memory: streams without end

    @classmethod
    def page_space(cls, options, max_seq_length, block_size):
        """Paged, the ring's S + W slots are cut into blocks taken as the ring fills: a sequence never holds more
        than ceil((S + W) / block) blocks. What is evicted is overwritten in place in the sequence's own blocks
        (the same bytes as returning them and taking new ones, without the pool's traffic); they all return when
        the sequence ends."""
        opts = cls.Options.resolve(options, None)
        if holds_everything(opts, max_seq_length):
            return super().page_space(options, max_seq_length, block_size)
        held = opts.sink_size + opts.window_size
        return PageSpace(block_size, round_up(held, block_size), lambda n: min(n, held))

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options=None, pool=None,
                 **option_values):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options, pool,
                         **option_values)
        self.sink_size, self.window_size = self.opts.sink_size, self.opts.window_size
        self.rope_positions = self.opts.rope_positions
        self.as_full = holds_everything(self.opts, max_seq_length)
        if self.as_full:  # nothing to evict: exactly the full cache's storage (no slot positions either)
            self.store = DenseStore(batch_size, n_kv_head, max_seq_length, head_dim, dtype, device, pool)
            return
        self.ring = RingStore(batch_size, n_kv_head, self.sink_size, self.window_size, head_dim, dtype, device, pool)

    def _ranks(self, ring_pos, n_evicted):
        """Rank inside the cache of each slot's token (R, S + W), when n_evicted (R, 1) tokens have left the middle
        (0 for empty slots, which are masked anyway): sinks keep their positions and the window follows in order."""
        return torch.where(ring_pos < self.sink_size, ring_pos, ring_pos - n_evicted).clamp(min=0)

    def forward(self, q, k, v, input_pos, rope_cos, rope_sin, rows=None):
        if self.as_full:  # rank in the cache = absolute position while nothing is evicted: both rope modes agree
            return self.forward_full(self.store, q, k, v, input_pos, rope_cos, rope_sin, rows)
        decode = self.is_decode(q, rows)
        rows, pos = self.rows_and_positions(q, input_pos, rows)
        if self.rope_positions == "original":
            q, k = rotate_qk(q, k, pos, rope_cos, rope_sin)
        if decode:
            return self._decode(q, k, v, pos, rows, rope_cos, rope_sin)
        return self._prefill(q, k, v, pos, rows, rope_cos, rope_sin)

    def _decode(self, q, k, v, pos, rows, rope_cos, rope_sin):
        R = q.shape[0]
        self.ring.write_positions(rows, pos, k, v)
        ring_pos = self.ring.pos[:R]
        recent = self.ring  # keys stored rotated: the kernel reads the ring as it is (through the table when paged)
        if self.rope_positions == "cache":  # keys rotated now by their rank: a (small, S + W) rotated copy
            keys, values = self.ring.logical(slice(0, R))
            n_evicted = (pos + 1 - self.sink_size - self.window_size).clamp(min=0)  # (R, 1)
            recent = (rotate(keys, self._ranks(ring_pos, n_evicted), rope_cos, rope_sin), values)
            q = rotate(q, pos - n_evicted, rope_cos, rope_sin)
        return self.attend_decode(q, recent, recent_pos=ring_pos)

    def _prefill(self, q, k, v, pos, rows, rope_cos, rope_sin):
        T, S, W = q.shape[2], self.sink_size, self.window_size
        first = int(pos[0, 0])
        chunk_pos = pos[0]
        ring_pos = self.ring.pos[rows]
        ring_k, ring_v = self.ring.logical(rows)
        if self.rope_positions == "cache":
            old_k = rotate(ring_k, self._ranks(ring_pos, max(0, first - S - W)), rope_cos, rope_sin)
            n_held = min(first, S + W)
            chunk_rank = torch.arange(n_held, n_held + T, device=q.device)
            q, k_rot = rotate_qk(q, k, chunk_rank, rope_cos, rope_sin)
            stored_k = k  # unrotated
        else:
            old_k, k_rot = ring_k, k
            stored_k = k  # already rotated at absolute positions
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = torch.cat([(ring_pos >= 0)[:, None, None, :].expand(-1, 1, T, -1),
                          causal.expand(q.shape[0], 1, T, T)], dim=-1)
        out = attend(q, torch.cat([old_k, k_rot], dim=2), torch.cat([ring_v, v], dim=2), mask)
        # Keep the chunk's sinks and its last W tokens (earlier ones would be overwritten in the ring anyway).
        idx = ((chunk_pos < S) | (chunk_pos > first + T - 1 - W)).nonzero().squeeze(1)
        self.ring.write_positions(rows, pos[:, idx], stored_k[:, :, idx], v[:, :, idx])
        return out
