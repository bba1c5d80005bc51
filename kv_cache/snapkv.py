"""snapkv: SnapKV (Li et al., 2024) prompt compression under a fixed budget (kv_cache/evict.py keeps and frees).

After the prompt, each KV head keeps the prompt tokens that the last --obs_window prompt queries (the observation
window; by default window_size, the window kept in the model dtype) attend to most, their attention summed over
those queries and the head's query heads and smoothed by average pooling over --kernel_size neighbouring positions
(so a kept token brings its context; kv_cache/evict.py pools, for any policy), plus the sinks and the window.
Decoding then appends: tokens leaving the window fill the free slots of the older store, and once the budget is
full they are dropped (the prompt's selection is never revised, as SnapKV). The whole prompt is prefilled in one
chunk so that the observation window is the prompt's end.
"""
from dataclasses import dataclass

from kv_cache.base import option, register
from kv_cache.evict import EvictionCache, EvictOptions


@dataclass
class SnapKVOptions(EvictOptions):
    obs_window: int = option(0, "SnapKV's observation window: the last this many prompt queries score the prompt "
                                "(0: --window_size)")

    def check(self, head_dim):
        super().check(head_dim)
        if self.decode_kernel_size != 1:
            raise ValueError("snapkv never revises its choice while decoding, so --decode_kernel_size has no "
                             "effect: drop it (it serves tova)")
        if not isinstance(self.obs_window, int) or self.obs_window < 0:
            raise ValueError(f"--obs_window must be a whole number of queries >= 0 (got {self.obs_window}): "
                             "e.g. 64, or 0 for --window_size")


@register
class SnapKVCache(EvictionCache):
    name = "snapkv"
    help = "SnapKV: keep the prompt tokens the last window_size queries attend to most, plus sinks and window"
    Options = SnapKVOptions
    whole_prompt = True
    replaces = False

    def score_queries(self, T):
        return slice(max(0, T - (self.opts.obs_window or self.window_size)), T)

    def update(self, scores, probs, pos, now):
        return scores  # decoding never revises the prompt's selection
