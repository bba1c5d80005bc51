"""full: every token's key and value in the model dtype, as gpt-fast keeps them."""
import torch
from torch import Tensor

from kv_cache.base import KVCache, add_attn_impl_argument, attend, attn_impl_for, register
from model import apply_rope


@register
class FullCache(KVCache):
    name = "full"
    help = "keep every token in the model dtype (no compression)"

    @classmethod
    def add_arguments(cls, parser):
        add_attn_impl_argument(parser)

    @classmethod
    def check_options(cls, options, max_seq_length, head_dim):
        attn_impl_for(options)

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, **options):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device)
        shape = (batch_size, n_kv_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device))
        self.use_attn_impl(options, device)

    def forward(self, q, k, v, input_pos: Tensor, rope_cos, rope_sin):
        cos, sin = rope_cos[input_pos], rope_sin[input_pos]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        B = q.shape[0]
        self.k_cache[:B].index_copy_(2, input_pos, k)
        self.v_cache[:B].index_copy_(2, input_pos, v)
        if self.attn_impl == "triton" and q.shape[2] == 1:
            # Reads only slots 0..input_pos (the torch path below masks the whole buffer).
            return self.decode_attention(q, self.k_cache[:B], self.v_cache[:B], hi_last=input_pos)
        # Static shapes: attend over the whole buffer, masking slots after each query's position (as gpt-fast).
        mask = torch.arange(self.max_seq_length, device=q.device) <= input_pos[:, None]
        return attend(q, self.k_cache[:B], self.v_cache[:B], mask)
