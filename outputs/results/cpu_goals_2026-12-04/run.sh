#!/bin/bash
# Issue 24's goals: RULER niah_single_1, niah_single_2, niah_multikey_1, 10 samples each, sinks/window 16/32, for
# full and quantize_kv int4 / int2 with --rotate auto (hadamard, the default since 2026-12-04) and, at 1k, none.
# Usage: run.sh [LENGTH] (tokens, default 1024; the 2k rows: run.sh 2048). Resumable: a row whose JSON exists is
# skipped.
cd "$(dirname "$0")/../../.."
OUT=outputs/results/cpu_goals_2026-12-04
LENGTH=${1:-1024}
row() {  # name, then the strategy and its options
  local json=$OUT/ruler$((LENGTH / 1024))k_$1.json; shift
  [ -f "$json" ] && return
  .venv/bin/python -m scripts.evaluate "$@" --max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 \
      --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths "$LENGTH" --ruler_samples 10 --json "$json"
}
row full full
row int2_auto quantize_kv --bits 2 --sink_size 16 --window_size 32
[ "$LENGTH" = 1024 ] && row int2_none quantize_kv --bits 2 --sink_size 16 --window_size 32 --rotate none
row int4_auto quantize_kv --bits 4 --sink_size 16 --window_size 32
[ "$LENGTH" = 1024 ] && row int4_none quantize_kv --bits 4 --sink_size 16 --window_size 32 --rotate none
