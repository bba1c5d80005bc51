# Each sample's answer on a RULER task at a length, for one configuration (the score per sample that
# scripts/evaluate.py sums); one model load; run from the repo root:
#   .venv/bin/python outputs/results/cpu_uuid_kept_2026-12-06/answers.py niah_single_3 1024 "full" [1,2,3] [--keep_needle]
# (the optional samples: those to run, all 10 by default). --keep_needle, an oracle, not a method (it knows where
# the answer is): the eviction policy's pooled prompt scores get a bonus on the needle's tokens (the two before it,
# its characters, the one after), so every head of every layer keeps them all and the rest of the budget is chosen
# as the policy chooses: what a policy that finds the span would get at these bytes. For snapkv, which never revises
# the prompt's choice (tova's decode scores would replace the bonus after one step); needs --kernel_size > 1. It decodes 48 tokens, not the
# task's 128 (the answer and what is around it fit; a run that talks on after the answer costs no more time).
import sys
sys.path.insert(0, ".")
import kv_cache.evict as evict
from engine import generate_batch
from scripts import evaluate as ev
from scripts.data import ruler

keep_needle = "--keep_needle" in sys.argv
argv = [a for a in sys.argv if a != "--keep_needle"]
task, length, config = argv[1], int(argv[2]), argv[3].split()
base = ["--max_tokens", "0", "--rouge_prompts", "0", "--retrieval_lengths", "", "--max_position", "0",
        "--ruler_samples", "10", "--ruler_lengths", str(length), "--ruler", task]
args, _ = ev.parse(["full"] + base)
model, tok, _ = ev.load(args)
prompts = ev.ruler_prompts(tok, args)
if len(argv) > 4:
    prompts = [p for p in prompts if p["index"] in {int(i) for i in argv[4].split(",")}]
extra = [] if config[0] == "full" else ["--sink_size", "16", "--window_size", "32"]
a, opts = ev.parse([config[0]] + base + extra + config[1:])
pooled, needle = evict.pooled_over_positions, [0, 0]


def pooled_with_needle(attention, pos, k, forward=False):
    bonus = ((pos >= needle[0]) & (pos < needle[1])).to(attention.dtype) * 1e4  # above any summed attention
    return pooled(attention, pos, k, forward) + bonus


if keep_needle:
    evict.pooled_over_positions = pooled_with_needle
for p in prompts:
    ids, answer = p["ids"], p["outputs"][0]
    if keep_needle:  # the needle's tokens: the shortest run whose text is the answer (as kept.py finds it)
        pieces = [tok.decode([t]) for t in ids]
        start, end = next((i, j) for i in range(len(ids)) for j in range(i + 1, min(len(ids), i + len(answer)) + 1)
                          if "".join(pieces[i:j]).strip() == answer)
        needle[:] = [start - 2, end + 1]
    ev.install_cache(model, config[0], opts, ev.ruler_tokens(prompts, length))
    steps = min(48, ruler.tokens_to_generate(task)) if keep_needle else ruler.tokens_to_generate(task)
    out = generate_batch(model, [ids], steps, eos_ids=tok.eos_ids)
    said = tok.decode(out["tokens"][0].tolist())
    print(f"sample {p['index']}: {'ok ' if all(o in said for o in p['outputs']) else 'MISS'} "
          f"want {p['outputs']} said {said.strip()[:80]!r}", flush=True)
