#!/bin/bash
# Issue 24's goal at 0.05x of full's bytes: snapkv keeping its tokens in int2 (--rotate auto: hadamard) at budget 269
# (half of the 0.1x row's 538), RULER niah x3 at 1k, 10 samples each. Resumable: a row whose JSON exists is skipped.
cd "$(dirname "$0")/../../.."
OUT=outputs/results/cpu_goals_2026-12-04
json=$OUT/ruler1k_snapkv_b269_int2_auto.json
[ -f "$json" ] || .venv/bin/python -m scripts.evaluate snapkv --sink_size 16 --window_size 32 --budget 269 --then_bits 2 \
    --max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 \
    --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024 --ruler_samples 10 --json "$json"
