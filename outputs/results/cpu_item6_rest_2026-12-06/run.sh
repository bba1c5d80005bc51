#!/usr/bin/env bash
# Issue 24 item 6, rows left after cpu_item6_other_2026-12-06/ (RULER, 10 samples a task, float32
# SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, every other option at its default):
# 1. RULER's other tasks (niah_single_3, vt, fwe) at 4k: h2o and expected_attention at 0.2x of full's bytes, kept
#    tokens in float32 (budget 805, as tova and snapkv in cpu_item6_other_2026-12-06/);
# 2. the other tasks at 2k: h2o and expected_attention at 0.100x with int4 kept tokens (budget 955, as tova and
#    snapkv in cpu_ruler_other_2026-12-04/);
# 3. every policy at 0.1x with kept tokens in float32 (budget 201 at 2k, 402 at 4k: memory.predicted_kv_bytes), on
#    niah_single_1, niah_single_2, niah_multikey_1 (the goals' tasks; kvpress's presses at 0.1x keep float32 tokens
#    too: cpu_peers2k_2026-12-05/, cpu_peers4k_2026-12-06/), then on the other tasks at 2k;
# 4. the other tasks at 4k: tova and snapkv with head-adaptive budgets at 0.100x, int4 kept tokens (budget 2146),
#    h2o and expected_attention at 0.100x int4, and tova's vt row at 0.100x int4.
# One row per task and configuration (one JSON each), resumable: a row whose JSON exists is skipped.
# Measured 2026-12-06/07 at OMP_NUM_THREADS=1 (71-521 s a row; rows, not timings): one process ran sections 1 and 2
# and section 3's 2k rows as far as tova's niah_single_3 row, beside compare_peers (cpu_peers_other*_2026-12-06/);
# it was then stopped and run again with SECTION=3b, and after compare_peers a second process ran SECTION=3b beside
# it. Then section 3's other rows on the other tasks at 2k, one process at OMP_NUM_THREADS=2 (63-132 s a row), stopped
# before section 4, which is not run. The scores:
# docs/results.md "Every policy at 0.1x in float32" and "RULER's other tasks at 2k and 4k", or
# `python -m scripts.ruler_table outputs/results --length 4096`.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_item6_rest_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --sink_size 16 --window_size 32)
policies=(tova snapkv h2o expected_attention)
# two processes share the list: a row one of them is running is marked, and the other passes it by
claim() { mkdir "$out/$1.running" 2>/dev/null || { echo "running elsewhere $1"; return 1; }; }
unclaimed_row() { local name=$1; claim "$name" || return 0; row "$@"; rmdir "$out/$name.running"; }
section=${SECTION:-all}  # 3b: the 4k rows of section 3 alone (a second process beside the first)
if [ "$section" = all ]; then
  for task in niah_single_3 vt fwe; do
    common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
    for policy in h2o expected_attention; do
      row "ruler4k_${policy}_b805_$task" "$policy" --budget 805
    done
  done
  for task in niah_single_3 vt fwe; do
    common=("${base[@]}" --ruler "$task" --ruler_lengths 2048)
    for policy in h2o expected_attention; do
      row "ruler2k_${policy}_b955_int4_$task" "$policy" --budget 955 --then_bits 4
    done
  done
  for task in niah_single_1 niah_single_2 niah_multikey_1 niah_single_3 vt fwe; do
    common=("${base[@]}" --ruler "$task" --ruler_lengths 2048)
    for policy in "${policies[@]}"; do
      row "ruler2k_${policy}_b201_$task" "$policy" --budget 201
    done
  done
fi
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  for policy in "${policies[@]}"; do
    unclaimed_row "ruler4k_${policy}_b402_$task" "$policy" --budget 402
  done
done
[ "$section" = all ] || exit 0
for task in niah_single_3 vt fwe; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  for policy in tova snapkv; do
    row "ruler4k_${policy}_b2146_int4_adaptive_$task" "$policy" --budget 2146 --then_bits 4 --head_budget adaptive
  done
  for policy in h2o expected_attention; do
    row "ruler4k_${policy}_b2146_int4_$task" "$policy" --budget 2146 --then_bits 4
  done
done
common=("${base[@]}" --ruler vt --ruler_lengths 4096)
row "ruler4k_tova_b2146_int4_vt" tova --budget 2146 --then_bits 4
