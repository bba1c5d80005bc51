"""The commands of README.md and docs/*.md work as written, at small sizes.

Every line of a ```bash block that starts with `.venv/bin/python`, `python` or `python3` (after optional VAR=value
assignments) runs, from the repository root, in a process of this interpreter (sys.executable):

  generate.py ...        as written plus `--max_new_tokens 2` (the last value given wins), on the embedded model;
  -m scripts.NAME ...    as written when it asks for something quick (--help, --list, --check, --dry-run), else
                         `-m scripts.NAME --help` (its real run is long): the module exists and its parser builds.

A line ending in a comment `# needs a GPU`, `# needs a cluster`, `# needs .venv-peers` or `# long` is not run (its
scripts module still gets its `--help` run). `printf ... > FILE` lines make FILE in a temporary folder and the
arguments naming it point there; `--out` / `--json` files land in that folder too, and `--profile NAME` gets a name
of its own whose files are removed afterwards.

Also: the README's two Python examples run (the API, and the eviction policy of "Adding a strategy", registered
and generating with evictions), its Layout table names every top-level entry and only those, and every relative
link and anchor in README.md and docs/ resolves.

Speed: one driver process of sys.executable imports torch once and forks a child per command, two at a time; the
child runs the command as `python` would (runpy: `-m` as run_module, a script as run_path, with its own sys.argv and
environment) and exits with its status. About 40 commands, each a fresh process, cost one torch import in all.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHECKPOINT = REPO / "checkpoints" / "smollm2-135m"
SKIP_MARKER = re.compile(r"(?:^|\s)#\s*(needs a GPU|needs a cluster|needs \.venv-peers|long)\b")
COMMAND = re.compile(r"^((?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*)(?:\.venv(?:-peers)?/bin/)?python3?\s+(.*)$")
QUICK = {"--help", "-h", "--list", "--check", "--dry-run", "--dry_run"}
SHELL_OPERATORS = set("();<>|&")
TIMEOUT_S = 240  # one command
PID = os.getpid()

# Runs jobs [{"argv": [...], "env": {...}}] read as JSON from stdin, WORKERS at a time, each in a forked child whose
# stdout and stderr go to OUT/<i>.out and OUT/<i>.err; prints one JSON line {"job": i, "status": s, "seconds": t}
# per job.
DRIVER = r"""
import atexit, importlib, json, os, runpy, signal, sys, threading, time, traceback

# The imports every command pays for (torch alone is seconds), paid once. No op runs here and no thread starts, so
# forking is safe; the repository's own modules are imported by each command itself.
for name in ("torch", "torch._dynamo", "numpy", "tokenizers", "jinja2", "safetensors", "gguf", "rouge_score.rouge_scorer",
             "matplotlib", "tqdm"):
    try:
        importlib.import_module(name)
    except Exception:
        pass
assert threading.active_count() == 1, "a thread started while importing: forking would not be safe"

OUT, WORKERS, TIMEOUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jobs = json.load(sys.stdin)


def child(i, job):
    os.dup2(os.open(f"{OUT}/{i}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(f"{OUT}/{i}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.environ.update(job["env"])
    signal.alarm(TIMEOUT)
    argv, status = job["argv"], 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


running = {}


def reap():
    pid, status = os.wait()
    i, start = running.pop(pid)
    print(json.dumps({"job": i, "status": os.waitstatus_to_exitcode(status), "seconds": time.time() - start}),
          flush=True)


for i, job in enumerate(jobs):
    while len(running) >= WORKERS:
        reap()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(i, job)
    running[pid] = (i, time.time())
while running:
    reap()
"""


@dataclass
class Line:
    doc: str  # README.md or docs/NAME.md
    number: int  # line in that file where the command starts
    text: str  # continuation lines joined
    skip: str = ""  # the marker, when the line is not run
    created: list = field(default_factory=list)  # printf lines: the files they make

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.number}"


def bash_lines(path: Path) -> list[Line]:
    """The lines of every ```bash block, continuation lines joined."""
    lines, inside, pending = [], False, None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            inside = not inside and stripped == "```bash"
            continue
        if not inside:
            continue
        if pending is not None:
            pending.text += " " + stripped.rstrip("\\").strip()
        else:
            pending = Line(str(path.relative_to(REPO)), number, stripped.rstrip("\\").strip())
        if not stripped.endswith("\\"):
            lines.append(pending)
            pending = None
    return lines


def python_blocks(path: Path) -> list[str]:
    blocks, current = [], None
    for raw in path.read_text(encoding="utf-8").splitlines():
        if current is None:
            current = [] if raw.strip() == "```python" else None
        elif raw.strip().startswith("```"):
            blocks.append("\n".join(current) + "\n")
            current = None
        else:
            current.append(raw)
    return blocks


def command_lines() -> list[Line]:
    found = []
    for path in DOCS:
        for line in bash_lines(path):
            if line.text.startswith("printf "):
                line.created = re.findall(r">\s*(\S+)\s*$", line.text)
                found.append(line)
            elif COMMAND.match(line.text):
                marker = SKIP_MARKER.search(line.text)
                line.skip = marker.group(1) if marker else ""
                found.append(line)
    return found


def shell_free(text: str) -> bool:
    """No unquoted pipe, redirection, && or subshell: one command the test can run without a shell."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    return not any(token and set(token) <= SHELL_OPERATORS for token in lexer)


def checkpoint_ready() -> bool:
    return all((CHECKPOINT / name).is_file() for name in ("model.pth", "model_args.json")) and any(
        (CHECKPOINT / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def split(line: Line):
    match = COMMAND.match(line.text)
    env = dict(assignment.split("=", 1) for assignment in shlex.split(match.group(1)))
    return env, shlex.split(match.group(2), comments=True)


def module_of(argv: list[str]):
    return argv[1] if len(argv) > 1 and argv[0] == "-m" else None


def plan(line: Line, files: dict, tmp: Path):
    """(env, argv) to run for a command line; a string when the test cannot run it."""
    if not shell_free(line.text):
        return f"{line.id}: a shell line (pipe, redirection, &&): mark it or make it one command"
    env, argv = split(line)
    module = module_of(argv)
    if module is not None:
        if not module.startswith("scripts."):
            return f"{line.id}: the test knows `-m scripts.NAME` and generate.py, not -m {module}: mark the line"
        return (env, argv) if QUICK & set(argv) else ({}, ["-m", module, "--help"])
    if not argv or argv[0] != "generate.py":
        return f"{line.id}: the test knows generate.py and `-m scripts.NAME`, not {argv[:1]}: mark the line"
    out = []
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if arg in files:
            arg = str(files[arg])
        elif arg.startswith("@") and arg[1:] in files:
            arg = "@" + str(files[arg[1:]])
        elif previous in ("--out", "--json"):
            arg = str(tmp / arg.replace("/", "_"))
        elif previous == "--profile":
            arg = f"readme{PID}_{arg}"
        out.append(arg)
    if not QUICK & set(out):
        out += ["--max_new_tokens", "2"]
    return env, out


def readme_block(marker: str) -> str:
    blocks = [b for b in python_blocks(REPO / "README.md") if marker in b]
    assert len(blocks) == 1, f"README.md should have one ```python block with {marker!r}"
    return blocks[0]


def api_example() -> str:
    """At small size: 2 new tokens, and a cache of one row of 64 positions (LLM's defaults, 8 rows of the model's
    whole context, cost the CPU's PyTorch path seconds a step with a quantized cache)."""
    small = ("import llm\n\n\nclass Small(llm.LLM):\n    def __init__(self, *args, **kwargs):\n"
             "        kwargs.setdefault('max_seq_length', 64)\n        kwargs.setdefault('max_batch_size', 1)\n"
             "        super().__init__(*args, **kwargs)\n\n\nllm.LLM = Small\n")
    code = re.sub(r"max_new_tokens=\d+", "max_new_tokens=2", readme_block("from llm import LLM"))
    checks = ('assert isinstance(outputs, list) and len(outputs) == 1\n'
              'assert {"text", "tokens", "finish_reason"} <= set(outputs[0]), outputs[0]\n'
              'assert 1 <= len(outputs[0]["tokens"]) <= 2, outputs[0]\n')
    return small + code + checks


def strategy_example(last_args: list[str]) -> str:
    """The example policy, loaded as the file it names would be, then generate.py with it."""
    block = readme_block("class DecayCache")
    first = block.splitlines()[0]
    assert first.startswith("# kv_cache/") and first.endswith(".py"), "the example should say where it goes"
    name = first[2:-3].replace("/", ".")
    argv = ["generate.py", "--prompt", "Once upon a time,", "--max_new_tokens", "12", "--temperature", "0",
            "decay", "--sink_size", "2", "--window_size", "4", "--budget", "10", *last_args]
    return (f"import runpy, sys, types\nimport kv_cache\nmodule = types.ModuleType({name!r})\n"
            f"sys.modules[{name!r}] = module\nexec(compile({block!r}, {first[2:]!r}, 'exec'), module.__dict__)\n"
            f"sys.argv = {argv!r}\nsys.path.insert(0, '.')\nrunpy.run_path('generate.py', run_name='__main__')\n")


LINES = command_lines()
RUNNABLE = [line for line in LINES if not line.created]
EXAMPLES = {"api": api_example, "strategy": lambda: strategy_example(["--decay", "0.8"]),
            "strategy --help": lambda: strategy_example(["--help"])}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """planned: line id -> job key or why it cannot run; done: job key -> (status, stdout, stderr), or None when
    it needs the embedded model and checkpoints/smollm2-135m is not prepared."""
    tmp = tmp_path_factory.mktemp("readme")
    files = {}
    for line in LINES:
        if line.created:
            subprocess.run(["bash", "-c", line.text], cwd=tmp, check=True)
            files.update({name: tmp / name for name in line.created})
    planned, keys = {}, {}
    for line in RUNNABLE:
        module = module_of(split(line)[1])
        if module and module.startswith("scripts."):  # every module named anywhere gets its --help run
            keys[((), ("-m", module, "--help"))] = False
        if not line.skip:
            step = plan(line, files, tmp)
            planned[line.id] = step if isinstance(step, str) else (tuple(sorted(step[0].items())), tuple(step[1]))
            if not isinstance(step, str):
                keys[planned[line.id]] = "generate.py" in step[1] and not QUICK & set(step[1])
    for name, code in EXAMPLES.items():
        try:
            planned[name] = ((), ("-c", code()))
            keys[planned[name]] = True
        except AssertionError as e:  # the README lost its example: that test fails, the others still run
            planned[name] = f"README.md: {e}"
    todo = [key for key, needs_model in keys.items() if not needs_model or checkpoint_ready()]
    out = tmp / "driver"
    out.mkdir()
    jobs = [dict(env=dict(env), argv=list(argv)) for env, argv in todo]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.run([sys.executable, "-c", DRIVER, str(out), "2", str(TIMEOUT_S)], input=json.dumps(jobs),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S * len(jobs))
    assert driver.returncode == 0, driver.stderr[-3000:]
    statuses = {r["job"]: r["status"] for r in map(json.loads, driver.stdout.splitlines())}
    done = {key: None for key in keys}
    for i, key in enumerate(todo):
        done[key] = (statuses[i], (out / f"{i}.out").read_text(errors="replace"),
                     (out / f"{i}.err").read_text(errors="replace"))
    for path in (REPO / "outputs").glob(f"readme{PID}_*"):
        path.unlink()
    return planned, done


def outcome(results, key_id):
    planned, done = results
    key = planned[key_id]
    if isinstance(key, str):
        pytest.fail(key)
    if done[key] is None:
        pytest.skip(f"{CHECKPOINT.relative_to(REPO)} is not prepared: bash scripts/setup.sh")
    return key, done[key]


def check_ran(what: str, key, result):
    status, stdout, stderr = result
    shown = " ".join(shlex.quote(a) for a in ["python", *key[1]])[:300]
    assert status == 0 and "Traceback" not in stderr, \
        f"{what}\nran: {shown}\nstatus {status}\n{stdout[-3000:]}\n{stderr[-3000:]}"


@pytest.mark.parametrize("line", RUNNABLE, ids=lambda line: line.id)
def test_command_runs(line, results):
    if line.skip:
        pytest.skip(f"marked: {line.skip}")
    key, result = outcome(results, line.id)
    check_ran(f"{line.id}: `{line.text}`", key, result)


def test_every_scripts_module_named_has_a_working_help(results):
    _, done = results
    helps = {key[1][1]: result for key, result in done.items() if key[1][0] == "-m" and key[1][2:] == ("--help",)}
    assert helps, "the docs name no scripts module"
    failed = {name: (r[1] + r[2])[-1500:] for name, r in helps.items() if r[0] != 0 or "usage" not in r[1].lower()}
    assert not failed, f"`python -m NAME --help` fails for {sorted(failed)}:\n" + "\n".join(failed.values())


def test_python_api_example_runs(results):
    key, result = outcome(results, "api")
    check_ran("README.md, Python API", key, result)


def test_adding_a_strategy_example_registers_and_evicts(results):
    """The example policy gets its subcommand and flags and generates past its budget (5 prompt + 12 new tokens in
    a budget of 10: tokens are scored and evicted)."""
    key, result = outcome(results, "strategy")
    check_ran("README.md, Adding a strategy", key, result)
    key, result = outcome(results, "strategy --help")
    check_ran("README.md, Adding a strategy: decay --help", key, result)
    assert "--decay" in result[1], result[1][-2000:]


def layout_entries() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout", 1)
    assert len(section) == 2, "README.md has no ## Layout section"
    body = section[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([^`]+)` \|", body, flags=re.M)
    assert names, "the Layout table has no rows of the form | `path` | what |"
    return [n.rstrip("/") for n in names]


def test_layout_table_names_every_top_level_entry():
    names = layout_entries()
    assert len(names) == len(set(names)), f"named twice: {sorted(n for n in names if names.count(n) > 1)}"
    missing_on_disk = [n for n in names if not (REPO / n).exists()]
    assert not missing_on_disk, f"the Layout table names what does not exist: {missing_on_disk}"
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    top = {path.split("/", 1)[0] for path in tracked.splitlines() if path}
    top = {name for name in top if not name.startswith(".") or name == ".ci"}
    unlisted = sorted(top - set(names))
    assert not unlisted, f"top-level entries missing from the README's Layout table: {unlisted}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(path: Path) -> set:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", without_code(path.read_text(encoding="utf-8")), flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: links that do not resolve: {broken}"
