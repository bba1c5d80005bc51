#!/usr/bin/env bash
# Issue 24's "every method ahead of kvpress's best press at the same bytes" at 4k: h2o and expected_attention (their
# defaults, --kernel_size 15) with int4 kept tokens at 0.100x of full's KV bytes (budget 2146 at 4096 tokens, as the
# 0.1x rows of outputs/results/cpu_ruler4k_2026-12-04/), RULER niah_single_1, niah_single_2, niah_multikey_1,
# 10 samples a task, float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, --rotate auto. kvpress's
# best at 4k: 26.7 at 0.107x (docs/results.md). One row per task and policy;
# resumable: a row whose JSON exists is skipped. Measured 2026-12-06, alone, 9-12 minutes a row: h2o 3.3
# (niah_single_1 0 / niah_single_2 10 / niah_multikey_1 0); expected_attention 10.0 (0 / 10 / 20; 2026-12-06
# later, 6-10 minutes a row beside another job).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_policies4k_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
for policy in h2o expected_attention; do
  for task in niah_single_1 niah_single_2 niah_multikey_1; do
    common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
            --ruler_lengths 4096 --sink_size 16 --window_size 32 --ruler "$task")
    row "ruler4k_${policy}_b2146_int4_$task" "$policy" --budget 2146 --then_bits 4
  done
done
