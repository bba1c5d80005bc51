"""quantize_kv --bits_per_layer: the spec that gives each layer its own format, e.g. "8:0-1,28-29;2:*".

Entries BITS:LAYERS separated by ';', LAYERS a comma list of indices and ranges a-b, or * (the last entry: every layer
no earlier entry names). parse_bits_per_layer reads the grammar (checked with the options, before the model's layer
count is known); layer_bits gives each of a model's layers its --bits value. Every mistake is a one-line ValueError
naming the fix.
"""
from typing import Optional

from kernels.formats import FORMATS

BITS_PER_LAYER_EXAMPLE = "'8:0-1,28-29;2:*'"


def layer_list(layers) -> str:
    """Layer indices as the spec writes them: [0, 1, 2, 5] -> '0-2,5'."""
    runs = []
    for i in sorted(layers):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def parse_bits_per_layer(spec: str) -> list[tuple[str, Optional[list[int]]]]:
    """The --bits_per_layer spec as [(bits, layers)], layers None for '*' (the last entry); a one-line ValueError
    naming the fix for a malformed entry, an unknown format or a layer named twice. Layer counts are checked
    against the model by layer_bits."""
    what = f"--bits_per_layer {spec!r}"
    entries = [e.strip() for e in spec.split(";")]
    parsed, named = [], {}
    for n, entry in enumerate(entries):
        bits, sep, layers = (part.strip() for part in entry.partition(":"))
        if not sep or not bits or not layers:
            raise ValueError(f"{what}: entry {entry!r} is not BITS:LAYERS: write e.g. {BITS_PER_LAYER_EXAMPLE}")
        if bits not in FORMATS:
            raise ValueError(f"{what}: bits {bits!r} is not supported: use {', '.join(FORMATS)}")
        if layers == "*":
            if n != len(entries) - 1:
                raise ValueError(f"{what}: '*' (every layer not named before it) must be the last entry, as in "
                                 f"{BITS_PER_LAYER_EXAMPLE}")
            parsed.append((bits, None))
            continue
        indices = []
        for item in (i.strip() for i in layers.split(",")):
            first, dash, last = item.partition("-")
            if not first.isdigit() or dash and not last.isdigit():
                raise ValueError(f"{what}: {item!r} is not a layer index or range a-b"
                                 + (" ('*' stands alone: BITS:*)" if "*" in item else "")
                                 + f": write e.g. {BITS_PER_LAYER_EXAMPLE}")
            a, b = int(first), int(last) if dash else int(first)
            if b < a:
                raise ValueError(f"{what}: range {item!r} runs backwards: write {b}-{a}")
            indices += range(a, b + 1)
        for i in indices:
            if i in named:
                raise ValueError(f"{what}: layer {i} is named twice ({named[i]!r} and {entry!r}): give each layer one "
                                 "format")
            named[i] = entry
        parsed.append((bits, indices))
    return parsed


def layer_bits(spec: str, n_layer: int) -> list[str]:
    """The --bits value of each of the n_layer layers under a --bits_per_layer spec; a one-line ValueError when
    the spec names a layer the model does not have, leaves one without a format, or has a '*' that names none."""
    what = f"--bits_per_layer {spec!r}"
    bits_of = [None] * n_layer
    for bits, layers in parse_bits_per_layer(spec):
        if layers is None:
            rest = [i for i in range(n_layer) if bits_of[i] is None]
            if not rest:
                raise ValueError(f"{what}: '{bits}:*' names no layer (the entries before it name all {n_layer}): "
                                 "drop it")
            layers = rest
        past = [i for i in layers if i >= n_layer]
        if past:
            raise ValueError(f"{what} names layer{'s' * (len(past) > 1)} {layer_list(past)} but the model has "
                             f"{n_layer} layers (0-{n_layer - 1}): name layers below {n_layer}")
        for i in layers:
            bits_of[i] = bits
    missing = [i for i in range(n_layer) if bits_of[i] is None]
    if missing:
        raise ValueError(f"{what} gives layer{'s' * (len(missing) > 1)} {layer_list(missing)} no format (the model "
                         f"has {n_layer} layers): name them, or end the spec with an entry such as '8:*'")
    return bits_of
