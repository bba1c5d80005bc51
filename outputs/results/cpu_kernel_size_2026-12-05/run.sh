#!/usr/bin/env bash
# Issue 24, why 0.1x loses niah_single_3 at 1k (snapkv int4 budget 360: 0 of 10 where full keeps 70 and quantize_kv
# int4 16/32 without eviction 80, outputs/results/cpu_ruler_other_2026-12-04/): its value is a UUID of ~25 tokens,
# and snapkv's pooling (--kernel_size 15) keeps runs shorter than that. The same row with wider pooling windows.
# 10 samples, 1k, float32 SmolLM2-135M-Instruct on the CPU, sinks/window 16/32, --rotate auto. Resumable.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_kernel_size_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler niah_single_3
        --ruler_samples 10 --ruler_lengths 1024 --sink_size 16 --window_size 32)
row ruler1k_snapkv_b360_int4_k15_niah_single_3 snapkv --budget 360 --then_bits 4 --kernel_size 15
row ruler1k_snapkv_b360_int4_k31_niah_single_3 snapkv --budget 360 --then_bits 4 --kernel_size 31
row ruler1k_snapkv_b360_int4_k63_niah_single_3 snapkv --budget 360 --then_bits 4 --kernel_size 63
