"""A minimal Llama (Llama-2/3/3.1, SmolLM2) in plain PyTorch, gpt-fast style.

Attention hands (q, k, v) to a cache object from kv_cache/: the cache owns both the stored keys/values and the
attention over them, so eviction and quantized storage never touch this file. q and k reach the cache *before*
rotary embedding; the cache rotates them (StreamingLLM-style caches rotate by position inside the cache).
Weights use the Hugging Face layout (rotate-half RoPE, q/k rows unpermuted) so HF checkpoints load as they are.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    intermediate_size: int
    head_dim: Optional[int] = None  # dim // n_head unless the checkpoint says otherwise
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF config's rope_scaling, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies, with Llama-3.1 "llama3" scaling when the checkpoint asks for it (as HF computes it)."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq.float()
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}: only 'llama3' (Llama-3.1) is implemented")
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between is interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled).float()


def rope_tables(args: ModelArgs, length: int, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (length, head_dim) in float32, for positions 0..length-1."""
    inv_freq = rope_inv_freq(args).to(device)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, head_dim) by cos/sin rows (T, head_dim) already gathered for its positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_kv_head) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache = None

    def forward(self, x: Tensor, input_pos: Tensor, rope_cos: Tensor, rope_sin: Tensor, rows=None) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        y = self.kv_cache(q, k, v, input_pos, rope_cos, rope_sin, rows)  # (B, n_head, T, head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, input_pos: Tensor, rope_cos: Tensor, rope_sin: Tensor, rows=None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos, rope_cos, rope_sin, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied checkpoints (SmolLM2, Llama-3.2) have no output matrix: the embedding serves as both.
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope_cos = self.rope_sin = None

    def setup_caches(self, make_cache, rope_length: int):
        """Give every layer a cache from `make_cache(layer_idx)`; RoPE tables cover positions < rope_length."""
        device = self.tok_embeddings.weight.device
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = make_cache(i)
        self.rope_cos, self.rope_sin = rope_tables(self.args, rope_length, device)

    def caches(self) -> list:
        if self.rope_cos is None:
            raise RuntimeError("the caches are not set up: call setup_caches first")
        return [layer.attention.kv_cache for layer in self.layers]

    def reset_caches(self, rows: Optional[Tensor] = None):
        """Forget what the caches hold for sequences `rows` (every sequence when None)."""
        for cache in self.caches():
            cache.reset(rows)

    def finish_sequences(self, finished: Tensor):
        """finished (B,) bool: those sequences have ended; the caches may skip their attention work until reset."""
        for cache in self.caches():
            cache.finish(finished)

    def forward(self, idx: Tensor, input_pos: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """idx (B, T) token ids at positions input_pos: (T,) shared by the rows, or (B, T) one row per sequence,
        consecutive after what the caches hold. rows (B,): the caches' sequences idx feeds (None: the first B)."""
        if self.rope_cos is None:
            raise RuntimeError("the caches are not set up: call setup_caches first")
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, input_pos, self.rope_cos, self.rope_sin, rows)
        x = self.norm(x)
        return F.linear(x, self.tok_embeddings.weight) if self.output is None else self.output(x)

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state_dict: dict, device="cpu", dtype=torch.float32) -> "Transformer":
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict(state_dict, assign=True, strict=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
