# Diagnosis, 2026-12-06: would KVzip's scores (Kim et al., 2025: the model repeats the context, each context token
# scored by the most attention any query of the repetition gives it, per KV head over its query heads) mark a UUID's
# middle, where the question's attention (snapkv's: the prompt's last 32 queries, summed, pooled over 15 positions)
# marks its ends? One full-precision pass over prompt + "Repeat the previous context exactly." + prompt (nothing
# evicted), both scores taken from the same pass; per layer, how many of the needle's tokens each KV head
# would keep among its best M candidates (M = 312: budget 360 less sinks and window 16/32, 0.100x at 1k with int4).
# "shared": snapkv's scores, each head's normalised to sum 1, averaged over every head of every layer: one choice
# for all heads (a layer would need the later layers' scores: a selection after the whole prompt's pass).
# "kvzip per layer" / "kvzip shared": KVzip's scores, each token's most attention from any head of the layer / of
# any layer: one choice for a layer's heads / for all.
# One model load; run from the repo root:
#   .venv/bin/python outputs/results/cpu_uuid_kept_2026-12-06/kvzip_scores.py niah_single_3 1024 0,1,2
import sys
import needle  # first: it puts the repo root on the path
import torch
from engine import generate_batch
from kv_cache.base import attention_probs
from kv_cache.evict import pooled_over_positions
from kv_cache.snapkv import SnapKVCache
from scripts import evaluate as ev

task, length = sys.argv[1], int(sys.argv[2])
SINKS, WINDOW, KEPT = needle.SINKS, needle.WINDOW, 312
base, model, tok, prompts = needle.load(task, length, sys.argv[3])
captured = []  # per layer: (snapkv scores, kvzip scores), each (H, P) over the prompt's P tokens
P = [0]


def prompt_attention(self, q, keys, values, mask, chunk):
    # keys: the older store's and the ring's slots (empty on a first prefill, masked), then the chunk's tokens
    p, group, c = P[0], q.shape[1] // self.n_kv_head, keys.shape[2] - q.shape[2]
    question = attention_probs(q[:, :, p - WINDOW:p], keys[:, :, :c + p], mask[:, :, p - WINDOW:p, :c + p])[..., c:]
    repeat = attention_probs(q[:, :, p:], keys, mask[:, :, p:])[..., c:c + p]
    snap = question.sum(2).unflatten(1, (self.n_kv_head, group)).sum(2)[0]
    kvzip = repeat.amax(2).unflatten(1, (self.n_kv_head, group)).amax(2)[0]
    pos = torch.arange(p)[None].expand(self.n_kv_head, p)
    captured.append((pooled_over_positions(snap[None], pos[None], self.opts.kernel_size)[0], kvzip))  # snapkv's
    return torch.zeros(keys.shape[:3])


SnapKVCache.prompt_attention = prompt_attention
repeat_ids = tok.encode("\n\nRepeat the previous context exactly.\n")
for p in prompts:
    ids, answer = p["ids"], p["outputs"][0]
    pieces = [tok.decode([t]) for t in ids]
    start, end = needle.span(pieces, answer)
    start += not pieces[start].strip()  # a blank token before the UUID is not the UUID's
    P[0], captured[:] = len(ids), []
    full_input = ids + repeat_ids + ids
    opts = needle.options(base, ["snapkv", "--budget", str(len(full_input) - 64)])  # below: it evicts, so it scores
    ev.install_cache(model, "snapkv", opts, len(full_input) + 8)
    generate_batch(model, [full_input], 1, eos_ids=tok.eos_ids)
    candidates = torch.zeros(len(ids), dtype=torch.bool)
    candidates[SINKS:len(ids) - WINDOW] = True
    held = {"snapkv": [], "kvzip": []}  # per layer, each KV head's count of the needle's tokens among its best KEPT
    for snap, kvzip in captured:
        for name, score in (("snapkv", snap), ("kvzip", kvzip)):
            ranked = score.masked_fill(~candidates, float("-inf")).argsort(-1, descending=True)[:, :KEPT]
            held[name].append([len(set(r.tolist()) & set(range(start, end))) for r in ranked])
    print(f"sample {p['index']} answer {answer} at {start}..{end - 1} of {len(ids)}: its {end - start} tokens held "
          f"per KV head, layer 0 first", flush=True)
    shared = sum(snap / snap.sum(-1, keepdim=True) for snap, _ in captured).mean(0)
    top = shared.masked_fill(~candidates, float("-inf")).argsort(descending=True)[:KEPT]
    print(f"  shared: {len(set(top.tolist()) & set(range(start, end)))} tokens held in every head", flush=True)
    # KVzip's scores shared: each token's most attention from any head of a layer (per layer), or of any layer
    for name, score in (("kvzip per layer", torch.stack([kvzip.amax(0) for _, kvzip in captured])),
                        ("kvzip shared", torch.stack([kvzip.amax(0) for _, kvzip in captured]).amax(0, keepdim=True))):
        ranked = score.masked_fill(~candidates, float("-inf")).argsort(-1, descending=True)[:, :KEPT]
        counts = [len(set(r.tolist()) & set(range(start, end))) for r in ranked]
        print(f"  {name}: tokens held in every head of a layer: " + " ".join(map(str, counts)), flush=True)
    for name, layers in held.items():
        whole = sum(n == end - start for layer in layers for n in layer)
        print(f"  {name:6s} heads holding all: {whole:2d} of {sum(map(len, layers))} | "
              + " | ".join("/".join(f"{n:2d}" for n in layer) for layer in layers), flush=True)
