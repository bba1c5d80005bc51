"""compress_kv: StreamingLLM (Xiao et al., 2023). The cache keeps the first sink_size tokens (attention sinks) and the
most recent window_size tokens in the model dtype and evicts everything between, so its memory is constant however
long the stream runs: sink_size + window_size slots, allocated once and overwritten in place (the window is a ring).

Rotary positions, `--rope_positions`:
  * cache (default, as StreamingLLM): keys are stored unrotated and rotated at attention time by their rank inside
    the cache (sinks 0..S-1, then the window in position order); the query by its own rank. Every position the model
    sees is below sink_size + window_size (+ the chunk length during prefill), so generation stays fluent far past
    the model's trained context, which is the point of a streaming cache. (The RoPE tables need only
    sink_size + window_size + the longest prefill chunk rows.)
  * original: keys are rotated once at their absolute positions and stored rotated. Cheaper per step, but past the
    trained context the model meets rotary angles it never saw and degrades; the RoPE tables must cover every
    absolute position of the stream.

Decode (one token) writes the token, then attends to the sink_size + window_size tokens the cache keeps; its slot,
ranks and mask are tensor arithmetic on input_pos (no host sync); --attn_impl triton (the default on CUDA) attends
with the fused kernel of kernels/decode_attention.py (keys rotated in PyTorch first). A prefill chunk attends to
what the cache kept before the chunk plus the chunk itself causally, then keeps the chunk's sinks and last
window_size tokens. Any chunk length works, so prompts longer than the cache are fed in chunks (capacity None).
"""
import torch
from torch import Tensor

from kv_cache.base import KVCache, add_attn_impl_argument, attend, attn_impl_for, register
from model import apply_rope

SINK_SIZE, WINDOW_SIZE = 16, 32
ROPE_POSITIONS = ("cache", "original")


def add_sink_window_arguments(parser):
    parser.add_argument("--sink_size", type=int, default=SINK_SIZE,
                        help=f"first tokens always kept in the model dtype, the attention sinks (default {SINK_SIZE})")
    parser.add_argument("--window_size", type=int, default=WINDOW_SIZE,
                        help=f"most recent tokens kept in the model dtype (default {WINDOW_SIZE})")


def sink_window(options: dict) -> tuple[int, int]:
    """(sink_size, window_size) from the options, or a one-line ValueError."""
    sink_size, window_size = options.get("sink_size", SINK_SIZE), options.get("window_size", WINDOW_SIZE)
    if not isinstance(sink_size, int) or sink_size < 0:
        raise ValueError(f"--sink_size must be a whole number >= 0 (got {sink_size})")
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"--window_size must be a whole number >= 1 (got {window_size}): the newest token must stay")
    return sink_size, window_size


@register
class CompressKVCache(KVCache):
    name = "compress_kv"
    help = "StreamingLLM: keep the first sink_size and the last window_size tokens, evict the middle"

    @classmethod
    def add_arguments(cls, parser):
        add_sink_window_arguments(parser)
        parser.add_argument("--rope_positions", choices=ROPE_POSITIONS, default="cache",
                            help="rotate keys by their rank inside the cache (default, fluent past the trained "
                                 "context) or by their original absolute position")
        add_attn_impl_argument(parser)

    @classmethod
    def check_options(cls, options, max_seq_length, head_dim):
        sink_window(options)
        rope_positions = options.get("rope_positions", "cache")
        if rope_positions not in ROPE_POSITIONS:
            raise ValueError(f"--rope_positions {rope_positions!r} is not supported: use cache or original")
        attn_impl_for(options)

    @classmethod
    def capacity(cls, options, max_seq_length):
        return None  # constant memory: streams without end

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, **options):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device)
        self.check_options(options, max_seq_length, head_dim)
        self.sink_size, self.window_size = sink_window(options)
        self.rope_positions = options.get("rope_positions", "cache")
        self.use_attn_impl(options, device)
        shape = (batch_size, n_kv_head, self.sink_size + self.window_size, head_dim)
        self.register_buffer("hi_k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("hi_v", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("hi_pos", torch.full(shape[2:3], -1, dtype=torch.long, device=device))  # -1: empty

    def reset(self):
        super().reset()
        self.hi_pos.fill_(-1)

    def _slots(self, pos: Tensor) -> Tensor:
        """Slot of each position: sinks in place, later tokens in the window ring."""
        S, W = self.sink_size, self.window_size
        return torch.where(pos < S, pos, S + (pos - S) % W)

    def _ranks(self, n_evicted) -> Tensor:
        """Rank inside the cache of each slot's token, when n_evicted tokens have left the middle (0 for empty slots,
        which are masked anyway): sinks keep their positions and the window follows them in order."""
        pos = self.hi_pos
        return torch.where(pos < self.sink_size, pos, pos - n_evicted).clamp(min=0)

    def forward(self, q, k, v, input_pos: Tensor, rope_cos, rope_sin):
        if q.shape[2] == 1:
            return self._decode(q, k, v, input_pos, rope_cos, rope_sin)
        return self._prefill(q, k, v, input_pos, rope_cos, rope_sin)

    def _decode(self, q, k, v, input_pos, rope_cos, rope_sin):
        B, S, W = q.shape[0], self.sink_size, self.window_size
        if self.rope_positions == "original":
            cos, sin = rope_cos[input_pos], rope_sin[input_pos]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        slot = self._slots(input_pos)  # the window slot of the token that leaves the window now
        self.hi_k[:B].index_copy_(2, slot, k)
        self.hi_v[:B].index_copy_(2, slot, v)
        self.hi_pos.index_copy_(0, slot, input_pos)
        keys = self.hi_k[:B]
        if self.rope_positions == "cache":
            n_evicted = (input_pos + 1 - S - W).clamp(min=0)
            rank = self._ranks(n_evicted)
            keys = apply_rope(keys, rope_cos[rank], rope_sin[rank])
            q_rank = input_pos - n_evicted
            q = apply_rope(q, rope_cos[q_rank], rope_sin[q_rank])
        if self.attn_impl == "triton":  # the fused kernel skips empty slots (hi_pos < 0) itself
            return self.decode_attention(q, keys, self.hi_v[:B], hi_pos=self.hi_pos)
        return attend(q, keys, self.hi_v[:B], (self.hi_pos >= 0)[None])

    def _prefill(self, q, k, v, input_pos, rope_cos, rope_sin):
        B, T, S, W = q.shape[0], q.shape[2], self.sink_size, self.window_size
        first = int(input_pos[0])
        last = first + T - 1
        if self.rope_positions == "cache":
            rank = self._ranks(max(0, first - S - W))
            old_k = apply_rope(self.hi_k[:B], rope_cos[rank], rope_sin[rank])
            n_held = min(first, S + W)
            chunk_rank = torch.arange(n_held, n_held + T, device=q.device)
            cos, sin = rope_cos[chunk_rank], rope_sin[chunk_rank]
            q, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            stored_k = k  # unrotated
        else:
            old_k = self.hi_k[:B]
            cos, sin = rope_cos[input_pos], rope_sin[input_pos]
            q, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            stored_k = k_rot
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = torch.cat([(self.hi_pos >= 0).expand(T, -1), causal], dim=1)
        out = attend(q, torch.cat([old_k, k_rot], dim=2), torch.cat([self.hi_v[:B], v], dim=2), mask)
        # Keep the chunk's sinks and its last W tokens (earlier ones would be overwritten in the ring anyway).
        idx = ((input_pos < S) | (input_pos > last - W)).nonzero().squeeze(1)
        pos = input_pos[idx]
        slot = self._slots(pos)
        self.hi_k[:B].index_copy_(2, slot, stored_k[:, :, idx])
        self.hi_v[:B].index_copy_(2, slot, v[:, :, idx])
        self.hi_pos.index_copy_(0, slot, pos)
        return out
