#!/usr/bin/env bash
# Issue 24: does tova (the last prompt token's attention pooled over --kernel_size 15, the default), which matches
# full at 0.100x on niah_single_1/2 and niah_multikey_1 at 1k, do better than snapkv on RULER's other tasks?
# niah_single_3, niah_multikey_2, vt, fwe at 1k, 10 samples each, int4 kept tokens at budget 360 (0.100x of full's
# bytes, memory.predicted_kv_bytes), float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, --rotate
# auto. Full (47.0) and snapkv at the same budget (21.5) on the same samples:
# outputs/results/cpu_mixed_2026-12-04/ and outputs/results/cpu_ruler_other_2026-12-04/.
# Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_tova_other_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
        --ruler niah_single_3,niah_multikey_2,vt,fwe --ruler_lengths 1024 --sink_size 16 --window_size 32)
row ruler1k_tova_b360_int4 tova --budget 360 --then_bits 4
