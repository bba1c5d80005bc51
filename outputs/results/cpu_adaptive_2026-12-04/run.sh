#!/bin/bash
# RULER niah x3 at 1k, 10 samples: snapkv at budget 200 (0.2x of full's bytes) and 110 (0.11x) with uniform and
# head-adaptive budgets (--head_floor: AdaKV's safeguard). Resumable: a row whose JSON exists is skipped.
cd "$(dirname "$0")/../../.."
OUT=outputs/results/cpu_adaptive_2026-12-04
for row in "snapkv 200 uniform 0.2" "snapkv 200 adaptive 0.2" "snapkv 110 uniform 0.2" "snapkv 110 adaptive 0.2" \
           "snapkv 200 adaptive 0.5"; do
  set -- $row
  json=$OUT/ruler1k_$1_b$2_$3.json
  [ "$4" != 0.2 ] && json=$OUT/ruler1k_$1_b$2_$3_floor$4.json
  [ -f "$json" ] && continue
  .venv/bin/python -m scripts.evaluate "$1" --sink_size 16 --window_size 32 --budget "$2" --head_budget "$3" \
      --head_floor "$4" --max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 \
      --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024 --ruler_samples 10 --json "$json"
done
