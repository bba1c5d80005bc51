#!/usr/bin/env bash
# Issue 24 at 4k: kvpress's presses that evict for real at exactly 0.1x of full's bytes (compression ratio 0.9), on
# the RULER samples of outputs/results/cpu_ruler4k_2026-12-04/ (niah_single_1 / niah_single_2 / niah_multikey_1 at
# 4096 tokens, 10 samples each, seed 1234 as scripts/evaluate.py's), with our full and transformers' full as
# references: Knorm (kvpress's best real press at 1k), SnapKV and TOVA (tied with Knorm at 2k,
# outputs/results/cpu_peers2k_2026-12-05/). Run in .venv-peers (scripts/setup.sh --peers), alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/../../.."
.venv-peers/bin/python -m scripts.compare_peers --context 4096 --rouge_prompts 1 --ppl_tokens 0 \
  --ruler_tasks niah_single_1,niah_single_2,niah_multikey_1 --ruler_samples 10 --seed 1234 --press_bytes 0.1 \
  --only "KnormPress (bytes = 0.1x,SnapKVPress (bytes = 0.1x,TOVAPress (bytes = 0.1x" \
  --out outputs/results/cpu_peers4k_2026-12-06
