"""Float64 PyTorch oracles of the fused kernels' arithmetic, for the tests and scripts/gpu_check.py (never on the
generation path): the older store dequantized in float64 (unpack_ref, dequantize_ref; low_plane_ref for a store in
planes), a paged pool gathered back into its logical layout (unpage), and decode_attention_ref:
kernels/decode_attention.decode_attention's attention (its store arguments, contiguous or paged) as plain softmax
attention in float64.
"""
import math

import torch
from torch import Tensor

from kernels.formats import older_format
from kernels.quantize import COARSE_LOW


def unpack_ref(payload: Tensor, per_byte: int) -> Tensor:
    """Packed uint8 (..., D // per_byte) -> (..., D) field values; int8 / fp8 payloads pass through."""
    if per_byte == 1:
        return payload.to(torch.float64)
    bits = 8 // per_byte
    shifts = torch.arange(per_byte, device=payload.device, dtype=torch.uint8) * bits
    fields = (payload[..., None] >> shifts) & ((1 << bits) - 1)
    return fields.flatten(-2).to(torch.float64)


def dequantize_ref(payload: Tensor, scale: Tensor, zero: Tensor, D: int, low: Tensor = None) -> Tensor:
    """The older store (B, H, M, ...) dequantized to float64 (B, H, M, D): x = q * scale[t // F, d // G] (+ zero).
    low (B, H, M, D) float64: the payload is the high plane of a store in planes, q = 4 * hi + low (low_plane_ref)."""
    per_byte, F, G = older_format(payload, scale, D)
    x = unpack_ref(payload, per_byte)
    if low is not None:
        x = 4 * x + low
    expand = lambda s: s.to(torch.float64).repeat_interleave(F, dim=2).repeat_interleave(G, dim=3)
    x = x * expand(scale)
    return x if zero is None else x + expand(zero)


def low_plane_ref(lo: Tensor, entries: Tensor) -> Tensor:
    """Each older token's low-plane codes (B, H, M, D) float64: row entries[b, h, t] of the packed planes lo
    (B, H, E, D // 4) where it is >= 0 (a fine token), COARSE_LOW where it is -1 (a coarse one)."""
    rows = entries.long().clamp_min(0)[..., None].expand(-1, -1, -1, lo.shape[-1])
    fine = torch.gather(lo, 2, rows)  # a row out of range is an error, not a silent read
    return torch.where(entries[..., None] >= 0, unpack_ref(fine, 4), COARSE_LOW)


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
                         older_table=None, older_block=0, return_scores=False, older_start=None,
                         older_lane=0, k_lo=None, v_lo=None, older_fine=None):
    """decode_attention in float64 PyTorch, one sequence at a time; returns (B, n_head, 1, D) in float64. A sequence
    that attends to nothing (finished: recent_last -1, n_older 0) gets output 0, as in the kernel. Paged stores (recent_table,
    older_table) are unpaged into the logical layout first (unpage), then read as the unpaged ones are.
    return_scores: also the attention probabilities (B, n_head, M + NH) in float64, as decode_attention lays them
    out (older token t in column t, recent slot i in column M + i, 0 where not attended).
    older_start (B, H), older_lane: a head-shared older store: the lanes' first older_lane slots are one run of
    tokens, head h's n_older[b, h] from token older_start[b, h] on; slot t of lane l scores in column l * M + t.
    k_lo, v_lo, older_fine: the older store in planes (never paged): older token t's code is 4 * hi + the low plane
    k_lo / v_lo[b, h, older_fine[b, h, t]], or 4 * hi + COARSE_LOW where older_fine is -1."""
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
    M = k_q.shape[2] if k_q is not None else 0
    if k_q is not None:
        n_older = n_older.reshape(-1, n_older.shape[-1] if n_older.dim() == 2 else 1).expand(B, H)  # per head or not
        k_low = v_low = None
        if older_fine is not None:  # the entries of tokens past n_older are never read: coarse
            held = torch.arange(M, device=q.device) < n_older[..., None]
            entries = torch.where(held, older_fine[:, :, :M].long(), -1)
            k_low, v_low = low_plane_ref(k_lo, entries), low_plane_ref(v_lo, entries)
        older_k = dequantize_ref(k_q, k_scale, k_zero, D, k_low)
        older_v = dequantize_ref(v_q, v_scale, v_zero, D, v_low)
        columns = torch.arange(M).expand(H, M)  # each head's older tokens: its lane, column t for token t
        if older_start is not None:  # the lanes' run, seen by every head, and its tokens' columns
            older_k, older_v = (x[:, :, :older_lane].reshape(B, 1, H * older_lane, D).expand(B, H, -1, D)
                                for x in (older_k, older_v))
            run = torch.arange(H * older_lane)
            columns = (run // older_lane * M + run % older_lane).expand(H, -1)
        start = torch.zeros(B, H, dtype=torch.long) if older_start is None else older_start.reshape(B, H).cpu()
    group = HQ // H
    n_columns = M * (H if older_start is not None else 1)
    outs, probs = [], torch.zeros(B, HQ, n_columns + NH, dtype=torch.float64, device=q.device)
    for b in range(B):
        out = torch.zeros(HQ, 1, D, dtype=torch.float64, device=q.device)
        for h in range(H):  # a head at a time: each has its own older tokens
            heads = slice(h * group, (h + 1) * group)
            keep = torch.arange(NH, device=q.device) <= recent_last[b]
            nm = int(n_older[b, h]) if k_q is not None else 0
            if recent_pos is not None:
                keep &= (recent_pos[b] >= 0) & ((recent_pos[b] < sink_size) | (recent_pos[b] >= sink_size + nm))
            k, v = recent_k[b, h][keep].double(), recent_v[b, h][keep].double()
            older = slice(0, 0)
            if k_q is not None:
                older = slice(int(start[b, h]), int(start[b, h]) + nm)
                k, v = torch.cat([older_k[b, h, older], k]), torch.cat([older_v[b, h, older], v])
            if k.shape[0] == 0:  # no token to attend to: output 0 by definition (a softmax over nothing is undefined)
                continue
            p = (q[b, heads].double() @ k.T / math.sqrt(D)).softmax(-1)  # (group, 1, tokens)
            out[heads] = p @ v
            if k_q is not None:
                probs[b, heads, columns[h, older].to(q.device)] = p[:, 0, :nm]
            probs[b, heads, n_columns + keep.nonzero().squeeze(1)] = p[:, 0, nm:]
        outs.append(out)
    return (torch.stack(outs), probs) if return_scores else torch.stack(outs)
