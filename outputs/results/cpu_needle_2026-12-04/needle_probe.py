"""Why h2o / tova lose RULER's needles: which of the needle's tokens each layer's KV heads still hold after the
prompt, against snapkv, with the prompt prefilled in chunks of 512 (the eviction runs of 2026-12-02) or whole.
python needle_probe.py CHECKPOINT RULER_JSON N_SAMPLES [STRATEGIES]  (STRATEGIES: comma-separated, default all)"""
import ast, json, sys
import torch
sys.path.insert(0, ".")
import runner
from tokenizer import load_tokenizer
from scripts.data import ruler

torch.manual_seed(0)
ckpt, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = runner.load_model(ckpt, torch.device("cpu"), torch.float32)
tok = load_tokenizer(ckpt)
samples = json.load(open(path))["samples"][:n]
CONFIGS = [("tova", {}, 512), ("tova", {}, None), ("h2o", {}, 512), ("h2o", {}, None),
           ("snapkv", dict(kernel_size=1), None), ("snapkv", {}, None), ("expected_attention", {}, None)]
if len(sys.argv) > 4:
    CONFIGS = [c for c in CONFIGS if c[0] in sys.argv[4].split(",")]
BASE = dict(sink_size=16, window_size=32, budget=200)

def find(seq, sub):
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)

rows = []
for s in samples:
    ids = ruler.prompt_ids(tok, s["input"])
    answer = s["outputs"][0] if isinstance(s["outputs"], list) else ast.literal_eval(s["outputs"])[0]
    digits = tok.encode(answer)
    start = find(ids, digits)
    needle = set(range(start, start + len(digits)))
    for strategy, extra, chunk in CONFIGS:
        runner.setup_cache(model, strategy, {**BASE, **extra}, 1, len(ids) + 16)
        tokens = torch.tensor([ids])
        logits = runner.prefill(model, tokens, chunk_size=chunk, last_only=True)
        whole = 0; frac = []
        for cache in model.caches():
            ring = set(cache.ring.pos[0].tolist())
            for head in cache.older_tokens(0):
                held = needle & (set(head) | ring)
                frac.append(len(held) / len(needle)); whole += held == needle
        out, pos, nxt = [], len(ids), logits[:, -1].argmax(-1)
        for _ in range(len(digits) + 2):
            out.append(int(nxt))
            logits = model(nxt.view(1, 1), torch.tensor([[pos]]))  # the decode step
            nxt = logits[:, -1].argmax(-1); pos += 1
        text = tok.decode(out)
        rows.append(dict(sample=s["index"], strategy=strategy, extra=extra, chunk=chunk, needle_at=start,
                         prompt=len(ids), mean_kept=sum(frac) / len(frac), heads_whole=whole / len(frac),
                         correct=answer in text, answer=text))
        print(json.dumps(rows[-1]), flush=True)
