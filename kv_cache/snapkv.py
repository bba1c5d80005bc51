"""snapkv: SnapKV (Li et al., 2024) prompt compression under a fixed budget (kv_cache/evict.py keeps and frees).

After the prompt, each KV head keeps the prompt tokens that the last window_size prompt queries (the observation
window, which is also the window kept in the model dtype) attend to most, their attention summed over those queries
and the head's query heads and smoothed by average pooling over kernel_size neighbouring positions (so a kept token
brings its context), plus the sinks and the window. Decoding then appends: tokens leaving the window fill the free
slots of the older store, and once the budget is full they are dropped (the prompt's selection is never revised, as
SnapKV). The whole prompt is prefilled in one chunk so that the observation window is the prompt's end.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from kv_cache.base import option, register
from kv_cache.evict import EvictionCache, EvictOptions


@dataclass
class SnapKVOptions(EvictOptions):
    # 15, not SnapKV's 5-7: tokenizers that spell numbers digit by digit (SmolLM2; Llama-3 up to 3 digits a token)
    # need the whole run of a needle's digits kept to copy it (measured: README, "Eviction under a fixed budget").
    kernel_size: int = option(15, "SnapKV's pooling: scores averaged over this many neighbouring positions (odd)")

    def check(self, head_dim):
        super().check(head_dim)
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"--kernel_size must be an odd whole number >= 1 (got {self.kernel_size})")


@register
class SnapKVCache(EvictionCache):
    name = "snapkv"
    help = "SnapKV: keep the prompt tokens the last window_size queries attend to most, plus sinks and window"
    Options = SnapKVOptions
    whole_prompt = True
    replaces = False

    def score_queries(self, T):
        return slice(max(0, T - self.window_size), T)

    def prefill_scores(self, probs, old, pos):
        """Attention from the observation window, pooled over neighbouring positions (in position order: held
        tokens sit in the cache in no particular order)."""
        order = pos.argsort(-1)  # empty slots (-1, probability 0) first
        mass = probs.sum(2).gather(2, order)
        held = (pos.gather(2, order) >= 0).float()
        k = self.opts.kernel_size
        window_sum = lambda x: F.avg_pool1d(x, k, stride=1, padding=k // 2, count_include_pad=True)  # noqa: E731
        pooled = window_sum(mass) / window_sum(held).clamp(min=1 / k)  # the mean over held neighbours only
        return pooled.scatter(2, order, pooled)

    def update(self, scores, probs):
        return scores  # decoding never revises the prompt's selection
