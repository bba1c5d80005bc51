# Each sample's answer on a RULER task at a length, for one configuration (the score per sample that
# scripts/evaluate.py sums); one model load; run from the repo root:
#   .venv/bin/python outputs/results/cpu_uuid_kept_2026-12-06/answers.py niah_single_3 1024 "full" [1,2,3]
# (the optional last argument: the samples to run, all 10 by default)
import sys
sys.path.insert(0, ".")
from engine import generate_batch
from scripts import evaluate as ev
from scripts.data import ruler

task, length, config = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
base = ["--max_tokens", "0", "--rouge_prompts", "0", "--retrieval_lengths", "", "--max_position", "0",
        "--ruler_samples", "10", "--ruler_lengths", str(length), "--ruler", task]
args, _ = ev.parse(["full"] + base)
model, tok, _ = ev.load(args)
prompts = ev.ruler_prompts(tok, args)
if len(sys.argv) > 4:
    prompts = [p for p in prompts if p["index"] in {int(i) for i in sys.argv[4].split(",")}]
extra = [] if config[0] == "full" else ["--sink_size", "16", "--window_size", "32"]
a, opts = ev.parse([config[0]] + base + extra + config[1:])
for p in prompts:
    ev.install_cache(model, config[0], opts, ev.ruler_tokens(prompts, length))
    out = generate_batch(model, [p["ids"]], ruler.tokens_to_generate(task), eos_ids=tok.eos_ids)
    said = tok.decode(out["tokens"][0].tolist())
    print(f"sample {p['index']}: {'ok ' if all(o in said for o in p['outputs']) else 'MISS'} "
          f"want {p['outputs']} said {said.strip()[:80]!r}", flush=True)
