#!/usr/bin/env bash
# SnapKV's observation window (--obs_window: the last prompt queries that score the prompt) apart from the window
# kept in the model dtype (32): does scoring with more of the question keep more needles at 0.1x of full's bytes?
# snapkv 16/32, int4 kept tokens, budget 360 (0.100x at 1k; window-scored row: 86.7 in
# outputs/results/cpu_mixed_2026-12-04/), RULER niah_single_1 / niah_single_2 / niah_multikey_1 at 1024 tokens, 10
# samples each, float32 SmolLM2-135M-Instruct on the CPU, greedy, --rotate auto. Resumable: a row whose JSON exists
# is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_obs_window_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
        --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024 --sink_size 16 --window_size 32)
for obs in ${OBS-64 16}; do  # OBS="": none of these (narrower windows scored better: the rows below)
  row ruler1k_snapkv_b360_int4_obs$obs snapkv --budget 360 --then_bits 4 --obs_window $obs
done
# The observation window narrowed to the answer's prefix (RULER's question, template and answer prefix are 40
# tokens here, the prefix alone about 16): 8 at 1k, and 16 for int2 with its best half int4 (budget 420, 0.100x,
# 90.0 with 32) and for int4 at 2k (budget 955, 0.100x; 93.3 with 32, full 83.3).
row ruler1k_snapkv_b360_int4_obs8 snapkv --budget 360 --then_bits 4 --obs_window 8
row ruler1k_snapkv_b420_int2_fine50_obs16 snapkv --budget 420 --then_bits 2 --fine_share 0.5 --obs_window 16
common=("${common[@]/1024/2048}")
row ruler2k_snapkv_b955_int4_obs16 snapkv --budget 955 --then_bits 4 --obs_window 16
