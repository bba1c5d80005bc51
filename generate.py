"""Generate text with a Llama-family model and a pluggable KV cache, gpt-fast style.

    python generate.py --prompt "Once upon a time," quantize_kv --sink_size 16 --window_size 32 --bits 4

The cache strategy is a subcommand (full by default); each file in kv_cache/ adds one.
"""
import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch

import kv_cache
from checkpoint import default_checkpoint_path, load_checkpoint
from model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUTPUTS = Path(__file__).resolve().parent / "outputs"


# ---------------------------------------------------------------- model and cache set-up


def load_model(checkpoint_path, device, dtype) -> Transformer:
    args, state_dict = load_checkpoint(checkpoint_path, dtype=dtype)  # cast as read: never two copies in memory
    return Transformer.from_state_dict(args, state_dict, device=device, dtype=dtype)


def setup_cache(model: Transformer, strategy: str, options: dict, batch_size: int, max_seq_length: int,
                rope_length: int = 0):
    """Give every layer a fresh cache of `strategy`; RoPE tables cover max(max_seq_length, rope_length) positions."""
    cache_cls = kv_cache.STRATEGIES[strategy]
    args = model.args
    cache_cls.check_options(options, max_seq_length, args.head_dim)
    weight = model.tok_embeddings.weight

    def make_cache(layer_idx):
        return cache_cls(batch_size, max_seq_length, args.n_kv_head, args.head_dim, weight.dtype, weight.device,
                         **options)

    model.setup_caches(make_cache, max(max_seq_length, rope_length))


def kv_bytes(model: Transformer) -> int:
    return sum(cache.nbytes() for cache in model.caches())


def full_kv_bytes(model: Transformer, batch_size: int, tokens: int) -> int:
    """What the plain 16-bit-or-model-dtype cache would hold for `tokens` tokens: the baseline of every ratio."""
    a = model.args
    return 2 * a.n_layer * batch_size * a.n_kv_head * a.head_dim * tokens * model.tok_embeddings.weight.element_size()


# ---------------------------------------------------------------- generation


def sample(logits: torch.Tensor, temperature: float, top_k) -> torch.Tensor:
    """Next token per row from the last position's logits (B, V): greedy when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = torch.where(logits < kth, float("-inf"), logits)
    probs = torch.softmax(logits.float(), dim=-1)
    # Exponential-race sampling: same distribution as multinomial without a device sync (gpt-fast's trick).
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1, keepdim=True)


def prefill(model: Transformer, tokens: torch.Tensor, start_pos: int = 0, chunk_size: int = None) -> torch.Tensor:
    """Feed tokens (B, T) at positions start_pos.. in chunks; return logits (B, T, V)."""
    chunk_size = chunk_size or tokens.shape[1]
    logits = []
    for begin in range(0, tokens.shape[1], chunk_size):
        chunk = tokens[:, begin:begin + chunk_size]
        input_pos = torch.arange(start_pos + begin, start_pos + begin + chunk.shape[1], device=tokens.device)
        logits.append(model(chunk, input_pos))
    return torch.cat(logits, dim=1)


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


def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature=0.0, top_k=None, eos_ids=(),
             prefill_chunk=None, decode_fn=decode_one_token, on_token=None) -> dict:
    """Generate up to max_new_tokens after prompt (B, T). Stops early when every row has produced an EOS."""
    B, T = prompt.shape
    device = prompt.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    next_token = sample(prefill(model, prompt, 0, prefill_chunk)[:, -1], temperature, top_k)
    synchronize()
    t1 = time.perf_counter()
    new_tokens, finished = [next_token], torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
    if on_token:
        on_token(next_token)
    for step in range(1, max_new_tokens):
        finished |= torch.isin(next_token[:, 0], eos)
        if eos.numel() and bool(finished.all()):
            break
        input_pos = torch.tensor([T + step - 1], device=device)
        next_token = decode_fn(model, next_token, input_pos, temperature, top_k).clone()
        new_tokens.append(next_token)
        if on_token:
            on_token(next_token)
    synchronize()
    t2 = time.perf_counter()
    return {"tokens": torch.cat(new_tokens, dim=1), "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_steps": len(new_tokens) - 1}


class TextStreamer:
    """Prints row 0's text as tokens arrive; decodes the whole tail so multi-byte characters print whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, token: torch.Tensor):
        self.ids.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux reports KiB)


@contextlib.contextmanager
def maybe_profile(name, device):
    """With --profile NAME: a Chrome/Perfetto trace, a key-averages table and (CUDA) a memory timeline in outputs/."""
    if not name:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    OUTPUTS.mkdir(exist_ok=True)
    with profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=True,
                 with_flops=True) as prof:
        yield
    prof.export_chrome_trace(str(OUTPUTS / f"{name}_trace.json"))
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=40)
    (OUTPUTS / f"{name}_table.txt").write_text(table)
    written = [f"{name}_trace.json", f"{name}_table.txt"]
    if device.type == "cuda":
        prof.export_memory_timeline(str(OUTPUTS / f"{name}_memory.html"), device=str(device))
        written.append(f"{name}_memory.html")
    print(f"profile: wrote {', '.join('outputs/' + w for w in written)} (open the trace in https://ui.perfetto.dev)")


# ---------------------------------------------------------------- command line


def add_common_arguments(parser, suppress=False):
    """Options accepted before and after the strategy subcommand (the seed README puts some after it)."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--checkpoint_path", type=Path, default=default(None),
                        help="model.pth (gpt-fast layout), a .gguf file or a HF directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=default("Once upon a time,"))
    parser.add_argument("--max_new_tokens", type=int, default=default(200))
    parser.add_argument("--num_samples", type=int, default=default(1))
    parser.add_argument("--batch_size", type=int, default=default(1), help="copies of the prompt decoded together")
    parser.add_argument("--temperature", type=float, default=default(0.0), help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=default(None))
    parser.add_argument("--seed", type=int, default=default(1234))
    parser.add_argument("--device", default=default("cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--dtype", choices=list(DTYPES), default=default(None),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max_seq_length", type=int, default=default(None),
                        help="tokens the cache is sized for (default: prompt + max_new_tokens)")
    parser.add_argument("--compile", action="store_true", default=default(False),
                        help="torch.compile the decode step (CUDA graphs on GPU)")
    parser.add_argument("--profile", metavar="NAME", default=default(None),
                        help="write a torch.profiler trace and table as outputs/NAME*")


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
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible: run with --device cpu (or on a GPU node)")
    dtype = DTYPES[dtype_name] if dtype_name else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def run(args, options):
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.num_samples < 1:
        raise ValueError("--max_new_tokens, --batch_size and --num_samples must be at least 1")
    checkpoint_path = args.checkpoint_path or default_checkpoint_path()
    torch.manual_seed(args.seed)
    from tokenizer import load_tokenizer  # imported here: scripts/bench_decode.py uses this file without gguf
    model = load_model(checkpoint_path, device, dtype)  # first: a missing checkpoint names the set-up fix
    tokenizer = load_tokenizer(checkpoint_path)

    prompt_ids = ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(args.prompt)
    T = len(prompt_ids)
    total = T + args.max_new_tokens
    max_seq_length = args.max_seq_length or min(total, model.args.max_position_embeddings)
    capacity = kv_cache.STRATEGIES[args.strategy].capacity(options, max_seq_length)
    if capacity is not None and total > capacity:
        raise ValueError(f"prompt ({T} tokens) + --max_new_tokens ({args.max_new_tokens}) = {total} tokens but the "
                         f"{args.strategy} cache holds {capacity}: raise --max_seq_length, shorten the prompt or use compress_kv")
    setup_cache(model, args.strategy, options, args.batch_size, max_seq_length, rope_length=total)
    prompt = torch.tensor([prompt_ids] * args.batch_size, device=device)

    decode_fn = decode_one_token
    if args.compile:
        decode_fn = compile_decode()

    print(f"model: {checkpoint_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {dtype}, "
          f"{device}); cache: {args.strategy} {options}")
    results = []
    for i in range(args.num_samples):
        for cache in model.caches():
            cache.reset()
        profiling = args.profile if i == args.num_samples - 1 else None  # profile the last, warmest sample
        streamer = TextStreamer(tokenizer)
        print(args.prompt, end="", flush=True)
        with maybe_profile(profiling, device):
            out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, tokenizer.eos_ids,
                           prefill_chunk=max_seq_length, decode_fn=decode_fn, on_token=streamer)
        print()
        results.append(out)

    timed = results[1:] if len(results) > 1 else results  # the first sample pays compilation and warm-up
    prefill_tps = sum(T * args.batch_size for _ in timed) / sum(r["prefill_s"] for r in timed)
    decode_tokens = sum(r["decode_steps"] * args.batch_size for r in timed)
    decode_s = sum(r["decode_s"] for r in timed)
    held = kv_bytes(model)
    baseline = full_kv_bytes(model, args.batch_size, max_seq_length)
    print(f"prompt tokens: {T}, new tokens: {results[-1]['tokens'].shape[1]} x batch {args.batch_size}")
    print(f"prefill: {prefill_tps:.1f} tokens/s, decode: {decode_tokens / decode_s if decode_s else float('nan'):.2f} tokens/s")
    print(f"KV cache: {held / 2**20:.2f} MiB allocated ({held / baseline:.3f}x the full cache's "
          f"{baseline / 2**20:.2f} MiB for {max_seq_length} tokens)")
    print(f"peak memory: {peak_memory_bytes(device) / 2**30:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    options = strategy_options(args, parser)
    try:
        run(args, options)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --max_seq_length or --batch_size, or use quantize_kv/compress_kv")


if __name__ == "__main__":
    main()
