#!/usr/bin/env bash
# Issue 24's last missed goal: 0.05x of full's bytes at 4k within 90 % of full's 80.0 (>= 72). Tova with int4 kept
# tokens at budget 955 (0.050x) scored 70.0 (100 / 60 / 50, outputs/results/cpu_goals4k_2026-12-05/); at 0.1x int8
# kept tokens with --kernel_size 31 matched full (80.0), so the same bytes are tried here as int8 at budget 617
# (0.0499x, memory.predicted_kv_bytes at 4096 tokens), with the default kernel 15 and with 31.
# RULER at 4096 tokens, 10 samples a task, one row per task, float32 SmolLM2-135M-Instruct on the CPU, greedy,
# sinks/window 16/32. Full on the same samples: outputs/results/cpu_ruler4k_2026-12-04/ (80.0 = 100 / 90 / 50).
# niah_single_2 (where 0.05x loses) first for both kernels. Resumable: a row whose JSON exists is skipped.
# Measured 2026-12-06 (niah_single_2 only, then stopped): kernel 31 60.0, 15 50.0: 8 bits do not help at 0.05x.
# kept.py / kept.log showed why (which needle tokens each head holds, after the prompt and each decode step):
# heads of layers 7-14 held ": 65953" without "370." (the centered kernel reaches 7 tokens past a peak at the
# needle's start), and tova's decode steps evicted a needle's last digits from a layer-7 head while the answer was
# read. diagnose.log (outputs/results/cpu_goals4k_2026-12-05/diagnose.py, samples 1, 2, 4, 5, 6): --pooling forward (the kernel's 15 positions up to a
# token) answers 1 and 2 with tova int8; snapkv --obs_window 1 (tova's prompt scores, no decode eviction)
# answers 4 too; with int4 kept tokens at 955 it answers all but 2 (lost by int4 with eviction, as before).
# So the rows below: snapkv --obs_window 1 --pooling forward, int4 at 955 and int8 at 617.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_goals005_4k_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --ruler_lengths 4096 --sink_size 16 --window_size 32)
for task in niah_single_2 niah_multikey_1 niah_single_1; do
  common=("${base[@]}" --ruler "$task")
  row "ruler4k_tova_b617_int8_k31_$task" tova --budget 617 --then_bits 8 --kernel_size 31
  row "ruler4k_tova_b617_int8_$task" tova --budget 617 --then_bits 8
  break  # the other tasks not run: 8 bits lost niah_single_2 (above)
done
for task in niah_single_2 niah_multikey_1 niah_single_1; do
  common=("${base[@]}" --ruler "$task")
  row "ruler4k_snapkv_obs1_fwd_b955_int4_$task" snapkv --obs_window 1 --pooling forward --budget 955 --then_bits 4
done
# Measured 2026-12-06: 76.7 (100 / 80 / 50) at 0.050x, 95.8 % of full's 80.0 (niah_single_2 loses sample 2, lost
# by int4 with eviction, and 7, which full loses too). Then the same configuration where tova was measured at 1k
# (0.100x, budget 360: tova 96.7) and 2k (0.050x, budget 359: tova 86.7), the three tasks in one row; int8 at 617
# last. Measured: 1k 96.7 (100 / 100 / 90), 2k 90.0 (100 / 100 / 70); int8 at 617 niah_single_2 80.0 (samples 5
# and 7 lost), niah_multikey_1 40.0, then stopped (niah_single_1 not run: int4 at 955 is the better use of 0.05x).
for length_budget in 1024:360 2048:359; do
  common=("${base[@]/4096/${length_budget%:*}}" --ruler niah_single_1,niah_single_2,niah_multikey_1)
  row "ruler$((${length_budget%:*} / 1024))k_snapkv_obs1_fwd_b${length_budget#*:}_int4" snapkv --obs_window 1 \
    --pooling forward --budget ${length_budget#*:} --then_bits 4
done
for task in niah_single_2 niah_multikey_1 niah_single_1; do
  common=("${base[@]}" --ruler "$task")
  row "ruler4k_snapkv_obs1_fwd_b617_int8_$task" snapkv --obs_window 1 --pooling forward --budget 617 --then_bits 8
done
