#!/usr/bin/env bash
# Issue 24: RULER's other tasks (niah_single_3, niah_multikey_2, vt, fwe), 10 samples each, SmolLM2-135M-Instruct
# float32 on the CPU, greedy, sinks/window 16/32, --rotate auto (hadamard for 4 and 2 bits). At 1k the rows not yet
# measured there (full 47.0 and snapkv mixed 14.7 are in cpu_mixed_2026-12-04/): quantize_kv int8 / int4 / int2
# 16/32, snapkv int4 at 0.100x of full's bytes (budget 360); at 2k full, snapkv int2 with its best half int4 (budget
# 1127) and int4 (955), both 0.100x (budgets from memory.predicted_kv_bytes, as cpu_mixed_2026-12-04/run.sh).
# Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ruler_other_2026-12-04
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
      --ruler niah_single_3,niah_multikey_2,vt,fwe --ruler_samples 10)
common=("${base[@]}" --ruler_lengths 1024 --sink_size 16 --window_size 32)
row ruler1k_quantize_kv_int8 quantize_kv --bits 8
row ruler1k_quantize_kv_int4 quantize_kv --bits 4
row ruler1k_quantize_kv_int2 quantize_kv --bits 2
row ruler1k_snapkv_b360_int4 snapkv --budget 360 --then_bits 4
common=("${base[@]}" --ruler_lengths 2048)
row ruler2k_full full
common=("${base[@]}" --ruler_lengths 2048 --sink_size 16 --window_size 32)
row ruler2k_snapkv_b1127_int2_fine50 snapkv --budget 1127 --then_bits 2 --fine_share 0.5
row ruler2k_snapkv_b955_int4 snapkv --budget 955 --then_bits 4
