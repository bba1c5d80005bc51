#!/usr/bin/env bash
# --rotate_parts (kv_cache/rotation.py): hadamard on the keys only against keys and values (the rows of
# outputs/results/cpu_rotation_2026-12-04/, cpu_goals_2026-12-04/ and cpu_mixed_2026-12-04/, measured with both
# rotated), float32 SmolLM2-135M-Instruct on the CPU, sinks/window 16/32, groups of 32. Streamed perplexity: the first
# 1024 tokens of the evaluation text one at a time; RULER niah_single_1 / niah_single_2 / niah_multikey_1, 10 samples
# each. Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_rotate_parts_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
ruler=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0
       --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_samples 10)
common=(--max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "" --rotate hadamard --rotate_parts keys)
row ppl_int2_keys quantize_kv --bits 2 --attn_impl cpu
common=("${ruler[@]}" --ruler_lengths 1024 --sink_size 16 --window_size 32 --rotate hadamard --rotate_parts keys)
row ruler1k_int2_keys quantize_kv --bits 2
row ruler1k_snapkv_b420_int2_fine50_keys snapkv --budget 420 --then_bits 2 --fine_share 0.5
row ruler1k_snapkv_b360_int4_keys snapkv --budget 360 --then_bits 4
common=("${ruler[@]}" --ruler_lengths 2048 --sink_size 16 --window_size 32 --rotate hadamard --rotate_parts keys)
row ruler2k_int2_keys quantize_kv --bits 2
row ruler2k_snapkv_b1127_int2_fine50_keys snapkv --budget 1127 --then_bits 2 --fine_share 0.5
common=(--max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "" --rotate hadamard --rotate_parts keys)
row ppl_h2o_b420_int2_fine50_keys h2o --sink_size 16 --window_size 32 --budget 420 --then_bits 2 --fine_share 0.5
row ppl_h2o_b538_int2_keys h2o --sink_size 16 --window_size 32 --budget 538 --then_bits 2
