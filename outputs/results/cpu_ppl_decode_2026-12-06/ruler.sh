#!/usr/bin/env bash
# Does --decode_kernel_size 15 (pooled.sh) change what RULER's answers find? tova and h2o, int4 kept tokens at budget
# 360 (0.100x at 1k), RULER niah_single_1, niah_single_2, niah_multikey_1 at 1024 tokens, 10 samples each, float32
# SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, --rotate auto; the same rows unpooled:
# outputs/results/cpu_policies01_2026-12-05/ (ruler1k_tova_b360_int4_k15 96.7, ruler1k_h2o_b360_int4_k15 23.3, made
# with --kernel_size 15, the default since). Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ppl_decode_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
        --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024 --sink_size 16 --window_size 32)
row ruler1k_tova_b360_int4_dk15 tova --budget 360 --then_bits 4 --decode_kernel_size 15
row ruler1k_h2o_b360_int4_dk15 h2o --budget 360 --then_bits 4 --decode_kernel_size 15
