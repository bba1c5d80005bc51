"""Every byte count and fit of a run, before anything is allocated.

Names say where a count comes from: `allocated_*` is measured from the live caches' buffers; `predicted_*` comes
from caches built on the meta device with the run's own options (the stores' own byte counts, never a second
formula); `full_kv_bytes` is the plain cache's arithmetic, the baseline of every ratio.
"""
import math
import os
import resource

import torch

import kv_cache
import tp
from kv_cache.paging import BlockPool, PageSpace
from model import ModelArgs, Transformer


def default_num_blocks(space: PageSpace, batch_size: int, max_seq_length: int) -> int:
    """A pool where every sequence of the batch reaches max_seq_length (what contiguous storage allocates), plus
    the null block; at least one block besides it (a store that pages nothing for so short a run, e.g. quantize_kv
    whose sinks + window hold it all, still has a pool to point at)."""
    return max(2, batch_size * space.blocks_for(max_seq_length) + 1)


def allocated_kv_bytes(model: Transformer) -> int:
    """What the model's caches hold in buffers now (paged: the whole pool)."""
    return sum(cache.nbytes() for cache in model.caches())


def full_kv_bytes(model: Transformer, batch_size: int, tokens: int) -> int:
    """What the plain cache in the model's dtype holds for `tokens` tokens: the baseline of every ratio."""
    a = model.args
    return 2 * a.n_layer * batch_size * a.n_kv_head * a.head_dim * tokens * model.tok_embeddings.weight.element_size()


def sizing_options(strategy: str, options: dict, head_dim: int):
    """The options resolved for counting bytes: storage does not depend on the attention path, and the meta device
    has no Triton kernels to check for."""
    return kv_cache.STRATEGIES[strategy].Options.resolve({**options, "attn_impl": "torch"}, head_dim)


def predicted_kv_bytes(args: ModelArgs, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                       dtype=torch.bfloat16, block_size: int = None, num_blocks: int = None) -> int:
    """What the caches of all layers allocate, from the layers' caches built on the meta device (no memory used),
    each with its own options (KVCache.layer_options: e.g. quantize_kv --bits_per_layer); paged with block_size: a
    pool of num_blocks blocks (default: every sequence reaches max_seq_length)."""
    cache_cls = kv_cache.STRATEGIES[strategy]
    resolved = sizing_options(strategy, options, args.head_dim)
    pool = None
    if block_size:
        space = cache_cls.page_space(resolved, max_seq_length, block_size)
        pool = BlockPool(num_blocks or default_num_blocks(space, batch_size, max_seq_length), space, batch_size,
                         torch.device("meta"))
    built = []  # (options, bytes): layers of equal options allocate equal buffers, so each is built once
    total = 0
    for i in range(args.n_layer):
        layer = cache_cls.layer_options(resolved, i, args.n_layer)
        n_bytes = next((n for opts, n in built if opts == layer), None)
        if n_bytes is None:
            n_bytes = cache_cls(batch_size, max_seq_length, args.n_kv_head, args.head_dim, dtype, torch.device("meta"),
                                options=layer, pool=pool).nbytes()
            built.append((layer, n_bytes))
        total += n_bytes
    return total


def check_block_size(args: ModelArgs, strategy: str, options: dict, max_seq_length: int, block_size: int):
    """A strategy whose blocks hold whole groups (quantize_kv's flush groups) would round block_size up: refused in
    one line naming the sizes that are whole."""
    space = kv_cache.STRATEGIES[strategy].page_space
    resolved = sizing_options(strategy, options, args.head_dim)
    if space(resolved, max_seq_length, block_size).block_tokens != block_size:
        group = space(resolved, max_seq_length, 1).block_tokens
        raise ValueError(f"--block_size {block_size}: {strategy}'s blocks hold whole groups of {group} tokens (they are "
                         f"quantized together), so blocks would hold {math.lcm(block_size, group)}: use --block_size "
                         f"{-(-block_size // group) * group} or another multiple of {group}")


def predicted_pool_bytes(args: ModelArgs, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                         block_size: int, dtype=torch.bfloat16) -> tuple[int, int]:
    """(bytes that do not depend on the pool's size, bytes per block), all layers: from caches built on the meta
    device with pools of 2 and 3 blocks."""
    two, three = (predicted_kv_bytes(args, strategy, options, batch_size, max_seq_length, dtype, block_size, n)
                  for n in (2, 3))
    return two - 2 * (three - two), three - two


def blocks_in(memory_bytes: float, fixed: int, per_block: int) -> int:
    """Blocks a pool of memory_bytes holds (beside the fixed bytes)."""
    return max(0, int((memory_bytes - fixed) // per_block))


def predicted_generation_bytes(args: ModelArgs, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                               prompt_len: int, rope_length: int, dtype, block_size: int = None,
                               num_blocks: int = None) -> int:
    """Bytes a generation allocates beyond the weights: the caches, the float32 RoPE tables (cos, sin and the
    angles they come from) and one prefill chunk's logits (B, chunk, vocab) with a copy."""
    rope = 4 * max(rope_length, max_seq_length) * args.head_dim * 4
    logits = 2 * batch_size * prompt_len * args.vocab_size * dtype.itemsize
    kv = predicted_kv_bytes(args, strategy, options, batch_size, max_seq_length, dtype, block_size, num_blocks)
    return kv + rope + logits


def available_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: free GPU memory plus what this process's allocator holds unused
    (CUDA); on the CPU the kernel's MemAvailable (free pages plus reclaimable cache), else the free physical pages."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux reports KiB)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def largest(fits, upper: int) -> int:
    """The largest n in 1..upper with fits(n), or 0; fits must be monotone (true up to some n, then false).
    Doubling first, then bisection: a search over a huge range evaluates fits only O(log answer) times."""
    if upper < 1 or not fits(1):
        return 0
    low, high = 1, 2  # fits(low) holds
    while high <= upper and fits(high):
        low, high = high, 2 * high
    high = min(high - 1, upper)  # the answer is in low..high
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def check_memory(model: Transformer, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                 prompt_len: int, rope_length: int, available: int = None, block_size: int = None,
                 num_blocks: int = None):
    """Before anything is allocated: a one-line ValueError when the caches and prefill buffers cannot fit in the
    memory left after the weights, naming the largest --max_seq_length and --batch_size that would."""
    weight = model.tok_embeddings.weight
    if available is None:  # tensor parallel: the fullest GPU decides, so that every rank decides alike
        available = int(tp.min_over_ranks(available_memory_bytes(weight.device)))

    def needed(batch, length):
        return predicted_generation_bytes(model.args, strategy, options, batch, length, prompt_len, rope_length,
                                          weight.dtype, block_size, num_blocks)

    need = needed(batch_size, max_seq_length)
    if need <= available:
        return
    tokens = rope_length  # prompt + new tokens: a cache of fixed capacity must hold them all
    capacity = kv_cache.STRATEGIES[strategy].capacity
    fixes = []
    length_fit = largest(lambda length: needed(batch_size, length) <= available, max_seq_length)
    if length_fit and (capacity(options, length_fit) is None or capacity(options, length_fit) >= tokens):
        fixes.append(f"--max_seq_length {length_fit}")
    batch_fit = largest(lambda batch: needed(batch, max_seq_length) <= available, batch_size)
    if batch_fit:
        fixes.append(f"--batch_size {batch_fit}")
    if num_blocks:
        fixes = ["fewer --num_blocks / a smaller --kv_memory_gb"]
    fix = (" or ".join(fixes) + " fits" if fixes else
           "even one sequence does not fit: lower --max_new_tokens or shorten the prompt, or use compress_kv")
    where = "GPU memory" if weight.device.type == "cuda" else "memory"
    raise ValueError(f"the {strategy} cache, RoPE tables and prefill logits need {format_bytes(need)} for "
                     f"--max_seq_length {max_seq_length} x --batch_size {batch_size} but {format_bytes(available)} "
                     f"of {where} is free: {fix}")
