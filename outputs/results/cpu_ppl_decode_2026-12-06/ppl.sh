#!/usr/bin/env bash
# Issue 24: streamed perplexity of every eviction policy at 0.2x and 0.1x of full's bytes through the decode step
# (--stream_step decode: generation's own path, the token leaving the window moved into the policy's store) rather
# than one-token prefill chunks (outputs/results/cpu_ppl_policies_2026-12-05/, where a row took over an hour, every
# token a prefill in which the policy chooses again). The first 1024 tokens of the evaluation text, float32
# SmolLM2-135M-Instruct on the CPU, sinks/window 16/32, --rotate auto, the default pooling.
# Part 1, every token decoded from the first (full and quantize_kv int2 as references, tova).
# Part 2, --stream_prompt 512: the first 512 tokens as one prompt, compressed as each policy compresses a prompt
# (SnapKV and Expected Attention choose only there), then the 512 after it decoded one at a time and scored.
# Budgets (memory.predicted_kv_bytes at 1024 tokens): 200 in the model dtype = 0.199x; 360 with int4 kept tokens =
# 0.100x; 420 with int2 kept tokens, the best-scored half int4 = 0.100x. Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ppl_decode_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "" --stream_step decode)
common=("${base[@]}")
row ppl_full full
common=("${base[@]}" --sink_size 16 --window_size 32)
row ppl_int2 quantize_kv --bits 2
row ppl_tova_b360_int4 tova --budget 360 --then_bits 4
common=("${base[@]}" --stream_prompt 512)
row ppl_p512_full full
common=("${base[@]}" --stream_prompt 512 --sink_size 16 --window_size 32)
for policy in snapkv tova h2o expected_attention; do
  row "ppl_p512_${policy}_b360_int4" "$policy" --budget 360 --then_bits 4
done
for policy in snapkv tova h2o expected_attention; do
  row "ppl_p512_${policy}_b200" "$policy" --budget 200
done
row ppl_p512_snapkv_adaptive_b360_int4 snapkv --budget 360 --then_bits 4 --head_budget adaptive
row ppl_p512_tova_b420_int2_fine50 tova --budget 420 --then_bits 2 --fine_share 0.5
row ppl_p512_tova_adaptive_b360_int4 tova --budget 360 --then_bits 4 --head_budget adaptive
# References after the same prompt: sinks + window alone (compress_kv 16/32), quantize_kv int4 and int2 (16/32);
# and h2o decoded from the first token.
row ppl_p512_compress compress_kv
row ppl_p512_int4 quantize_kv --bits 4
row ppl_p512_int2 quantize_kv --bits 2
common=("${base[@]}" --sink_size 16 --window_size 32)
row ppl_h2o_b360_int4 h2o --budget 360 --then_bits 4
