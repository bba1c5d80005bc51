#!/usr/bin/env bash
# Issue 24 with SnapKV's pooling (--kernel_size 15) every policy's default since 2026-12-05: (a) the 0.05x goal at
# 2k, tova with int4 kept tokens at budget 359 (0.0499x of full's bytes at 2048 tokens, memory.predicted_kv_bytes;
# at 4k it scored 70.0 = 87.5 % of full, outputs/results/cpu_tova_pooled_2026-12-05/); (b) every policy at 0.2x in
# the model dtype (budget 200 at 1k, 0.199x, as outputs/results/cpu_evict_2026-12-02/, where h2o and tova scored 0
# unpooled and kvpress's best press 30). RULER niah_single_1 / niah_single_2 / niah_multikey_1, 10 samples each,
# float32 SmolLM2-135M-Instruct on the CPU, greedy, sinks/window 16/32, --rotate auto; full on the same samples 96.7
# at 1k (cpu_goals_2026-12-04/), 83.3 at 2k (cpu_ruler4k_2026-12-04/). `bash run.sh a` and `bash run.sh b` run
# halves (at most two rows at once on two cores); no argument runs both in turn. Resumable: a row whose JSON exists
# is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_pooled_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
part=${1:-ab}
base=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
      --ruler niah_single_1,niah_single_2,niah_multikey_1 --sink_size 16 --window_size 32)
if [[ $part == *a* ]]; then
  common=("${base[@]}" --ruler_lengths 2048)
  row ruler2k_tova_b359_int4 tova --budget 359 --then_bits 4
  common=("${base[@]}" --ruler_lengths 1024)
  row ruler1k_tova_b200 tova --budget 200
  row ruler1k_h2o_b200 h2o --budget 200
fi
if [[ $part == *b* ]]; then
  common=("${base[@]}" --ruler_lengths 1024)
  row ruler1k_expected_attention_b200 expected_attention --budget 200
  row ruler1k_snapkv_b200 snapkv --budget 200
  common=("${base[@]}" --ruler_lengths 2048)
  row ruler2k_snapkv_b359_int4_obs8 snapkv --budget 359 --then_bits 4 --obs_window 8
fi
