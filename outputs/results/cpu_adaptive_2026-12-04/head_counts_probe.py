# snapkv --head_budget uniform vs adaptive at budget 200 (RULER niah_single_1, 1k, 4 samples): how many tokens each KV head
# keeps beyond sinks and window, and how many of the 90 heads hold the whole needle. Usage (from the repository root):
# .venv/bin/python outputs/results/cpu_adaptive_2026-12-04/head_counts_probe.py outputs/ruler/niah_single_1-1024-seed1234-68a1e142fec08b48.json
import ast, json, sys
import torch
sys.path.insert(0, ".")
import runner
from tokenizer import load_tokenizer
from scripts.data import ruler
model = runner.load_model("checkpoints/smollm2-135m/model.pth", torch.device("cpu"), torch.float32)
tok = load_tokenizer("checkpoints/smollm2-135m/model.pth")
samples = json.load(open(sys.argv[1]))["samples"][:4]
for s in samples:
    ids = ruler.prompt_ids(tok, s["input"])
    answer = s["outputs"][0] if isinstance(s["outputs"], list) else ast.literal_eval(s["outputs"])[0]
    digits = tok.encode(answer)
    start = next(i for i in range(len(ids)) if ids[i:i + len(digits)] == digits)
    needle = set(range(start, start + len(digits)))
    for hb in ("uniform", "adaptive"):
        runner.setup_cache(model, "snapkv", dict(sink_size=16, window_size=32, budget=200, head_budget=hb), 1, len(ids) + 16)
        runner.prefill(model, torch.tensor([ids]), chunk_size=None, last_only=True)
        counts, whole = [], []
        for cache in model.caches():
            heads = cache.older_tokens(0)
            counts.append([len(h) for h in heads]); whole.append([needle <= set(h) for h in heads])
        print(hb, "whole-needle heads", sum(map(sum, whole)), "layers 0-5 counts", counts[:6], "needle holders' counts",
              [c for cs, ws in zip(counts, whole) for c, w in zip(cs, ws) if w][:20], flush=True)
