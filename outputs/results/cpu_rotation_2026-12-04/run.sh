#!/usr/bin/env bash
# RULER at 2048 tokens, 10 samples per task, SmolLM2-135M float32 on the CPU: quantize_kv int2 / int4 with and
# without --rotate hadamard, and full. One JSON per row; a row whose JSON exists is skipped (resumable: run again).
# Usage: bash outputs/results/cpu_rotation_2026-12-04/run.sh   (from the repository root)
set -euo pipefail
out=outputs/results/cpu_rotation_2026-12-04
common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
        --ruler niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2 --ruler_lengths 2048
        --ruler_samples 10)
source "$out/row.sh"
row int2_hadamard quantize_kv --bits 2 --rotate hadamard --attn_impl cpu
row int2 quantize_kv --bits 2 --rotate none --attn_impl cpu
row int4_hadamard quantize_kv --bits 4 --rotate hadamard --attn_impl cpu
row int4 quantize_kv --bits 4 --rotate none --attn_impl cpu
row full full
