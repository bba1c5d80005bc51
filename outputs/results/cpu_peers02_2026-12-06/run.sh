#!/usr/bin/env bash
# Issue 24 item 6: kvpress's evicting presses at 0.2x of full's bytes (compression ratio 0.8: a press keeps a fifth
# of the prompt's tokens in float32), on the RULER samples of the goals' tables (niah_single_1 / niah_single_2
# / niah_multikey_1, 10 samples each, seed 1234 as scripts/evaluate.py's), at 1k and at 2k, with our full and
# transformers' full as references; ours at 0.2x: outputs/results/cpu_pooled_2026-12-05/ (1k, budget 200) and
# cpu_item6_2k_2026-12-06/ (2k, budget 402). Run in .venv-peers (scripts/setup.sh --peers). One folder per length;
# a length whose peers.json exists is skipped. Measured 2026-12-06 with THREADS=1 beside two evaluate.py rows (peers.md
# per length): 1k TOVAPress 33.3, SnapKVPress 20.0, StreamingLLMPress 16.7, KnormPress 13.3, ExpectedAttentionPress
# 0.0 (0.224x); 2k TOVAPress 56.7, SnapKVPress 40.0, StreamingLLMPress 20.0, KnormPress 16.7, ExpectedAttentionPress
# 0.0 (0.212x). The 2k run was stopped once after its first three presses and run again whole; the stopped run's
# lines were taken out of log.txt (its three means, 20.0 / 40.0 / 16.7, were the rerun's).
set -euo pipefail
export TQDM_DISABLE=1  # progress bars (weights loading) would fill the log
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_peers02_2026-12-06
presses="StreamingLLMPress (bytes = 0.2x,SnapKVPress (bytes = 0.2x,KnormPress (bytes = 0.2x"
presses="$presses,ExpectedAttentionPress (bytes = 0.2x,TOVAPress (bytes = 0.2x"
for context in 1024 2048; do
  [ -f "$out/$context/peers.json" ] && { echo "skip $context"; continue; }
  .venv-peers/bin/python -m scripts.compare_peers --context "$context" --rouge_prompts 1 --ppl_tokens 0 \
    --ruler_tasks niah_single_1,niah_single_2,niah_multikey_1 --ruler_samples 10 --seed 1234 --press_bytes 0.2 \
    --threads "${THREADS:-2}" --only "$presses" --out "$out/$context" 2>&1 | tr '\r' '\n' \
    | grep --line-buffered -Ev "it/s\]|it/s, |^W[0-9]{4} |^ *$" | tee -a "$out/log.txt"
done
