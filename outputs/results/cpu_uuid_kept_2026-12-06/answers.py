# Each sample's answer on a RULER task at a length, for one configuration (the score per sample that
# scripts/evaluate.py sums); one model load; run from the repo root:
#   .venv/bin/python outputs/results/cpu_uuid_kept_2026-12-06/answers.py niah_single_3 1024 "full" [1,2,3] [--keep_needle]
#       [--needle_heads 6.0,7.2,...]
# (the optional samples: those to run, all 10 by default). --keep_needle, an oracle, not a method (it knows where
# the answer is): the eviction policy's pooled prompt scores get a bonus on the needle's tokens (the two before it,
# its characters, the one after), so every head of every layer keeps them all and the rest of the budget is chosen
# as the policy chooses: what a policy that finds the span would get at these bytes. For snapkv, which never revises
# the prompt's choice (tova's decode scores would replace the bonus after one step); needs --kernel_size > 1. It
# decodes 48 tokens, not the task's 128 (the answer and what is around it fit; a run that talks on after the answer
# costs no more time). --needle_heads LAYER.HEAD,...: the bonus only in those KV heads (the others keep what snapkv
# chooses): whether a needle held by a few heads (KVzip's copying heads, kvzip_scores.log) is enough.
import sys
import torch
import needle  # first: it puts the repo root on the path
import kv_cache.evict as evict
from engine import generate_batch
from scripts import evaluate as ev
from scripts.data import ruler

keep_needle = "--keep_needle" in sys.argv
argv = [a for a in sys.argv if a != "--keep_needle"]
needle_heads = None
if "--needle_heads" in argv:
    i = argv.index("--needle_heads")
    needle_heads = [tuple(int(x) for x in lh.split(".")) for lh in argv[i + 1].split(",")]
    del argv[i:i + 2]
task, length, config = argv[1], int(argv[2]), argv[3].split()
base, model, tok, prompts = needle.load(task, length, argv[4] if len(argv) > 4 else None)
opts = needle.options(base, config)
pooled, kept, calls = evict.pooled_over_positions, [0, 0], [0]


def pooled_with_needle(attention, pos, k, forward=False):
    bonus = ((pos >= kept[0]) & (pos < kept[1])).to(attention.dtype) * 1e4  # above any summed attention
    if needle_heads is not None:  # one call per layer, in layer order, per prompt (whole_prompt: one chunk)
        layer = calls[0] % model.args.n_layer
        calls[0] += 1
        bonus = bonus * torch.tensor([float((layer, h) in needle_heads) for h in range(bonus.shape[1])])[:, None]
    return pooled(attention, pos, k, forward) + bonus


if keep_needle:
    evict.pooled_over_positions = pooled_with_needle
for p in prompts:
    ids, answer = p["ids"], p["outputs"][0]
    if keep_needle:
        start, end = needle.span([tok.decode([t]) for t in ids], answer)
        kept[:] = [start - 2, end + 1]
    ev.install_cache(model, config[0], opts, ev.ruler_tokens(prompts, length))
    steps = min(48, ruler.tokens_to_generate(task)) if keep_needle else ruler.tokens_to_generate(task)
    out = generate_batch(model, [ids], steps, eos_ids=tok.eos_ids)
    said = tok.decode(out["tokens"][0].tolist())
    print(f"sample {p['index']}: {'ok ' if all(o in said for o in p['outputs']) else 'MISS'} "
          f"want {p['outputs']} said {said.strip()[:80]!r}", flush=True)
