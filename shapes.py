"""Model shapes by name, and random weights of any shape: what the benchmarks and tests run when speed or memory is
measured, which do not depend on the weights' values (no checkpoint needed)."""
import torch

from model import ModelArgs, Transformer

SHAPES = {
    # Two layers, GQA 2:1, head_dim 64: every strategy works on it, and a CPU runs it in seconds.
    "tiny": ModelArgs(vocab_size=512, dim=128, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=256, head_dim=64),
    # tiny with GQA 2:1 over 4 heads: splits over 2 ranks (--tp 2) without replicating KV heads
    "tiny-gqa": ModelArgs(vocab_size=512, dim=128, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=256,
                          head_dim=32),
    "smollm2-135m": ModelArgs(vocab_size=49152, dim=576, n_layer=30, n_head=9, n_kv_head=3, intermediate_size=1536,
                              rope_base=100000.0, tie_word_embeddings=True),
    "llama3-8b": ModelArgs(vocab_size=128256, dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336,
                           rope_base=500000.0),
    "llama3-70b": ModelArgs(vocab_size=128256, dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672,
                            rope_base=500000.0),
}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place: norm weights (1-D) with 1, matrices with N(0, 0.02) from `seed`. Any model
    (ours, or a transformers peer of the same shape) gets the same kind of weights."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return module


def random_model(args: ModelArgs, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Transformer:
    """A Transformer of the given shape with random weights in `dtype`, built directly on the device (never a
    float32 copy on the host first), in eval mode without gradients."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    return randomize(model, seed)
