#!/usr/bin/env bash
# --decode_kernel_size 15: tova's and h2o's decode-step attention pooled over 15 neighbouring held tokens (as the
# prompt's, --kernel_size 15) before it updates their scores, against ppl.sh's unpooled rows (the same settings
# otherwise: int4 kept tokens at budget 360 = 0.100x, 16/32, the first 1024 tokens of the evaluation text, decoded
# from the first token or after a 512-token prompt). Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ppl_decode_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
base=(--max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "" --stream_step decode --sink_size 16 --window_size 32)
for policy in tova h2o; do
  common=("${base[@]}" --stream_prompt 512)
  row "ppl_p512_${policy}_b360_int4_dk15" "$policy" --budget 360 --then_bits 4 --decode_kernel_size 15
  common=("${base[@]}")
  row "ppl_${policy}_b360_int4_dk15" "$policy" --budget 360 --then_bits 4 --decode_kernel_size 15
done
# --head_budget adaptive (pooled over each head's run across lanes; refused before 2026-12-06, later): tova after
# the 512-token prompt, against ppl.sh's adaptive row without pooling.
common=("${base[@]}" --stream_prompt 512)
row ppl_p512_tova_adaptive_b360_int4_dk15 tova --budget 360 --then_bits 4 --head_budget adaptive --decode_kernel_size 15
