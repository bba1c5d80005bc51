"""Tensor parallelism over torch.distributed, as gpt-fast's tp.py: the model is cut into N shards as it loads, and
model.py does not know.

    torchrun --nproc_per_node 3 generate.py --prompt "Once upon a time," quantize_kv --bits 4
    python scripts/launch.py --nproc_per_node 3 generate.py ...     # the same; a failed rank is one line

Each of the N ranks holds
  * attention: a contiguous block of n_head / N query heads and their n_kv_head / N KV heads: those rows of wqkv
    (the fused [q; k; v] rows, HF layout: q rows by query head, then k and v rows by KV head) and the same columns
    of wo;
  * MLP: intermediate_size / N channels: those rows of w1 (gate) and w3 (up) and columns of w2 (down);
  * the embedding, the output matrix and the norms whole (replicated).
wo and w2 then give partial sums, so there is one all-reduce after the attention and one after the MLP: forward
hooks on the two modules, through functional collectives, so a compiled decode step stays one graph. The rank's
model is an ordinary Transformer of shard_args' shape (n_head / N, n_kv_head / N, intermediate_size / N): model.args
describes the shard, generate.setup_cache builds every strategy's caches for the rank's KV heads only (KV memory
per GPU falls by N), and nothing in kv_cache/ knows about ranks. Weight quantization (weight_quant.py) goes after
sharding, on each rank's shard.

GQA stays exact: query head h reads KV head h // (n_head / n_kv_head), and a rank's query heads are exactly those of
its KV heads. With more ranks than KV heads, replicate_kv_heads (--replicate_kv_heads) copies each KV head to
N / n_kv_head ranks: each rank holds one KV head and n_head / N of its query heads.

Every rank ends with the same logits (the output matrix is whole on each, after the all-reduce), so with the same
seed every rank samples the same token: nothing is broadcast. Eviction policies (kv_cache/evict.py) score tokens per
KV head from that head's own query heads, which a rank holds together, so they choose as in one process.

Launch: torchrun (or scripts/launch.py) sets RANK, WORLD_SIZE and LOCAL_RANK; rank r takes cuda:LOCAL_RANK (NCCL)
or the CPU (gloo). Rank 0 prints and writes files; the others print only their own errors (run()). Collectives time
out after TP_TIMEOUT_S seconds (default 600), so a rank that stops makes the others stop rather than hang.
"""
import dataclasses
import datetime
import os
import signal
import sys
import traceback

import torch
import torch.distributed as dist

from model import ModelArgs, Transformer

TIMEOUT_ENV = "TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600
# What a collective raises when a peer process is gone or silent (gloo's words; NCCL raises DistBackendError).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
             "NCCL communicator was aborted", "ncclRemoteError")

_state = {"ready": False, "exiting": False}


# ---------------------------------------------------------------- ranks


def world_size() -> int:
    """Ranks in the job: WORLD_SIZE as torchrun sets it, 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The rank that prints and writes files (every process outside torchrun)."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: under torchrun, --device cuda means cuda:LOCAL_RANK (one GPU per rank); the CPU stays the
    CPU (gloo). Outside torchrun the device as given."""
    if world_size() == 1:
        return device
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"tensor parallel runs on cuda (NCCL) or cpu (gloo), not {device.type}: pass --device cuda")
    if device.index is not None:
        raise ValueError(f"--device {device} under torchrun: every rank takes its own GPU (cuda:LOCAL_RANK): pass "
                         "--device cuda")
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))  # checked by every rank alike
    if per_node > count:
        raise ValueError(f"{per_node} ranks on this node but it has {count} GPU(s): use --nproc_per_node {count} "
                         "or fewer")
    return torch.device("cuda", local)


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds > 0: unset it (default "
                         f"{DEFAULT_TIMEOUT_S}) or give e.g. {TIMEOUT_ENV}=300")
    return value


def init(device: torch.device):
    """Join the process group (torchrun's environment) once: NCCL on CUDA, gloo on the CPU, every collective timing out
    after TP_TIMEOUT_S. Nothing outside torchrun."""
    if world_size() == 1 or _state["ready"]:
        return
    timeout = datetime.timedelta(seconds=timeout_s())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    _state["ready"] = True
    _state["device"] = device


def _reduce(value: float, op) -> float:
    if not _state["ready"]:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_state["device"])
    dist.all_reduce(t, op=op)
    return t.item()


def min_over_ranks(value: float) -> float:
    """The smallest of every rank's value (a decision that must be the same on all ranks, e.g. what fits in the
    memory of the fullest GPU); the value itself outside tensor parallel."""
    return _reduce(value, dist.ReduceOp.MIN)


def everyone(flag: bool) -> bool:
    """True when the flag is true on every rank: a choice that leads to collectives (compute or read a cached
    file) must be made by all ranks alike, or the ranks wait on each other forever."""
    return bool(_reduce(1.0 if flag else 0.0, dist.ReduceOp.MIN))


# ---------------------------------------------------------------- sharding


def common_rank_counts(args: ModelArgs, limit: int = 64) -> list[int]:
    """Rank counts (2..limit) that split this shape without replication."""
    return [n for n in range(2, limit + 1)
            if args.n_head % n == 0 and args.n_kv_head % n == 0 and args.intermediate_size % n == 0]


def shard_args(args: ModelArgs, world: int, replicate_kv_heads: bool = False) -> ModelArgs:
    """The shape of one rank's shard: n_head / world query heads, n_kv_head / world KV heads (one, replicated, with
    replicate_kv_heads when there are more ranks than KV heads) and intermediate_size / world MLP channels; a
    one-line ValueError naming rank counts that work when the shape does not split."""
    if world == 1:
        return args
    fits = common_rank_counts(args)
    use = f"use {' or '.join(map(str, fits))} ranks" if fits else "this model does not split across ranks"
    if world > args.n_kv_head:
        if replicate_kv_heads and world % args.n_kv_head == 0 and args.n_head % world == 0 \
                and args.intermediate_size % world == 0:
            return dataclasses.replace(args, n_head=args.n_head // world, n_kv_head=1,
                                       intermediate_size=args.intermediate_size // world)
        replicable = [n for n in range(args.n_kv_head * 2, 65, args.n_kv_head)
                      if args.n_head % n == 0 and args.intermediate_size % n == 0]
        if replicate_kv_heads:
            raise ValueError(f"--replicate_kv_heads copies each of the {args.n_kv_head} KV heads to the same number "
                             f"of ranks, and {world} ranks cannot share the {args.n_head} query heads so: "
                             + (f"use {' or '.join(map(str, replicable))} ranks" if replicable else use))
        hint = (f", or --replicate_kv_heads with {' or '.join(map(str, replicable))} ranks (each KV head copied to "
                "several ranks)") if replicable else ""
        raise ValueError(f"{world} ranks but the model has {args.n_kv_head} KV heads: {use}{hint}")
    for what, count in (("query heads", args.n_head), ("KV heads", args.n_kv_head),
                        ("MLP channels (intermediate_size)", args.intermediate_size)):
        if count % world:
            raise ValueError(f"the model's {count} {what} do not split evenly over {world} ranks: {use}")
    return dataclasses.replace(args, n_head=args.n_head // world, n_kv_head=args.n_kv_head // world,
                               intermediate_size=args.intermediate_size // world)


def shard_pieces(args: ModelArgs, rank_: int, world: int, replicate_kv_heads: bool = False) -> dict:
    """{state-dict name: (dim, [(start, stop), ...])}: the slices of the full tensors that rank rank_ holds (the
    format checkpoint.load_checkpoint's `shard` reads); tensors not named are held whole."""
    local = shard_args(args, world, replicate_kv_heads)
    if world == 1:
        return {}
    hd = args.head_dim
    q0 = rank_ * local.n_head  # the rank's first query head, and the KV head it reads (its first KV head)
    kv0 = q0 * args.n_kv_head // args.n_head
    q = (q0 * hd, (q0 + local.n_head) * hd)
    k_start = (args.n_head + kv0) * hd
    v_start = k_start + args.n_kv_head * hd
    kv = local.n_kv_head * hd
    f0 = rank_ * local.intermediate_size
    mlp = (f0, f0 + local.intermediate_size)
    pieces = {}
    for i in range(args.n_layer):
        layer = f"layers.{i}."
        pieces[layer + "attention.wqkv.weight"] = (0, [q, (k_start, k_start + kv), (v_start, v_start + kv)])
        pieces[layer + "attention.wo.weight"] = (1, [q])
        pieces[layer + "feed_forward.w1.weight"] = (0, [mlp])
        pieces[layer + "feed_forward.w3.weight"] = (0, [mlp])
        pieces[layer + "feed_forward.w2.weight"] = (1, [mlp])
    return pieces


def _all_reduce_output(module, inputs, output):
    """Forward hook: sum the ranks' partial outputs of wo (attention) or w2 (MLP). A functional collective: traced
    by torch.compile into the graph (no graph break), waited on where the sum is first used."""
    import torch.distributed._functional_collectives as funcol
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def parallelize(model: Transformer, full_args: ModelArgs, replicate_kv_heads: bool = False) -> Transformer:
    """Make a model of shard_args' shape one rank's part: one all-reduce after each attention and each MLP (hooks on
    those modules, so they survive a swap of their Linears by weight quantization); model.tp_* say how it is split."""
    for layer in model.layers:
        layer.attention.register_forward_hook(_all_reduce_output)
        layer.feed_forward.register_forward_hook(_all_reduce_output)
    model.tp_world, model.tp_full_args, model.tp_replicated = world_size(), full_args, replicate_kv_heads
    return model


def load_model(checkpoint_path, device, dtype, replicate_kv_heads: bool = False) -> Transformer:
    """This rank's shard of a checkpoint (only its slices are read: checkpoint.load_checkpoint's shard), on
    `device`, with the all-reduces installed."""
    from checkpoint import load_checkpoint
    r, world = rank(), world_size()
    full_args, state_dict = load_checkpoint(checkpoint_path, dtype=dtype,
                                            shard=lambda args: shard_pieces(args, r, world, replicate_kv_heads))
    model = Transformer.from_state_dict(shard_args(full_args, world, replicate_kv_heads), state_dict, device=device,
                                        dtype=dtype)
    return parallelize(model, full_args, replicate_kv_heads)


def shard_model(model: Transformer, rank_: int, world: int, replicate_kv_heads: bool = False) -> Transformer:
    """A whole model's shard for rank rank_ (a copy; `model` is left as it is), all-reduces installed: the same
    shard load_model reads from a checkpoint."""
    from checkpoint import take_piece
    pieces = shard_pieces(model.args, rank_, world, replicate_kv_heads)
    weight = model.tok_embeddings.weight
    state_dict = {name: take_piece(t, pieces.get(name)).clone() for name, t in model.state_dict().items()}
    shard = Transformer.from_state_dict(shard_args(model.args, world, replicate_kv_heads), state_dict,
                                        device=weight.device, dtype=weight.dtype)
    parallelize(shard, model.args, replicate_kv_heads)
    shard.tp_world = world
    return shard


def all_reduce_bytes(args: ModelArgs, batch: int, tokens: int, dtype) -> int:
    """Bytes one forward of `tokens` tokens per sequence all-reduces: two (B, T, dim) sums per layer."""
    return 2 * args.n_layer * batch * tokens * args.dim * dtype.itemsize


def ring_bytes(message_bytes: int, world: int) -> int:
    """Bytes each rank sends (and receives) to all-reduce message_bytes in a ring: reduce-scatter then all-gather,
    each (world - 1) / world of the message."""
    return 2 * (world - 1) * message_bytes // world


def describe(model: Transformer) -> str:
    """One line: how the model is split (for the run's report)."""
    world = getattr(model, "tp_world", 1)
    if world == 1:
        return "tensor parallel: off"
    full, local = model.tp_full_args, model.args
    backend = dist.get_backend() if dist.is_initialized() else "not started"
    kv = (f"1 KV head (each of the {full.n_kv_head} copied to {world // full.n_kv_head} ranks)"
          if model.tp_replicated else f"{local.n_kv_head} of {full.n_kv_head} KV heads")
    return (f"tensor parallel: {world} ranks ({backend}); each holds {local.n_head} of {full.n_head} query heads, "
            f"{kv}, {local.intermediate_size} of {full.intermediate_size} MLP channels; params, KV cache and peak "
            "memory below are rank 0's")


# ---------------------------------------------------------------- one process per rank


def _lost_peer(e: BaseException) -> bool:
    """A collective's error: the backend's own (DistError), or gloo's RuntimeError about a peer that is gone."""
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in LOST_PEER))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _stopped(signum, frame):
    if _state["exiting"]:
        return
    raise SystemExit("error: stopped by the launcher: another rank failed (its error is above)")


def run(main, *args):
    """main(*args) as one rank of a tensor-parallel job (outside torchrun: just main(*args)). Rank 0 prints; the
    other ranks print nothing but their own errors, one line each, prefixed by their rank. What every rank meets
    alike is rank 0's line alone: bad input (ValueError, or any error before the process group is up), an
    interrupt, a lost peer (a rank that died, a collective that timed out) and the launcher's SIGTERM after another
    rank failed. A rank that fails leaves at once (os._exit): the destructors of a process group with a dead peer
    can hang."""
    if world_size() == 1:
        return main(*args)
    r, real_stderr = rank(), sys.stderr
    if r > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    signal.signal(signal.SIGTERM, _stopped)
    line, code = None, 0
    try:
        main(*args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            # Before the group is up every rank has run the same checks on the same input; after it, bad input
            # is still a ValueError. Either way rank 0 says it.
            same_everywhere = (not _state["ready"] or isinstance(e.__context__, (ValueError, KeyboardInterrupt))
                               or "stopped by the launcher" in e.code)
            line = e.code if r == 0 or not same_everywhere else None
            if isinstance(e.__context__, BaseException) and _lost_peer(e.__context__):
                line = _lost_peer_line(e.__context__) if r == 0 else None
    except BaseException as e:
        code = 1
        if _lost_peer(e):
            line = _lost_peer_line(e) if r == 0 else None
        elif r == 0:
            line = "".join(traceback.format_exception(e)).rstrip()
        else:
            line = f"error: {type(e).__name__}: {_one_line(e)}"
    _state["exiting"] = True
    if code == 0 and line is None:
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    sys.stdout.flush()
    if line:
        real_stderr.write((f"rank {r}: " if r > 0 else "") + line + "\n")
    real_stderr.flush()
    os._exit(code or 1)


def _lost_peer_line(e: BaseException) -> str:
    what = next((s.lower() for s in LOST_PEER if s in str(e)), f"{type(e).__name__}: {_one_line(e)[:120]}")
    return (f"error: lost contact with another rank ({what}): a rank failed or was stopped (its error is "
            f"above, or in its node's log); a silent rank times out after {TIMEOUT_ENV}={timeout_s():g} s")
