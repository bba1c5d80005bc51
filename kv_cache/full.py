"""full: every token's key and value in the model dtype, as gpt-fast keeps them (a DenseStore: slot = position)."""
from kv_cache.base import KVCache, register
from kv_cache.stores import DenseStore


@register
class FullCache(KVCache):
    name = "full"
    help = "keep every token in the model dtype (no compression)"

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options=None, pool=None,
                 **option_values):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options, pool,
                         **option_values)
        self.store = DenseStore(batch_size, n_kv_head, max_seq_length, head_dim, dtype, device, pool)

    def forward(self, q, k, v, input_pos, rope_cos, rope_sin, rows=None):
        return self.forward_full(self.store, q, k, v, input_pos, rope_cos, rope_sin, rows)
