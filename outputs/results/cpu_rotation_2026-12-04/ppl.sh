#!/usr/bin/env bash
# Streamed perplexity, the first 1024 tokens of the evaluation text one token at a time (--chunk_size 1), quantize_kv
# 16/32 groups of 32 with and without --rotate, the C decode kernel. One JSON per row; existing rows are skipped.
set -euo pipefail
out=outputs/results/cpu_rotation_2026-12-04
common=(--max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "")
source "$out/row.sh"
row ppl_int2 quantize_kv --bits 2 --rotate none --attn_impl cpu
row ppl_int2_hadamard quantize_kv --bits 2 --rotate hadamard --attn_impl cpu
row ppl_int2_signed quantize_kv --bits 2 --rotate signed_hadamard --attn_impl cpu
row ppl_int4_hadamard quantize_kv --bits 4 --rotate hadamard --attn_impl cpu
row ppl_int2_token_hadamard quantize_kv --bits 2 --k_granularity token --rotate hadamard --attn_impl cpu
row ppl_full full
row ppl_int4 quantize_kv --bits 4 --rotate none --attn_impl cpu
