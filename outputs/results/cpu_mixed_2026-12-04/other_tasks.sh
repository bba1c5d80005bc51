#!/usr/bin/env bash
# RULER's other tasks (niah_single_3, niah_multikey_2, vt, fwe) at 1k, 10 samples each: full and snapkv with its
# kept tokens in int2, the best-scored half in int4 (0.100x, as run.sh). Existing rows are skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_mixed_2026-12-04
common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
                 --ruler niah_single_3,niah_multikey_2,vt,fwe --ruler_samples 10 --ruler_lengths 1024)
source outputs/results/cpu_rotation_2026-12-04/row.sh
row ruler1k_other_full full
row ruler1k_other_snapkv_b420_int2_fine50 snapkv --sink_size 16 --window_size 32 --budget 420 --then_bits 2 --fine_share 0.5
