#!/usr/bin/env bash
# Mixed precision by score (--fine_share) against one precision for every kept token, at the same bytes: snapkv at
# 0.100x of full's KV bytes at 1k (float32 SmolLM2, sinks/window 16/32 in float32, --rotate auto: hadamard), RULER
# niah_single_1, niah_single_2, niah_multikey_1 at 1024 tokens, 10 samples each. The int2 row at budget 538 (0.100x)
# is outputs/results/cpu_rotation_2026-12-04/ruler1k_snapkv_b538_int2_hadamard.json. Existing rows are skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_mixed_2026-12-04
common=(--sink_size 16 --window_size 32 --max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
        --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024 --ruler_samples 10)
source outputs/results/cpu_rotation_2026-12-04/row.sh
row ruler1k_snapkv_b420_int2_fine50 snapkv --budget 420 --then_bits 2 --fine_share 0.5
row ruler1k_snapkv_b465_int2_fine25 snapkv --budget 465 --then_bits 2 --fine_share 0.25
row ruler1k_snapkv_b360_int4 snapkv --budget 360 --then_bits 4
