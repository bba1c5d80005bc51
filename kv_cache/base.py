"""The cache interface every strategy implements, and the plain attention they share."""
import argparse
import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

STRATEGIES: dict[str, type["KVCache"]] = {}


def register(cls):
    STRATEGIES[cls.name] = cls
    return cls


class KVCache(nn.Module):
    """Storage for one layer's keys and values, and the attention over them.

    Storage is allocated once in __init__ (static shapes, written in place). forward() receives the new tokens'
    q (B, n_head, T, head_dim) and k, v (B, n_kv_head, T, head_dim) *before* RoPE, their positions input_pos (T,)
    (consecutive, continuing what the cache holds) and the model's RoPE tables; it stores k, v and returns the
    attention output (B, n_head, T, head_dim) of the new tokens over everything the cache keeps.
    """

    name = ""
    help = ""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser):
        """The strategy's command-line options (a subcommand of generate.py and scripts/evaluate.py)."""

    @classmethod
    def check_options(cls, options: dict, max_seq_length: int, head_dim: int):
        """Raise ValueError with one line naming the fix when the options cannot work."""

    @classmethod
    def capacity(cls, options: dict, max_seq_length: int):
        """How many tokens one sequence may hold in all; None when the cache can stream without end."""
        return max_seq_length

    @classmethod
    def bytes_per_token(cls, options: dict, n_kv_head: int, head_dim: int, dtype) -> float:
        """Bytes one more stored token costs in one layer and one sequence (keys + values, metadata amortized);
        for quantize_kv, a token of the quantized store."""
        return 2 * n_kv_head * head_dim * dtype.itemsize

    def __init__(self, batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int, dtype, device, **options):
        super().__init__()
        self.batch_size, self.max_seq_length = batch_size, max_seq_length
        self.n_kv_head, self.head_dim, self.dtype = n_kv_head, head_dim, dtype

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        raise NotImplementedError

    def use_attn_impl(self, options: dict, device):
        """Resolve --attn_impl for this device (self.attn_impl); the fused decode kernel is imported only when asked
        for, so the torch path never needs triton."""
        self.attn_impl = attn_impl_for(options, device)
        if self.attn_impl == "triton":
            from kernels.decode_attention import decode_attention
            self.decode_attention = decode_attention

    def nbytes(self) -> int:
        """Bytes really allocated for this layer's cache: every buffer it holds (scales and zero-points too)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def reset(self):
        """Forget every stored token, so the cache can take a new sequence from position 0."""
        for b in self.buffers():
            b.zero_()


ATTN_IMPLS = ("triton", "torch")


def add_attn_impl_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--attn_impl", choices=ATTN_IMPLS, default=None,
                        help="decode step: triton = fused attention over the stored format (default on CUDA), "
                             "torch = PyTorch (default elsewhere); prefill always uses PyTorch")


def attn_impl_for(options: dict, device=None):
    """The decode implementation asked for, or the device's default (triton on CUDA when installed, else torch); a
    one-line ValueError when it cannot run there. device None: check the name only."""
    impl = options.get("attn_impl")
    if impl is not None and impl not in ATTN_IMPLS:
        raise ValueError(f"--attn_impl {impl!r} is not available: use one of {', '.join(ATTN_IMPLS)}")
    if device is None:
        return impl
    has_triton = importlib.util.find_spec("triton") is not None
    on_cuda = torch.device(device).type == "cuda"
    impl = impl or ("triton" if on_cuda and has_triton else "torch")
    if impl == "triton" and not has_triton:
        raise ValueError("--attn_impl triton needs the triton package (pip install triton): or use --attn_impl torch")
    if impl == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--attn_impl triton needs a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU "
                         "interpreter): use --attn_impl torch")
    return impl


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention of q (B, n_head, T, D) over k, v (B, n_kv_head, S, D); mask (T, S) or (B, 1, T, S), True = keep.
    Query heads are grouped onto KV heads (GQA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
