# Diagnosis, 2026-12-06: which tokens of the needle each layer's KV heads hold, after the prompt and after each
# decode step, on a RULER task at a length (cpu_goals005_4k_2026-12-06/kept.py with the task and length as
# arguments), for one configuration; one model load; run from the repo root:
#   .venv/bin/python outputs/results/cpu_uuid_kept_2026-12-06/kept.py niah_single_3 1024 0,1 "tova --budget 360 --then_bits 4"
# A line after the prompt (and after any decode step that changed what is held): the answer so far, then per layer
# (0 first, "|" between layers) the three KV heads' needle as held (a digit held, '_' not), the two tokens before
# it (": " as tokenized) and the "." after it included ("~" a blank token).
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # needle.py, also when run through runpy
import needle  # noqa: E402
from engine import generate_batch  # noqa: E402
from scripts import evaluate as ev  # noqa: E402
from scripts.data import ruler  # noqa: E402

task, length = sys.argv[1], int(sys.argv[2])
base, model, tok, prompts = needle.load(task, length, sys.argv[3])
config = sys.argv[4].split()
opts = needle.options(base, config)
for p in prompts:
    ids, answer = p["ids"], p["outputs"][0]
    pieces = [tok.decode([t]) for t in ids]
    start, end = needle.span(pieces, answer)
    span = list(range(start - 2, end + 1))  # the two tokens before it, its tokens, the one after
    print(f"sample {p['index']} answer {answer} at positions {start}..{end - 1}: "
          f"{''.join(pieces[span[0]:span[-1] + 1])!r}", flush=True)
    ev.install_cache(model, config[0], opts, ev.ruler_tokens(prompts, length))
    said, last = [], [None]

    def snapshot(out):
        said.extend(t for _, t in out.tokens)
        if out.finished:
            return
        layers = []
        for cache in model.caches():
            heads = cache.older_tokens(0)
            ring = set(cache.ring.pos[0].tolist())
            layers.append(" ".join("".join((pieces[q].strip() or "~")[:1] if (q in set(h) or q in ring) else "_" for q in span)
                                   for h in heads))
        if layers != last[0]:  # printed after the prompt, then only when a decode step changed what is held
            print(f"  after {tok.decode(said)!r}: " + " | ".join(layers), flush=True)
        last[0] = layers

    generate_batch(model, [ids], ruler.tokens_to_generate(task), eos_ids=tok.eos_ids, on_step=snapshot)
    print(f"  answered {tok.decode(said)!r}", flush=True)
