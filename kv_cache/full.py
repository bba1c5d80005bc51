"""full: every token's key and value in the model dtype, as gpt-fast keeps them (a DenseStore: slot = position)."""
import torch

from kv_cache.base import KVCache, attend, register, rotate_qk
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
        decode = self.is_decode(q, rows)
        rows, pos = self.rows_and_positions(q, input_pos, rows)
        q, k = rotate_qk(q, k, pos, rope_cos, rope_sin)
        self.store.write(rows, pos, k, v)
        if decode:  # the first R sequences, each up to its own position
            return self.attend_decode(q, self.store, hi_last=pos[:, 0])
        # Prefill: attend over the whole buffer (static shapes, as gpt-fast), masking slots after each query.
        keys, values = self.store.logical(rows)
        mask = torch.arange(keys.shape[2], device=q.device) <= pos[0, :, None]
        return attend(q, keys, values, mask)
