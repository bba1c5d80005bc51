#!/usr/bin/env bash
# Issue 24: streamed perplexity of every eviction policy at 0.2x and 0.1x of full's bytes. The first 1024 tokens of
# the evaluation text one token at a time (each token a one-token prefill of the eviction cache: the policy chooses
# again what it keeps from its scores, the token's own attention among them), float32 SmolLM2-135M-Instruct on the
# CPU, sinks/window 16/32, --rotate auto, the default pooling (--kernel_size 15).
# Budgets (memory.predicted_kv_bytes at 1024 tokens): 200 in the model dtype = 0.199x; 360 with int4 kept tokens =
# 0.100x; 420 with int2 kept tokens, the best-scored half int4 = 0.100x. Full's 20.384 on the same tokens:
# outputs/results/cpu_rotation_2026-12-04/ppl_full.json; h2o at 0.100x: outputs/results/cpu_mixed_2026-12-04/.
# Resumable: a row whose JSON exists is skipped. 2026-12-05: tova's row only (4076 s under contention; each
# token is a one-token prefill of the eviction cache); the others are left for a quieter machine.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_ppl_policies_2026-12-05
common=(--sink_size 16 --window_size 32 --max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "")
source outputs/results/cpu_rotation_2026-12-04/row.sh
for policy in tova snapkv expected_attention; do
  row "ppl_${policy}_b360_int4" "$policy" --budget 360 --then_bits 4
done
row ppl_snapkv_adaptive_b360_int4 snapkv --budget 360 --then_bits 4 --head_budget adaptive
row ppl_tova_adaptive_b360_int4 tova --budget 360 --then_bits 4 --head_budget adaptive
row ppl_tova_b420_int2_fine50 tova --budget 420 --then_bits 2 --fine_share 0.5
for policy in tova snapkv h2o expected_attention; do
  row "ppl_${policy}_b200" "$policy" --budget 200
done
