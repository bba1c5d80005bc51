#!/usr/bin/env bash
# run.sh's comparison at 2k: snapkv at 0.100x of full's KV bytes at 2048 tokens (the ring alone is 0.023x),
# int2 for every kept token (budget 1474), the best-scored half at 4 bits (1127), int4 (955); RULER niah_single_1,
# niah_single_2, niah_multikey_1 at 2048 tokens, 10 samples each (full: outputs/results/cpu_goals_2026-12-04/
# ruler2k_full.json). Existing rows are skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_mixed_2026-12-04
common=(--sink_size 16 --window_size 32 --max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
        --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 2048 --ruler_samples 10)
source outputs/results/cpu_rotation_2026-12-04/row.sh
row ruler2k_snapkv_b1127_int2_fine50 snapkv --budget 1127 --then_bits 2 --fine_share 0.5
row ruler2k_snapkv_b1474_int2 snapkv --budget 1474 --then_bits 2
row ruler2k_snapkv_b955_int4 snapkv --budget 955 --then_bits 4
