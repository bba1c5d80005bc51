"""h2o: Heavy-Hitter Oracle (Zhang et al., 2023), decode-time eviction under a fixed budget (kv_cache/evict.py keeps,
evicts and frees; this policy only scores). A token's score is the attention it has received so far from every
query (prefill and decode), summed over the query heads of its KV head, and over the queries (H2O's, the default)
or averaged over them (--accumulate mean); the lowest-scored leaves. Scores come with the fused kernel's output (no
second pass over the keys).

A sum favours the oldest tokens, attended by the most queries. The mean divides by the queries that have attended
the token (each query from its own position on: p - t + 1 at step p for a token at t), as kvpress's
ObservedAttentionPress scores a prompt (it averages over the query heads too: a constant factor, the same choice),
kept as a running mean while decoding.
"""
from dataclasses import dataclass

from kv_cache.base import option, register
from kv_cache.evict import EvictionCache, EvictOptions


@dataclass
class H2OOptions(EvictOptions):
    accumulate: str = option("sum", "a token's score: the attention it has received, summed (H2O's) or averaged "
                                    "over the queries that attended it (mean: no bias toward the oldest tokens)",
                             choices=["sum", "mean"])


@register
class H2OCache(EvictionCache):
    name = "h2o"
    help = "H2O: sinks + window + the tokens with the most accumulated attention, per KV head, in a fixed budget"
    Options = H2OOptions

    def prefill_scores(self, attention, old, pos, first, end):
        if self.opts.accumulate == "sum":
            return old + attention
        seen = (first - pos).clamp(min=0)  # queries that attended each token before the chunk (each from its own)
        return (old * seen + attention) / (end - pos).clamp(min=1)

    def update(self, scores, probs, pos, now):
        if self.opts.accumulate == "sum":
            return scores + probs
        seen = (now - pos).clamp(min=0)
        return (scores * seen + probs) / (seen + 1)
