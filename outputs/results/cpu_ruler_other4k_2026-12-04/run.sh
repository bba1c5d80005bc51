#!/usr/bin/env bash
# Issue 24 at 4k: RULER's other four tasks (niah_single_3, niah_multikey_2, vt, fwe), 10 samples each, at 4096
# tokens, float32 SmolLM2-135M-Instruct on the CPU, greedy: full, then snapkv at 0.100x of full's KV bytes with the
# budgets of outputs/results/cpu_ruler4k_2026-12-04/run.sh (memory.predicted_kv_bytes at 4096 tokens: int2 with its
# best-scored half at 4 bits 2544, int4 every kept token 2146), sinks/window 16/32 in float32, --rotate auto
# (hadamard). One row per task and configuration (a row takes 10-30 minutes here), in order of value, so a session
# that ends mid-way loses one task's row at most. Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ruler_other4k_2026-12-04
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --ruler_lengths 4096)
for task in niah_single_3 niah_multikey_2 vt fwe; do
  common=("${base[@]}" --ruler "$task")
  row "ruler4k_full_$task" full
  common=("${base[@]}" --ruler "$task" --sink_size 16 --window_size 32)
  row "ruler4k_snapkv_b2544_int2_fine50_$task" snapkv --budget 2544 --then_bits 2 --fine_share 0.5
  row "ruler4k_snapkv_b2146_int4_$task" snapkv --budget 2146 --then_bits 4
done
