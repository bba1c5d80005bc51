"""Fused decode attention (one query token per sequence) over a 16-bit "recent" store and a quantized "older" store: a
cache's recent and older stores (kv_cache/stores.py; KVCache.attend_decode passes them under these names).

Flash-decoding: the keys are cut into splits (grid axis 1) that each run an online softmax over their share and
write a partial output and log-sum-exp; a small second kernel merges the splits. The query heads that share a KV
head (GQA) sit together in one program, so every KV tile is read once for the whole group. The older store is
dequantized tile by tile in registers (the dequantized older never exists in memory). Lengths come in as device
tensors and each split sizes its share from them at run time, so the grid depends on shapes only (CUDA-graph-able,
no host sync). Grid (B * n_kv_head, older splits + recent splits), about two programs per SM; tiles of BLOCK_N = 64 tokens
(32 past head_dim 128) by the padded head_dim, the query group padded to 16 rows for tl.dot (tf32 on float32
operands: 16-bit keys and values are exact in it); 16-byte loads of contiguous rows, pipelined (num_stages 2).
Every sequence of the batch has its own lengths and ring state, read with a batch stride (0 when the batch shares
one): a finished sequence (recent_last -1, n_older 0) runs empty loops, loads no tile and gets output 0.

The stores come as the caches lay them out, contiguous or paged: kv_cache/stores.py states every layout once (the
pools' physical-slot formula too), and the caches pass them with kernel_inputs(). What is attended:

  hi   slot i of sequence b when i <= recent_last[b] (when given) and, with recent_pos given, p = recent_pos[b, i] (recent_pos[i]
       when shared by the batch) has p >= 0 and (p < sink_size or p >= sink_size + n_older[b]); -1 marks an empty slot.
  older  its first n_older[b] tokens (n_older per head, (B, H): head h's first n_older[b, h]). The format is read off the buffers' shapes (older_format): per_byte codes a byte,
       scale rows of F tokens, scale columns of G channels; x = q * scale[t // F, d // G] (+ zero).

Paged stores (as vLLM's PagedAttention; recent_table / older_table given) are pools shared by the batch, batch dim 1 (or B
with batch stride 0, an .expand of it), read through a block table (B, max_blocks) int32 or int64: every index and
mask above keeps its logical meaning and only the addresses go through the table. Entries past a sequence's length
hold 0, the null block (kv_cache/paging.py), which masked lanes may address but never load. Paging is a constexpr of
the kernel: the unpaged path compiles as before.

Head-shared older store (older_start given, (B, H)): the eviction policies' head-adaptive layout (kv_cache/evict.py).
The store's H lanes (its head dim) of older_lane logical slots each are one run of H * older_lane tokens that the
heads share, token f in slot f % older_lane of lane f // older_lane; head h of sequence b attends to its tokens
older_start[b, h] .. older_start[b, h] + n_older[b, h] - 1, whatever lanes they sit in. Per-token metadata only (F = 1).
A constexpr too.

Keys quantized before RoPE (quantize_kv --key_rope pre, k_rope_cos / k_rope_sin given): older token t is position
sink_size + t, and each dequantized key tile is rotated in registers by those positions' rows of the RoPE tables
(model.apply_rope's rotate-half layout: channel d pairs with d + D/2) before its scores; the recent store is attended as
given (the caller rotates it). A constexpr too: without the tables the kernel is what it was.

Planes (mixed precision by score; k_lo, v_lo and older_fine given): an eviction cache keeps its older tokens as a
4-bit code split into two 2-bit planes (kernels/quantize.py, quantize_planes) and holds the low plane of its
top-scored tokens only, so the bits go where the attention is. The 2-bit payload is every token's high plane, its
scale and zero-point (per token, F = 1) the 4-bit code's; older_fine[b, h, t] (logical token t) is the token's entry e
of k_lo / v_lo[b, h, e] (never paged: few tokens hold one), or -1 for a coarse token. The code is 4 * hi + lo, or
4 * hi + 1.5 (COARSE_LOW, the centre of the four codes it stands for) for a coarse token; x = code * scale + zero.
A constexpr too.
"""
import inspect
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.formats import older_format
from kernels.quantize import COARSE_LOW

LOG2E = 1.4426950408889634
_COARSE_LOW = tl.constexpr(COARSE_LOW)  # a global the kernels read must be a constexpr


@triton.jit
def _physical_rows(table_ptr, offs_n, mask, stride_tn, BLOCK: tl.constexpr):
    """Pool row of each logical token offs_n of one sequence (table_ptr at its row of the block table):
    table[n // BLOCK] * BLOCK + n % BLOCK. int64: a pool holds the whole batch, so its offsets can pass 2**31
    elements. Masked lanes read entry 0, i.e. rows of the null block, which their own loads mask out too."""
    blk = tl.load(table_ptr + (offs_n // BLOCK) * stride_tn, mask=mask, other=0)
    return blk.to(tl.int64) * BLOCK + offs_n % BLOCK


@triton.jit
def _group_tile(ptr, stride_sn, n0, end, rows, table_ptr, stride_tn, F: tl.constexpr, G: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Metadata of tokens n0 .. n0 + BLOCK_N - 1 (F tokens x G channels per entry), loaded once per entry as a small
    contiguous tile and repeated over its tokens and channels: (BLOCK_N, BLOCK_D). F and G powers of two. Paged
    (PAGED, PAGE tokens a block): an entry's row is that of the pool token holding its first token; F divides PAGE,
    so the entry's F tokens sit together in one block. F = 1: the tokens' own rows (their payload's)."""
    R: tl.constexpr = BLOCK_N // F if BLOCK_N >= F else 1
    C: tl.constexpr = BLOCK_D // G
    first = n0 + tl.arange(0, R) * F  # first (logical) token of each entry row
    mask = first < end
    if F == 1:
        first = rows
    elif PAGED:
        first = _physical_rows(table_ptr, first, mask, stride_tn, PAGE)
    s = tl.load(ptr + (first // F)[:, None] * stride_sn + tl.arange(0, C)[None, :], mask=mask[:, None],
                other=0).to(tl.float32)
    return tl.reshape(tl.broadcast_to(s[:, None, :, None], (R, BLOCK_N // R, C, G)), (BLOCK_N, BLOCK_D))


@triton.jit
def _unpack(raw, PER_BYTE: tl.constexpr):
    """Packed bytes (rows, C) spread into their fields in channel order (rows, C * PER_BYTE), 2 or 4 a byte:
    element i sits in byte i // PER_BYTE at bits (i % PER_BYTE) * 8 // PER_BYTE (kernels/formats.py)."""
    field_mask: tl.constexpr = (1 << (8 // PER_BYTE)) - 1
    if PER_BYTE == 2:
        x = tl.interleave(raw & field_mask, raw >> 4)
    else:
        x = tl.interleave(tl.interleave(raw & field_mask, (raw >> 4) & field_mask),
                          tl.interleave((raw >> 2) & field_mask, raw >> 6))
    return x


@triton.jit
def _dequant_tile(payload_ptr, scale_ptr, zero_ptr, stride_pn, stride_sn, n0, end, rows, table_ptr, stride_tn,
                  lo_ptr, stride_le, lo_rows,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PER_BYTE: tl.constexpr,
                  F: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_TILES: tl.constexpr,
                  PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_LO: tl.constexpr):
    """Tokens n0 .. n0 + BLOCK_N - 1 (those below end) of one (batch, head) of the older store, dequantized to float32
    (BLOCK_N, BLOCK_D). rows: the store row of each token (n0 + arange unpaged, its pool token when PAGED); the
    masks stay on the logical tokens. HAS_LO: the payload is the tokens' high planes and lo_rows (BLOCK_N,) each
    token's row of the low planes at lo_ptr (rows stride_le apart), -1 for a coarse token (module docstring)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < end
    offs_d = tl.arange(0, BLOCK_D)
    if PER_BYTE == 1:
        raw = tl.load(payload_ptr + rows[:, None] * stride_pn + offs_d[None, :],
                      mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
        x = raw.to(tl.float32)
    else:
        # Load whole packed bytes (contiguous, vectorizable) and spread their fields back into channel order.
        offs_p = tl.arange(0, BLOCK_D // PER_BYTE)
        mask_p = offs_p[None, :] < D // PER_BYTE
        raw = tl.load(payload_ptr + rows[:, None] * stride_pn + offs_p[None, :], mask=mask_n[:, None] & mask_p,
                      other=0)
        x = _unpack(raw, PER_BYTE).to(tl.float32)
        if HAS_LO:  # the code before its scale: 4 * hi + lo, the low plane only loaded for the fine tokens
            fine = lo_rows >= 0
            lo = tl.load(lo_ptr + lo_rows[:, None] * stride_le + offs_p[None, :],
                         mask=(mask_n & fine)[:, None] & mask_p, other=0)
            x = x * 4 + tl.where(fine[:, None], _unpack(lo, PER_BYTE).to(tl.float32), _COARSE_LOW)
    if GROUP_TILES:
        x = x * _group_tile(scale_ptr, stride_sn, n0, end, rows, table_ptr, stride_tn, F, G, BLOCK_N, BLOCK_D, PAGED,
                            PAGE)
        if HAS_ZERO:
            x = x + _group_tile(zero_ptr, stride_sn, n0, end, rows, table_ptr, stride_tn, F, G, BLOCK_N, BLOCK_D,
                                PAGED, PAGE)
    else:
        # Any F, G: gather scale[t // F, d // G] element by element (served from L1); paged, t is the pool token
        # (F divides the block, so pool token // F is its pool metadata row).
        offs_s = (rows // F)[:, None] * stride_sn + (offs_d // G)[None, :]
        mask_s = mask_n[:, None] & (offs_d[None, :] < D)
        x = x * tl.load(scale_ptr + offs_s, mask=mask_s, other=0).to(tl.float32)
        if HAS_ZERO:
            x = x + tl.load(zero_ptr + offs_s, mask=mask_s, other=0).to(tl.float32)
    return x


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), still float32 (finite x)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b (float32 tiles), accumulated in float32. ieee / tf32: float32 operands; bf16: rounded to bfloat16 first;
    bf16_emulated: the same operands (rounded to nearest bfloat16, as sm_90's cvt.rn) multiplied in float32, where
    their products are exact (only the order of the sum differs from the MMA), for Triton's CPU interpreter, whose
    dot of bfloat16 tiles is wrong and whose cast to bfloat16 truncates."""
    if DOT_PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT_PRECISION == "bf16_emulated":
        return tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _softmax_step(q, k, v, k_col_scale, v_row_scale, keep, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of the query group q (BLOCK_G, D) over a tile k, v (BLOCK_N, D); scores in log2.
    Operands are float32: 16-bit values are exact in tf32, and the dequantized tiles and the probabilities keep
    tf32's 10 mantissa bits instead of bfloat16's 7. DOT_PRECISION "bf16" rounds them to bfloat16 instead: half the
    shared-memory traffic and twice tf32's rate, for a GPU where the dots, not the bytes, bound the step (tried by
    scripts/tune_decode.py)."""
    s = _dot(q, tl.trans(k), DOT_PRECISION) * (k_col_scale * qk_scale)[None, :]
    s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p * v_row_scale[None, :], v, DOT_PRECISION)
    return m_new, l_i, acc, s


@triton.jit
def _store_scores(scores_ptr, s, row0, offs_g, columns, keep, n_scores, GROUP: tl.constexpr):
    """The tile's log2 scores s (BLOCK_G, BLOCK_N) (-inf where masked) into rows row0 + g of the (B * HQ, n_scores)
    score buffer at columns `columns` where keep: what the softmax already computed, so a policy gets every token's
    attention without a second pass over the keys."""
    ptrs = scores_ptr + (row0 + offs_g).to(tl.int64)[:, None] * n_scores + columns[None, :]
    tl.store(ptrs, s, mask=(offs_g < GROUP)[:, None] & keep[None, :])


@triton.jit
def _rope_tile(x, cos_ptr, sin_ptr, stride_r, pos, mask, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of x (BLOCK_N, BLOCK_D) float32 rotated by positions pos (BLOCK_N,) as model.apply_rope rotates them:
    out[j] = x[j] cos - x[j + D/2] sin, out[j + D/2] = x[j + D/2] cos + x[j] sin (BLOCK_D == D). The tables of
    model.rope_tables hold each angle twice (columns j and j + D/2), so only their first half is read."""
    HALF: tl.constexpr = BLOCK_D // 2
    rows = pos.to(tl.int64)[:, None] * stride_r + tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + rows, mask=mask[:, None], other=1.0)
    sin = tl.load(sin_ptr + rows, mask=mask[:, None], other=0.0)
    lo, hi = tl.split(tl.permute(tl.reshape(x, (BLOCK_N, 2, HALF)), (0, 2, 1)))  # x[:, :D/2], x[:, D/2:]
    return tl.reshape(tl.permute(tl.join(lo * cos - hi * sin, hi * cos + lo * sin), (0, 2, 1)), (BLOCK_N, BLOCK_D))


@triton.jit
def _decode_split_kernel(
    q_ptr, recent_k_ptr, recent_v_ptr, recent_pos_ptr, recent_last_ptr, n_older_ptr,
    kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr,
    o_part_ptr, lse_part_ptr,
    recent_table_ptr, older_table_ptr, scores_ptr,
    qk_scale, sink_size, n_recent, n_older_slots,
    stride_qb, stride_qh,
    stride_hkb, stride_hkh, stride_hkn,
    stride_hvb, stride_hvh, stride_hvn,
    stride_last, stride_nmid, stride_posb,
    stride_kqb, stride_kqh, stride_kqn,
    stride_ksb, stride_ksh, stride_ksn,
    stride_vqb, stride_vqh, stride_vqn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_htb, stride_htn, stride_mtb, stride_mtn,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    HAS_HI_POS: tl.constexpr, HAS_HI_LAST: tl.constexpr, HAS_MID: tl.constexpr,
    SPLITS_MID: tl.constexpr, SPLITS_HI: tl.constexpr,
    K_PER_BYTE: tl.constexpr, K_F: tl.constexpr, K_G: tl.constexpr, K_ZERO: tl.constexpr, K_TILES: tl.constexpr,
    V_PER_BYTE: tl.constexpr, V_F: tl.constexpr, V_G: tl.constexpr, V_ZERO: tl.constexpr, V_TILES: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PAGED_HI: tl.constexpr, HI_BLOCK: tl.constexpr, PAGED_MID: tl.constexpr, MID_BLOCK: tl.constexpr,
    SCORES: tl.constexpr, rope_cos_ptr, rope_sin_ptr, stride_rope, KEY_ROPE: tl.constexpr,
    older_start_ptr, stride_nmh, stride_osb, stride_osh, older_lane, lane_rows, HAS_START: tl.constexpr,
    klo_ptr, vlo_ptr, fine_ptr, stride_klb, stride_klh, stride_kle, stride_vlb, stride_vlh, stride_vle,
    stride_fb, stride_fh, HAS_LO: tl.constexpr,
):
    """One split of one (sequence, KV head). PAGED_HI / PAGED_MID: that store is a pool read through its block
    table (its batch strides are 0); every index and mask here is logical and only the addresses go through the
    table. Unpaged, the table arguments are never read and the code is what it was before paging (constexpr).
    SCORES: every tile's log2 scores are also stored, older token t at column t and recent slot i at n_older_slots + i of
    the score rows (B * HQ, n_older_slots + n_recent) (head-shared: slot t of lane l at column l * (n_older_slots / H)
    + t). KEY_ROPE: older keys were quantized before RoPE; each dequantized
    tile is rotated by positions sink_size + t (rows of the tables at rope_cos_ptr / rope_sin_ptr). HAS_START: a
    head-shared older store, head h's tokens from token older_start[b, h] of the lanes' run on (lane_rows: rows
    of a payload or metadata buffer per lane, the same for all). HAS_LO: the older store in planes, older token t's
    low planes at row older_fine[b, h, t] of k_lo / v_lo (fine_ptr, klo_ptr, vlo_ptr), -1: none (coarse)."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # batch offsets can pass 2**31 elements in a large cache
    h = pid_bh % H
    SPLITS: tl.constexpr = SPLITS_MID + SPLITS_HI

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_gd = (offs_g[:, None] < GROUP) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=mask_gd, other=0).to(tl.float32)

    # A finite start keeps alpha = exp2(m_i - m_new) defined while every score so far is masked.
    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    ones_n = tl.full((BLOCK_N,), 1.0, tl.float32)
    n_older = 0
    first_older = 0  # the head's first logical token of the older store
    if HAS_MID:
        n_older = tl.load(n_older_ptr + b * stride_nmid + h * stride_nmh).to(tl.int32)
        if HAS_START:
            first_older = tl.load(older_start_ptr + b * stride_osb + h * stride_osh).to(tl.int32)

    # Without an older store the condition is a constexpr False and the older branch is never built: its dead code
    # with dummy pointers broke Triton 3.6's coalescing pass on sm_90.
    if HAS_MID and split < SPLITS_MID:
        # Mid store: tokens [first_older, first_older + n_older), shared evenly (whole tiles) among the splits.
        chunk = tl.cdiv(tl.cdiv(n_older, SPLITS_MID), BLOCK_N) * BLOCK_N
        start = first_older + split * chunk
        end = tl.minimum(start + chunk, first_older + n_older)
        if HAS_START:
            hm = tl.zeros((), tl.int64)  # the lane of each token is in its row (below)
        elif PAGED_MID:
            hm = h.to(tl.int64)  # a pool's head stride spans the whole batch's tokens: past 2**31 in a large one
        else:
            hm = h
        kq_base = kq_ptr + b * stride_kqb + hm * stride_kqh
        ks_base = ks_ptr + b * stride_ksb + hm * stride_ksh
        kz_base = kz_ptr + b * stride_ksb + hm * stride_ksh
        vq_base = vq_ptr + b * stride_vqb + hm * stride_vqh
        vs_base = vs_ptr + b * stride_vsb + hm * stride_vsh
        vz_base = vz_ptr + b * stride_vsb + hm * stride_vsh
        mt_base = older_table_ptr + b * stride_mtb
        klo_base = klo_ptr + b * stride_klb + h * stride_klh
        vlo_base = vlo_ptr + b * stride_vlb + h * stride_vlh
        fine_base = fine_ptr + b * stride_fb + h * stride_fh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            keep = offs_n < end
            slots = offs_n
            if HAS_START:  # token f of the lanes' run: slot f % older_lane of lane f // older_lane
                lane = offs_n // older_lane
                slots = offs_n - lane * older_lane
            if PAGED_MID:  # one table lookup per tile, shared by keys, values and their metadata
                rows = _physical_rows(mt_base, slots, keep, stride_mtn, MID_BLOCK)
            else:
                rows = slots
            if HAS_START:
                rows = lane.to(tl.int64) * lane_rows + rows
            # The tokens' rows of the low planes (logical, never paged), shared by keys and values; else unread.
            lo_rows = tl.load(fine_base + offs_n, mask=keep, other=-1) if HAS_LO else offs_n
            # One scale per token (int8 / fp8): apply it to the scores and probabilities, not the tiles.
            if K_PER_BYTE == 1 and K_F == 1 and K_G >= D and not K_ZERO:
                k = tl.load(kq_base + rows[:, None] * stride_kqn + offs_d[None, :],
                            mask=keep[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
                k_col_scale = tl.load(ks_base + rows * stride_ksn, mask=keep, other=0).to(tl.float32)
            else:
                k = _dequant_tile(kq_base, ks_base, kz_base, stride_kqn, stride_ksn, n0, end, rows, mt_base,
                                  stride_mtn, klo_base, stride_kle, lo_rows, D, BLOCK_N, BLOCK_D, K_PER_BYTE, K_F,
                                  K_G, K_ZERO, K_TILES, PAGED_MID, MID_BLOCK, HAS_LO)
                k_col_scale = ones_n
            if KEY_ROPE:  # a per-token scale (k_col_scale) commutes with the rotation: the raw tile is rotated
                k = _rope_tile(k, rope_cos_ptr, rope_sin_ptr, stride_rope, sink_size + offs_n, keep, BLOCK_N, BLOCK_D)
            if V_PER_BYTE == 1 and V_F == 1 and V_G >= D and not V_ZERO:
                v = tl.load(vq_base + rows[:, None] * stride_vqn + offs_d[None, :],
                            mask=keep[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
                v_row_scale = tl.load(vs_base + rows * stride_vsn, mask=keep, other=0).to(tl.float32)
            else:
                v = _dequant_tile(vq_base, vs_base, vz_base, stride_vqn, stride_vsn, n0, end, rows, mt_base,
                                  stride_mtn, vlo_base, stride_vle, lo_rows, D, BLOCK_N, BLOCK_D, V_PER_BYTE, V_F,
                                  V_G, V_ZERO, V_TILES, PAGED_MID, MID_BLOCK, HAS_LO)
                v_row_scale = ones_n
            m_i, l_i, acc, s = _softmax_step(q, k, v, k_col_scale, v_row_scale, keep, m_i, l_i, acc, qk_scale,
                                             DOT_PRECISION)
            if SCORES:
                if HAS_START:
                    columns = lane * (n_older_slots // H) + slots
                else:
                    columns = offs_n
                _store_scores(scores_ptr, s, (b * H + h) * GROUP, offs_g, columns, keep, n_older_slots + n_recent,
                              GROUP)
    else:
        # Hi store: slots [0, recent_len), shared evenly among the SPLITS_HI splits. recent_last -1 (a finished sequence)
        # gives recent_len 0: chunk 0, so every split's loop is empty.
        recent_len = n_recent
        if HAS_HI_LAST:
            recent_len = tl.maximum(tl.minimum(tl.load(recent_last_ptr + b * stride_last).to(tl.int32) + 1, n_recent), 0)
        recent_split = split - SPLITS_MID
        chunk = tl.cdiv(tl.cdiv(recent_len, SPLITS_HI), BLOCK_N) * BLOCK_N
        start = recent_split * chunk
        end = tl.minimum(start + chunk, recent_len)
        if PAGED_HI:
            hh = h.to(tl.int64)  # a pool's head stride spans the whole batch's slots: past 2**31 in a large one
        else:
            hh = h
        hk_base = recent_k_ptr + b * stride_hkb + hh * stride_hkh
        hv_base = recent_v_ptr + b * stride_hvb + hh * stride_hvh
        ht_base = recent_table_ptr + b * stride_htb
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            keep = offs_n < end
            if PAGED_HI:  # masked by the range only, so it need not wait for recent_pos
                rows = _physical_rows(ht_base, offs_n, keep, stride_htn, HI_BLOCK)
            else:
                rows = offs_n
            if HAS_HI_POS:
                pos = tl.load(recent_pos_ptr + b * stride_posb + offs_n, mask=keep, other=-1)
                keep = keep & (pos >= 0) & ((pos < sink_size) | (pos >= sink_size + n_older))
            mask_nd = keep[:, None] & (offs_d[None, :] < D)
            k = tl.load(hk_base + rows[:, None] * stride_hkn + offs_d[None, :], mask=mask_nd, other=0)
            v = tl.load(hv_base + rows[:, None] * stride_hvn + offs_d[None, :], mask=mask_nd, other=0)
            m_i, l_i, acc, s = _softmax_step(q, k.to(tl.float32), v.to(tl.float32), ones_n, ones_n, keep, m_i,
                                             l_i, acc, qk_scale, DOT_PRECISION)
            if SCORES:
                _store_scores(scores_ptr, s, (b * H + h) * GROUP, offs_g, n_older_slots + offs_n, offs_n < end,
                              n_older_slots + n_recent, GROUP)

    # Partial result of this split: normalized output and log2-sum-exp (-inf when it saw no token).
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    rows = (b * H + h) * GROUP + offs_g
    tl.store(o_part_ptr + (rows * SPLITS + split)[:, None] * D + offs_d[None, :], out, mask=mask_gd)
    tl.store(lse_part_ptr + rows * SPLITS + split, lse, mask=offs_g < GROUP)


@triton.jit
def _decode_merge_kernel(o_part_ptr, lse_part_ptr, out_ptr, stride_ob, stride_oh,
                         HQ: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                         CHUNK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse), for one (sequence, query head)."""
    row = tl.program_id(0)  # b * HQ + query head
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_part_ptr + row * SPLITS + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a token: output 0 rather than NaN
    denom = tl.maximum(tl.sum(tl.exp2(lse - m), 0), 1e-30)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in tl.static_range(0, SPLITS, CHUNK_S):  # chunks keep the (splits, D) tile small in registers
        offs_c = s0 + tl.arange(0, CHUNK_S)
        w = tl.exp2(tl.load(lse_part_ptr + row * SPLITS + offs_c, mask=offs_c < SPLITS, other=float("-inf")) - m)
        o = tl.load(o_part_ptr + (row * SPLITS + offs_c)[:, None] * D + offs_d[None, :],
                    mask=(offs_c[:, None] < SPLITS) & (offs_d[None, :] < D), other=0)
        acc += tl.sum(w[:, None] * o, 0)
    b = row // HQ
    hq = row % HQ
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, (acc / denom).to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


def per_batch(t: Tensor, B: int) -> tuple[Tensor, int]:
    """A length tensor of shape (), (1,) or (B,) and the stride that reads sequence b's entry (0 when shared)."""
    t = t.reshape(-1)
    if t.numel() not in (1, B):
        raise ValueError(f"length tensor has {t.numel()} entries; pass one, or one per sequence ({B})")
    return t, (0 if t.numel() == 1 else t.stride(0))


def per_head(t: Tensor, B: int, H: int, name: str) -> tuple[Tensor, int, int]:
    """A per-(sequence, KV head) tensor (B, H) (or (1, H), shared by the batch) and its strides over b and h."""
    if t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] != H:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; pass ({B}, {H}), one entry per sequence and KV head")
    return t, (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def per_batch_rows(t: Tensor, B: int, name: str) -> tuple[Tensor, int]:
    """A row tensor of shape (N,) or (1, N) shared by the batch, or (B, N) one row per sequence, and the stride
    that reads sequence b's row (0 when shared). The kernels index a row with unit steps."""
    if t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] not in (1, B)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; pass (N,) shared by the batch or ({B}, N)")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} needs its last dim contiguous")
    return t, (0 if t.dim() == 1 or t.shape[0] == 1 else t.stride(0))


def check_planes(k_lo: Tensor, v_lo: Tensor, older_fine: Tensor, k_format: tuple, v_format: tuple, B: int, H: int,
                 M: int, D: int):
    """The older store in planes (module docstring): a 2-bit payload with per-token scales and zero-points (the formats
    (per_byte, F, zero) of keys and values), low planes (B, H, E, D // 4) uint8 and older_fine (B, H, S >= M) int16,
    each contiguous in its last dim (the kernel reads rows with unit steps)."""
    if any(per_byte != 4 or F != 1 or zero is None for per_byte, F, zero in (k_format, v_format)):
        raise ValueError("k_lo / v_lo (low planes) need 2-bit keys and values with per-token scales and zero-points")
    for name, t in (("k_lo", k_lo), ("v_lo", v_lo)):
        if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[:2] != (B, H) or t.shape[3] != D // 4 or t.stride(3) != 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)} and dtype {t.dtype}; pass uint8 "
                             f"({B}, {H}, E, {D // 4}), its last dim contiguous")
    if older_fine.dtype != torch.int16 or older_fine.dim() != 3 or older_fine.shape[:2] != (B, H) \
            or older_fine.shape[2] < M or older_fine.stride(2) != 1:
        raise ValueError(f"older_fine has shape {tuple(older_fine.shape)} and dtype {older_fine.dtype}; pass int16 "
                         f"({B}, {H}, S) with S >= {M} (the older store's logical tokens), its last dim contiguous")


def _plane_args(k_lo: Optional[Tensor], v_lo: Optional[Tensor], older_fine: Optional[Tensor], dummy: Tensor) -> dict:
    """_decode_split_kernel's arguments of the low planes (HAS_LO), a never-read dummy pointer without them."""
    if older_fine is None:
        return dict(klo_ptr=dummy, vlo_ptr=dummy, fine_ptr=dummy, stride_klb=0, stride_klh=0, stride_kle=0,
                    stride_vlb=0, stride_vlh=0, stride_vle=0, stride_fb=0, stride_fh=0, HAS_LO=False)
    return dict(klo_ptr=k_lo, vlo_ptr=v_lo, fine_ptr=older_fine, stride_klb=k_lo.stride(0), stride_klh=k_lo.stride(1),
                stride_kle=k_lo.stride(2), stride_vlb=v_lo.stride(0), stride_vlh=v_lo.stride(1),
                stride_vle=v_lo.stride(2), stride_fb=older_fine.stride(0), stride_fh=older_fine.stride(1), HAS_LO=True)


def _group_tiles(F: int, G: int, D: int, block_d: int) -> bool:
    """Whether metadata can be read as whole tiles (_group_tile): powers of two and no padded channels."""
    pow2 = lambda n: n & (n - 1) == 0
    return pow2(F) and pow2(G) and D == block_d and G <= D


def _num_splits(device: torch.device, programs: int, capacity_older: int, capacity_hi: int, block_n: int):
    """Splits of the older and the recent store: enough programs to fill the GPU a couple of times over."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2  # the CPU interpreter: two splits exercise the merge without the cost of many programs
    total = max(2, triton.cdiv(target, programs))
    tiles_older, tiles_hi = triton.cdiv(capacity_older, block_n), triton.cdiv(capacity_hi, block_n)
    splits_hi = min(tiles_hi, max(1, round(total * capacity_hi / max(1, capacity_older + capacity_hi))))
    splits_older = min(tiles_older, max(1 if tiles_older else 0, total - splits_hi))
    return splits_older, max(1, splits_hi)


def page_table(table: Tensor, block: int, B: int, name: str) -> int:
    """Check a block table (B, max_blocks) of int32 / int64 pool block numbers and its block size; returns the
    logical capacity max_blocks * block."""
    if table.dim() != 2 or table.shape[0] != B:
        raise ValueError(f"{name}_table has shape {tuple(table.shape)}; pass ({B}, max_blocks), one row per sequence")
    if table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}_table has dtype {table.dtype}; pass int32 or int64 block numbers")
    if block <= 0:
        raise ValueError(f"{name}_block is {block}; pass the tokens per block (> 0) with {name}_table")
    return table.shape[1] * block


def check_pool(pool: Tensor, B: int, block: int, tokens_per_row: int, name: str):
    """A paged pool (1, H, rows, ...) shared by the batch, or its .expand(B, ...): whole blocks of block //
    tokens_per_row rows."""
    if pool.shape[0] not in (1, B):
        raise ValueError(f"paged {name} has batch dim {pool.shape[0]}; pass the pool as (1, H, ...) or its .expand")
    if pool.shape[2] * tokens_per_row % block:
        raise ValueError(f"paged {name} holds {pool.shape[2] * tokens_per_row} tokens, not whole blocks of {block}")


class DecodeInputs(NamedTuple):
    """The inputs of one decode-attention call, declared once, in the order of the torch.library ops' schemas
    (kvcache::decode_attention and kvcache::decode_attention_scores take them positionally). decode_attention
    takes them by name, with splits=(split_older, split_hi) and block_n in its own form; _launch reads them."""
    q: Tensor
    recent_k: Tensor
    recent_v: Tensor
    recent_last: Optional[Tensor] = None
    recent_pos: Optional[Tensor] = None
    sink_size: int = 0
    n_older: Optional[Tensor] = None
    k_q: Optional[Tensor] = None
    k_scale: Optional[Tensor] = None
    k_zero: Optional[Tensor] = None
    v_q: Optional[Tensor] = None
    v_scale: Optional[Tensor] = None
    v_zero: Optional[Tensor] = None
    split_older: int = -1  # -1: splits chosen for the device (_num_splits)
    split_hi: int = -1
    block_n: int = 0  # 0: tiles chosen for head_dim
    recent_table: Optional[Tensor] = None
    recent_block: int = 0
    older_table: Optional[Tensor] = None
    older_block: int = 0
    k_rope_cos: Optional[Tensor] = None
    k_rope_sin: Optional[Tensor] = None
    older_start: Optional[Tensor] = None
    older_lane: int = 0
    k_lo: Optional[Tensor] = None
    v_lo: Optional[Tensor] = None
    older_fine: Optional[Tensor] = None
    num_warps: int = 0  # 0: the launch defaults below (DEFAULT_WARPS, DEFAULT_STAGES); scripts/tune_decode.py tries others
    num_stages: int = 0
    dot_precision: str = ""  # "": ieee for float32 models, tf32 otherwise; "bf16": bfloat16 operands (_softmax_step)


DEFAULT_WARPS, DEFAULT_STAGES = 4, 2  # of the split kernel


def decode_attention(q: Tensor, recent_k: Tensor, recent_v: Tensor, *, splits: tuple = None, block_n: int = None,
                     return_scores: bool = False, **inputs):
    """Attention of q (B, n_head, 1, D) (already rotated) over the recent store and the first n_older older tokens.

    recent_last, n_older: device tensors of shape (), (1,) or (B,); recent_last (the last recent slot to read, e.g. input_pos for
    the full cache) may be None: every slot. recent_pos int64 (NH,) shared by the batch, (B, NH) per sequence, or None:
    then every slot up to recent_last counts. A sequence with recent_last -1 and n_older 0 (finished) reads nothing and
    gets output 0. The older arguments are left None when there is no older store.
    recent_table, recent_block: the recent store paged (module docstring): recent_k, recent_v are pools (1, H, P, D) and recent_table
    (B, max_blocks) int32 / int64 maps logical block j of sequence b to pool block recent_table[b, j] of recent_block
    slots; NH = max_blocks * recent_block logical slots. older_table, older_block: the older store paged likewise (payload,
    scales and zeros pools with batch dim 1; older_block a multiple of the key group F); M = max_blocks * older_block.
    Unused table entries hold 0, the null block.
    splits=(older, recent) overrides the number of splits; returns (B, n_head, 1, D) in q's dtype.
    return_scores: also return every token's attention probability (B, n_head, M + NH) float32, older token t in
    column t and recent slot i in column M + i (0 where not attended): the scores the softmax computed anyway, stored
    as it goes and normalized with the merged log-sum-exp (no second pass over the keys), for eviction policies.
    k_rope_cos, k_rope_sin: the older keys were quantized before RoPE (quantize_kv --key_rope pre); these are the
    model's float32 tables (positions, D) of model.rope_tables, and older token t is rotated by row sink_size + t
    after dequantization (module docstring). Needs a power-of-two head_dim >= 16.
    older_start (B, H) int, older_lane: a head-shared older store (module docstring): its lanes of older_lane slots
    are one run of tokens, head h's from token older_start[b, h] on; n_older then (B, H). Scores: slot t of lane l
    in column l * M + t.
    k_lo, v_lo (B, H, E, D // 4) uint8 and older_fine (B, H, S >= M) int16, all three or none: the older store in
    planes (module docstring): k_q, v_q 2-bit with per-token scales and zero-points hold every token's high plane,
    and older token t (logical) is fine, with low planes k_lo[b, h, e] and v_lo[b, h, e], where e = older_fine[b, h,
    t] >= 0, coarse where it is -1. Not paged, even with older_table; not with older_start.
    inputs: the other fields of DecodeInputs, by name.
    Under torch.compile this is the opaque op torch.ops.kvcache.decode_attention (decode_attention_scores);
    eager calls launch directly, without the op dispatcher's per-call overhead."""
    split_older, split_hi = splits or (-1, -1)
    args = DecodeInputs(q, recent_k, recent_v, split_older=split_older, split_hi=split_hi, block_n=block_n or 0, **inputs)
    if torch.compiler.is_compiling():
        op = torch.ops.kvcache.decode_attention_scores if return_scores else torch.ops.kvcache.decode_attention
        return op(*args)
    return _launch(args, return_scores)


def _launch(inputs: DecodeInputs, return_scores: bool):
    """Check the inputs, then run the split kernel over (sequence x KV head, split) and the merge kernel."""
    q, recent_k, recent_v, sink_size = inputs.q, inputs.recent_k, inputs.recent_v, inputs.sink_size
    recent_last, recent_pos, n_older = inputs.recent_last, inputs.recent_pos, inputs.n_older
    k_q, k_scale, k_zero = inputs.k_q, inputs.k_scale, inputs.k_zero
    v_q, v_scale, v_zero = inputs.v_q, inputs.v_scale, inputs.v_zero
    recent_table, recent_block, older_table, older_block = inputs.recent_table, inputs.recent_block, inputs.older_table, inputs.older_block
    k_rope_cos, k_rope_sin, block_n = inputs.k_rope_cos, inputs.k_rope_sin, inputs.block_n
    older_start, older_lane = inputs.older_start, inputs.older_lane
    k_lo, v_lo, older_fine = inputs.k_lo, inputs.v_lo, inputs.older_fine
    B, HQ, T, D = q.shape
    H, NH = recent_k.shape[1], recent_k.shape[2]
    if inputs.dot_precision not in ("", "ieee", "tf32", "bf16"):
        raise ValueError(f"dot_precision {inputs.dot_precision!r}: pass ieee, tf32 or bf16 (or leave it empty)")
    if inputs.num_warps not in (0, 1, 2, 4, 8, 16) or inputs.num_stages < 0:
        raise ValueError(f"num_warps {inputs.num_warps} / num_stages {inputs.num_stages}: pass a power of two up to "
                         "16 and a whole number of stages (0: the defaults)")
    if T != 1:
        raise ValueError(f"decode_attention takes one query token per sequence, got {T}")
    if HQ % H:
        raise ValueError(f"{HQ} query heads do not share {H} KV heads evenly")
    if recent_k.stride(-1) != 1 or recent_v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention needs head_dim contiguous in q, recent_k and recent_v")
    group = HQ // H
    has_older = k_q is not None
    paged_hi, paged_older = recent_table is not None, older_table is not None
    if recent_block and not paged_hi or older_block and not paged_older:
        raise ValueError("recent_block / older_block given without its block table (recent_table / older_table)")
    if paged_older and not has_older:
        raise ValueError("older_table given without an older store (k_q, ...)")
    has_lo = older_fine is not None
    if (k_lo is not None, v_lo is not None, has_lo) != (has_lo,) * 3 or has_lo and not has_older:
        raise ValueError("k_lo, v_lo and older_fine (the older store's low planes) come all three, with an older store")
    if has_lo and older_start is not None:
        raise ValueError("k_lo / v_lo (low planes) are not supported with older_start (a head-shared older store)")
    if paged_hi:
        NH = page_table(recent_table, recent_block, B, "recent")
        for name, pool in (("recent_k", recent_k), ("recent_v", recent_v)):
            check_pool(pool, B, recent_block, 1, name)
    if has_older:
        k_pb, k_f, k_g = older_format(k_q, k_scale, D)
        v_pb, v_f, v_g = older_format(v_q, v_scale, D)
        M = k_q.shape[2]
        stride_nmh = stride_osb = stride_osh = 0
        if older_start is not None or n_older.dim() == 2:
            n_older, stride_nmid, stride_nmh = per_head(n_older, B, H, "n_older")
        else:
            n_older, stride_nmid = per_batch(n_older, B)
        lane_rows = 0
        if older_start is not None:
            if k_rope_cos is not None or k_f != 1 or v_f != 1:
                raise ValueError("older_start (a head-shared older store) takes per-token metadata and keys rotated "
                                 "before they were stored")
            older_start, stride_osb, stride_osh = per_head(older_start, B, H, "older_start")
            lane_rows = k_q.stride(1) // k_q.stride(2)
            # lanes are addressed as lane_rows rows apart (a single lane's stride is never used: one KV head a rank)
            if any(t is not None and t.shape[1] > 1 and (t.stride(1) != lane_rows * t.stride(2)) for t in
                   (k_q, k_scale, k_zero, v_q, v_scale, v_zero)) or not 0 < older_lane <= M:
                raise ValueError(f"a head-shared older store needs buffers of {lane_rows} rows a lane and "
                                 f"0 < older_lane <= {M} (got {older_lane})")
        if paged_older:
            M = page_table(older_table, older_block, B, "older")
            if older_block % k_f or older_block % v_f:
                raise ValueError(f"older_block {older_block} is not a multiple of the key group {k_f}: a metadata row "
                                 "would straddle two blocks")
            for name, pool, f in (("k_q", k_q, 1), ("k_scale", k_scale, k_f), ("k_zero", k_zero, k_f),
                                  ("v_q", v_q, 1), ("v_scale", v_scale, v_f), ("v_zero", v_zero, v_f)):
                if pool is not None:
                    check_pool(pool, B, older_block, f, name)
        if has_lo:
            check_planes(k_lo, v_lo, older_fine, (k_pb, k_f, k_zero), (v_pb, v_f, v_zero), B, H, M, D)
    else:
        k_pb = k_f = k_g = v_pb = v_f = v_g = 1
        M, stride_nmid = 0, 0
        stride_nmh = stride_osb = stride_osh = lane_rows = 0
        k_q = k_scale = v_q = v_scale = n_older = recent_k  # never read
    stride_last = stride_posb = 0
    if recent_last is not None:
        recent_last, stride_last = per_batch(recent_last, B)
    if recent_pos is not None:
        if recent_pos.shape[-1] != NH:
            raise ValueError(f"recent_pos has {recent_pos.shape[-1]} slots, the recent store {NH}"
                             + (" (recent_table blocks x recent_block)" if paged_hi else ""))
        recent_pos, stride_posb = per_batch_rows(recent_pos, B, "recent_pos")

    BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16
    BLOCK_G = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    key_rope = k_rope_cos is not None
    if key_rope != (k_rope_sin is not None) or key_rope and not has_older:
        raise ValueError("k_rope_cos and k_rope_sin rotate the older store's keys: pass both, with an older store")
    if key_rope:
        if BLOCK_D != D:  # the rotation pairs the tile's halves: no padded channels
            raise ValueError(f"keys quantized before RoPE need a power-of-two head_dim >= 16 in the fused kernel "
                             f"(got {D}): use --attn_impl torch")
        if k_rope_cos.shape != k_rope_sin.shape or k_rope_cos.dim() != 2 or k_rope_cos.shape[1] != D \
                or k_rope_cos.dtype != torch.float32 or k_rope_cos.stride() != k_rope_sin.stride() \
                or k_rope_cos.stride(1) != 1:
            raise ValueError(f"k_rope_cos / k_rope_sin must be float32 tables (positions, {D}) with rows "
                             "contiguous, as model.rope_tables makes them")
    if block_n <= 0:
        block_n = 64 if BLOCK_D <= 128 else 32
    dot_precision = inputs.dot_precision or ("ieee" if q.dtype == torch.float32 else "tf32")
    if dot_precision == "bf16" and INTERPRETED:
        dot_precision = "bf16_emulated"
    splits_older, splits_hi = (inputs.split_older, inputs.split_hi) if inputs.split_older >= 0 else _num_splits(q.device, B * H, M, NH, block_n)
    if not has_older:
        splits_older = 0
    n_splits = splits_older + splits_hi

    o_part = torch.empty(B, HQ, n_splits, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, HQ, n_splits, device=q.device, dtype=torch.float32)
    out = torch.empty(B, HQ, 1, D, device=q.device, dtype=q.dtype)
    k_asym, v_asym = k_zero is not None, v_zero is not None
    k_zero = k_scale if k_zero is None else k_zero  # never read when symmetric
    v_zero = v_scale if v_zero is None else v_zero
    # A pool is shared by the batch: batch stride 0, whether it comes as (1, ...) or expanded to (B, ...).
    batch_stride = lambda t, paged: 0 if paged else t.stride(0)  # noqa: E731
    ht = recent_table if paged_hi else q  # never read when that store is not paged
    mt = older_table if paged_older else q
    older_slots = (H * M if older_start is not None else M) if has_older else 0
    # Columns not attended (past a length, a finished sequence) are never stored: they start at -inf (probability 0).
    scores = torch.full((B, HQ, older_slots + NH), float("-inf"), device=q.device) if return_scores else q
    args = [  # the runtime arguments of _decode_split_kernel, in its order
        q, recent_k, recent_v, recent_k if recent_pos is None else recent_pos, recent_k if recent_last is None else recent_last, n_older,
        k_q, k_scale, k_zero, v_q, v_scale, v_zero,
        o_part, lse_part,
        ht, mt, scores,
        LOG2E / math.sqrt(D), sink_size, NH, older_slots,
        q.stride(0), q.stride(1),
        batch_stride(recent_k, paged_hi), recent_k.stride(1), recent_k.stride(2),
        batch_stride(recent_v, paged_hi), recent_v.stride(1), recent_v.stride(2),
        stride_last, stride_nmid, stride_posb,
        batch_stride(k_q, paged_older), k_q.stride(1), k_q.stride(2),
        batch_stride(k_scale, paged_older), k_scale.stride(1), k_scale.stride(2),
        batch_stride(v_q, paged_older), v_q.stride(1), v_q.stride(2),
        batch_stride(v_scale, paged_older), v_scale.stride(1), v_scale.stride(2),
        ht.stride(0) if paged_hi else 0, ht.stride(1) if paged_hi else 0,
        mt.stride(0) if paged_older else 0, mt.stride(1) if paged_older else 0,
    ]
    constexprs = dict(
        H=H, GROUP=group, D=D,
        HAS_HI_POS=recent_pos is not None, HAS_HI_LAST=recent_last is not None, HAS_MID=has_older,
        SPLITS_MID=splits_older, SPLITS_HI=splits_hi,
        K_PER_BYTE=k_pb, K_F=k_f, K_G=k_g, K_ZERO=k_asym,
        K_TILES=_group_tiles(k_f, k_g, D, BLOCK_D),
        V_PER_BYTE=v_pb, V_F=v_f, V_G=v_g, V_ZERO=v_asym,
        V_TILES=_group_tiles(v_f, v_g, D, BLOCK_D),
        BLOCK_G=BLOCK_G, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
        DOT_PRECISION=dot_precision,
        num_warps=inputs.num_warps or DEFAULT_WARPS, num_stages=inputs.num_stages or DEFAULT_STAGES,
    )
    _decode_split_kernel[(B * H, n_splits)](
        *args, **constexprs, PAGED_HI=paged_hi, HI_BLOCK=recent_block if paged_hi else 1, PAGED_MID=paged_older,
        MID_BLOCK=older_block if paged_older else 1, SCORES=return_scores,
        rope_cos_ptr=k_rope_cos if key_rope else q, rope_sin_ptr=k_rope_sin if key_rope else q,  # else never read
        stride_rope=k_rope_cos.stride(0) if key_rope else 0, KEY_ROPE=key_rope,
        older_start_ptr=q if older_start is None else older_start, stride_nmh=stride_nmh, stride_osb=stride_osb,
        stride_osh=stride_osh, older_lane=max(older_lane, 1), lane_rows=lane_rows, HAS_START=older_start is not None,
        **_plane_args(k_lo, v_lo, older_fine, q))
    _decode_merge_kernel[(B * HQ,)](
        o_part, lse_part, out, out.stride(0), out.stride(1),
        HQ=HQ, D=D, SPLITS=n_splits, BLOCK_S=triton.next_power_of_2(n_splits),
        CHUNK_S=min(16, triton.next_power_of_2(n_splits)), BLOCK_D=BLOCK_D, num_warps=2,
    )
    if not return_scores:
        return out
    lse = torch.logsumexp(lse_part * math.log(2), dim=-1) * LOG2E  # the merged log2-sum-exp of each query head
    lse = torch.where(torch.isinf(lse), 0.0, lse)  # attended to nothing: every score is -inf, probability 0
    return out, torch.exp2(scores - lse[..., None])


def score_columns(inputs: DecodeInputs) -> int:
    """Columns of the score rows: the older store's logical tokens, then the recent store's logical slots."""
    n_recent = inputs.recent_table.shape[1] * inputs.recent_block if inputs.recent_table is not None else inputs.recent_k.shape[2]
    if inputs.k_q is None:
        return n_recent
    lanes = inputs.k_q.shape[1] if inputs.older_start is not None else 1  # head-shared: every lane's slots per head
    return n_recent + lanes * (inputs.older_table.shape[1] * inputs.older_block if inputs.older_table is not None else
                               inputs.k_q.shape[2])


# Triton decides once, when a kernel is defined, whether it runs in its CPU interpreter (TRITON_INTERPRET).
INTERPRETED = type(_decode_split_kernel).__name__ == "InterpretedFunction"


def _register(name: str, return_scores: bool, fake):
    """The custom op kvcache::<name> over _launch, its schema DecodeInputs' fields (names, types, defaults), and
    its fake (the output shapes for torch.compile) from fake(inputs)."""
    def launch(*args, **kwargs):
        return _launch(DecodeInputs(*args, **kwargs), return_scores)

    launch.__signature__ = inspect.Signature(
        [inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind,
                           default=DecodeInputs._field_defaults.get(field, inspect.Parameter.empty))
         for field, kind in DecodeInputs.__annotations__.items()],
        return_annotation=tuple[Tensor, Tensor] if return_scores else Tensor)
    op = torch.library.custom_op(f"kvcache::{name}", launch, mutates_args=())
    op.register_fake(lambda *args, **kwargs: fake(DecodeInputs(*args, **kwargs)))


_register("decode_attention", False, lambda inputs: inputs.q.new_empty(inputs.q.shape))  # contiguous, as the kernel's
_register("decode_attention_scores", True, lambda inputs: (
    inputs.q.new_empty(inputs.q.shape),
    inputs.q.new_empty((*inputs.q.shape[:2], score_columns(inputs)), dtype=torch.float32)))
