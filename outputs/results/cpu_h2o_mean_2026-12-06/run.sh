#!/usr/bin/env bash
# h2o --accumulate mean (2026-12-06): a token's score is the attention it received divided by the queries that
# attended it (kvpress's ObservedAttentionPress's average), against H2O's sum, which favours the oldest tokens.
# Float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, --rotate auto, --kernel_size 15 (the
# default), 10 samples a RULER task (niah_single_1, niah_single_2, niah_multikey_1). The sum's rows, same settings:
# 1k int4 0.100x (budget 360) ../cpu_policies01_2026-12-05/ruler1k_h2o_b360_int4_k15.json; 1k float32 0.199x
# (budget 200) ../cpu_pooled_2026-12-05/ruler1k_h2o_b200.json; 2k int4 0.100x (955) ../cpu_policies2k_2026-12-06/;
# 4k int4 0.100x (2146) ../cpu_policies4k_2026-12-06/; streamed perplexity ../cpu_ppl_decode_2026-12-06/ (ppl.sh).
# In order of value; resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_h2o_mean_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
ruler=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10 --sink_size 16
       --window_size 32)
ppl=(--max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "" --stream_step decode --sink_size 16 --window_size 32)
common=("${ruler[@]}" --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024)
row ruler1k_h2o_mean_b360_int4 h2o --accumulate mean --budget 360 --then_bits 4
common=("${ppl[@]}" --stream_prompt 512)
row ppl_p512_h2o_mean_b360_int4 h2o --accumulate mean --budget 360 --then_bits 4
common=("${ruler[@]}" --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024)
row ruler1k_h2o_mean_b200 h2o --accumulate mean --budget 200
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${ruler[@]}" --ruler "$task" --ruler_lengths 2048)
  row "ruler2k_h2o_mean_b955_int4_$task" h2o --accumulate mean --budget 955 --then_bits 4
done
for task in niah_single_1 niah_single_2 niah_multikey_1; do
  common=("${ruler[@]}" --ruler "$task" --ruler_lengths 4096)
  row "ruler4k_h2o_mean_b2146_int4_$task" h2o --accumulate mean --budget 2146 --then_bits 4
done
common=("${ppl[@]}")
row ppl_h2o_mean_b360_int4 h2o --accumulate mean --budget 360 --then_bits 4
