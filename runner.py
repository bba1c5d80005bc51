"""The device side of generation: the model and its caches, prefill, the decode step and sampling.

The engine (engine.py) decides what runs; this file runs it. Every function here works on the model's caches as
set up by setup_cache: a batch of rows (cache sequences), contiguous or paged in one block pool.
"""
import time
from typing import NamedTuple

import torch

import kv_cache
import tp
from checkpoint import load_checkpoint
from kv_cache.mixed import MixedCache
from kv_cache.paging import BlockPool
from memory import default_num_blocks
from model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU (what its tensor cores and the checkpoints use); float32 on the CPU, where bfloat16
    matmuls are slow on most processors."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype, or its name in DTYPES (--dtype), or None: the device's default (default_dtype)."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_model(checkpoint_path, device, dtype, replicate_kv_heads: bool = False) -> Transformer:
    if tp.world_size() > 1:  # under torchrun: this rank's shard only (tp.py); quantize after this, on the shard
        return tp.load_model(checkpoint_path, device, dtype, replicate_kv_heads)
    args, state_dict = load_checkpoint(checkpoint_path, dtype=dtype)  # cast as read: never two copies in memory
    return Transformer.from_state_dict(args, state_dict, device=device, dtype=dtype)


def cache_factory(model: Transformer, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                  quiet: bool = False, block_size: int = None, num_blocks: int = None):
    """(make(layer_idx) -> that layer's cache of `strategy` for batch_size rows, the pool or None). The options are
    checked once for all layers (one line naming the fix), each layer's resolved before any memory is taken.
    block_size: paged in a pool of num_blocks blocks shared by the rows and all layers (kv_cache/paging.py;
    num_blocks None: every sequence's max_seq_length fits)."""
    cache_cls = kv_cache.STRATEGIES[strategy]
    args = model.args
    resolved = cache_cls.check_options(options, max_seq_length, args.head_dim, quiet)
    per_layer = [cache_cls.layer_options(resolved, i, args.n_layer) for i in range(args.n_layer)]
    weight = model.tok_embeddings.weight
    pool = None
    if block_size:
        space = cache_cls.page_space(resolved, max_seq_length, block_size)
        pool = BlockPool(num_blocks or default_num_blocks(space, batch_size, max_seq_length), space, batch_size,
                         weight.device)

    def make_cache(layer_idx):
        return cache_cls(batch_size, max_seq_length, args.n_kv_head, args.head_dim, weight.dtype, weight.device,
                         options=per_layer[layer_idx], pool=pool)

    return make_cache, pool


def setup_cache(model: Transformer, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                rope_length: int = 0, quiet: bool = False, block_size: int = None, num_blocks: int = None):
    """Give every layer a fresh cache of `strategy` (cache_factory); RoPE tables cover max(max_seq_length,
    rope_length) positions; quiet: no notices from the options check. Returns the pool (None when contiguous)."""
    make_cache, pool = cache_factory(model, strategy, options, batch_size, max_seq_length, quiet, block_size,
                                     num_blocks)
    model.setup_caches(make_cache, max(max_seq_length, rope_length))
    return pool


def setup_mixed_cache(model: Transformer, configs: list, max_seq_length: int, block_size: int = None) -> list:
    """Several KV configurations in one batch (kv_cache/mixed.py): configs lists (name, strategy, options, rows,
    num_blocks) in row order; each gets its rows and, paged, its own pool. Returns the pools."""
    factories = [cache_factory(model, strategy, options, rows, max_seq_length, True, block_size, num_blocks)
                 for _, strategy, options, rows, num_blocks in configs]
    names = [config[0] for config in configs]
    model.setup_caches(lambda i: MixedCache([make(i) for make, _ in factories], names), max_seq_length)
    return [pool for _, pool in factories]


def pool_of(model: Transformer):
    """The caches' shared BlockPool, or None when they are contiguous."""
    return model.caches()[0].pool


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- sampling


class Sampling(NamedTuple):
    """Per-row sampling parameters, (B, 1) tensors on the device, so a batch mixes requests and the decode step
    keeps one graph: temperature (0 = greedy), top_k (0 = every token), top_p (1 = every token), seed."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor

    @classmethod
    def of(cls, rows: list, device) -> "Sampling":
        """rows: (temperature, top_k, top_p, seed) per row."""
        t, k, p, s = zip(*rows)
        return cls(torch.tensor(t, device=device, dtype=torch.float32)[:, None],
                   torch.tensor(k, device=device, dtype=torch.long)[:, None],
                   torch.tensor(p, device=device, dtype=torch.float32)[:, None],
                   torch.tensor(s, device=device, dtype=torch.long)[:, None])


# splitmix64's constants as signed int64 (torch has no uint64 arithmetic; products wrap alike)
_GOLDEN, _MIX1, _MIX2 = (c - 2**64 if c >= 2**63 else c for c in
                         (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) uniforms in (0, 1), a pure function of (seed, position, token id): a counter-based generator
    (splitmix64 over the three), so a request's draws do not depend on which other requests share its batch or
    on the order steps run in, and the decode step stays one graph without a device-side generator state."""
    token = torch.arange(vocab_size, device=seed.device, dtype=torch.long)
    x = (seed * _GOLDEN + position.reshape(-1, 1).long()) * _GOLDEN + token
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).float() + 0.5) / 2**24


def sample(logits: torch.Tensor, sampling: Sampling = None, position: torch.Tensor = None) -> torch.Tensor:
    """Next token per row (B, 1) from the last position's logits (B, V). sampling None: greedy. Otherwise per row:
    greedy where temperature is 0, else drawn from softmax(logits / temperature) restricted to the top_k most likely
    tokens and the smallest set whose probability reaches top_p, with the row's noise at `position` (the position
    of the token whose logits these are)."""
    greedy = logits.argmax(dim=-1, keepdim=True)
    if sampling is None:
        return greedy
    temperature, top_k, top_p, seed = sampling
    scaled = logits.float() / temperature.clamp(min=1e-5)
    ordered = scaled.sort(dim=-1, descending=True).values
    kth = ordered.gather(-1, (top_k - 1).clamp(min=0, max=logits.size(-1) - 1))
    scaled = torch.where((top_k > 0) & (scaled < kth), float("-inf"), scaled)
    ordered = torch.where((top_k > 0) & (ordered < kth), float("-inf"), ordered)
    # top_p: keep a token when the probability of the tokens more likely than it is below top_p
    cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    below = (cumulative - torch.softmax(ordered, dim=-1)) < top_p
    threshold = torch.where(below, ordered, float("inf")).amin(dim=-1, keepdim=True)
    scaled = torch.where(scaled < threshold, float("-inf"), scaled)
    probs = torch.softmax(scaled, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (gpt-fast's trick, no device sync).
    drawn = torch.argmax(probs / -torch.log(uniform_noise(seed, position, logits.size(-1))), dim=-1, keepdim=True)
    return torch.where(temperature > 0, drawn, greedy)


# ---------------------------------------------------------------- prefill and decode


def prefill(model: Transformer, tokens: torch.Tensor, start_pos: int = 0, chunk_size: int = None,
            rows: torch.Tensor = None, last_only: bool = False) -> torch.Tensor:
    """Feed tokens (B, T) at positions start_pos.. in chunks of chunk_size (None: all at once) into cache sequences
    `rows` (None: the first B); each chunk attends to what the cache holds plus itself causally, so activations
    grow with chunk_size x context, not context^2. Returns logits (B, T, V), or (B, 1, V) of the last token with
    last_only (the (B, T, V) logits of a long prompt would outweigh the chunking). Paged caches take the blocks
    each chunk needs first."""
    if model.caches()[0].whole_prompt:  # e.g. SnapKV scores the prompt from its end: one chunk
        chunk_size = None
    chunk_size = chunk_size or tokens.shape[1]
    pool = pool_of(model)
    if rows is None:  # named, so a one-token chunk is a prefill chunk too, never taken for the decode step
        rows = torch.arange(tokens.shape[0], device=tokens.device)
    row_ids = rows.tolist() if pool is not None else ()
    logits = []
    for begin in range(0, tokens.shape[1], chunk_size):
        chunk = tokens[:, begin:begin + chunk_size]
        end = start_pos + begin + chunk.shape[1]
        for row in row_ids:
            pool.reserve(row, end)
        input_pos = torch.arange(start_pos + begin, end, device=tokens.device)
        out = model(chunk, input_pos, rows)
        logits.append(out[:, -1:].clone() if last_only else out)  # a copy: a view would keep the chunk's logits
    return logits[-1] if last_only else torch.cat(logits, dim=1)


def prefill_rows(model: Transformer, ids: list[int], rows: list[int], chunk_size) -> tuple[torch.Tensor, list]:
    """Prefill one prompt into cache sequences `rows` (reset, all at once) and return the last token's logits
    (len(rows), V) and, per row, the prompt tokens taken from blocks a paged pool already held (not computed). A
    pool that shares prefixes gets one row at a time: the first stores the prompt, the others share its blocks."""
    device = model.tok_embeddings.weight.device
    pool = pool_of(model)
    if pool is not None and pool.sharable(rows[0]) and len(rows) > 1:
        out = [prefill_rows(model, ids, [row], chunk_size) for row in rows]
        return torch.cat([logits for logits, _ in out]), [shared[0] for _, shared in out]
    shared = pool.share_prefix(rows[0], ids) if pool is not None and len(rows) == 1 else 0
    tokens = torch.tensor([ids[shared:]] * len(rows), device=device)
    logits = prefill(model, tokens, shared, chunk_size, rows=torch.tensor(rows, device=device), last_only=True)
    if pool is not None:
        for row in rows:
            pool.publish_prefix(row, ids)
    return logits[:, -1], [shared] * len(rows)


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor, sampling: Sampling = None):
    """One decode step: token (B, 1) at positions input_pos (B, 1); returns the next token (B, 1)."""
    logits = model(token, input_pos)
    return sample(logits[:, -1], sampling, input_pos)


def compile_decode(decode_fn=decode_one_token):
    """decode_fn as one compiled graph (fullgraph: a graph break fails loudly instead of slowing every step), replayed
    as a CUDA graph on GPU (mode reduce-overhead). The caches keep static shapes and take positions as a tensor, so
    it compiles once per cache set-up (and sampling mode: greedy or not) and never again per step
    (tests/test_compile.py holds them to it). dynamic=False: a second set-up with other shapes (other options, or
    bench_decode --interleave's caches side by side) gets its own static graph, never one generalized over sizes."""
    import torch._inductor.config as inductor_config
    inductor_config.coordinate_descent_tuning = True  # as gpt-fast: tunes the GEMV-like decode kernels
    inductor_config.triton.unique_kernel_names = True  # readable kernel names in profiler traces
    return torch.compile(decode_fn, mode="reduce-overhead", fullgraph=True, dynamic=False)


def warm_up(model: Transformer, decode_fn, sampling: Sampling = None, calls: int = 3) -> float:
    """Call decode_fn `calls` times untimed, so compilation (and CUDA-graph recording, which takes the first calls)
    is not counted as decode speed; return the seconds it took. It decodes at positions 0.. of the caches and
    resets them after; sampling draws no global random numbers, so the timed run samples exactly what it would
    have."""
    device = model.tok_embeddings.weight.device
    batch_size = model.caches()[0].batch_size
    token = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
    t0 = time.perf_counter()
    for pos in range(calls):  # positions (B, 1), as the engine passes them: the graph it will replay
        input_pos = torch.full((batch_size, 1), pos, device=device)
        token = decode_fn(model, token, input_pos, sampling).clone()
    synchronize(device)
    model.reset_caches()
    return time.perf_counter() - t0
