#!/usr/bin/env bash
# Issue 24 item 6 on RULER's other tasks: kvpress's two best evicting presses (TOVAPress and SnapKVPress, the best
# at 0.1x and 0.2x on the needle tasks: cpu_peers2k_2026-12-05/, cpu_peers02_2026-12-06/) at 0.2x and 0.1x of full's
# bytes (a press keeps that share of the prompt's tokens in float32), on niah_single_3 / vt / fwe at 2048 tokens,
# 10 samples each, seed 1234 as scripts/evaluate.py's (our rows on these samples: cpu_item6_other_2026-12-06/,
# cpu_item6_rest_2026-12-06/), with our full and transformers' full as references. The answer cap is each task's own
# (128 / 30 / 50 tokens, as evaluate.py's; the default cap of 32 would cut a UUID). niah_multikey_2 is left out:
# full scores 0.0 on it at 2k. Run in .venv-peers (scripts/setup.sh --peers), THREADS=1 beside one evaluate.py
# process.
# Measured 2026-12-06/07 (43 min, THREADS=1 beside one evaluate.py process; peers.md): our full and transformers' full
# 50.2 (fwe 46.7 / niah_single_3 90.0 / vt 14.0), evaluate.py's full on these samples; SnapKVPress 5.3 at 0.212x
# (10.0 / 0.0 / 6.0) and 1.1 at 0.113x, TOVAPress 1.1 at 0.212x and 1.3 at 0.113x. --only's "bytes" also matched the
# presses at quantize_kv int4's bytes (0.208x: SnapKVPress 4.2, TOVAPress 1.1), run too.
set -euo pipefail
export TQDM_DISABLE=1  # progress bars (weights loading) would fill the log
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_peers_other_2026-12-06
.venv-peers/bin/python -m scripts.compare_peers --context 2048 --rouge_prompts 1 --ppl_tokens 0 \
  --ruler_tasks niah_single_3,vt,fwe --ruler_samples 10 --ruler_new_tokens 128 --seed 1234 --press_bytes 0.2,0.1 \
  --threads "${THREADS:-2}" --only "SnapKVPress (bytes,TOVAPress (bytes" --out "$out" 2>&1 \
  | tr '\r' '\n' | grep --line-buffered -Ev "it/s\]|it/s, |^W[0-9]{4} |^ *$" | tee -a "$out/log.txt"
