#!/usr/bin/env bash
# Issue 24 at 4k: RULER niah_single_1, niah_single_2, niah_multikey_1, 10 samples each, at 4096 tokens (SmolLM2's
# context is 8k), float32 SmolLM2-135M-Instruct, greedy: full, then snapkv at 0.100x of full's KV bytes (budgets from
# memory.predicted_kv_bytes at 4096 tokens: int2 every kept token 3346, int4 every kept token 2146, int2 with its
# best-scored half at 4 bits 2544), sinks/window 16/32 in float32, --rotate auto (hadamard). Resumable: a row whose
# JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ruler4k_2026-12-04
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
      --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_samples 10 --ruler_lengths 4096)
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=("${base[@]}")
row ruler4k_full full
common=("${base[@]}" --sink_size 16 --window_size 32)
row ruler4k_snapkv_b2544_int2_fine50 snapkv --budget 2544 --then_bits 2 --fine_share 0.5
row ruler4k_snapkv_b2146_int4 snapkv --budget 2146 --then_bits 4
row ruler4k_snapkv_b3346_int2 snapkv --budget 3346 --then_bits 2
