#!/usr/bin/env bash
# Issue 25's last measurements, each alone on the machine, in this order (2 cores, torch 2.13.0+cpu):
# 1. compiled decode at 4k and 8k with the per-channel flush as a branch (torch.cond), full / int8 / int4 in turns;
# 2. ours against transformers' QuantizedCache (quanto) at 1k / 4k / 8k on the final code (no weight-only rows);
# 3. --compile with and without --quantize int8 weights, generate.py on a ~1k-token prompt, three samples (the first,
#    warm-up, left out of the figure).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_speed_2026-12-05
.venv/bin/python -m scripts.bench_decode --device cpu --shapes smollm2-135m --contexts 4k,8k --batches 1 \
  --strategies full,quantize_kv-int8,quantize_kv-int4 --steps 16 --repeats 7 --compile --interleave \
  --out $out/compiled_cond_long
.venv-peers/bin/python -m scripts.cpu_peers_speed --contexts 1k,4k,8k --steps 16 --repeats 2 \
  --only ours,transformers --no-weight_rows --out $out/quanto_final
.venv/bin/python -c "from scripts.data import corpus; print(corpus.stream_text()[:4500])" > $out/prompt_1k.txt
for round in 1 2; do
  for weights in "" "--quantize int8"; do
    echo "== round $round, --compile $weights"
    .venv/bin/python generate.py --prompt @$out/prompt_1k.txt --max_new_tokens 64 --num_samples 3 --compile \
      $weights full
  done
done 2>&1 | tee $out/compile_int8_weights.txt
