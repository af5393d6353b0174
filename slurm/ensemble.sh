#!/usr/bin/env bash
# Ensemble the trained folds of one experiment: test-split metrics, then the HTML report.
#
#   sbatch slurm/ensemble.sh runs/EXPERIMENT          # slurm/train_folds.sh submits this for you,
#                                                     # after every fold of its array succeeded
# Environment: PYTHON (default: the checkout's .venv, else python3), EVALUATE_ARGS (extra
# `cxrdist evaluate` flags, e.g. "--split test --no-tta"), CXRDIST_HOME (the checkout).
#
#SBATCH --job-name=cxrdist-ensemble
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00

set -euo pipefail

(( $# == 1 )) || { echo "usage: sbatch slurm/ensemble.sh RUNS/EXPERIMENT" >&2; exit 2; }
runs=$1
root=${CXRDIST_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $root/.venv/bin/python ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "[ensemble $(date +%H:%M:%S)] $runs on ${SLURM_JOB_NODELIST:-$(hostname)}"
# shellcheck disable=SC2086  # EVALUATE_ARGS is a word list by design
"$PYTHON" -m cxrdist evaluate --runs "$runs" ${EVALUATE_ARGS:-}
"$PYTHON" -m cxrdist report --runs "$runs"
echo "[ensemble $(date +%H:%M:%S)] done"
