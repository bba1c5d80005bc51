#!/usr/bin/env bash
# Issue 24 item 6 at 4k: kvpress's two best evicting presses at 0.2x of full's bytes (TOVAPress and SnapKVPress, the
# best two at 1k and 2k: outputs/results/cpu_peers02_2026-12-06/; compression ratio 0.8, a press keeps a fifth of
# the prompt's tokens in float32), on the RULER samples of the goals' tables (niah_single_1 / niah_single_2 /
# niah_multikey_1 at 4096 tokens, 10 samples each, seed 1234 as scripts/evaluate.py's), with our full and
# transformers' full as references. Ours at 0.2x on these samples: outputs/results/cpu_item6_4k_2026-12-06/ (budget
# 805). Run in .venv-peers (scripts/setup.sh --peers), THREADS=1 beside one evaluate.py process.
# Measured 2026-12-06 (47 min, THREADS=1 beside one evaluate.py process; peers.md): both presses keep 843 of the
# prompt's 4095 tokens, 0.206x of full's bytes measured: TOVAPress 40.0 (80 / 20 / 20), SnapKVPress 36.7 (90 / 20 /
# 0); our full and transformers' full 80.0 (100 / 90 / 50).
set -euo pipefail
export TQDM_DISABLE=1  # progress bars (weights loading) would fill the log
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_peers02_4k_2026-12-06
.venv-peers/bin/python -m scripts.compare_peers --context 4096 --rouge_prompts 1 --ppl_tokens 0 \
  --ruler_tasks niah_single_1,niah_single_2,niah_multikey_1 --ruler_samples 10 --seed 1234 --press_bytes 0.2 \
  --threads "${THREADS:-2}" --only "SnapKVPress (bytes = 0.2x,TOVAPress (bytes = 0.2x" --out "$out" 2>&1 \
  | tr '\r' '\n' | grep --line-buffered -Ev "it/s\]|it/s, |^W[0-9]{4} |^ *$" | tee -a "$out/log.txt"
