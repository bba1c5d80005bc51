#!/usr/bin/env bash
# snapkv keeping 538 tokens per head in int2 (4.50 MiB at 1k, 0.100x of full's bytes), with and without --rotate:
# RULER niah_single_1, niah_single_2, niah_multikey_1 at 1024 tokens, 10 samples each. Existing rows are skipped.
set -euo pipefail
out=outputs/results/cpu_rotation_2026-12-04
common=(--sink_size 16 --window_size 32 --budget 538 --then_bits 2 --max_tokens 0 --rouge_prompts 0
        --retrieval_lengths "" --max_position 0 --ruler niah_single_1,niah_single_2,niah_multikey_1
        --ruler_lengths 1024 --ruler_samples 10)
source "$out/row.sh"
row ruler1k_snapkv_b538_int2_hadamard snapkv --rotate hadamard
row ruler1k_snapkv_b538_int2 snapkv --rotate none
