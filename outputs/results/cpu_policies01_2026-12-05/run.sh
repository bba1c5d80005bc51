#!/usr/bin/env bash
# Issue 24's goal "every method ahead of kvpress's best press at the same bytes", at 0.1x of full's KV bytes, where
# kvpress's best real press (Knorm) scored 10.0 at 0.127x (outputs/results/cpu_peers_2026-12-04/): every eviction
# policy keeping its tokens in int4 at budget 360 (0.100x at 1k, as snapkv's row in
# outputs/results/cpu_mixed_2026-12-04/run.sh: 86.7), head-uniform and, for snapkv, head-adaptive. RULER
# niah_single_1, niah_single_2, niah_multikey_1 at 1024 tokens, 10 samples each, float32 SmolLM2-135M-Instruct on
# the CPU, greedy, sinks/window 16/32, --rotate auto. Resumable: a row whose JSON exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_policies01_2026-12-05
source outputs/results/cpu_rotation_2026-12-04/row.sh
common=(--max_tokens 0 --rouge_prompts 0 --retrieval_lengths "" --max_position 0 --ruler_samples 10
        --ruler niah_single_1,niah_single_2,niah_multikey_1 --ruler_lengths 1024 --sink_size 16 --window_size 32)
row ruler1k_h2o_b360_int4 h2o --budget 360 --then_bits 4
row ruler1k_tova_b360_int4 tova --budget 360 --then_bits 4
row ruler1k_expected_attention_b360_int4 expected_attention --budget 360 --then_bits 4
row ruler1k_snapkv_adaptive_b360_int4 snapkv --budget 360 --then_bits 4 --head_budget adaptive --head_floor 0.5
# --kernel_size 15 (SnapKV's pooling of the prompt's scores, open to every policy since 2026-12-05): does keeping a
# scored token's neighbours, every digit of a needle, lift the policies that score one token at a time?
row ruler1k_tova_b360_int4_k15 tova --budget 360 --then_bits 4 --kernel_size 15
row ruler1k_expected_attention_b360_int4_k15 expected_attention --budget 360 --then_bits 4 --kernel_size 15
row ruler1k_h2o_b360_int4_k15 h2o --budget 360 --then_bits 4 --kernel_size 15
