#!/usr/bin/env bash
# TOVA with SnapKV's pooling (--kernel_size 15): the last prompt token's attention, averaged over 15 neighbouring
# positions, chooses the prompt tokens kept (1k, 0.100x: 96.7 = full, against 23.3 unpooled;
# outputs/results/cpu_policies01_2026-12-05/). Does it hold at 2k and 4k, and at 0.05x of full's bytes? int4 kept
# tokens, sinks/window 16/32, --rotate auto; budgets as snapkv's rows (memory.predicted_kv_bytes): 2k 0.100x 955,
# 4k 0.050x 955, 4k 0.100x 2146. RULER niah_single_1 / niah_single_2 / niah_multikey_1, 10 samples each, float32
# SmolLM2-135M-Instruct on the CPU, greedy; full on the same samples: outputs/results/cpu_ruler4k_2026-12-04/ (2k
# 83.3, 4k 80.0). One row per task at 4k. Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_tova_pooled_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --sink_size 16 --window_size 32)
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  row "ruler4k_tova_b955_int4_k15_$task" tova --budget 955 --then_bits 4 --kernel_size 15
done
common=("${base[@]}" --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 2048)
row ruler2k_tova_b955_int4_k15 tova --budget 955 --then_bits 4 --kernel_size 15
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  row "ruler4k_tova_b2146_int4_k15_$task" tova --budget 2146 --then_bits 4 --kernel_size 15
done
