"""The command line shared by generate.py and the scripts: argparse types, the common options, one subcommand per
registered cache strategy, device and dtype, prompt input and the option checks made before anything loads."""
import argparse
import math
import re
import sys
from pathlib import Path

import torch

import kv_cache
import weight_quant
from checkpoint import SETUP_HINT
from kv_cache.paging import DEFAULT_BLOCK_SIZE
from profiling import check_profile_name
from atomic import check_writable_file
from runner import DTYPES, resolve_dtype

DEFAULT_PROMPT = "Once upon a time,"


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
    """Options accepted before and after the strategy subcommand (`generate.py quantize_kv --bits 4 --compile`
    reads as naturally as the other order)."""
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--checkpoint_path", type=Path, default=default(None),
                        help="model.pth (gpt-fast layout), a .gguf file or a HF directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=default(None),
                        help=f"the prompt text (default: {DEFAULT_PROMPT!r}); @FILE reads it from a UTF-8 file, - "
                             "from standard input, @@TEXT is the text @TEXT; empty: start from the tokenizer's BOS "
                             "token")
    parser.add_argument("--prompts_file", type=Path, default=default(None),
                        help="many prompts, one a line (UTF-8; \\n in a line is a newline, \\\\ a backslash, any other "
                             "backslash is kept), run "
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
    parser.add_argument("--block_size", type=whole_number(1), default=default(None),
                        help=f"with --paged: tokens per block (default {DEFAULT_BLOCK_SIZE}, which quantize_kv rounds up "
                             "to whole flush groups; a value given must be a multiple of them)")
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


def strategy_parser(strategy: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=strategy, exit_on_error=False)
    kv_cache.STRATEGIES[strategy].add_arguments(parser)
    return parser


def parse_strategy_options(strategy: str, argv: list[str]) -> dict:
    """A strategy's keyword arguments from its own command-line options (defaults filled in), e.g.
    parse_strategy_options("quantize_kv", ["--bits", "4"]); a one-line ValueError for bad ones."""
    if strategy not in kv_cache.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(kv_cache.STRATEGIES)}")
    try:
        return vars(strategy_parser(strategy).parse_args(argv))
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"{strategy} {' '.join(argv)}: {e}") from None


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
    dtype = resolve_dtype(dtype_name, device)
    return device, dtype


def prompt_texts(args) -> list[str]:
    """The run's prompts: the lines of --prompts_file, or --prompt (default DEFAULT_PROMPT)."""
    if args.prompts_file is not None:
        return read_prompts_file(args.prompts_file)
    return [read_prompt(DEFAULT_PROMPT if args.prompt is None else args.prompt)]


def read_prompts_file(path: Path) -> list[str]:
    """One prompt a line (UTF-8). Two escapes: \\n is a newline, \\\\ a backslash; any other backslash is kept as
    written (\\frac, C:\\Users stay intact). Blank lines are skipped."""
    try:
        text = read_prompt(f"@{path}")
    except ValueError as e:
        raise ValueError(str(e).replace(f"--prompt @{path}", f"--prompts_file {path}")) from None
    prompts = [re.sub(r"\\([n\\])", lambda m: "\n" if m.group(1) == "n" else "\\", line)
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
                                          ("--block_size", args.block_size)) if value is not None]
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
    if args.prompts_file is not None and args.prompt is not None:
        raise ValueError("--prompt and --prompts_file both give the prompts: give one of them")
    if args.out is not None:
        inputs = [Path(args.prompt[1:])] if args.prompt and args.prompt.startswith("@") and \
            not args.prompt.startswith("@@") else []
        inputs += [path for path in (args.prompts_file, args.checkpoint_path) if path is not None]
        for path in inputs:
            if args.out.resolve() == path.resolve():
                raise ValueError(f"--out {args.out} is an input of this run ({path}): write the completions to "
                                 "another file")
        check_writable_file(args.out)
    if args.profile is not None:  # "" too: a name that is no name
        check_profile_name(args.profile)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


