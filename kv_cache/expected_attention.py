"""expected_attention: Expected Attention (Devoto et al., 2025; kvpress's ExpectedAttentionPress, a leader of its RULER
board) as a prompt-compression policy under a fixed budget, stored for real (kv_cache/evict.py keeps and frees).

Instead of the attention the prompt's queries paid, a token is scored by the attention the *coming* queries are
expected to pay it. The prompt's queries (before RoPE, past the sinks, whose hidden states carry outliers) are taken
as a Gaussian per query head, mean mu and covariance Sigma; the queries of the next n_future positions are that
Gaussian rotated by RoPE at those positions, approximated by the average rotation Rbar (RoPE is linear in its
cos / sin rows, so Rbar is RoPE with the rows averaged): mu' = Rbar mu, Sigma' = Rbar Sigma Rbar^T. For q ~ N(mu',
Sigma'), E[exp(q.k / sqrt(D))] = exp(mu'.k / sqrt(D) + k^T Sigma' k / (2 D)): a softmax of that over the held tokens
is each token's expected attention, summed over the KV head's query heads and weighted by the norm of its value
(what it would add to the output), as kvpress does with use_vnorm. Each head keeps its best-scored tokens beyond
sinks and window; decoding appends until the budget is full and never revises the choice (as SnapKV). The prompt
is prefilled in one chunk (whole_prompt) so its statistics are the whole prompt's.
"""
import math
from dataclasses import dataclass

import torch

from kv_cache.base import option, per_kv_head, register
from kv_cache.evict import EvictionCache, EvictOptions
from model import apply_rope


@dataclass
class ExpectedAttentionOptions(EvictOptions):
    n_future: int = option(512, "future positions whose average RoPE rotation the query statistics take")

    def check(self, head_dim):
        super().check(head_dim)
        if self.decode_kernel_size != 1:
            raise ValueError("expected_attention never revises its choice while decoding, so --decode_kernel_size "
                             "has no effect: drop it (it serves tova)")
        if not isinstance(self.n_future, int) or self.n_future < 1:
            raise ValueError(f"--n_future must be a whole number >= 1 (got {self.n_future})")


@register
class ExpectedAttentionCache(EvictionCache):
    name = "expected_attention"
    help = "Expected Attention: keep the tokens the coming queries are expected to attend to (query statistics)"
    Options = ExpectedAttentionOptions
    whole_prompt = True
    replaces = False

    def prompt_attention(self, q, keys, values, mask, chunk):
        """Expected attention of the coming queries times each value's norm, (R, H, N)."""
        R, HQ, T, D = chunk.q.shape
        x = chunk.q[:, :, min(self.sink_size, T - 1):].double()  # past the sinks (a one-token chunk keeps its own)
        mean = x.mean(2)  # (R, HQ, D)
        centred = x - mean[:, :, None]
        cov = centred.transpose(-1, -2) @ centred / max(1, x.shape[2] - 1)  # (R, HQ, D, D)
        # RoPE turns channel pair i by p * theta_i at position p: theta from the tables' row 1, so future positions
        # past the tables' end (sized by the run's max_seq_length) are turned as the model would, and the choice
        # never depends on how long the batch's tables are.
        theta = torch.atan2(chunk.rope_sin[1].double(), chunk.rope_cos[1].double())
        angles = torch.arange(chunk.end, chunk.end + self.opts.n_future, device=q.device).double()[:, None] * theta
        cos, sin = angles.cos().mean(0), angles.sin().mean(0)
        mean = apply_rope(mean, cos, sin)
        cov = apply_rope(apply_rope(cov, cos, sin).transpose(-1, -2), cos, sin).transpose(-1, -2)
        if self.rotate:  # keys are stored rotated: so are the expected queries
            r = self.rotation.double()
            mean, cov = mean @ r, r.T @ cov @ r
        k = keys.double().repeat_interleave(HQ // keys.shape[1], dim=1)  # (R, HQ, N, D)
        logits = (k @ mean[..., None])[..., 0] / math.sqrt(D) + ((k @ cov) * k).sum(-1) / (2 * D)
        held = mask[:, :, -1]  # (R, 1, N): what the chunk's last query sees, every token held
        probs = torch.softmax(logits.masked_fill(~held, float("-inf")), dim=-1).nan_to_num(0.0)
        return (per_kv_head(probs, self.n_kv_head) * values.double().norm(dim=-1)).float()

    def update(self, scores, probs, pos, now):
        return scores  # decoding never revises the prompt's selection
