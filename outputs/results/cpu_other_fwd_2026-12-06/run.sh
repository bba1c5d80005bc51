#!/usr/bin/env bash
# Issue 24: RULER's other four tasks (niah_single_3, niah_multikey_2, vt, fwe) at 2k and 4k for the configuration
# that met the 0.05x goal on the three niah tasks (snapkv --obs_window 1 --pooling forward: tova's prompt scores,
# pooled forward, no decode eviction; outputs/results/cpu_goals005_4k_2026-12-06/), and for tova (--kernel_size 15,
# its default), int4 kept tokens, sinks/window 16/32, float32 SmolLM2-135M-Instruct on the CPU, greedy, 10 samples a
# task. Budgets (memory.predicted_kv_bytes): 0.100x is 955 at 2k and 2146 at 4k; 0.050x is 955 at 4k. Full and
# snapkv's default (--obs_window 32, centered pooling) on the same samples: outputs/results/cpu_ruler_other_2026-12-04/
# (2k) and cpu_ruler_other4k_2026-12-04/ (4k). One row per task and configuration, most telling first (a 4k row takes
# 15-19 minutes alone, a 2k row about 5); resumable: a row whose JSON exists is skipped.
# Tasks whose full cache scores about 0 here carry no signal and are not run: niah_multikey_2 (full 0.0 at 2k and at
# 4k) and vt at 4k (full 4.0); vt at 2k (full 14.0) is.
# Measured 2026-12-06 (10 samples each; full and snapkv's default int4 from the folders above): at 0.100x, forward:
# 4k niah_single_3 0.0 (full 30.0, snapkv default 0.0), fwe 30.0 (50.0, 30.0); 2k niah_single_3 0.0 (90.0, 0.0),
# fwe 36.7 (46.7, 33.3), vt 4.0 (14.0, 12.0); tova at 2k: niah_single_3 0.0, fwe 30.0, vt 12.0. At 0.050x, forward:
# 4k niah_single_3 0.0, fwe 20.0; tova at 4k (0.100x): niah_single_3 0.0, fwe 40.0 (every row run).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_other_fwd_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --ruler_lengths 4096 --sink_size 16 --window_size 32)
forward=(snapkv --obs_window 1 --pooling forward --then_bits 4)
for task in niah_single_3 fwe; do
  common=("${base[@]}" --ruler "$task")
  row "ruler4k_snapkv_obs1_fwd_b2146_int4_$task" "${forward[@]}" --budget 2146
done
for task in niah_single_3 fwe vt; do
  common=("${base[@]/4096/2048}" --ruler "$task")
  row "ruler2k_snapkv_obs1_fwd_b955_int4_$task" "${forward[@]}" --budget 955
done
for task in niah_single_3 fwe vt; do
  common=("${base[@]/4096/2048}" --ruler "$task")
  row "ruler2k_tova_b955_int4_$task" tova --budget 955 --then_bits 4
done
for task in niah_single_3 fwe; do
  common=("${base[@]}" --ruler "$task")
  row "ruler4k_snapkv_obs1_fwd_b955_int4_$task" "${forward[@]}" --budget 955
  row "ruler4k_tova_b2146_int4_$task" tova --budget 2146 --then_bits 4
done
