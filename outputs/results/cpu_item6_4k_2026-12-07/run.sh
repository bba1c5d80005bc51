#!/usr/bin/env bash
# Issue 24 item 6, the last rows: RULER's other tasks (niah_single_3, vt, fwe) at 4k, 10 samples a task, float32
# SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, every other option at its default (--rotate auto):
# - at 0.100x of full's bytes with int4 kept tokens (budget 2146): tova and snapkv with head-adaptive budgets,
#   h2o and expected_attention, and tova's vt row (its niah_single_3 and fwe rows: cpu_other_fwd_2026-12-06/);
# - every policy at 0.1x with kept tokens in float32 (budget 402: memory.predicted_kv_bytes);
# - quantize_kv int8, and int2 without rotation (int4 / int2 rotated: cpu_item6_other_2026-12-06/).
# These are the rows the 2k table has and the 4k table lacked (cpu_item6_rest_2026-12-06/run.sh's section 4 is the
# first of them; it was not run there). One row per task and configuration (one JSON each), resumable: a row whose
# JSON exists is skipped; two processes share the list (a row one of them runs is marked .running). vt and fwe come
# first, and the int4 rows last: a niah_single_3 row with int4 kept tokens (a UUID, up to 128 new tokens a sample)
# took 9-34 min at one thread here, where a float32 one takes about 6.
# Measured 2026-12-07, two processes at OMP_NUM_THREADS=1 on the two cores (278-2040 s a row; rows, not timings): the
# list was reordered twice while it ran (vt and fwe first, then the int4 rows last; the rows are the same). The
# niah_single_3 rows of h2o and expected_attention with int4 kept tokens ran last (1012 and 533 s).
# The scores: docs/results.md "RULER's other tasks at 2k and 4k", or ruler_table_other_4096.md here
# (`python -m scripts.ruler_table outputs/results --length 4096 --tasks niah_single_3,niah_multikey_2,vt,fwe`).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_item6_4k_2026-12-07
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=()
claim() { mkdir "$out/$1.running" 2>/dev/null || { echo "running elsewhere $1"; return 1; }; }
unclaimed_row() { local name=$1; claim "$name" || return 0; row "$@"; rmdir "$out/$name.running"; }
rows() {  # every configuration of the list on one task
  local task=$1
  common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
          --sink_size 16 --window_size 32 --ruler "$task" --ruler_lengths 4096)
  for policy in tova snapkv; do
    unclaimed_row "ruler4k_${policy}_b2146_int4_adaptive_$task" "$policy" --budget 2146 --then_bits 4 --head_budget adaptive
  done
  for policy in tova snapkv h2o expected_attention; do
    unclaimed_row "ruler4k_${policy}_b402_$task" "$policy" --budget 402
  done
  unclaimed_row "ruler4k_int8_$task" quantize_kv --bits 8
  unclaimed_row "ruler4k_int2_none_$task" quantize_kv --bits 2 --rotate none
  for policy in h2o expected_attention; do
    unclaimed_row "ruler4k_${policy}_b2146_int4_$task" "$policy" --budget 2146 --then_bits 4
  done
  if [ "$task" = vt ]; then unclaimed_row "ruler4k_tova_b2146_int4_vt" tova --budget 2146 --then_bits 4; fi
}
for task in vt fwe niah_single_3; do rows "$task"; done
