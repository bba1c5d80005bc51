#!/usr/bin/env bash
# Issue 24, the 0.05x goal at 4k (90 % of full's 80.0 = 72): tova with int4 kept tokens at 0.050x (budget 955)
# scored 70.0 (100 / 60 / 50; outputs/results/cpu_tova_pooled_2026-12-05/). Mixed precision at the same bytes: int2
# kept tokens with the best-scored half int4 (budget 1127, 0.050x at 4096 tokens, memory.predicted_kv_bytes; as
# snapkv's row in outputs/results/cpu_ruler005_4k_2026-12-05/). RULER niah_single_2 / niah_multikey_1 /
# niah_single_1, 10 samples each, one row per task, float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window
# 16/32, --rotate auto, --kernel_size 15 (the default). Full on the same samples: outputs/results/cpu_ruler4k_2026-12-04/.
# Resumable: a row whose JSON exists is skipped. Measured 2026-12-05: niah_single_2 only, 50.0 (int4's 60.0 lost
# sample 5 here, nothing gained): the other tasks were not run, as 72 was then out of reach for this configuration.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_tova_mixed4k_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --sink_size 16 --window_size 32)
for task in niah_single_2 niah_multikey_1 niah_single_1; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  row "ruler4k_tova_b1127_int2_fine50_$task" tova --budget 1127 --then_bits 2 --fine_share 0.5
done
