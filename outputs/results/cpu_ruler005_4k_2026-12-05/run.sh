#!/usr/bin/env bash
# Issue 24's 0.05x goal at 4k (at 1k the float32 16/32 ring alone is 0.047x of full's bytes; at 4k it is 0.012x):
# RULER niah_single_1, niah_single_2, niah_multikey_1 at 4096 tokens, 10 samples each, float32 SmolLM2-135M-Instruct
# on the CPU, greedy, snapkv 16/32 --rotate auto at 0.050x of full's KV bytes (memory.predicted_kv_bytes at 4096
# tokens: int4 for every kept token budget 955 -> 0.04998x; int2 with its best-scored half at 4 bits 1127 ->
# 0.04999x). Full on the same samples: outputs/results/cpu_ruler4k_2026-12-04/ruler4k_full.json (80.0). One row per
# task and configuration; resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ruler005_4k_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --ruler_lengths 4096 --sink_size 16 --window_size 32)
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${base[@]}" --ruler "$task")
  row "ruler4k_snapkv_b1127_int2_fine50_$task" snapkv --budget 1127 --then_bits 2 --fine_share 0.5
  row "ruler4k_snapkv_b955_int4_$task" snapkv --budget 955 --then_bits 4
done
