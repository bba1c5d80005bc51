"""generate.py --plan: what a run needs per GPU, from the checkpoint's config alone (no weight is read).

    python generate.py --checkpoint_path checkpoints/llama3-8b/model.pth --plan --device cuda --tp 2 \\
        --quantize int8 --batch_size 16 --max_seq_length 8192 --memory_gb 80 quantize_kv --bits 4

Every count is one the run itself makes, not a second formula:
  * weights: the parameters of a model of one rank's shard shape (tp.shard_args: query heads, KV heads and MLP
    channels / ranks; embedding, norms and output replicated) built on the meta device; a linear that
    weight_quant.quantize_weights quantizes counts weight_quant.linear_bytes for its shard, the rest numel x dtype;
  * KV cache: memory.predicted_kv_bytes for that shard shape (n_kv_head / ranks), the strategy and its options (paged
    too), batch and context;
  * the other buffers of a generation (RoPE tables, prefill logits): memory.predicted_generation_bytes, as check_memory.
The largest batch (at the context) and context (at the batch) are the largest for which weights + generation bytes
fit --memory_gb, found by memory.largest. tests/test_plan.py holds the counts to real allocations.
"""
import torch

import kv_cache
import memory
import tp
import weight_quant
from kv_cache.paging import DEFAULT_BLOCK_SIZE
from checkpoint import default_checkpoint_path, load_model_args
from cli_options import check_options, prompt_texts
from llm import prompt_tokens
from model import ModelArgs, Transformer
from runner import resolve_dtype

BATCH_LIMIT = 2**20  # the largest batch searched for


def weight_bytes(args: ModelArgs, dtype: torch.dtype, device_type: str, world: int = 1,
                 replicate_kv_heads: bool = False, mode=None, group_size=None) -> dict:
    """One rank's weights: linears (quantized with mode) and other (embedding, norms), the shard's shape (local_args)
    and the int4 group size used."""
    local = tp.shard_args(args, world, replicate_kv_heads)  # one line naming rank counts that work, when none does
    with torch.device("meta"):
        model = Transformer(local)
    linears = weight_quant.quantized_linears(model)
    group = weight_quant.resolve_group_size(mode, group_size, [m.in_features for m in linears.values()],
                                            device_type)
    linear_total = sum(weight_quant.linear_bytes(m.out_features, m.in_features, mode, group, dtype, device_type)
                       for m in linears.values())
    in_linears = {id(m.weight) for m in linears.values()}
    other = sum(p.numel() * dtype.itemsize for p in model.parameters() if id(p) not in in_linears)
    return {"linears": linear_total, "other": other, "weights": linear_total + other, "group_size": group,
            "n_linears": len(linears), "local_args": local}


def plan_bytes(args: ModelArgs, strategy: str, options: dict, batch_size: int, max_seq_length: int, prompt_len: int,
               rope_length: int, dtype: torch.dtype, device_type: str, world: int = 1,
               replicate_kv_heads: bool = False, mode=None, group_size=None, block_size=None,
               num_blocks=None, weights: dict = None) -> dict:
    """One rank's bytes: weight_bytes(), kv (the caches), buffers (RoPE tables and prefill logits) and total.
    weights: weight_bytes()' answer when already known (it does not depend on batch or context)."""
    weights = weights or weight_bytes(args, dtype, device_type, world, replicate_kv_heads, mode, group_size)
    local = weights["local_args"]
    kv = memory.predicted_kv_bytes(local, strategy, options, batch_size, max_seq_length, dtype, block_size, num_blocks)
    generation = memory.predicted_generation_bytes(local, strategy, options, batch_size, max_seq_length, prompt_len,
                                           rope_length, dtype, block_size, num_blocks)
    return {**weights, "kv": kv, "buffers": generation - kv, "total": weights["weights"] + generation}


def resolve(args, options) -> dict:
    """Everything the plan is made for, from the command line and the checkpoint's config; one-line ValueErrors."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N") from None
    dtype = resolve_dtype(args.dtype, device)
    check_options(args)
    world = args.tp or tp.world_size()
    if args.tp and tp.world_size() > 1 and args.tp != tp.world_size():
        raise ValueError(f"--tp {args.tp} but torchrun started {tp.world_size()} ranks: drop --tp or match them")
    checkpoint_path = args.checkpoint_path or default_checkpoint_path()
    model_args = load_model_args(checkpoint_path)
    mode = weight_quant.checkpoint_mode(args.quantize, checkpoint_path)
    held = mode if mode != args.quantize else None
    weight_quant.check_mode(mode, device, dtype)
    batch = args.max_batch_size or args.batch_size
    prompt_len = longest_prompt(args, checkpoint_path)
    trained = model_args.max_position_embeddings
    if prompt_len is None:
        if args.max_seq_length is None:
            raise ValueError(f"--plan: no tokenizer beside {checkpoint_path} to count the prompt's tokens: give "
                             "--max_seq_length")
        prompt_len = args.max_seq_length  # the most a prompt can be: the prefill logits are an upper bound
        total = args.max_seq_length
    else:
        total = prompt_len + args.max_new_tokens
    max_seq_length = args.max_seq_length or min(total, trained)
    block_size = (args.block_size or DEFAULT_BLOCK_SIZE) if args.paged else None
    num_blocks = args.num_blocks
    if args.kv_memory_gb is not None:
        local = tp.shard_args(model_args, world, args.replicate_kv_heads)
        fixed, per_block = memory.predicted_pool_bytes(local, args.strategy, options, batch, max_seq_length, block_size, dtype)
        num_blocks = max(2, memory.blocks_in(args.kv_memory_gb * 2**30, fixed, per_block))
    if args.memory_gb is not None:
        budget = int(args.memory_gb * 2**30)
    elif device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available()):
        budget = memory.available_memory_bytes(device)
    else:
        raise ValueError(f"--plan for {device.type} on a machine without one: give --memory_gb (its memory per GPU, "
                         "e.g. 80)")
    kv_cache.STRATEGIES[args.strategy].check_options(options, max_seq_length, model_args.head_dim, quiet=True)
    return dict(checkpoint_path=checkpoint_path, model_args=model_args, device=device, dtype=dtype, world=world,
                mode=mode, held=held, batch=batch, prompt_len=prompt_len, total=total, max_seq_length=max_seq_length,
                block_size=block_size, num_blocks=num_blocks, budget=budget)


def longest_prompt(args, checkpoint_path) -> int | None:
    """The longest prompt's tokens, as run() counts them; None when no tokenizer sits beside the config."""
    from tokenizer import load_tokenizer
    try:
        tokenizer = load_tokenizer(checkpoint_path)
    except ValueError:
        return None
    texts = prompt_texts(args)
    return max(len(prompt_tokens(tokenizer, text, args.chat, args.system)) for text in texts)


def run(args, options):
    """generate.py --plan: print the plan (a one-line ValueError when not even the weights, or one sequence, fit)."""
    r = resolve(args, options)
    a, dtype = r["model_args"], r["dtype"]
    chunk = min(args.prefill_chunk_size, r["prompt_len"])

    weights = weight_bytes(a, dtype, r["device"].type, r["world"], args.replicate_kv_heads, r["mode"],
                           args.weight_group_size)

    def counts(batch, length, num_blocks=r["num_blocks"]):
        return plan_bytes(a, args.strategy, options, batch, length, chunk, r["total"], dtype, r["device"].type,
                          block_size=r["block_size"], num_blocks=num_blocks, weights=weights)

    planned = counts(r["batch"], r["max_seq_length"])
    budget = r["budget"]
    fmt = memory.format_bytes
    where = f"--memory_gb {args.memory_gb:g}" if args.memory_gb is not None else f"free on {r['device']}"
    if planned["weights"] > budget:
        raise ValueError(f"the weights alone need {fmt(planned['weights'])} per GPU but {fmt(budget)} is "
                         f"{'given' if args.memory_gb is not None else 'free'}: use --quantize int8 or int4, more "
                         "--tp ranks, or a GPU with more memory")

    def fits(batch, length):  # paged: a pool where every sequence reaches the length (what admission reserves)
        try:
            return counts(batch, length, None)["total"] <= budget
        except ValueError:  # a length so short that the cache pages nothing (quantize_kv: all in sinks + window),
            return True  # so it needs less than any longer one

    trained = a.max_position_embeddings
    context_limit = max(trained, r["max_seq_length"])
    best_batch = memory.largest(lambda b: fits(b, r["max_seq_length"]), BATCH_LIMIT)
    best_context = memory.largest(lambda n: fits(r["batch"], n), context_limit)
    if not best_batch:
        alone = memory.largest(lambda n: fits(1, n), context_limit)
        raise ValueError(f"not even one sequence of {r['max_seq_length']} tokens fits in {fmt(budget)} per GPU beside "
                         f"{fmt(planned['weights'])} of weights: " +
                         (f"--max_seq_length {alone} fits at batch 1, or " if alone else "") +
                         "use --quantize, more --tp ranks, or a smaller cache (quantize_kv/compress_kv)")
    local = planned["local_args"]
    quant = {None: dtype_name(dtype), "int8": "int8 per channel (torchao)",
             "int4": f"int4 in groups of {planned['group_size']} (torchao)"}[r["mode"]]
    if r["held"]:
        quant += ", from the checkpoint"
    print(f"plan: {r['checkpoint_path']} (config only, no weight read): {a.n_layer} layers, {a.n_head} query / "
          f"{a.n_kv_head} KV heads of {a.head_dim}, dim {a.dim}, MLP {a.intermediate_size}, vocab {a.vocab_size}")
    print(f"per GPU: {r['world']} tensor-parallel rank(s) ({local.n_head} query / {local.n_kv_head} KV heads, "
          f"{local.intermediate_size} MLP channels each), {r['device'].type} {dtype_name(dtype)}, weights {quant}")
    print(f"  weights   {fmt(planned['weights']):>11}  ({planned['n_linears']} linears {fmt(planned['linears'])}; "
          f"embedding and norms {fmt(planned['other'])})")
    paged = f", paged in blocks of {r['block_size']}" if r["block_size"] else ""
    shown = {k: v for k, v in options.items() if v is not None}
    print(f"  KV cache  {fmt(planned['kv']):>11}  ({args.strategy} {shown}{paged}: batch {r['batch']} x "
          f"{r['max_seq_length']} tokens)")
    print(f"  buffers   {fmt(planned['buffers']):>11}  (RoPE tables, prefill logits of {chunk} tokens)")
    verdict = "fits" if planned["total"] <= budget else "does NOT fit"
    print(f"  total     {fmt(planned['total']):>11}  of {fmt(budget)} ({where}): {verdict}")
    more = " (the whole range searched)" if best_batch == BATCH_LIMIT else ""
    reserved = ", every sequence's blocks reserved" if r["block_size"] else ""
    print(f"largest batch at {r['max_seq_length']} tokens{reserved}: {best_batch}{more}")
    note = (" (the model's trained context, the most searched)" if best_context == trained == context_limit else
            " (the most searched)" if best_context == context_limit else "")
    print(f"largest context at batch {r['batch']}: {best_context} tokens{note}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
