"""tova: Token Omission Via Attention (Oren et al., 2024), decode-time eviction under a fixed budget
(kv_cache/evict.py keeps, evicts and frees; this policy only scores). Only the current query's attention counts (the
last prompt token's at prefill); per KV head rather than TOVA's average over heads, so each head keeps its own.
Scores come with the fused kernel's output (no second pass over the keys).

The prompt is prefilled in one chunk (whole_prompt), so its selection is the attention of the prompt's last token,
where RULER's question ends: prefilled in chunks, each chunk's last token (any word of the haystack) chose what
the chunk kept before the question was seen, and TOVA scored 0 on RULER's needles at 0.2x of full's bytes
(docs/results.md, "Why H2O and TOVA lose the needle").
"""
from kv_cache.base import register
from kv_cache.evict import EvictionCache


@register
class TOVACache(EvictionCache):
    name = "tova"
    help = "TOVA: sinks + window + the tokens the current query attends to most, per KV head, in a fixed budget"
    whole_prompt = True

    def score_queries(self, T):
        return slice(T - 1, T)

    def update(self, scores, probs, pos, now):
        return probs
