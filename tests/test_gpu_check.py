"""scripts/gpu_check.py: without a GPU it asks for --tiny (one line, at once) instead of interpreting the real shapes
for many minutes, and its checks cover every Triton kernel file, quantize-on-append included, bit for bit.

(Meant for tests/test_gpu_check.py; tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, as done here too.)
"""
import os
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as tests/conftest.py does

import pytest  # noqa: E402

from scripts import gpu_check  # noqa: E402
from scripts.common import REPO_DIR  # noqa: E402

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def run_gpu_check(*argv, **env):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env)
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", *argv], cwd=REPO_DIR, capture_output=True,
                            text=True, env=environment, timeout=120)
    return result, time.perf_counter() - t0


@needs_no_gpu
@pytest.mark.parametrize("env", [{}, {"TRITON_INTERPRET": "1"}])
def test_without_a_gpu_it_asks_for_tiny(env):
    """Neither its own guard nor a TRITON_INTERPRET=1 left in the environment lets it interpret the 32k cases."""
    result, seconds = run_gpu_check(**env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "--tiny" in lines[0] and "GPU" in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""  # no table started: nothing ran
    assert seconds < 60


def test_every_triton_kernel_file_has_a_check():
    """Each kernels/*.py holding a @triton.jit kernel is checked by a generator in CHECKS."""
    kernel_files = {p.stem for p in (REPO_DIR / "kernels").glob("*.py") if "@triton.jit" in p.read_text()}
    checked = {"decode_attention": "check_decode_attention", "quantize_append": "check_quantize_into"}
    assert kernel_files == set(checked), kernel_files
    assert [check.__name__ for check in gpu_check.CHECKS] == list(checked.values())


QUANTIZE_ROWS = None


def quantize_rows():
    """The rows of check_quantize_into at tiny shapes (interpreted without a GPU), computed once."""
    global QUANTIZE_ROWS
    if QUANTIZE_ROWS is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator(device=device).manual_seed(1)
        QUANTIZE_ROWS = list(gpu_check.check_quantize_into(True, device, gen))
    return QUANTIZE_ROWS


@pytest.mark.parametrize("kind", [k for k, spec in gpu_check.KINDS.items() if spec is not None])
def test_quantize_into_check_passes_at_tiny_shapes(kind):
    rows = [r for r in quantize_rows() if r[1].split()[0] == kind]
    assert rows and {r[0] for r in rows} == {"quantize_into"}
    assert {r[1].split()[1] for r in rows} == {"flush", "bulk"}  # the decode flush and a many-tile write
    failing = [r for r in rows if not r[3] <= r[4]]
    assert not failing, failing


def test_quantize_into_check_catches_one_wrong_byte(monkeypatch):
    """The check is not vacuous: a kernel that writes one byte wrong fails it."""
    import kernels.quantize_append as quantize_append

    real = quantize_append.quantize_into

    def one_byte_off(k, v, rows, start, k_q, *rest):
        real(k, v, rows, start, k_q, *rest)
        k_q.view(torch.uint8)[0, 0, int(start), 0] ^= 1

    monkeypatch.setattr(quantize_append, "quantize_into", one_byte_off)
    monkeypatch.setattr(gpu_check, "HEADS", {True: gpu_check.HEADS[True][:1]})
    monkeypatch.setattr(gpu_check, "LENGTHS", {True: gpu_check.LENGTHS[True][:1]})
    monkeypatch.setattr(gpu_check, "KINDS", {"int8": (8, "token")})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = list(gpu_check.check_quantize_into(True, device, torch.Generator(device=device).manual_seed(0)))
    assert rows and all(r[3] > 0 and "k_q: 1 bytes differ" in r[5] for r in rows), rows
