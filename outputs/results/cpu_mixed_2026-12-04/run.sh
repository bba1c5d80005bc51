#!/usr/bin/env bash
# Mixed precision by score (--fine_share) against one precision for every kept token, at the same bytes: snapkv at
# 0.100x of full's KV bytes (float32 SmolLM2, sinks/window 16/32 in float32, --rotate auto: hadamard), RULER
# niah_single_1, niah_single_2, niah_multikey_1, 10 samples each, at 1024 tokens (int2 for every kept token: budget
# 538, outputs/results/cpu_rotation_2026-12-04/ruler1k_snapkv_b538_int2_hadamard.json) and at 2048 (the ring alone
# is 0.023x there; full: outputs/results/cpu_goals_2026-12-04/ruler2k_full.json). The 1k row at budget 773 is issue
# 24's ~0.15x goal (0.150x: quantize_kv int2 16/32 holds 0.172x). Existing rows are skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_mixed_2026-12-04
base=(--sink_size 16 --window_size 32 --max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
      --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_samples 10)
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=("${base[@]}" --ruler_lengths 1024)
row ruler1k_snapkv_b420_int2_fine50 snapkv --budget 420 --then_bits 2 --fine_share 0.5
row ruler1k_snapkv_b465_int2_fine25 snapkv --budget 465 --then_bits 2 --fine_share 0.25
row ruler1k_snapkv_b360_int4 snapkv --budget 360 --then_bits 4
row ruler1k_snapkv_b773_int2_fine50 snapkv --budget 773 --then_bits 2 --fine_share 0.5
common=("${base[@]}" --ruler_lengths 2048)
row ruler2k_snapkv_b1127_int2_fine50 snapkv --budget 1127 --then_bits 2 --fine_share 0.5
row ruler2k_snapkv_b1474_int2 snapkv --budget 1474 --then_bits 2
row ruler2k_snapkv_b955_int4 snapkv --budget 955 --then_bits 4
