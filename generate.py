"""Generate text with a Llama-family model and a pluggable KV cache, gpt-fast style.

    python generate.py --prompt "Once upon a time," quantize_kv --sink_size 16 --window_size 32 --bits 4

The cache strategy is a subcommand (full by default); each file in kv_cache/ adds one. This file is the command
line only: the engine (engine.py) generates, memory.py sizes, runner.py runs the model.
"""
import json
import os
import sys
from pathlib import Path

import torch

import kv_cache
import tp
import weight_quant
from atomic import atomic_write_text
from checkpoint import default_checkpoint_path
from cli_options import (build_parser, check_checkpoint_path, check_options, prompt_texts, resolve_device_dtype,
                         strategy_options, warn)
from engine import Engine, SamplingParams
from kv_cache.paging import DEFAULT_BLOCK_SIZE, PoolExhausted
from llm import prompt_tokens, until_stop
from memory import (allocated_kv_bytes, blocks_in, check_block_size, check_memory, format_bytes, full_kv_bytes,
                    peak_memory_bytes, predicted_pool_bytes)
from profiling import maybe_profile
from scheduler import tokens_stored
from runner import Sampling, compile_decode, decode_one_token, load_model, pool_of, setup_cache, warm_up


def run(args, options):
    if args.plan:  # before the device check: a GPU run can be planned on a machine without one
        import plan
        return plan.run(args, options)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    device = tp.rank_device(device)  # under torchrun: this rank's GPU
    check_options(args)
    weight_quant.check_mode(args.quantize, device, dtype)
    notice = weight_quant.cpu_speed_notice(args.quantize, device)
    if notice:
        warn(notice)
    kv_cache.base.attn_impl_for(options.get("attn_impl"), device)  # e.g. --attn_impl triton on a CPU
    if args.top_k and args.temperature == 0:
        warn("--top_k has no effect with --temperature 0 (greedy decoding): set --temperature to sample")
    texts = prompt_texts(args)
    checkpoint_path = args.checkpoint_path or default_checkpoint_path()
    check_checkpoint_path(checkpoint_path)  # first: a missing checkpoint names the set-up fix
    weight_quant.checkpoint_mode(args.quantize, checkpoint_path)  # --quantize against a quantized checkpoint
    from tokenizer import load_tokenizer
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
    block_size = (args.block_size or DEFAULT_BLOCK_SIZE) if args.paged else None
    if args.block_size is not None:  # given, not the default: refused rather than silently rounded up
        check_block_size(model.args, args.strategy, options, max_seq_length, args.block_size)
    num_blocks = args.num_blocks
    if args.kv_memory_gb is not None:
        fixed, per_block = predicted_pool_bytes(model.args, args.strategy, options, batch_size, max_seq_length,
                                                block_size, dtype)
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
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or 0,
                            stop_ids=tuple(tokenizer.eos_ids))
    decode_fn = compile_decode() if args.compile else decode_one_token
    engine = Engine(model, decode_fn, args.prefill_chunk_size, seed=args.seed)
    for i, ids in enumerate(prompts):  # one line before any work when a prompt can never run
        engine.check(ids, params, f"prompt {i}" if len(prompts) > 1 else "the prompt")
    if pool is not None and not continuous:  # static batches: every sequence of a batch runs to the end
        need = max(sum(pool.space.blocks_for(tokens_stored(len(ids), args.max_new_tokens)) for ids in batch)
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
    compile_s = None
    if args.compile and args.max_new_tokens > 1:  # a single new token never calls the decode step
        sampling = None if args.temperature == 0 else Sampling.of(
            [(args.temperature, args.top_k or 0, 1.0, 0)] * batch_size, device)
        compile_s = warm_up(model, decode_fn, sampling, calls=min(3, max_seq_length))
        engine.reset()
    if args.prompts_file is None:
        results = generate_prompt(args, engine, tokenizer, batches[0], texts[0], params, device)
    elif continuous:
        results = generate_continuously(args, engine, tokenizer, prompts, texts, params, device)
    else:
        results = generate_prompts_file(args, engine, tokenizer, batches, texts, params, device)
    report(args, engine, results, compile_s, batch_size, max_seq_length, device)


def run_engine(engine: Engine, prompts: list, params, on_step=None) -> dict:
    """One engine.generate, with what the report needs: the requests and the engine's counts of this call."""
    before = dict(vars(engine.stats))
    done = engine.generate(prompts, params, on_step)
    counts = {key: value - before[key] for key, value in vars(engine.stats).items()}
    return {"requests": done, **counts}


def shown_text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(until_stop(tokens, tokenizer.eos_ids))


def generate_prompt(args, engine, tokenizer, batch, text, params, device) -> list[dict]:
    """--prompt: row 0 streams as it is generated, the other rows follow in full; --num_samples times."""
    shown_prompt = "" if args.chat else text  # in chat mode the answer is shown, not the template
    results, profile_files = [], []
    for i in range(args.num_samples):
        profiling = args.profile if i == args.num_samples - 1 else None  # profile the last, warmest sample
        streamer = TextStreamer(tokenizer, engine.next_id)
        if len(batch) > 1:
            print(f"--- row 0 of {len(batch)} ---")
        print(shown_prompt, end="", flush=True)
        with maybe_profile(profiling, device, profile_files):
            out = run_engine(engine, batch, params, streamer)
        print()  # ends the streamed line before anything else is printed
        rows = [until_stop(r.tokens, tokenizer.eos_ids) for r in out["requests"]]
        for j, row in enumerate(rows[1:], start=1):
            if row == rows[0]:
                print(f"--- row {j} of {len(rows)}: the same text as row 0 ---")
            else:
                print(f"--- row {j} of {len(rows)} ---")
                print(shown_prompt + tokenizer.decode(row))
        out["profile_files"] = profile_files
        results.append(out)
    if args.out is not None:
        requests = [r for out in results for r in out["requests"]]
        write_jsonl(args.out, tokenizer, [text] * len(requests), dict(enumerate(requests)))
    return results


def print_completion(args, tokenizer, texts, index, request):
    shown = "" if args.chat else texts[index]
    print(f"--- prompt {index} ({request.finish_reason}, {len(request.tokens)} tokens) ---")
    print(shown + shown_text(tokenizer, request.tokens))


def generate_prompts_file(args, engine, tokenizer, batches, texts, params, device) -> list[dict]:
    """--prompts_file: the prompts run --batch_size at a time; each completion is printed (and written to --out)
    in input order as its batch ends."""
    results, done, profile_files = [], {}, []
    for i, batch in enumerate(batches):
        profiling = args.profile if i == len(batches) - 1 else None
        with maybe_profile(profiling, device, profile_files):
            out = run_engine(engine, batch, params)
        for request in out["requests"]:
            print_completion(args, tokenizer, texts, len(done), request)
            done[len(done)] = request
        if args.out is not None:  # after every batch: a run cut short keeps the completions it made
            write_jsonl(args.out, tokenizer, texts, done)
        out["profile_files"] = profile_files
        results.append(out)
    return results


def generate_continuously(args, engine, tokenizer, prompts, texts, params, device) -> list[dict]:
    """--prompts_file with --max_batch_size: continuous batching; each completion is printed as it ends, and --out
    rewritten with every completion so far, in input order."""
    done, profile_files = {}, []
    first_id = engine.next_id

    def on_step(step):
        for request in step.finished:
            index = request.id - first_id
            print_completion(args, tokenizer, texts, index, request)
            done[index] = request
            if args.out is not None:
                write_jsonl(args.out, tokenizer, texts, done)

    with maybe_profile(args.profile, device, profile_files):
        out = run_engine(engine, prompts, params, on_step)
    out["profile_files"] = profile_files
    out["peak_running"] = engine.scheduler.peak_running
    return [out]


class TextStreamer:
    """Prints one request's text as its tokens arrive (an engine on_step), up to its stop token; decodes the whole
    tail so multi-byte characters print whole."""

    def __init__(self, tokenizer, request_id: int):
        self.tokenizer, self.request_id, self.ids, self.printed = tokenizer, request_id, [], ""

    def __call__(self, step):
        for request, token in step.tokens:
            if request.id != self.request_id or token in request.params.stop_ids:
                continue
            self.ids.append(token)
            text = self.tokenizer.decode(self.ids)
            if not text.endswith("\ufffd"):
                print(text[len(self.printed):], end="", flush=True)
                self.printed = text


def write_jsonl(path: Path, tokenizer, texts: list[str], requests: dict):
    """requests: input index -> finished request; written in input order."""
    rows = [json.dumps(dict(index=i, prompt=texts[i], completion=shown_text(tokenizer, r.tokens), tokens=r.tokens,
                            finish_reason=r.finish_reason), ensure_ascii=False)
            for i, r in sorted(requests.items())]
    if tp.is_main():  # tensor parallel: every rank has the same completions; rank 0 writes them
        atomic_write_text(path, "".join(row + "\n" for row in rows))


def report(args, engine, results, compile_s, batch_size, max_seq_length, device):
    # With several samples the first is left out: it pays the warm-up of eager PyTorch (and of compilation when
    # --compile runs a single new token); --compile's own warm-up above already kept compilation out.
    timed = results[1:] if args.num_samples > 1 else results
    # Prompt tokens taken from shared blocks are not computed: they do not count as prefill speed.
    shared = sum(r["shared_tokens"] for r in results)
    prefill_tps = sum(r["prompt_tokens"] - r["shared_tokens"] for r in timed) / sum(r["prefill_s"] for r in timed)
    decode_tokens = sum(r["decode_tokens"] for r in timed)
    decode_steps = sum(r["decode_steps"] for r in timed)
    decode_s = sum(r["decode_s"] for r in timed)
    model = engine.model
    held = allocated_kv_bytes(model)
    baseline = full_kv_bytes(model, batch_size, max_seq_length)
    requests = [r for out in results for r in out["requests"]]
    n_stop = sum(r.finish_reason == "stop" for r in requests)
    print(f"prompt tokens: {sum(r['prompt_tokens'] for r in results)}, new tokens: "
          f"{sum(len(r.tokens) for r in requests)} in {len(requests)} sequence(s) ({n_stop} ended at a stop token), "
          f"batch {batch_size}")
    shared_note = f" ({shared} prompt tokens shared from the pool, not computed)" if shared else ""
    decode_tps = decode_tokens / decode_s if decode_s else float("nan")
    steps_ps = decode_steps / decode_s if decode_s else float("nan")
    print(f"prefill: {prefill_tps:.1f} tokens/s{shared_note}, decode: {decode_tps:.2f} tokens/s generated "
          f"({steps_ps:.2f} batch steps/s)")
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
        used = (f"{batch_size} rows" if batch_size == args.max_batch_size else
                f"{batch_size} rows, one per prompt")
        print(f"continuous batching: up to {results[0]['peak_running']} sequences at once (--max_batch_size "
              f"{args.max_batch_size}: {used}), {results[0]['decode_steps']} decode steps")
    print(f"peak memory: {peak_memory_bytes(device) / 2**30:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    if args.out is not None:
        print(f"wrote {len(requests)} completion(s) to {args.out}")
    profile_files = results[-1]["profile_files"]
    if profile_files:
        print(f"profile: wrote {', '.join(profile_files)} (open the trace in https://ui.perfetto.dev)")


def main(argv=None):
    parser = build_parser(__doc__)
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
