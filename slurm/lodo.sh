#!/usr/bin/env bash
# Leave-one-dataset-out on SLURM: `cxrdist lodo` as jobs.
#
#   bash slurm/lodo.sh configs/multi.yaml [key=value ...]     # from a login node; it only submits
#
# For every dataset NAME of the config's data.shards it submits slurm/train_folds.sh's fold array on
# the other datasets (experiment EXPERIMENT-without-NAME, as `cxrdist lodo --plan` lists them; every
# train_folds.sh variable applies: NODES, GPUS_PER_NODE, TIME, requeue on preemption, ...), then one
# job that waits for all the arrays (afterok) and runs `cxrdist lodo --evaluate-only`: each
# ensemble on its training datasets' test split and on the dataset it left out, and the summary
# runs/EXPERIMENT/lodo/lodo.json. If a fold fails, that job is cancelled (--kill-on-invalid-dep=yes);
# resubmitting skips the folds that finished. Knobs: slurm/README.md.

set -uo pipefail

die() { echo "lodo.sh: error: $*" >&2; exit 2; }

ROOT=${CXRDIST_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f $ROOT/slurm/train_folds.sh ]] || die "cannot find the cxrdist checkout (looked in $ROOT); set CXRDIST_HOME"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PROCS_PER_NODE=${PROCS_PER_NODE:-2}

submit() {
    [[ -f $1 ]] || die "config $1: no such file"
    local config overrides=("${@:2}")
    config=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")  # as train_folds.sh: relative paths in it resolve against its folder
    [[ -z ${RUNS_DIR:-} ]] || overrides+=("output_dir=$RUNS_DIR")

    local plan info experiment output_dir
    plan=$("$PYTHON" -m cxrdist lodo --config "$config" --plan "${overrides[@]}") || exit 2
    info=$("$PYTHON" -m cxrdist info --no-manifest --config "$config" "${overrides[@]}") || exit 2
    IFS=$'\t' read -r experiment output_dir _ <<<"$info"
    [[ $output_dir = /* ]] || output_dir=$PWD/$output_dir
    local lodo_dir=$output_dir/$experiment/lodo
    mkdir -p "$lodo_dir"

    local ids=() name held_out_experiment shards id_file
    id_file=$(mktemp)
    # shellcheck disable=SC2034  # name: the first column, for the reader
    while IFS=$'\t' read -r name held_out_experiment shards; do
        ENSEMBLE=0 ARRAY_ID_FILE=$id_file bash "$ROOT/slurm/train_folds.sh" "$config" "${overrides[@]}" "$shards" \
            "experiment=$held_out_experiment" || { rm -f "$id_file"; die "submitting the folds of $held_out_experiment failed"; }
        ids+=("$(cat "$id_file")")
    done <<<"$plan"
    rm -f "$id_file"

    local var
    for var in $(compgen -e | grep -E '^(SLURM|SRUN)_' | grep -v '^SLURM_CONF$'); do unset "$var"; done
    local resources=(--nodes=1 --ntasks=1 --time="${ENSEMBLE_TIME:-02:00:00}")
    if (( GPUS_PER_NODE > 0 )); then
        resources+=(--gres=gpu:1 --cpus-per-task="${ENSEMBLE_CPUS:-${CPUS_PER_GPU:-8}}")
    else
        resources+=(--cpus-per-task="${ENSEMBLE_CPUS:-$((PROCS_PER_NODE * ${CPUS_PER_GPU:-1}))}")
    fi
    [[ -n ${PARTITION:-} ]] && resources+=(--partition="$PARTITION")
    [[ -n ${ACCOUNT:-} ]] && resources+=(--account="$ACCOUNT")
    # shellcheck disable=SC2206  # EXTRA_SBATCH_ARGS is a word list by design
    local extra=(${EXTRA_SBATCH_ARGS:-})
    local dependency summary_id
    dependency=afterok:$(IFS=:; echo "${ids[*]}")
    summary_id=$(sbatch --parsable --chdir="$PWD" "${resources[@]}" "${extra[@]}" --job-name="cxrdist-$experiment-lodo" \
        --dependency="$dependency" --kill-on-invalid-dep=yes --output="$lodo_dir/summary-%j.out" \
        --export=ALL,CXRDIST_SLURM_ROLE=lodo-summary,CXRDIST_HOME="$ROOT" \
        "$ROOT/slurm/lodo.sh" "$config" "${overrides[@]}") || die "sbatch of the summary job failed"
    summary_id=${summary_id%%;*}
    echo "lodo summary job: $summary_id (after fold arrays ${ids[*]})"
    echo "summary: $lodo_dir/lodo.json; log: $lodo_dir/summary-$summary_id.out"
}

(( $# >= 1 )) || die "usage: bash slurm/lodo.sh CONFIG.yaml [key=value ...]"
if [[ ${CXRDIST_SLURM_ROLE:-} == lodo-summary ]]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # shellcheck disable=SC2086  # LODO_ARGS is a word list by design
    exec "$PYTHON" -m cxrdist lodo --evaluate-only ${LODO_ARGS:-} --config "$@"
fi
submit "$@"
