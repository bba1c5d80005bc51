#!/usr/bin/env bash
# Issue 24 item 6 at 2k: every eviction policy at 0.2x of full's KV bytes with kept tokens in the model dtype (float32
# here; budget 402 = 0.200x at 2048 tokens, memory.predicted_kv_bytes, as budget 200 = 0.199x at 1k in
# outputs/results/cpu_pooled_2026-12-05/), and the head-adaptive budgets (--head_budget adaptive) of snapkv and tova
# with int4 kept tokens at 0.100x (budget 955, the uniform rows' bytes: outputs/results/cpu_tova_pooled_2026-12-05/,
# cpu_mixed_2026-12-04/). RULER niah_single_1, niah_single_2, niah_multikey_1 at 2048 tokens, 10 samples a task,
# float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, every other option at its default.
# kvpress's best at 2k: 26.7 at 0.113x (outputs/results/cpu_peers2k_2026-12-05/); full 83.3 (cpu_goals_2026-12-04/).
# One row per task and configuration (about 5-7 minutes a row alone); resumable: a row whose JSON exists is skipped.
# Measured 2026-12-06 (two processes, one thread each, beside a compare_peers run; 100-419 s a row): at 0.200x tova
# 83.3 (100 / 100 / 50), snapkv 73.3 (100 / 80 / 40), h2o 10.0 (0 / 10 / 20), expected_attention 0.0; adaptive at
# 0.100x snapkv 90.0 (100 / 90 / 80), tova 90.0 (100 / 100 / 70).
# `bash run.sh` runs every row; `bash run.sh 0 2` and `bash run.sh 1 2` split them between two processes (run
# each with OMP_NUM_THREADS=1 on two cores): quality rows, not timings.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_item6_2k_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
part=${1:-0}; parts=${2:-1}
i=0
each() {  # each NAME STRATEGY OPTIONS...: the row, for this part only
  if [ $((i % parts)) -eq "$part" ]; then row "$@"; fi
  i=$((i + 1))
}
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
          --ruler_lengths 2048 --sink_size 16 --window_size 32 --ruler "$task")
  for policy in tova snapkv h2o expected_attention; do
    each "ruler2k_${policy}_b402_$task" "$policy" --budget 402
  done
  for policy in snapkv tova; do
    each "ruler2k_${policy}_b955_int4_adaptive_$task" "$policy" --budget 955 --then_bits 4 --head_budget adaptive
  done
done
