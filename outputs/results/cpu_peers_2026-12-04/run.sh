#!/usr/bin/env bash
# Issue 24: kvpress's presses at exactly 0.1x of full's bytes (compression ratio 0.9: an evicting press keeps that
# share of the tokens), on the RULER samples of the goals' table (niah_single_1 / niah_single_2 / niah_multikey_1 at
# 1024 tokens, 10 samples each, seed 1234 as scripts/evaluate.py's), with our full and transformers' full as
# references. Run in .venv-peers (scripts/setup.sh --peers).
set -euo pipefail
cd "$(dirname "$0")/../../.."
.venv-peers/bin/python -m scripts.compare_peers --context 1024 --rouge_prompts 1 --ppl_tokens 0 \
  --ruler_tasks niah_single_1,niah_single_2,niah_multikey_1 --ruler_samples 10 --seed 1234 --press_bytes 0.1 \
  --only "bytes = 0.1x" --out outputs/results/cpu_peers_2026-12-04
