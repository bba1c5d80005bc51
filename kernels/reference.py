"""Float64 PyTorch oracles of the fused kernels' arithmetic, for the tests and scripts/gpu_check.py (never on the
generation path): the older store dequantized in float64 (unpack_ref, dequantize_ref), a paged pool gathered back into
its logical layout (unpage), and decode_attention_ref: kernels/decode_attention.decode_attention's attention (its
store arguments, contiguous or paged) as plain softmax attention in float64.
"""
import math

import torch
from torch import Tensor

from kernels.decode_attention import older_format


def unpack_ref(payload: Tensor, per_byte: int) -> Tensor:
    """Packed uint8 (..., D // per_byte) -> (..., D) field values; int8 / fp8 payloads pass through."""
    if per_byte == 1:
        return payload.to(torch.float64)
    bits = 8 // per_byte
    shifts = torch.arange(per_byte, device=payload.device, dtype=torch.uint8) * bits
    fields = (payload[..., None] >> shifts) & ((1 << bits) - 1)
    return fields.flatten(-2).to(torch.float64)


def dequantize_ref(payload: Tensor, scale: Tensor, zero: Tensor, D: int) -> Tensor:
    """The older store (B, H, M, ...) dequantized to float64 (B, H, M, D): x = q * scale[t // F, d // G] (+ zero)."""
    per_byte, F, G = older_format(payload, scale, D)
    x = unpack_ref(payload, per_byte)
    expand = lambda s: s.to(torch.float64).repeat_interleave(F, dim=2).repeat_interleave(G, dim=3)
    x = x * expand(scale)
    return x if zero is None else x + expand(zero)


def unpage(pool: Tensor, table: Tensor, block: int, tokens_per_row: int = 1) -> Tensor:
    """A paged pool (1 or B, H, rows, ...) gathered back into the logical layout (B, H, n_blocks * block //
    tokens_per_row, ...): logical block j of sequence b is pool block table[b, j], i.e. pool rows table[b, j] * r ..
    table[b, j] * r + r - 1 with r = block // tokens_per_row rows a block (tokens_per_row: tokens sharing a row,
    F for per-channel key metadata, else 1)."""
    r = block // tokens_per_row
    rows = table.long()[:, :, None] * r + torch.arange(r, device=table.device)  # (B, n_blocks, r)
    return pool[0][:, rows.flatten(1)].transpose(0, 1)  # (H, B, n_blocks * r, ...) -> (B, H, ...)


def decode_attention_ref(q, recent_k, recent_v, recent_last=None, recent_pos=None, sink_size=0, n_older=None, k_q=None, k_scale=None,
                         k_zero=None, v_q=None, v_scale=None, v_zero=None, recent_table=None, recent_block=0,
                         older_table=None, older_block=0, return_scores=False):
    """decode_attention in float64 PyTorch, one sequence at a time; returns (B, n_head, 1, D) in float64. A sequence
    that attends to nothing (finished: recent_last -1, n_older 0) gets output 0, as in the kernel. Paged stores (recent_table,
    older_table) are unpaged into the logical layout first (unpage), then read as the unpaged ones are.
    return_scores: also the attention probabilities (B, n_head, M + NH) in float64, as decode_attention lays them
    out (older token t in column t, recent slot i in column M + i, 0 where not attended)."""
    if recent_table is not None:
        recent_k, recent_v = unpage(recent_k, recent_table, recent_block), unpage(recent_v, recent_table, recent_block)
    if older_table is not None:
        D = q.shape[-1]
        k_f, v_f = older_format(k_q, k_scale, D)[1], older_format(v_q, v_scale, D)[1]
        pages = lambda t, f: None if t is None else unpage(t, older_table, older_block, f)  # noqa: E731
        k_q, k_scale, k_zero = pages(k_q, 1), pages(k_scale, k_f), pages(k_zero, k_f)
        v_q, v_scale, v_zero = pages(v_q, 1), pages(v_scale, v_f), pages(v_zero, v_f)
    B, HQ, _, D = q.shape
    H = recent_k.shape[1]
    NH = recent_k.shape[2]
    recent_last = torch.full((B,), NH - 1, device=q.device) if recent_last is None else recent_last.reshape(-1).expand(B)
    if recent_pos is not None:
        recent_pos = recent_pos.reshape(-1, NH).expand(B, NH)  # a row shared by the batch, or one per sequence
    if k_q is not None:
        n_older = n_older.reshape(-1).expand(B)
        older_k = dequantize_ref(k_q, k_scale, k_zero, D)
        older_v = dequantize_ref(v_q, v_scale, v_zero, D)
    M = k_q.shape[2] if k_q is not None else 0
    outs, probs = [], torch.zeros(B, HQ, M + NH, dtype=torch.float64, device=q.device)
    for b in range(B):
        keep = torch.arange(NH, device=q.device) <= recent_last[b]
        nm = int(n_older[b]) if k_q is not None else 0
        if recent_pos is not None:
            keep &= (recent_pos[b] >= 0) & ((recent_pos[b] < sink_size) | (recent_pos[b] >= sink_size + nm))
        k, v = recent_k[b][:, keep].double(), recent_v[b][:, keep].double()
        if k_q is not None:
            k = torch.cat([older_k[b, :, :nm], k], dim=1)
            v = torch.cat([older_v[b, :, :nm], v], dim=1)
        if k.shape[1] == 0:  # no token to attend to: output 0 by definition (a softmax over nothing is undefined)
            outs.append(torch.zeros(HQ, 1, D, dtype=torch.float64, device=q.device))
            continue
        k, v = k.repeat_interleave(HQ // H, dim=0), v.repeat_interleave(HQ // H, dim=0)
        p = (q[b].double() @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1)  # (HQ, 1, tokens)
        outs.append(p @ v)
        probs[b, :, :nm] = p[:, 0, :nm]
        probs[b, :, M + keep.nonzero().squeeze(1)] = p[:, 0, nm:]
    return (torch.stack(outs), probs) if return_scores else torch.stack(outs)
