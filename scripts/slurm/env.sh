# Sourced by the sbatch scripts and submit.sh: the cluster's environment. Edit these lines (or set the variables
# before calling submit.sh; sbatch passes the environment on).
#
# The jobs run ./.venv/bin/python, made once on the login node on top of the cluster's CUDA torch:
#   module load anaconda3 && conda activate your_env    # whatever provides your CUDA torch
#   VENV_ARGS=--system-site-packages bash scripts/setup.sh
# MODULES: the modules that torch needs at run time (the ones loaded above), e.g. MODULES="anaconda3"; empty: none.
# CONDA_ENV: run the jobs in this conda environment's python instead of ./.venv (it needs requirements.txt and the
# two --no-deps packages of scripts/setup.sh); empty: ./.venv.
MODULES="${MODULES-}"
CONDA_ENV="${CONDA_ENV-}"
# run_matrix.py / evaluate.py options for the GPU matrix (they override the CPU defaults): sink/window 16/32 and
# 64/256, the model's whole context, a stream past it, more prompts, retrieval up to 8k tokens.
EVAL_ARGS="${EVAL_ARGS---windows 16/32,64/256 --max_position 0 --max_tokens 4096 --stream_tokens 12288 --rouge_prompts 16 --prompt_tokens 1024 --new_tokens 128 --retrieval_tasks passkey,qa --retrieval_lengths 1024,2048,4096,8192 --retrieval_depths 0.1,0.3,0.5,0.7,0.9 --retrieval_samples 4}"

# Each missing piece is one line naming the fix, not a `command not found` in the middle of a job.
if [ -n "$MODULES" ]; then
  if ! command -v module >/dev/null 2>&1; then
    echo "error: MODULES=\"$MODULES\" but there is no \`module\` command here: set MODULES= (empty) in scripts/slurm/env.sh or the environment, or run where environment modules are set up" >&2
    exit 1
  fi
  module load $MODULES
fi
if [ -n "$CONDA_ENV" ]; then
  if ! command -v conda >/dev/null 2>&1; then
    echo "error: CONDA_ENV=\"$CONDA_ENV\" but there is no \`conda\` command: add the module that provides it to MODULES (e.g. MODULES=anaconda3), or set CONDA_ENV= (empty) to use ./.venv" >&2
    exit 1
  fi
  eval "$(conda shell.bash hook)"
  conda activate "$CONDA_ENV"
  PYTHON=python
else
  if [ ! -x .venv/bin/python ]; then
    echo "error: no .venv/bin/python: run \`VENV_ARGS=--system-site-packages bash scripts/setup.sh\` on the login node first (or set CONDA_ENV)" >&2
    exit 1
  fi
  PYTHON=.venv/bin/python
fi
