"""Weight-only quantization of the model's linear layers through torchao's `quantize_` (torchao's own tensor
subclasses and kernels; no matmul of ours). Activations, the KV cache and everything else keep the model dtype.

  int8  per output channel, symmetric (torchao Int8WeightOnlyConfig, PerRow): an int8 weight, a float32 scale and
        torchao's int8 zero point (always 0) per row. Any device; eager torchao converts the int8 weight to the
        activation dtype inside each matmul (under torch.compile inductor fuses that into the matmul).
  int4  per group of `group_size` input columns, asymmetric (tinygemm's scheme: a scale and a zero per group), two
        weights a byte, in the packed layout of the device's tinygemm kernel:
          CUDA  Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"): torch's _weight_int4pack_mm, which
                takes bfloat16 only and needs compute capability >= 8.0; torchao pads rows to a multiple of 8 and
                columns to a multiple of 1024 (stored padded). torchao's default int4 format ("plain") needs the
                mslk kernel package, which is not installed here.
          CPU   torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig (Int4OpaqueTensor): torch's
                _weight_int4pack_mm_for_cpu, float32/bfloat16/float16 activations, group sizes 32, 64, 128.
        The two layouts are packed for their device: an int4 model is quantized on the device it runs on, never
        moved or saved (scripts/prepare_checkpoint.py writes int8 checkpoints only).

What is quantized: every nn.Linear (attention wqkv and wo, feed-forward w1, w2, w3, and an untied output matrix).
The token embedding stays in the model dtype, and with it a tied output (SmolLM2, Llama-3.2): one tensor serves the
lookup and the output matmul, and quantizing it would either dequantize the whole table at every lookup (torchao
Int8Tensor's embedding op does) or need a second, quantized copy for the output, more bytes than the one table.
Norm weights are vectors and stay as they are.

linear_bytes() is the one place that says how many bytes a quantized linear takes (generate.py --plan reads it);
tests/test_plan.py holds it to the bytes of real torchao tensors.
"""
import json
import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128  # torchao's Int4WeightOnlyConfig default
# When 128 does not divide a model's widths: the finest group both kernels take. SmolLM2's weights come from a Q4_1
# GGUF, 4-bit in blocks of 32 with a scale and a minimum each, which tinygemm's groups of 32 reproduce exactly
# (perplexity unchanged), where groups of 64 requantize pairs of blocks (+22 to +26 % perplexity; README).
FALLBACK_GROUP_SIZE = 32
INT4_GROUP_SIZES = {"cpu": (32, 64, 128), "cuda": (32, 64, 128, 256)}  # what each tinygemm kernel accepts
TORCHAO_HINT = "pip install torchao==0.18.0 (scripts/setup.sh installs it)"
# Beside a model.pth whose linears hold torchao int8 weights (scripts/prepare_checkpoint.py --quantize): the mode,
# so that loading imports torchao (its tensor classes must be registered before torch.load) and --plan knows it.
# Kept here, below checkpoint.py (which imports this module and re-exports both names): neither module imports the
# other inside a function.
WEIGHT_QUANTIZATION_FILE = "weight_quantization.json"


def weight_quantization(path) -> dict | None:
    """{"mode": "int8", ...} for a model.pth checkpoint of torchao-quantized weights, else None (no weight read)."""
    path = Path(path)
    marker = (path if path.is_dir() else path.parent) / WEIGHT_QUANTIZATION_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except ValueError as e:
        raise ValueError(f"{marker} is not valid JSON ({type(e).__name__}: {' '.join(str(e).split())}) — prepare "
                         "the checkpoint again")


def import_torchao():
    """torchao, imported with its import-time log lines held back: on a CPU build it warns that its CUDA extensions
    (mxfp8, cutlass) do not load, and torch warns about an Enum it registers; neither is used here. Importing it
    also registers its tensor classes for torch.load(weights_only=True), which a quantized checkpoint needs."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.prototype.quantization.int4  # noqa: F401  (registers Int4OpaqueTensor)
    except Exception as e:  # not installed, or a torchao built for another torch fails as it imports
        raise ValueError(f"weight quantization needs torchao 0.18.0 ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}): {TORCHAO_HINT}") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return torchao


def check_mode(mode, device: torch.device, dtype: torch.dtype):
    """What can be checked before any weight loads: a one-line ValueError naming the alternative."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"--quantize {mode!r} is not a weight quantization: use int8 or int4 (or leave it out)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--quantize runs on cpu or cuda (torchao's weight-only kernels), not {device.type}")
    if mode == "int4" and device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"--quantize int4 on CUDA runs torchao's tinygemm kernel, which takes bfloat16 only, "
                             f"not {str(dtype).removeprefix('torch.')}: use --dtype bfloat16 or --quantize int8")
        if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError("--quantize int4 on CUDA needs compute capability 8.0 or newer (tinygemm's tensor-core "
                             "kernel): use --quantize int8 on this GPU")


def checkpoint_mode(mode, checkpoint_path):
    """The weights a run gets: --quantize's mode, or the mode a checkpoint of scripts/prepare_checkpoint.py
    --quantize holds (read from its marker file, before any weight loads); a one-line ValueError when they differ."""
    held = (weight_quantization(checkpoint_path) or {}).get("mode")
    if held and mode and held != mode:
        raise ValueError(f"the checkpoint's weights are already {held}: drop --quantize {mode}, or quantize a float "
                         "checkpoint")
    return mode or held


def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears quantize_weights quantizes, by name: every nn.Linear (the embedding is no linear, see above)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def resolve_group_size(mode, group_size, in_features: list[int], device_type: str) -> int | None:
    """int4's group size: the one given, else DEFAULT_GROUP_SIZE when it divides every linear's input width, else
    FALLBACK_GROUP_SIZE (SmolLM2: 576 = 4.5 x 128). torchao would leave a linear whose width the group size does not
    divide unquantized, silently: that is refused here. None for int8 (per channel)."""
    if mode != "int4":
        return None
    sizes = INT4_GROUP_SIZES.get(device_type, INT4_GROUP_SIZES["cpu"])
    if group_size is None:
        group_size = next((size for size in (DEFAULT_GROUP_SIZE, FALLBACK_GROUP_SIZE)
                           if all(width % size == 0 for width in in_features)), FALLBACK_GROUP_SIZE)
    if group_size not in sizes:
        raise ValueError(f"--weight_group_size {group_size}: the {device_type} int4 kernel takes "
                         f"{', '.join(map(str, sizes))}")
    bad = sorted({width for width in in_features if width % group_size})
    if bad:
        fits = [size for size in sizes if all(width % size == 0 for width in in_features)]
        fix = f"use --weight_group_size {max(fits)}" if fits else "use --quantize int8"
        raise ValueError(f"--weight_group_size {group_size} does not divide the input width {bad[0]} of the model's "
                         f"linears (torchao would leave them unquantized): {fix}")
    return group_size


def torchao_config(mode: str, group_size, device_type: str):
    """The torchao config for mode on this device (see the module docstring). set_inductor_config=False: torchao
    would otherwise change inductor's global settings; generate.compile_decode sets the ones it wants."""
    import_torchao()
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, PerRow
        return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)
    if device_type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)


def mode_of(model: nn.Module) -> str | None:
    """"int8" / "int4" when the model's linears hold torchao weights (quantized here or loaded so), else None."""
    modes = {MODE_OF_CLASS.get(type(module.weight.data).__name__) for module in quantized_linears(model).values()}
    modes.discard(None)
    if len(modes) > 1:
        raise ValueError(f"the model mixes {' and '.join(sorted(modes))} weights: quantize a float checkpoint")
    return modes.pop() if modes else None


MODE_OF_CLASS = {"Int8Tensor": "int8", "Int4OpaqueTensor": "int4", "Int4TilePackedTo4dTensor": "int4"}


def quantize_weights(model: nn.Module, mode, group_size=None) -> nn.Module:
    """Quantize the model's linear weights in place with torchao's quantize_ (mode None: leave float weights as they
    are); returns model.
    A model whose weights are already `mode` (a checkpoint from scripts/prepare_checkpoint.py --quantize) is kept
    as it is (mode None takes the mode it holds, for CpuInt8Linear). Under tensor parallelism call it after sharding:
    each rank quantizes its own shards."""
    held = mode_of(model)
    mode = mode or held
    if mode is None:
        return model
    linears = quantized_linears(model)
    weight = next(iter(linears.values())).weight
    check_mode(mode, weight.device, weight.dtype)
    if held is not None and held != mode:
        raise ValueError(f"the checkpoint's weights are already {held}: drop --quantize {mode}, or quantize a "
                         "float checkpoint")
    if held is None:
        group_size = resolve_group_size(mode, group_size, [m.in_features for m in linears.values()],
                                        weight.device.type)
        import_torchao()
        from torchao.quantization import quantize_
        # torch.compile (--compile) warns once per torchao class that it has no stable hash for AOT autograd's
        # cache: the cache skips those graphs, nothing else changes.
        warnings.filterwarnings("ignore", message=r".*does not implement _stable_hash_for_caching")
        quantize_(model, torchao_config(mode, group_size, weight.device.type),
                  filter_fn=lambda module, name: name in linears)
    if mode == "int8" and weight.device.type == "cpu":
        # The class changes, not the module: its weight, its name in the state dict and any hook stay as they are.
        for module in linears.values():
            module.__class__ = CpuInt8Linear
    return model


@torch.library.custom_op("kvcache::int8_weight_linear", mutates_args=())
def int8_weight_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torchao's own weight-only int8 linear (Int8Tensor, per row: our int8 mode) as one op a compiled graph calls
    and does not look into; no bias (CpuInt8Linear adds it)."""
    from torchao.quantization import Int8Tensor
    return nn.functional.linear(x, Int8Tensor(qdata, scale, [1, qdata.shape[1]], x.dtype))


@int8_weight_linear.register_fake
def _(x, qdata, scale):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


class CpuInt8Linear(nn.Linear):
    """An nn.Linear whose weight is torchao's int8 (quantize_weights sets the class on the CPU). Eager it is any
    nn.Linear. Compiled, its matmul is the opaque int8_weight_linear: traced into, torchao's linear becomes an
    int8 -> float conversion in Inductor's C++ (vectorized through partial int8 loads) before the matmul, ~7x
    slower than aten's conversion on an AVX2 CPU, and `--compile --quantize int8` decoded at 0.20x of float32's
    compiled speed (outputs/results/cpu_speed_2026-12-05/)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        y = int8_weight_linear(x, self.weight.qdata, self.weight.scale)
        return y if self.bias is None else y + self.bias


def cpu_speed_notice(mode, device: torch.device) -> str | None:
    """One line when a weight quantization is known not to decode faster than float32 on the CPU, eager or compiled
    (the figures: docs/results.md, "CPU decode speed in turns"): int8, whose matmul converts every int8 weight to
    the activation dtype on every call (compiled too: CpuInt8Linear keeps torchao's eager op in the graph), and
    int4, whose CPU matmul (torch's _weight_int4pack_mm_for_cpu, the same op compiled) unpacks every weight."""
    if device.type != "cpu" or mode not in MODES:
        return None
    share, reason = {"int8": ("a quarter", "every matmul converts each int8 weight to float first"),
                     "int4": ("an eighth", "the CPU int4 matmul unpacks every weight on every call; under half "
                                           "float32's speed, and slower still to prefill")}[mode]
    return (f"--quantize {mode} on the CPU holds {share} of the linears' bytes but does not decode faster than "
            f"float32, eager or compiled ({reason}): leave it out for speed, keep it for memory")


def describe(model: nn.Module) -> str:
    """One line for the run's report: what the weights hold, quantized and not."""
    linears = quantized_linears(model)
    weights = [module.weight for module in linears.values()]
    quantized = sum(tensor_bytes(w) for w in weights)
    first = weights[0]
    group = getattr(first, "block_size", [None])[-1]
    layout = (f"{type(first).__name__}, " + ("per channel" if mode_of(model) == "int8" else f"groups of {group}"))
    rest = model_bytes(model) - quantized
    return (f"weights: {mode_of(model)} (torchao {layout}) in {len(linears)} linears, {format_mib(quantized)}; "
            f"embedding and norms {str(model.tok_embeddings.weight.dtype).removeprefix('torch.')}, {format_mib(rest)}")


def format_mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- byte counts


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor subclass counts the plain tensors inside it (its packed data, scales,
    zero points), not its nominal shape x dtype."""
    if type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, name)) for name in names)


def model_bytes(model: nn.Module) -> int:
    """What the model's parameters hold (its weights: the caches' buffers and the RoPE tables are not counted)."""
    return sum(tensor_bytes(p.data) for p in model.parameters())


def linear_bytes(out_features: int, in_features: int, mode, group_size, dtype: torch.dtype, device_type: str) -> int:
    """Bytes a linear weight (out_features, in_features) takes once quantize_weights has quantized it on
    device_type (mode None: the plain weight in dtype), from torchao 0.18's layouts:
      int8: int8 data, a float32 scale and an int8 zero point per row (Int8Tensor, PerRow);
      int4 CPU: int4 data two a byte, a (scale, zero) pair in dtype per group and row (Int4OpaqueTensor);
      int4 CUDA: the same in bfloat16 after torchao pads rows to a multiple of 8 and columns to a multiple of 1024
                 (Int4TilePackedTo4dTensor)."""
    if mode is None:
        return out_features * in_features * dtype.itemsize
    if mode == "int8":
        return out_features * in_features + out_features * (4 + 1)
    if mode != "int4":
        raise ValueError(f"--quantize {mode!r} is not a weight quantization: use int8 or int4 (or leave it out)")
    if device_type == "cuda":
        out_features = math.ceil(out_features / 8) * 8
        in_features = math.ceil(in_features / 1024) * 1024
        dtype = torch.bfloat16
    return out_features * in_features // 2 + (in_features // group_size) * out_features * 2 * dtype.itemsize
