#!/usr/bin/env bash
# Queue the whole matrix on a Slurm cluster: one array task per strategy, then the merge that renders the table.
#   bash scripts/slurm/submit.sh [extra sbatch options, e.g. --partition=gpu --account=myproj]
# Results: outputs/<job id>/ (one JSON per strategy, table.md, *.png); logs: outputs/slurm-<job id>_<task>.out.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v sbatch >/dev/null 2>&1; then
  echo "error: sbatch is not on PATH: run scripts/slurm/submit.sh on the cluster's login node (where Slurm is)" >&2
  exit 1
fi
source scripts/slurm/env.sh
# $EVAL_ARGS is word-split on purpose (a list of options): --windows there sets the number of entries, and --list
# checks every option now, not on the GPU node.
entries=$($PYTHON -m scripts.run_matrix --list $EVAL_ARGS | wc -l)
mkdir -p outputs  # Slurm does not create the folder of --output: without it a job fails without a log
job=$(sbatch --parsable --array=0-$((entries - 1)) "$@" scripts/slurm/matrix.sbatch)
job=${job%%;*}  # --parsable prints "id;cluster" on multi-cluster set-ups
merge=$(sbatch --parsable --dependency=afterany:"$job" --export=ALL,MATRIX_JOB_ID="$job" "$@" scripts/slurm/merge.sbatch)
echo "matrix: array job $job ($entries tasks), merge: job ${merge%%;*} -> outputs/$job/table.md"
