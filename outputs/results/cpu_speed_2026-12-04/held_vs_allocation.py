"""Full cache, eager CPU decode at 1024 tokens held, rows allocated for 1200 or for 8192 tokens (a server's rows are
allocated for its longest request): ms per step of each, interleaved in one process, in the tree given.

    python outputs/results/cpu_speed_2026-12-04/held_vs_allocation.py TREE   # prints one JSON line
"""
import json
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402

from runner import decode_one_token, prefill, setup_cache  # noqa: E402
from shapes import SHAPES, random_model  # noqa: E402

CONTEXT, ALLOCATIONS, STEPS, ROUNDS = 1024, (1200, 8192), 16, 5
torch.manual_seed(0)
model = random_model(SHAPES["smollm2-135m"], torch.device("cpu"), torch.float32)
prompt = torch.randint(0, model.args.vocab_size, (1, CONTEXT))
state = {}
with torch.no_grad():
    for n in ALLOCATIONS:
        setup_cache(model, "full", {}, 1, n)
        token = prefill(model, prompt, last_only=True).argmax(-1)
        state[n] = [[layer.attention.kv_cache for layer in model.layers], token, CONTEXT, []]
    for _ in range(ROUNDS):
        for n in ALLOCATIONS:
            caches, token, pos, times = state[n]
            for layer, cache in zip(model.layers, caches):
                layer.attention.kv_cache = cache
            t0 = time.perf_counter()
            for _ in range(STEPS):
                token = decode_one_token(model, token, torch.full((1, 1), pos))
                pos += 1
            times.append((time.perf_counter() - t0) / STEPS * 1e3)
            state[n][1:3] = [token, pos]
print(json.dumps({"tree": sys.argv[1], **{f"ms_alloc_{n}": round(statistics.median(state[n][3]), 2)
                                           for n in ALLOCATIONS}}))
