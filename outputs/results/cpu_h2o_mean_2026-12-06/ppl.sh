#!/usr/bin/env bash
# h2o --accumulate mean, streamed perplexity after the 512-token prompt, the settings of run.sh's ppl rows: at
# 0.199x in float32 (budget 200; the sum's row: ../cpu_ppl_decode_2026-12-06/ppl_p512_h2o_b200.json, 19.234), and
# at 0.100x int4 with each decode step's attention pooled over 15 held neighbours (--decode_kernel_size 15; the
# sum's: ../cpu_ppl_decode_2026-12-06/ppl_p512_h2o_b360_int4_dk15.json, 17.962).
# Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_h2o_mean_2026-12-06
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=(--max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "" --stream_step decode --sink_size 16
        --window_size 32 --stream_prompt 512)
row ppl_p512_h2o_mean_b200 h2o --accumulate mean --budget 200
row ppl_p512_h2o_mean_b360_int4_dk15 h2o --accumulate mean --budget 360 --then_bits 4 --decode_kernel_size 15
# At the same 0.100x: int2 kept tokens with the best-scored half int4 (budget 420, --fine_share 0.5; tova's:
# ../cpu_ppl_decode_2026-12-06/ppl_p512_tova_b420_int2_fine50.json, 17.790), and head-adaptive budgets.
row ppl_p512_h2o_mean_b420_int2_fine50 h2o --accumulate mean --budget 420 --then_bits 2 --fine_share 0.5
row ppl_p512_h2o_mean_adaptive_b360_int4 h2o --accumulate mean --budget 360 --then_bits 4 --head_budget adaptive
