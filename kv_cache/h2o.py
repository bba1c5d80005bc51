"""h2o and tova: decode-time eviction under a fixed budget (kv_cache/evict.py keeps, evicts and frees; these
policies only score). Scores come with the fused kernel's output (no second pass over the keys).

  h2o   Heavy-Hitter Oracle (Zhang et al., 2023): a token's score is the attention it has received so far, summed
        over every query (prefill and decode) and the query heads of its KV head; the lowest-scored leaves.
  tova  Token Omission Via Attention (Oren et al., 2024): only the current query's attention counts (the last
        prompt token's at prefill); per KV head rather than TOVA's average over heads, so each head keeps its own.
"""
from kv_cache.base import register
from kv_cache.evict import EvictionCache


@register
class H2OCache(EvictionCache):
    name = "h2o"
    help = "H2O: sinks + window + the tokens with the most accumulated attention, per KV head, in a fixed budget"

    def prefill_scores(self, probs, old, pos):
        return old + probs.sum(2)

    def update(self, scores, probs):
        return scores + probs


@register
class TOVACache(EvictionCache):
    name = "tova"
    help = "TOVA: sinks + window + the tokens the current query attends to most, per KV head, in a fixed budget"

    def score_queries(self, T):
        return slice(T - 1, T)

    def prefill_scores(self, probs, old, pos):
        return probs[:, :, -1]

    def update(self, scores, probs):
        return probs
