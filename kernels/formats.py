"""The quantized storage formats, defined once: every file that stores, reads, counts or lists a format reads this
table (kv_cache/stores.py, kernels/quantize.py, the kernels' format switch through the shapes, the scripts' lists).
It lives beside the kernels because they and their references are its first readers and must not import the cache
package.

A format is the payload's element type and packing, and how its scales are laid out:
  payload      `payload_dtype`, `per_byte` codes a byte (4-bit: 2, 2-bit: 4; element i of a row sits in byte
               i // per_byte at bits (i % per_byte) * bits, the low end first).
  scales       float16; symmetric formats (int8, fp8) have one scale per token and head, x = q * scale;
               asymmetric ones (KIVI int4 / int2) have scale and zero-point per group, x = q * scale + zero, with
               values grouped by group_size channels per token and keys by default per channel over group_size
               tokens (KIVI's layout).
Adding a format is a row here, its quantize/dequantize pair in kernels/quantize.py and its code path in the
kernels (whose format switch reads the buffers' dtypes and shapes).
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    name: str                   # the --bits value
    bits: int                   # bits per stored code
    payload_dtype: torch.dtype
    asymmetric: bool            # scale and zero-point (KIVI) rather than a scale alone
    default_k_granularity: str  # "channel" (KIVI keys) or "token"

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def channel_group(self, head_dim: int, group_size: int) -> int:
        """Channels sharing one scale in a per-token layout: the whole head for the symmetric formats, group_size
        channels for the asymmetric ones."""
        return group_size if self.asymmetric else head_dim

    @property
    def label(self) -> str:
        return self.name if self.name == "fp8" else f"int{self.bits}"


# In the order the scripts list them (benchmark rows, evaluation matrix entries).
FORMATS = {f.name: f for f in (
    Format("8", 8, torch.int8, asymmetric=False, default_k_granularity="token"),
    Format("4", 4, torch.uint8, asymmetric=True, default_k_granularity="channel"),
    Format("2", 2, torch.uint8, asymmetric=True, default_k_granularity="channel"),
    Format("fp8", 8, torch.float8_e4m3fn, asymmetric=False, default_k_granularity="token"),
)}


def get_format(bits) -> Format:
    """The format of a --bits value (8, "8", "fp8", 4, "4", ...), or a one-line ValueError."""
    if isinstance(bits, Format):
        return bits
    fmt = FORMATS.get(str(bits))
    if fmt is None:
        raise ValueError(f"--bits {bits} is not supported: use {', '.join(FORMATS)}")
    return fmt


def older_format(payload: torch.Tensor, scale: torch.Tensor, D: int) -> tuple[int, int, int]:
    """(values per byte, tokens per scale row F, channels per scale column G) from the older store's shapes."""
    per_byte = D // payload.shape[-1]
    if per_byte not in (1, 2, 4) or payload.shape[-1] * per_byte != D:
        raise ValueError(f"older payload last dim {payload.shape[-1]} does not pack head_dim {D} at 8, 4 or 2 bits")
    F = payload.shape[2] // scale.shape[2]
    G = D // scale.shape[3]
    if F * scale.shape[2] != payload.shape[2] or G * scale.shape[3] != D:
        raise ValueError(f"older scale shape {tuple(scale.shape)} does not tile payload {tuple(payload.shape)}")
    return per_byte, F, G
