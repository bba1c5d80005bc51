# Sourced by the sbatch scripts and submit.sh: the cluster's environment. Edit these lines (or set the variables
# before calling submit.sh; sbatch passes the environment on).
MODULES="${MODULES-anaconda3}"              # `module load $MODULES`; empty: no modules
CONDA_ENV="${CONDA_ENV-kv-cache}"           # `conda activate $CONDA_ENV`; empty: use ./.venv from scripts/setup.sh
# run_matrix.py / evaluate.py options for the GPU matrix (they override the CPU defaults): sink/window 16/32 and
# 64/256, the model's whole context, a stream past it, more prompts, retrieval up to 8k tokens.
EVAL_ARGS="${EVAL_ARGS---windows 16/32,64/256 --max_position 0 --max_tokens 4096 --stream_tokens 12288 --rouge_prompts 16 --prompt_tokens 1024 --new_tokens 128 --retrieval_tasks passkey,qa --retrieval_lengths 1024,2048,4096,8192 --retrieval_depths 0.1,0.3,0.5,0.7,0.9 --retrieval_samples 4}"

if [ -n "$MODULES" ]; then
  module load $MODULES
fi
if [ -n "$CONDA_ENV" ]; then
  eval "$(conda shell.bash hook)"
  conda activate "$CONDA_ENV"
  PYTHON=python
else
  PYTHON=.venv/bin/python
fi
