#!/usr/bin/env bash
# Issue 24's "every method ahead of kvpress's best press at the same bytes" at 2k: h2o and expected_attention (their
# defaults, --kernel_size 15) with int4 kept tokens at 0.100x of full's KV bytes (budget 955 at 2048 tokens, as
# tova's 90.0 in outputs/results/cpu_tova_pooled_2026-12-05/), RULER niah_single_1, niah_single_2, niah_multikey_1,
# 10 samples a task, float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, --rotate auto. kvpress's
# best at 2k: 26.7 (outputs/results/cpu_peers2k_2026-12-05/); full 83.3 (cpu_goals_2026-12-04/ruler2k_full.json).
# One row per task and policy (about 5 minutes a row alone); resumable: a row whose JSON exists is skipped.
# Measured 2026-12-06: h2o 26.7 (niah_single_1 0 / niah_single_2 30 / niah_multikey_1 50); expected_attention
# 26.7 (0 / 40 / 40).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_policies2k_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
for policy in h2o expected_attention; do
  for task in niah_single_1 niah_single_2 niah_multikey_1; do
    common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
            --ruler_lengths 2048 --sink_size 16 --window_size 32 --ruler "$task")
    row "ruler2k_${policy}_b955_int4_$task" "$policy" --budget 955 --then_bits 4
  done
done
