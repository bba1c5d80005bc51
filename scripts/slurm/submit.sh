#!/usr/bin/env bash
# Queue the whole matrix on a Slurm cluster: one array task per strategy, then the merge that renders the table.
#   bash scripts/slurm/submit.sh [extra sbatch options, e.g. --partition=gpu --account=myproj]
# Results: outputs/<job id>/ (one JSON per strategy, table.md, *.png); logs: outputs/slurm-<job id>_<task>.out.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/slurm/env.sh
entries=$($PYTHON scripts/run_matrix.py --list | wc -l)
job=$(sbatch --parsable --array=0-$((entries - 1)) "$@" scripts/slurm/matrix.sbatch)
job=${job%%;*}  # --parsable prints "id;cluster" on multi-cluster set-ups
merge=$(sbatch --parsable --dependency=afterany:"$job" --export=ALL,MATRIX_JOB_ID="$job" "$@" scripts/slurm/merge.sbatch)
echo "matrix: array job $job ($entries tasks), merge: job ${merge%%;*} -> outputs/$job/table.md"
