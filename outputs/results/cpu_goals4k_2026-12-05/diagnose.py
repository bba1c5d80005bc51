# Diagnosis, 2026-12-05: RULER niah_single_2 at 4096 tokens, samples 2, 4 and 6 (lost by tova / snapkv at 0.1x with
# int4 kept tokens, answered by full), each configuration on the same prompts, one model load; run from the repo root:
#   .venv/bin/python outputs/results/cpu_goals4k_2026-12-05/diagnose.py 2,4,6 "tova --sink_size 16 --window_size 32 --budget 2146" ...
# Output in diagnose.log (index, the answer as generated, score; seconds for the three).
import sys, time
sys.path.insert(0, ".")
from scripts import evaluate as ev
base = ["--max_tokens", "0", "--rouge_prompts", "0", "--retrieval_lengths", "", "--max_position", "0",
        "--ruler_samples", "10", "--ruler_lengths", "4096", "--ruler", "niah_single_2"]
indices = [int(x) for x in sys.argv[1].split(",")]
configs = [c.split() for c in sys.argv[2:]]
args, _ = ev.parse(["full"] + base)
model, tok, _ = ev.load(args)
prompts = [p for p in ev.ruler_prompts(tok, args) if p["index"] in indices]
for c in configs:
    a, opts = ev.parse([c[0]] + base + c[1:])  # the strategy, the common options, then its own
    t = time.time()
    r = ev.ruler_eval(model, tok, prompts, c[0], opts, a)
    print(" ".join(c), [(s["index"], s["output"].strip()[:10], s["score"]) for s in r["ruler_samples"]], f"{time.time()-t:.0f}s", flush=True)
