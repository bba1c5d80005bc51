"""Generate text with a Llama-family model and a pluggable KV cache, gpt-fast style.

    python generate.py --prompt "Once upon a time," quantize_kv --sink_size 16 --window_size 32 --bits 4

The cache strategy is a subcommand (full by default); each file in kv_cache/ adds one.
"""
import argparse
import contextlib
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import kv_cache
import tp
import weight_quant
from atomic import atomic_write_text, check_writable_file
from checkpoint import SETUP_HINT, default_checkpoint_path, load_checkpoint
from kv_cache.paging import DEFAULT_BLOCK_SIZE, BlockPool, PageSpace, PoolExhausted
from model import ModelArgs, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUTPUTS = Path(__file__).resolve().parent / "outputs"


# ---------------------------------------------------------------- model and cache set-up


def load_model(checkpoint_path, device, dtype, replicate_kv_heads: bool = False) -> Transformer:
    if tp.world_size() > 1:  # under torchrun: this rank's shard only (tp.py); quantize after this, on the shard
        return tp.load_model(checkpoint_path, device, dtype, replicate_kv_heads)
    args, state_dict = load_checkpoint(checkpoint_path, dtype=dtype)  # cast as read: never two copies in memory
    return Transformer.from_state_dict(args, state_dict, device=device, dtype=dtype)


def setup_cache(model: Transformer, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                rope_length: int = 0, quiet: bool = False, block_size: int = None, num_blocks: int = None):
    """Give every layer a fresh cache of `strategy`; RoPE tables cover max(max_seq_length, rope_length) positions.
    quiet: no notices from the options check (for caches sized internally, e.g. by scripts/evaluate.py).
    block_size: page the cache in a pool of num_blocks blocks shared by the batch and all layers (kv_cache/paging.py;
    num_blocks None: every sequence's max_seq_length fits). Returns the pool (None when contiguous)."""
    cache_cls = kv_cache.STRATEGIES[strategy]
    args = model.args
    resolved = cache_cls.check_options(options, max_seq_length, args.head_dim, quiet)  # once for all layers
    per_layer = [cache_cls.layer_options(resolved, i, args.n_layer) for i in range(args.n_layer)]  # checked first
    weight = model.tok_embeddings.weight
    pool = None
    if block_size:
        space = cache_cls.page_space(resolved, max_seq_length, block_size)
        pool = BlockPool(num_blocks or default_num_blocks(space, batch_size, max_seq_length), space, batch_size,
                         weight.device)

    def make_cache(layer_idx):
        return cache_cls(batch_size, max_seq_length, args.n_kv_head, args.head_dim, weight.dtype, weight.device,
                         options=per_layer[layer_idx], pool=pool)

    model.setup_caches(make_cache, max(max_seq_length, rope_length))
    return pool


def default_num_blocks(space: PageSpace, batch_size: int, max_seq_length: int) -> int:
    """A pool where every sequence of the batch reaches max_seq_length (what contiguous storage allocates), plus
    the null block."""
    return batch_size * space.blocks_for(max_seq_length) + 1


def pool_of(model: Transformer):
    """The caches' shared BlockPool, or None when they are contiguous."""
    return model.caches()[0].pool


def kv_bytes(model: Transformer) -> int:
    return sum(cache.nbytes() for cache in model.caches())


def pool_bytes(args: ModelArgs, strategy: str, options: dict, batch_size: int, max_seq_length: int, block_size: int,
               dtype=torch.bfloat16) -> tuple[int, int]:
    """(bytes that do not depend on the pool's size, bytes per block), all layers: from caches built on the meta
    device with pools of 2 and 3 blocks, so they are the stores' own byte counts."""
    two, three = (cache_bytes(args, strategy, options, batch_size, max_seq_length, dtype, block_size, n)
                  for n in (2, 3))
    return two - 2 * (three - two), three - two


def blocks_in(memory_bytes: float, fixed: int, per_block: int) -> int:
    """Blocks a pool of memory_bytes holds (beside the fixed bytes)."""
    return max(0, int((memory_bytes - fixed) // per_block))


def full_kv_bytes(model: Transformer, batch_size: int, tokens: int) -> int:
    """What the plain 16-bit-or-model-dtype cache would hold for `tokens` tokens: the baseline of every ratio."""
    a = model.args
    return 2 * a.n_layer * batch_size * a.n_kv_head * a.head_dim * tokens * model.tok_embeddings.weight.element_size()


def cache_bytes(args: ModelArgs, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                dtype=torch.bfloat16, block_size: int = None, num_blocks: int = None) -> int:
    """What the caches of all layers allocate, from the layers' caches built on the meta device (no memory used),
    each with its own options (KVCache.layer_options: e.g. quantize_kv --bits_per_layer); paged with block_size: a
    pool of num_blocks blocks (default: every sequence reaches max_seq_length)."""
    # Storage does not depend on the attention path, and the meta device has no Triton kernels to check for.
    cache_cls = kv_cache.STRATEGIES[strategy]
    resolved = cache_cls.Options.resolve({**options, "attn_impl": "torch"}, args.head_dim)
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


def generation_bytes(args: ModelArgs, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                     prompt_len: int, rope_length: int, dtype, block_size: int = None, num_blocks: int = None) -> int:
    """Bytes a generation allocates beyond the weights: the caches, the float32 RoPE tables (cos, sin and the
    angles they come from) and one prefill chunk's logits (B, chunk, vocab) with a copy."""
    rope = 4 * max(rope_length, max_seq_length) * args.head_dim * 4
    logits = 2 * batch_size * prompt_len * args.vocab_size * dtype.itemsize
    return cache_bytes(args, strategy, options, batch_size, max_seq_length, dtype, block_size, num_blocks) + rope + logits


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


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def largest_fitting(fits, upper: int) -> int:
    """The largest n in 1..upper with fits(n), or 0; fits must be monotone (true up to some n, then false)."""
    low, high = 0, upper
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
        return generation_bytes(model.args, strategy, options, batch, length, prompt_len, rope_length, weight.dtype,
                                block_size, num_blocks)

    need = needed(batch_size, max_seq_length)
    if need <= available:
        return
    tokens = rope_length  # prompt + new tokens: a cache of fixed capacity must hold them all
    capacity = kv_cache.STRATEGIES[strategy].capacity
    fixes = []
    length_fit = largest_fitting(lambda length: needed(batch_size, length) <= available, max_seq_length)
    if length_fit and (capacity(options, length_fit) is None or capacity(options, length_fit) >= tokens):
        fixes.append(f"--max_seq_length {length_fit}")
    batch_fit = largest_fitting(lambda batch: needed(batch, max_seq_length) <= available, batch_size)
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


# ---------------------------------------------------------------- generation


def sample(logits: torch.Tensor, temperature: float, top_k) -> torch.Tensor:
    """Next token per row from the last position's logits (B, V): greedy when temperature is 0; top_k None or 0
    samples from every token. Each row draws its own noise, so the rows of a batch are independent samples."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = torch.where(logits < kth, float("-inf"), logits)
    probs = torch.softmax(logits.float(), dim=-1)
    # Exponential-race sampling: same distribution as multinomial without a device sync (gpt-fast's trick).
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1, keepdim=True)


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


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor, temperature: float, top_k):
    logits = model(token, input_pos)
    return sample(logits[:, -1], temperature, top_k)


def compile_decode(decode_fn=decode_one_token):
    """decode_fn as one compiled graph (fullgraph: a graph break fails loudly instead of slowing every step), replayed
    as a CUDA graph on GPU (mode reduce-overhead). The caches keep static shapes and take positions as a tensor, so
    it compiles once per cache set-up and never again per step (tests/test_compile.py holds them to it)."""
    import torch._inductor.config as inductor_config
    inductor_config.coordinate_descent_tuning = True  # as gpt-fast: tunes the GEMV-like decode kernels
    inductor_config.triton.unique_kernel_names = True  # readable kernel names in profiler traces
    return torch.compile(decode_fn, mode="reduce-overhead", fullgraph=True)


def prefill_one(model: Transformer, ids: list[int], row: int, chunk_size) -> tuple[torch.Tensor, int]:
    """Prefill one prompt into cache sequence `row` (reset), sharing the blocks of a prompt prefix that a paged
    pool already holds (only the rest is computed); return the last token's logits (1, V) and the tokens shared."""
    device = model.tok_embeddings.weight.device
    pool = pool_of(model)
    shared = pool.share_prefix(row, ids) if pool is not None else 0
    logits = prefill(model, torch.tensor([ids[shared:]], device=device), shared, chunk_size,
                     rows=torch.tensor([row], device=device), last_only=True)
    if pool is not None:
        pool.publish_prefix(row, ids)
    return logits[:, -1], shared


def prefill_prompts(model: Transformer, prompts: list[list[int]], chunk_size, temperature, top_k):
    """Prefill prompt b into cache sequence b and sample each one's first new token: (B, 1), and the prompt tokens
    taken from the pool's shared blocks instead of computed. Copies of one prompt
    are fed together (in a paged pool that shares prefixes, the first is stored and the others share it);
    prompts of different lengths one at a time (each sequence starts at position 0, so no padding is stored or
    attended to)."""
    device = model.tok_embeddings.weight.device
    pool = pool_of(model)
    sharing = pool is not None and pool.space.sharable
    if all(ids == prompts[0] for ids in prompts) and not sharing:
        logits = prefill(model, torch.tensor(prompts, device=device), 0, chunk_size, last_only=True)
        return sample(logits[:, -1], temperature, top_k), 0
    first, shared = [], 0
    for b, ids in enumerate(prompts):
        logits, n_shared = prefill_one(model, ids, b, chunk_size)
        first.append(sample(logits, temperature, top_k))
        shared += n_shared
    return torch.cat(first), shared


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature=0.0, top_k=None, eos_ids=(),
                   prefill_chunk=None, decode_fn=decode_one_token, on_token=None) -> dict:
    """Generate up to max_new_tokens after each prompt (token id lists of any lengths) in one batch, from freshly
    reset caches. Every sequence decodes at its own position and ends at its own EOS: from then on its position
    stays where it is and the caches skip its attention work; the loop stops when every sequence has ended.

    Returns sequences (per prompt: tokens up to and including the EOS, finish_reason "eos" or "length"), tokens
    (B, steps) as decoded (after a sequence's EOS its row holds filler), prompt_tokens, prefill_s, decode_s and
    decode_steps."""
    B = len(prompts)
    device = model.tok_embeddings.weight.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pool = pool_of(model)
    model.reset_caches()
    t0 = time.perf_counter()
    next_token, shared = prefill_prompts(model, prompts, prefill_chunk, temperature, top_k)
    synchronize()
    t1 = time.perf_counter()
    positions = [len(ids) for ids in prompts]  # where each next token goes (a host copy, for a paged pool)
    input_pos = torch.tensor(positions, device=device)[:, None]
    eos = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
    new_tokens, finished = [next_token], torch.zeros(B, dtype=torch.bool, device=device)
    if on_token:
        on_token(next_token)
    for step in range(1, max_new_tokens):
        finished |= torch.isin(next_token[:, 0], eos)
        done = finished.tolist() if eos.numel() else None  # one host copy a step, only when sequences can end
        if done is not None:
            if all(done):
                break
            model.finish_sequences(finished)
        if pool is not None:  # blocks for this step's writes (a finished row writes into its own or the null block)
            for b in range(B):
                if done is None or not done[b]:
                    pool.reserve(b, positions[b] + 1)
                    positions[b] += 1
        next_token = decode_fn(model, next_token, input_pos, temperature, top_k).clone()
        input_pos = input_pos + (~finished)[:, None]
        new_tokens.append(next_token)
        if on_token:
            on_token(next_token)
    synchronize()
    t2 = time.perf_counter()
    tokens = torch.cat(new_tokens, dim=1)
    sequences = []
    for row in tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in eos_ids), None)
        sequences.append(dict(tokens=row if end is None else row[:end + 1],
                              finish_reason="length" if end is None else "eos"))
    return {"sequences": sequences, "tokens": tokens, "prompt_tokens": sum(map(len, prompts)), "shared_tokens": shared,
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1, "decode_steps": len(new_tokens) - 1}


def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature=0.0, top_k=None, eos_ids=(),
             prefill_chunk=None, decode_fn=decode_one_token, on_token=None) -> dict:
    """generate_batch for a prompt tensor (B, T): rows of one length."""
    return generate_batch(model, prompt.tolist(), max_new_tokens, temperature, top_k, eos_ids, prefill_chunk,
                          decode_fn, on_token)


def warm_up(model: Transformer, decode_fn, batch_size: int, temperature: float, top_k, calls: int = 3) -> float:
    """Call decode_fn `calls` times untimed, so compilation (and CUDA-graph recording, which takes the first calls)
    is not counted as decode speed; return the seconds it took. It decodes at positions 0.. of the caches and
    resets them after, and the random state is restored, so the timed run samples exactly what it would have."""
    device = model.tok_embeddings.weight.device
    token = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        for pos in range(calls):  # positions (B, 1), as generate_batch passes them: the graph it will replay
            input_pos = torch.full((batch_size, 1), pos, device=device)
            token = decode_fn(model, token, input_pos, temperature, top_k).clone()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    model.reset_caches()
    return time.perf_counter() - t0


def until_eos(ids: list[int], eos_ids) -> list[int]:
    """A row's tokens up to (not including) its first EOS: after it the row only waits for the others."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[:i]
    return ids


class TextStreamer:
    """Prints row 0's text as tokens arrive, up to its first EOS; decodes the whole tail so multi-byte characters
    print whole."""

    def __init__(self, tokenizer, eos_ids=()):
        self.tokenizer, self.eos_ids, self.ids, self.printed, self.done = tokenizer, set(eos_ids), [], "", False

    def __call__(self, token: torch.Tensor):
        token_id = int(token[0, 0])
        self.done = self.done or token_id in self.eos_ids
        if self.done:
            return
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux reports KiB)


PROFILE_NAME = re.compile(r"[A-Za-z0-9._-]+")
PROFILE_SUFFIXES = ("_trace.json", "_table.txt", "_memory.html")
# Kineto (torch.profiler's C++ core) logs `USDT:2026-01-01 12:00:00 123:123 File.cpp:52] profiler_start` lines.
KINETO_LOG_LINE = re.compile(r"[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+:\d+\] ")


def check_profile_name(name: str):
    """A profile name is a file-name stem inside outputs/: checked before any work, so no run ends by failing to
    write (a missing folder) or writes outside outputs/ (a path)."""
    if not PROFILE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"--profile {name!r} is not a name: use letters, digits and - _ . only (no folders); "
                         "the files go to outputs/NAME_trace.json, outputs/NAME_table.txt, ...")
    for suffix in PROFILE_SUFFIXES:
        check_writable_file(OUTPUTS / f"{name}{suffix}")


@contextlib.contextmanager
def quiet_profiler_logs():
    """Hold stderr (the file descriptor: Kineto writes from C++) in a file while the profiler starts, stops and
    exports, then pass on every line that is not Kineto's own log, so none lands in the middle of streamed text."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not KINETO_LOG_LINE.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def export_atomically(path: Path, export):
    """export(name) writes a whole file at `name`; it replaces `path` only once complete (same folder, one rename).
    The temporary name keeps path's suffix: the profiler picks the format from it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        export(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def maybe_profile(name, device, written: list = None):
    """With --profile NAME: a Chrome/Perfetto trace, a key-averages table and (CUDA) a memory timeline in outputs/,
    each written atomically. The files written are appended to `written` when given (the caller reports them after
    its own output), else named on stderr."""
    if not name or not tp.is_main():  # tensor parallel: rank 0's profile
        yield
        return
    check_profile_name(name)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=True, with_flops=True)
    with quiet_profiler_logs():
        prof.start()
    try:
        yield
    finally:
        with quiet_profiler_logs():
            prof.stop()
    paths = [OUTPUTS / f"{name}{suffix}" for suffix in PROFILE_SUFFIXES[:3 if device.type == "cuda" else 2]]
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with quiet_profiler_logs():
        export_atomically(paths[0], prof.export_chrome_trace)
        atomic_write_text(paths[1], prof.key_averages().table(sort_by=sort_by, row_limit=40))
        if device.type == "cuda":
            export_atomically(paths[2], lambda tmp: prof.export_memory_timeline(tmp, device=str(device)))
    names = [str(path.relative_to(OUTPUTS.parent)) for path in paths]
    if written is None:
        print(f"profile: wrote {', '.join(names)} (open the trace in https://ui.perfetto.dev)", file=sys.stderr)
    else:
        written.extend(names)


# ---------------------------------------------------------------- command line


def whole_number(minimum: int, meaning: str = "", maximum: int = None):
    """An argparse type: an int in minimum..maximum, else one line saying what is accepted."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}{meaning}, got {value}")
        return value
    return parse


def temperature_value(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 = greedy), got {text}")
    return value


def positive_number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def add_common_arguments(parser, suppress=False):
    """Options accepted before and after the strategy subcommand (the seed README puts some after it)."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--checkpoint_path", type=Path, default=default(None),
                        help="model.pth (gpt-fast layout), a .gguf file or a HF directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=default("Once upon a time,"),
                        help="the prompt text; @FILE reads it from a UTF-8 file, - from standard input, @@TEXT is "
                             "the text @TEXT; empty: start from the tokenizer's BOS token")
    parser.add_argument("--prompts_file", type=Path, default=default(None),
                        help="many prompts, one a line (UTF-8; \\n in a line is a newline, \\\\ a backslash), run "
                             "--batch_size at a time, each with its own length and end; replaces --prompt")
    parser.add_argument("--out", type=Path, default=default(None),
                        help="write every completion as JSON lines to this file (prompt, completion, tokens, "
                             "finish_reason), in input order, atomically")
    parser.add_argument("--chat", action="store_true", default=default(False),
                        help="wrap the prompt as a user message in the checkpoint's own chat template")
    parser.add_argument("--system", metavar="TEXT", default=default(None),
                        help="with --chat: a system message before the prompt")
    parser.add_argument("--max_new_tokens", type=whole_number(1), default=default(200))
    parser.add_argument("--num_samples", type=whole_number(1), default=default(1))
    parser.add_argument("--batch_size", type=whole_number(1), default=default(1),
                        help="sequences decoded together: copies of --prompt, or that many prompts of "
                             "--prompts_file at a time (every row is shown)")
    parser.add_argument("--temperature", type=temperature_value, default=default(0.0), help="0 = greedy")
    parser.add_argument("--top_k", type=whole_number(0, " (0 = no top-k)"), default=default(None),
                        help="sample among the k most likely tokens; 0 or unset: among all tokens")
    parser.add_argument("--seed", type=whole_number(-2**63, "", 2**64 - 1), default=default(1234))
    parser.add_argument("--device", default=default("cuda" if torch.cuda.is_available() else "cpu"),
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=default(None),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max_seq_length", type=whole_number(1), default=default(None),
                        help="tokens the cache is sized for (default: prompt + max_new_tokens, at most the model's "
                             "context); checked against free memory before anything is allocated")
    parser.add_argument("--prefill_chunk_size", type=whole_number(1), default=default(512),
                        help="prompt tokens fed at a time: each chunk attends to the cache so far and itself, so "
                             "prefill memory grows with chunk x prompt, not prompt^2")
    parser.add_argument("--max_batch_size", type=whole_number(1), default=default(None),
                        help="with --prompts_file: continuous batching, up to N sequences at once; when one ends the "
                             "next prompt takes its place (instead of --batch_size batches)")
    parser.add_argument("--paged", action="store_true", default=default(False),
                        help="page the KV cache in one pool of blocks shared by every sequence (taken on demand, "
                             "returned at the end; full shares prompt prefixes)")
    parser.add_argument("--block_size", type=whole_number(1), default=default(DEFAULT_BLOCK_SIZE),
                        help="with --paged: tokens per block (quantize_kv rounds up to whole key groups)")
    parser.add_argument("--num_blocks", type=whole_number(2), default=default(None),
                        help="with --paged: blocks in the pool, the null block included (default: every sequence "
                             "can reach --max_seq_length)")
    parser.add_argument("--kv_memory_gb", type=positive_number, default=default(None),
                        help="with --paged: size the pool to this many GiB of KV memory (instead of --num_blocks)")
    parser.add_argument("--compile", action="store_true", default=default(False),
                        help="torch.compile the decode step (CUDA graphs on GPU); compilation is timed apart")
    parser.add_argument("--profile", metavar="NAME", default=default(None),
                        help="write a torch.profiler trace and table as outputs/NAME* (NAME: letters, digits, - _ .)")
    parser.add_argument("--replicate_kv_heads", action="store_true", default=default(False),
                        help="tensor parallel (torchrun) with more ranks than KV heads: copy each KV head to "
                             "ranks / KV heads ranks (tp.py)")
    parser.add_argument("--quantize", choices=weight_quant.MODES, default=default(None),
                        help="weight-only quantization of the linears with torchao (weight_quant.py): int8 per "
                             "channel, int4 per group (on CUDA bfloat16 only)")
    parser.add_argument("--weight_group_size", type=whole_number(1), default=default(None),
                        help=f"with --quantize int4: input columns per scale (default {weight_quant.DEFAULT_GROUP_SIZE}"
                             f" when it divides every linear's width, else {weight_quant.FALLBACK_GROUP_SIZE})")
    parser.add_argument("--plan", action="store_true", default=default(False),
                        help="print the memory plan per GPU (weights, KV cache, the largest batch and context that "
                             "fit --memory_gb) from the checkpoint's config, without loading weights, and stop")
    parser.add_argument("--tp", type=whole_number(1), default=default(None),
                        help="with --plan: tensor-parallel ranks to plan for (under torchrun: its world size)")
    parser.add_argument("--memory_gb", type=positive_number, default=default(None),
                        help="with --plan: GiB of memory per GPU (default: what the device has free)")


def one_line_error(message):
    """Bad command lines get one line naming the fix, never a usage dump."""
    sys.exit(f"error: {message} (see --help)")


def build_parser(description=__doc__, add_arguments=add_common_arguments) -> argparse.ArgumentParser:
    """One subcommand per strategy; add_arguments(parser, suppress) adds the options taken before and after it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = one_line_error
    add_arguments(parser)
    subparsers = parser.add_subparsers(dest="strategy", metavar="{" + ",".join(kv_cache.STRATEGIES) + "}",
                                       help="KV-cache strategy (default: full)")
    for name, cache_cls in kv_cache.STRATEGIES.items():
        sub = subparsers.add_parser(name, help=cache_cls.help, description=cache_cls.__doc__)
        cache_cls.add_arguments(sub)
        add_arguments(sub, suppress=True)
        sub.error = one_line_error
    parser.set_defaults(strategy="full")
    return parser


def strategy_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The subcommand's own options, as the cache's keyword arguments."""
    common = {action.dest for action in parser._actions}
    return {k: v for k, v in vars(args).items() if k not in common}


def resolve_device_dtype(device_name: str, dtype_name):
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"--device {device_name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible: run with --device cpu (or on a GPU node)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device_name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible: "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps but no Apple GPU is available: run with --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {device_name}: generate.py runs on cpu or cuda (cuda:N), not {device.type}")
    dtype = DTYPES[dtype_name] if dtype_name else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def read_prompts_file(path: Path) -> list[str]:
    """One prompt a line (UTF-8); a backslash escapes the next character: \\n is a newline, \\\\ a backslash.
    Blank lines are skipped."""
    try:
        text = read_prompt(f"@{path}")
    except ValueError as e:
        raise ValueError(str(e).replace(f"--prompt @{path}", f"--prompts_file {path}")) from None
    prompts = [re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), line)
               for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {path} holds no prompt: write one prompt a line")
    return prompts


def read_prompt(value: str) -> str:
    """--prompt TEXT as it is, @FILE the file's text, - standard input (both UTF-8, read exactly as written, a
    trailing newline included); @@TEXT is the literal text @TEXT."""
    if value.startswith("@@"):
        return value[1:]
    if value == "-":
        source = "standard input"
        data = sys.stdin.buffer.read()
    elif value.startswith("@"):
        path = Path(value[1:])
        source = str(path)
        if not path.is_file():
            raise ValueError(f"--prompt {value}: {path} " + ("is a folder" if path.is_dir() else "does not exist") +
                             ": give an existing text file after @ (@@TEXT for a prompt that starts with @)")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"--prompt {value}: cannot read {path} ({e.strerror}): check its permissions") from None
    else:
        return value
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not part of the prompt
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt {value}: {source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start}): convert it to UTF-8 (e.g. iconv -t UTF-8)") from None


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".gguf", ".safetensors")


def check_checkpoint_path(path: Path):
    """Fail fast, before the tokenizer and the weights load, on a path that cannot be a checkpoint: the same
    layouts checkpoint.load_checkpoint reads."""
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path} — {SETUP_HINT}")
    if path.is_dir():
        hf = (path / "config.json").is_file() and any(path.glob("*.safetensors"))
        if not (hf or (path / "model.pth").is_file() or len(list(path.glob("*.gguf"))) == 1):
            raise ValueError(f"no checkpoint in {path}: expected model.pth with model_args.json, one .gguf file, or "
                             "config.json with *.safetensors — convert one with scripts/convert_hf_checkpoint.py, "
                             "or pass the checkpoint file itself as --checkpoint_path")
    elif path.suffix not in CHECKPOINT_SUFFIXES and path.name != "config.json":
        raise ValueError(f"{path} is not a checkpoint file: pass a model.pth (model_args.json beside it), a .gguf "
                         "file or a Hugging Face directory as --checkpoint_path")


def check_options(args):
    """Options that contradict each other, or name files that cannot be written: checked before any loading."""
    if args.system is not None and not args.chat:
        raise ValueError("--system is a chat message: add --chat (or put the text into --prompt)")
    if args.prompts_file is not None and args.num_samples > 1:
        raise ValueError("--num_samples repeats one --prompt: with --prompts_file write a prompt on several lines")
    if args.max_batch_size is not None:
        if args.prompts_file is None:
            raise ValueError("--max_batch_size admits the prompts of --prompts_file as sequences end: add "
                             "--prompts_file (or use --batch_size for copies of --prompt)")
        if args.batch_size > 1:
            raise ValueError("--max_batch_size (continuous batching) replaces --batch_size (static batches): "
                             "give one of them")
    if not args.paged:
        given = [flag for flag, value in (("--num_blocks", args.num_blocks), ("--kv_memory_gb", args.kv_memory_gb),
                                          ("--block_size", args.block_size != DEFAULT_BLOCK_SIZE or None)) if value]
        if given:
            raise ValueError(f"{given[0]} sizes the paged pool: add --paged")
    if args.num_blocks is not None and args.kv_memory_gb is not None:
        raise ValueError("--num_blocks and --kv_memory_gb both size the pool: give one of them")
    if not args.plan:
        given = [flag for flag, value in (("--tp", args.tp), ("--memory_gb", args.memory_gb)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} is for --plan (add it); tensor parallel runs under torchrun "
                             "(scripts/launch.py)")
    if args.weight_group_size is not None and args.quantize != "int4":
        raise ValueError("--weight_group_size sets int4's groups: add --quantize int4 (int8 is per channel)")
    if args.out is not None:
        check_writable_file(args.out)
    if args.profile is not None:  # "" too: a name that is no name
        check_profile_name(args.profile)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def prompt_tokens(tokenizer, text: str, chat: bool, system) -> list[int]:
    """The prompt's token ids: the chat template's rendering (which adds BOS itself where the model wants it,
    as transformers' apply_chat_template) or the text after BOS when the tokenizer asks for one. An empty prompt
    starts from BOS."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat: this checkpoint has no chat template (no chat_template in its "
                             "tokenizer_config.json or GGUF metadata): drop --chat and write the prompt in the "
                             "model's own format")
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": text})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
        if not ids:
            raise ValueError("--chat: the checkpoint's chat template rendered nothing: fix its chat_template")
        return ids
    ids = ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(text)
    if ids:
        return ids
    if tokenizer.bos_id is None:
        raise ValueError("the prompt is empty and this tokenizer has no BOS token to start from: give --prompt TEXT")
    return [tokenizer.bos_id]


def run(args, options):
    if args.plan:  # before the device check: a GPU run can be planned on a machine without one
        import plan
        return plan.run(args, options)
    # Everything that can be checked without the weights is checked first, so a bad command line fails in seconds.
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    device = tp.rank_device(device)  # under torchrun: this rank's GPU
    check_options(args)
    weight_quant.check_mode(args.quantize, device, dtype)
    kv_cache.base.attn_impl_for(options.get("attn_impl"), device)  # e.g. --attn_impl triton on a CPU
    if args.top_k and args.temperature == 0:
        warn("--top_k has no effect with --temperature 0 (greedy decoding): set --temperature to sample")
    texts = read_prompts_file(args.prompts_file) if args.prompts_file else [read_prompt(args.prompt)]
    checkpoint_path = args.checkpoint_path or default_checkpoint_path()
    check_checkpoint_path(checkpoint_path)  # first: a missing checkpoint names the set-up fix
    weight_quant.checkpoint_mode(args.quantize, checkpoint_path)  # --quantize against a quantized checkpoint
    from tokenizer import load_tokenizer  # imported here: scripts/bench_decode.py uses this file without gguf
    tokenizer = load_tokenizer(checkpoint_path)
    prompts = [prompt_tokens(tokenizer, text, args.chat, args.system) for text in texts]
    # --prompt: batch_size copies of it; --prompts_file: batch_size prompts at a time, in input order.
    batches = ([[prompts[0]] * args.batch_size] if args.prompts_file is None else
               [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)])
    continuous = args.max_batch_size is not None
    batch_size = min(args.max_batch_size, len(prompts)) if continuous else max(map(len, batches))
    T = max(map(len, prompts))
    total = T + args.max_new_tokens
    torch.manual_seed(args.seed)
    tp.init(device)  # under torchrun: the process group (after the checks every rank makes alike)
    model = load_model(checkpoint_path, device, dtype, args.replicate_kv_heads)
    weight_quant.quantize_weights(model, args.quantize, args.weight_group_size)  # after sharding: each rank its own

    largest_id = max(max(ids) for ids in prompts)
    if largest_id >= model.args.vocab_size:
        raise ValueError(f"the tokenizer gives token id {largest_id} but the model has {model.args.vocab_size} "
                         f"embeddings: {checkpoint_path}'s tokenizer files belong to another model")
    trained = model.args.max_position_embeddings
    max_seq_length = args.max_seq_length or min(total, trained)
    capacity = kv_cache.STRATEGIES[args.strategy].capacity(options, max_seq_length)
    if capacity is not None and total > capacity:
        raise ValueError(f"prompt ({T} tokens) + --max_new_tokens ({args.max_new_tokens}) = {total} tokens but the "
                         f"{args.strategy} cache holds {capacity}: raise --max_seq_length, shorten the prompt or use compress_kv")
    block_size = args.block_size if args.paged else None
    num_blocks = args.num_blocks
    if args.kv_memory_gb is not None:
        fixed, per_block = pool_bytes(model.args, args.strategy, options, batch_size, max_seq_length, block_size,
                                      dtype)
        num_blocks = blocks_in(args.kv_memory_gb * 2**30, fixed, per_block)
        if num_blocks < 2:
            raise ValueError(f"--kv_memory_gb {args.kv_memory_gb} holds {num_blocks} block(s) of "
                             f"{format_bytes(per_block)} beside {format_bytes(fixed)} of per-sequence state: raise it")
    chunk = min(args.prefill_chunk_size, T)
    check_memory(model, args.strategy, options, batch_size, max_seq_length, chunk, rope_length=total,
                 block_size=block_size, num_blocks=num_blocks)
    if max_seq_length > trained:
        warn(f"--max_seq_length {max_seq_length} is past the model's trained context ({trained} positions): "
             "text past it degrades (compress_kv keeps positions inside its window)")
    pool = setup_cache(model, args.strategy, options, batch_size, max_seq_length, rope_length=total,
                       block_size=block_size, num_blocks=num_blocks)
    if pool is not None and not continuous:  # static batches: every sequence of a batch runs to the end
        import scheduler
        scheduler.check_fits(model, prompts, args.max_new_tokens)
        need = max(sum(scheduler.worst_case_blocks(model, len(ids), args.max_new_tokens) for ids in batch)
                   for batch in batches)
        if need > pool.usable:
            raise ValueError(f"a batch of --batch_size {batch_size} needs up to {need} blocks of {pool.block_tokens} "
                             f"tokens but the pool has {pool.usable}: use --max_batch_size (continuous batching "
                             "admits prompts as blocks free), a smaller --batch_size, or raise --num_blocks")

    print(f"model: {checkpoint_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {dtype}, "
          f"{device}); cache: {args.strategy} {options}" + ("; chat template applied" if args.chat else ""))
    if tp.world_size() > 1:
        print(tp.describe(model))
    if weight_quant.mode_of(model):
        print(weight_quant.describe(model))
    decode_fn = decode_one_token
    compile_s = None
    if args.compile:
        decode_fn = compile_decode()
        if args.max_new_tokens > 1:  # a single new token never calls the decode step
            compile_s = warm_up(model, decode_fn, batch_size, args.temperature, args.top_k,
                                calls=min(3, max_seq_length))
    if args.prompts_file is None:
        results = generate_prompt(args, model, tokenizer, batches[0], texts[0], decode_fn, device)
    elif continuous:
        results = generate_continuously(args, model, tokenizer, prompts, texts, decode_fn, device)
    else:
        results = generate_prompts_file(args, model, tokenizer, batches, texts, decode_fn, device)
    report(args, model, results, compile_s, batch_size, max_seq_length, device)


def generate_prompt(args, model, tokenizer, batch, text, decode_fn, device) -> list[dict]:
    """--prompt: row 0 streams as it is generated, the other rows follow in full; --num_samples times."""
    shown_prompt = "" if args.chat else text  # in chat mode the answer is shown, not the template
    results, profile_files = [], []
    for i in range(args.num_samples):
        profiling = args.profile if i == args.num_samples - 1 else None  # profile the last, warmest sample
        streamer = TextStreamer(tokenizer, tokenizer.eos_ids)
        if len(batch) > 1:
            print(f"--- row 0 of {len(batch)} ---")
        print(shown_prompt, end="", flush=True)
        with maybe_profile(profiling, device, profile_files):
            out = generate_batch(model, batch, args.max_new_tokens, args.temperature, args.top_k, tokenizer.eos_ids,
                                 prefill_chunk=args.prefill_chunk_size, decode_fn=decode_fn, on_token=streamer)
        print()  # ends the streamed line before anything else is printed
        print_other_rows(tokenizer, out["tokens"], shown_prompt)
        out["profile_files"] = profile_files
        results.append(out)
    if args.out is not None:
        sequences = [seq for r in results for seq in r["sequences"]]
        write_jsonl(args.out, tokenizer, [text] * len(sequences), dict(enumerate(sequences)))
    return results


def generate_prompts_file(args, model, tokenizer, batches, texts, decode_fn, device) -> list[dict]:
    """--prompts_file: the prompts run --batch_size at a time; each completion is printed (and written to --out)
    in input order as its batch ends."""
    results, sequences, profile_files = [], [], []
    for i, batch in enumerate(batches):
        profiling = args.profile if i == len(batches) - 1 else None
        with maybe_profile(profiling, device, profile_files):
            out = generate_batch(model, batch, args.max_new_tokens, args.temperature, args.top_k, tokenizer.eos_ids,
                                 prefill_chunk=args.prefill_chunk_size, decode_fn=decode_fn)
        for seq in out["sequences"]:
            index = len(sequences)
            shown = "" if args.chat else texts[index]
            print(f"--- prompt {index} ({seq['finish_reason']}, {len(seq['tokens'])} tokens) ---")
            print(shown + tokenizer.decode(until_eos(seq["tokens"], tokenizer.eos_ids)))
            sequences.append(seq)
        if args.out is not None:  # after every batch: a run cut short keeps the completions it made
            write_jsonl(args.out, tokenizer, texts, dict(enumerate(sequences)))
        out["profile_files"] = profile_files
        results.append(out)
    return results


def generate_continuously(args, model, tokenizer, prompts, texts, decode_fn, device) -> list[dict]:
    """--prompts_file with --max_batch_size: continuous batching (scheduler.py); each completion is printed as it
    ends, and --out rewritten with every completion so far, in input order."""
    import scheduler
    done, profile_files = {}, []

    def on_sequence(index, seq):
        shown = "" if args.chat else texts[index]
        print(f"--- prompt {index} ({seq['finish_reason']}, {len(seq['tokens'])} tokens) ---")
        print(shown + tokenizer.decode(until_eos(seq["tokens"], tokenizer.eos_ids)))
        done[index] = seq
        if args.out is not None:
            write_jsonl(args.out, tokenizer, texts, done)

    with maybe_profile(args.profile, device, profile_files):
        out = scheduler.generate_continuous(model, prompts, args.max_new_tokens, args.temperature, args.top_k,
                                            tokenizer.eos_ids, args.prefill_chunk_size, decode_fn, on_sequence)
    out["profile_files"] = profile_files
    return [out]


def write_jsonl(path: Path, tokenizer, texts: list[str], sequences: dict):
    """sequences: input index -> sequence; written in input order."""
    rows = [json.dumps(dict(index=i, prompt=texts[i], completion=tokenizer.decode(until_eos(seq["tokens"],
                                                                                             tokenizer.eos_ids)),
                            tokens=seq["tokens"], finish_reason=seq["finish_reason"]), ensure_ascii=False)
            for i, seq in sorted(sequences.items())]
    if tp.is_main():  # tensor parallel: every rank has the same completions; rank 0 writes them
        atomic_write_text(path, "".join(row + "\n" for row in rows))


def report(args, model, results, compile_s, batch_size, max_seq_length, device):
    # With several samples the first is left out: it pays the warm-up of eager PyTorch (and of compilation when
    # --compile runs a single new token); --compile's own warm-up above already kept compilation out.
    timed = results[1:] if args.num_samples > 1 else results
    # Prompt tokens taken from shared blocks are not computed: they do not count as prefill speed.
    shared = sum(r["shared_tokens"] for r in results)
    prefill_tps = sum(r["prompt_tokens"] - r["shared_tokens"] for r in timed) / sum(r["prefill_s"] for r in timed)
    decode_tokens = sum(r["decode_tokens"] if "decode_tokens" in r else r["decode_steps"] * r["tokens"].shape[0]
                        for r in timed)
    decode_s = sum(r["decode_s"] for r in timed)
    held = kv_bytes(model)
    baseline = full_kv_bytes(model, batch_size, max_seq_length)
    sequences = [seq for r in results for seq in r["sequences"]]
    n_eos = sum(seq["finish_reason"] == "eos" for seq in sequences)
    print(f"prompt tokens: {sum(r['prompt_tokens'] for r in results)}, new tokens: {sum(len(seq['tokens']) for seq in sequences)} in "
          f"{len(sequences)} sequence(s) ({n_eos} ended at EOS), batch {batch_size}")
    shared_note = f" ({shared} prompt tokens shared from the pool, not computed)" if shared else ""
    decode_tps = decode_tokens / decode_s if decode_s else float("nan")
    print(f"prefill: {prefill_tps:.1f} tokens/s{shared_note}, decode: {decode_tps:.2f} tokens/s")
    if compile_s is not None:
        print(f"compile: {compile_s:.1f} s (compilation and warm-up of the decode step, before and apart from the "
              "timed decode)")
    print(f"KV cache: {held / 2**20:.2f} MiB allocated ({held / baseline:.3f}x the full cache's "
          f"{baseline / 2**20:.2f} MiB for {max_seq_length} tokens)")
    pool = pool_of(model)
    if pool is not None:
        pooled = sum(cache.pool_nbytes() for cache in model.caches())
        fixed, per_block = held - pooled, pooled // pool.num_blocks
        print(f"KV pool: {pool.usable} blocks of {pool.block_tokens} tokens (+ the null block), "
              f"{per_block / 2**10:.1f} KiB a block over all layers; peak {pool.peak_used} of {pool.usable} used: "
              f"{format_bytes(fixed + pool.peak_used * per_block)} in use of {format_bytes(held)} allocated")
    if "peak_running" in results[0]:
        print(f"continuous batching: up to {results[0]['peak_running']} sequences at once (--max_batch_size "
              f"{batch_size}), {results[0]['decode_steps']} decode steps")
    print(f"peak memory: {peak_memory_bytes(device) / 2**30:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    if args.out is not None:
        print(f"wrote {len(sequences)} completion(s) to {args.out}")
    profile_files = results[-1]["profile_files"]
    if profile_files:
        print(f"profile: wrote {', '.join(profile_files)} (open the trace in https://ui.perfetto.dev)")


def print_other_rows(tokenizer, tokens: torch.Tensor, shown_prompt: str):
    """Rows 1.. of a batch (row 0 was streamed), each up to its EOS; a row equal to row 0 (greedy) says so."""
    rows = [until_eos(row, tokenizer.eos_ids) for row in tokens.tolist()]
    for i, row in enumerate(rows[1:], start=1):
        if row == rows[0]:
            print(f"--- row {i} of {len(rows)}: the same text as row 0 ---")
        else:
            print(f"--- row {i} of {len(rows)} ---")
            print(shown_prompt + tokenizer.decode(row))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    options = strategy_options(args, parser)
    try:
        run(args, options)
    except (ValueError, FileNotFoundError, PoolExhausted) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")  # one line, whatever a library put into the message
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --max_seq_length or --batch_size, or use quantize_kv/compress_kv")
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "not enough memory" not in str(e):
            raise
        sys.exit("error: out of memory: lower --max_seq_length or --batch_size, or use quantize_kv/compress_kv")
    except KeyboardInterrupt:
        print(flush=True)
        sys.exit("error: interrupted")
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    tp.run(main)  # under torchrun: rank 0 prints, the others only their own errors
