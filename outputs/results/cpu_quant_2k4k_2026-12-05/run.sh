#!/usr/bin/env bash
# Issue 24's matrix, quantize_kv at 2k and 4k: RULER niah_single_1, niah_single_2, niah_multikey_1, 10 samples each,
# float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, groups of 32, --rotate auto (hadamard on the
# keys for int4 / int2, none for int8) unless named. Full on the same samples: outputs/results/cpu_ruler4k_2026-12-04/
# (2k 83.3, 4k 80.0). At 4k one row per task (a row takes 10-30 minutes here), in order of value, so a session that
# ends mid-way loses one task's row at most. Resumable: a row whose JSON exists is skipped.
# Measured 2026-12-05 (later), alone: 2k int2 --rotate none 26.7 (20 / 40 / 20, 1065 s), 2k int8 83.3 (100 / 100 / 50,
# 805 s) = full's. 2026-12-06: 4k int8 80.0 (100 / 90 / 50, 886-1067 s a row beside another job) = full's.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_quant_2k4k_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --sink_size 16 --window_size 32)
for bits in 2 4; do
  for task in niah_single_1 niah_single_2 niah_multikey_1; do
    common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
    row "ruler4k_int${bits}_$task" quantize_kv --bits $bits
  done
done
common=("${base[@]}" --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 2048)
row ruler2k_int2_none quantize_kv --bits 2 --rotate none
row ruler2k_int8 quantize_kv --bits 8
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${base[@]}" --ruler "$task" --ruler_lengths 4096)
  row "ruler4k_int8_$task" quantize_kv --bits 8
done
