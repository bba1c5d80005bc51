#!/usr/bin/env bash
# Issue 24 item 6 (RULER, 10 samples a task, float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32,
# groups of 32, every other option at its default: --rotate auto rotates int4 / int2 keys, and eviction's int4 kept
# tokens' keys and values):
# 1. quantize_kv int2 without rotation at 4k on niah_single_1, niah_single_2, niah_multikey_1 (with the keys
#    rotated: 53.3 at 0.113x, outputs/results/cpu_quant_2k4k_2026-12-05/; full 80.0);
# 2. three of RULER's other tasks, niah_single_3, vt, fwe (niah_multikey_2 is left out: full scores 0.0 on it at 2k
#    and 4k; full at 2k 90.0 / 14.0 / 46.7, outputs/results/cpu_ruler_other_2026-12-04/, at 4k 30.0 / 4.0 / 50.0,
#    cpu_ruler_other4k_2026-12-04/): quantize_kv int8 / int4 / int2 (keys rotated, and unrotated) at 2k, int4 / int2
#    at 4k; tova, snapkv, h2o, expected_attention at 0.2x of full's bytes with kept tokens in float32 (budget 402 at
#    2k, 805 at 4k, as cpu_item6_2k_2026-12-06/ and cpu_item6_4k_2026-12-06/; h2o and expected_attention at 2k
#    only); tova and snapkv with head-adaptive budgets at 0.100x, int4 kept tokens (budget 955; their uniform rows:
#    cpu_ruler_other_2026-12-04/, cpu_other_fwd_2026-12-06/).
# One row per task and configuration (one JSON each), resumable: a row whose JSON exists is skipped. Measured
# 2026-12-06 as three scripts (section 1 and the 2k quantize_kv rows; then the 4k quantize_kv rows, int8 and the
# 2k 0.2x tova / snapkv rows; beside them the adaptive, h2o / expected_attention and 4k 0.2x rows), two processes at
# OMP_NUM_THREADS=1 on the two cores beside other runs and tests: 103-520 s a row. Rows, not timings. The scores:
# docs/results.md "RULER's other tasks at 2k and 4k", or `python -m scripts.ruler_table outputs/results --length
# 2048 --tasks niah_single_3,vt,fwe`.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_item6_other_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --sink_size 16 --window_size 32)
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  row "ruler4k_int2_none_$task" quantize_kv --bits 2 --rotate none
done
for task in niah_single_3 vt fwe; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 2048)
  row "ruler2k_int8_$task" quantize_kv --bits 8
  row "ruler2k_int4_$task" quantize_kv --bits 4
  row "ruler2k_int2_$task" quantize_kv --bits 2
  row "ruler2k_int2_none_$task" quantize_kv --bits 2 --rotate none
  for policy in tova snapkv h2o expected_attention; do
    row "ruler2k_${policy}_b402_$task" "$policy" --budget 402
  done
  for policy in tova snapkv; do
    row "ruler2k_${policy}_b955_int4_adaptive_$task" "$policy" --budget 955 --then_bits 4 --head_budget adaptive
  done
done
for task in niah_single_3 fwe vt; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  row "ruler4k_int4_$task" quantize_kv --bits 4
  row "ruler4k_int2_$task" quantize_kv --bits 2
  for policy in tova snapkv; do
    row "ruler4k_${policy}_b805_$task" "$policy" --budget 805
  done
done
