"""h2o: Heavy-Hitter Oracle (Zhang et al., 2023), decode-time eviction under a fixed budget (kv_cache/evict.py keeps,
evicts and frees; this policy only scores). A token's score is the attention it has received so far, summed over
every query (prefill and decode) and the query heads of its KV head; the lowest-scored leaves. Scores come with the
fused kernel's output (no second pass over the keys).
"""
from kv_cache.base import register
from kv_cache.evict import EvictionCache


@register
class H2OCache(EvictionCache):
    name = "h2o"
    help = "H2O: sinks + window + the tokens with the most accumulated attention, per KV head, in a fixed budget"

    def prefill_scores(self, attention, old):
        return old + attention

    def update(self, scores, probs):
        return scores + probs
