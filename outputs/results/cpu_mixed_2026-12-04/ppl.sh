#!/usr/bin/env bash
# Streamed perplexity at 0.1x of full's bytes (at 1k tokens), h2o 16/32 (--rotate auto): every kept token int2
# (budget 538), the best-scored half at 4 bits (420), int4 (360); the first 1024 tokens of the evaluation text one
# token at a time. Full's 20.384: outputs/results/cpu_rotation_2026-12-04/ppl_full.json. Existing rows are skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_mixed_2026-12-04
common=(--sink_size 16 --window_size 32 --max_tokens 1024 --rouge_prompts 0 --retrieval_lengths "")
source outputs/results/cpu_rotation_2026-12-04/row.sh
row ppl_h2o_b420_int2_fine50 h2o --budget 420 --then_bits 2 --fine_share 0.5
row ppl_h2o_b538_int2 h2o --budget 538 --then_bits 2
row ppl_h2o_b360_int4 h2o --budget 360 --then_bits 4
