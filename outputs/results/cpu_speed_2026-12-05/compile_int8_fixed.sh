#!/usr/bin/env bash
# --compile with and without --quantize int8 after weight_quant.CpuInt8Linear (the int8 matmul as one opaque op in
# the compiled graph), in turns, twice; then eager --quantize int8 against eager float32 once, for the same prompt.
# Run alone on the machine (a background RULER run was paused with SIGSTOP for its duration).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=outputs/results/cpu_speed_2026-12-05
for round in 1 2; do
  for flags in "--compile" "--compile --quantize int8"; do
    echo "== round $round, $flags"
    .venv/bin/python generate.py --prompt @$out/prompt_1k.txt --max_new_tokens 64 --num_samples 3 $flags full \
      | grep -a "^prefill\|^compile\|^weights\|^warning"
  done
done 2>&1 | tee $out/compile_int8_fixed.txt
