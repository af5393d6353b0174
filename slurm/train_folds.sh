#!/usr/bin/env bash
# Train every fold of an experiment on SLURM, then ensemble them.
#
#   sbatch slurm/train_folds.sh configs/paper.yaml [key=value ...]    # or: bash slurm/train_folds.sh ...
#
# Run outside a fold task, this script is the SUBMITTER: it reads the fold count from the shards'
# manifest, submits itself as a job array (one task per fold, each NODES x GPUS_PER_NODE) and
# slurm/ensemble.sh with an afterok dependency on the whole array, then exits. (An #SBATCH --array
# cannot depend on the manifest, hence the two stages; the #SBATCH lines below only size the
# small submitter job, the array gets its resources on the sbatch command line.)
#
# Inside a fold task it starts one `accelerate launch` per node with srun. SLURM sends USR1 to this
# script SIGNAL_BEFORE seconds ahead of the time limit (--signal=B:USR1@N); it is forwarded to
# the trainers, which checkpoint at the next step boundary and exit 75; the task then requeues
# itself and the next start resumes from the checkpoint, also on fewer nodes when NODES is a range
# (MIN-MAX): the sample order does not depend on the number of processes. With MAX_RESTARTS=N a
# rank that dies is restarted inside the task by the launcher (torch elastic), up to N times.
# Knobs: see slurm/README.md.
#
# No --ntasks here: the fold array is this script again, and a header's --ntasks=1 would shrink its
# --nodes=N (or MIN-MAX) to one node; the submission job gets SLURM's default of one task.
#SBATCH --job-name=cxrdist-submit
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00

set -uo pipefail

EXIT_PREEMPTED=75  # the trainer's "checkpointed, requeue me" (EX_TEMPFAIL)

die() { echo "train_folds.sh: error: $*" >&2; exit 2; }
log() { echo "[train_folds $(date +%H:%M:%S)] $*"; }
# The text with every URL in its display form (no user:password@, no query string): cxrdist's own rule.
redacted() {
    PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -c 'import sys; from cxrdist.data.location import redact; print(redact(sys.argv[1]))' "$1" \
        || echo "(not shown: cannot import cxrdist to hide credentials)"
}

repo_root() {
    # Under sbatch, $0 is slurmd's copy of the script in its spool directory: then the checkout is
    # found from the job's Command (the script path that was submitted) or the submit directory.
    local here script
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ -n ${CXRDIST_HOME:-} ]]; then
        echo "$CXRDIST_HOME"
    elif [[ -f $here/slurm/train_folds.sh ]]; then
        echo "$here"
    elif [[ -n ${SLURM_JOB_ID:-} ]] && script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1) && [[ -f $script ]]; then
        (cd "$(dirname "$script")/.." && pwd)
    else
        echo "${SLURM_SUBMIT_DIR:-$PWD}"
    fi
}

ROOT=$(repo_root)
[[ -f $ROOT/slurm/train_folds.sh ]] || die "cannot find the cxrdist checkout (looked in $ROOT); set CXRDIST_HOME"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$ROOT/cxrdist/train.py}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PROCS_PER_NODE=${PROCS_PER_NODE:-2}           # CPU processes per node when GPUS_PER_NODE=0
SIGNAL_BEFORE=${SIGNAL_BEFORE:-300}           # seconds before the time limit that USR1 arrives
MAX_REQUEUES=${MAX_REQUEUES:-50}
MAX_RESTARTS=${MAX_RESTARTS:-0}               # elastic restarts of failed trainers inside one start of the task
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}             # seconds the launchers wait at the start for every node

# ---------------------------------------------------------------------------------------------
# Stage 1: submit the fold array and the ensemble job.
# ---------------------------------------------------------------------------------------------

submit() {
    local config=$1; shift
    [[ -f $config ]] || die "config $config: no such file"
    config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
    local overrides=("$@")
    [[ -n ${RUNS_DIR:-} ]] && overrides+=("output_dir=$RUNS_DIR")
    [[ $NODES =~ ^[1-9][0-9]*(-[1-9][0-9]*)?$ ]] && (( ${NODES%-*} <= ${NODES#*-} )) \
        || die "NODES=$NODES: expected a number of nodes >= 1, or a range MIN-MAX (a requeued task may come back on fewer)"
    check_max_restarts
    [[ $RDZV_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "RDZV_TIMEOUT=$RDZV_TIMEOUT: expected a number of seconds >= 1"

    local info experiment output_dir num_folds
    # "EXPERIMENT OUTPUT_DIR NUM_FOLDS" (the fold count from the manifest, as `cxrdist train --fold all` takes it)
    local query=(info --config "$config")
    [[ -n ${FOLDS:-} ]] && query+=(--no-manifest)
    info=$("$PYTHON" -m cxrdist "${query[@]}" "${overrides[@]}") || exit 2
    IFS=$'\t' read -r experiment output_dir num_folds <<<"$info"  # tab-separated: an output_dir may hold spaces
    local folds=${FOLDS:-0-$((num_folds - 1))}
    [[ $folds =~ ^[0-9]+([-,][0-9]+)*(%[0-9]+)?$ ]] || die "FOLDS=$folds: expected an array spec of fold numbers like 0-4, 0,2 or 0-4%2"
    [[ $output_dir = /* ]] || output_dir=$PWD/$output_dir
    local exp_dir=$output_dir/$experiment
    mkdir -p "$exp_dir/slurm"  # sbatch opens --output before the job starts

    local resources=(--nodes="$NODES" --ntasks-per-node=1)  # one task per node, however many nodes a start gets
    if (( GPUS_PER_NODE > 0 )); then
        resources+=(--gres=gpu:"$GPUS_PER_NODE" --cpus-per-task=$((GPUS_PER_NODE * ${CPUS_PER_GPU:-8})))
    else
        resources+=(--cpus-per-task=$((PROCS_PER_NODE * ${CPUS_PER_GPU:-1})))
    fi
    [[ -n ${MEM:-} ]] && resources+=(--mem="$MEM")
    local common=(--parsable --chdir="$PWD")
    [[ -n ${PARTITION:-} ]] && common+=(--partition="$PARTITION")
    [[ -n ${ACCOUNT:-} ]] && common+=(--account="$ACCOUNT")
    # shellcheck disable=SC2206  # EXTRA_SBATCH_ARGS is a word list by design
    local extra=(${EXTRA_SBATCH_ARGS:-})

    # A submitter running as a job must not hand its own SLURM_* settings to the jobs it submits.
    local var
    for var in $(compgen -e | grep -E '^(SLURM|SRUN)_' | grep -v '^SLURM_CONF$'); do unset "$var"; done

    local array_id ensemble_id
    array_id=$(sbatch "${common[@]}" "${resources[@]}" "${extra[@]}" \
        --job-name="cxrdist-$experiment" --array="$folds" --time="${TIME:-24:00:00}" \
        --requeue --signal=B:USR1@"$SIGNAL_BEFORE" --open-mode=append \
        --output="$exp_dir/slurm/fold-%a-%A_%a.out" \
        --export=ALL,CXRDIST_SLURM_ROLE=fold,CXRDIST_HOME="$ROOT" \
        "$ROOT/slurm/train_folds.sh" "$config" "${overrides[@]}") || die "sbatch of the fold array failed"
    array_id=${array_id%%;*}
    [[ -n ${ARRAY_ID_FILE:-} ]] && echo "$array_id" >"$ARRAY_ID_FILE"  # for slurm/lodo.sh, which makes its jobs depend on it

    echo "fold array job: $array_id (folds $folds, $NODES node(s) each)"
    if [[ ${ENSEMBLE:-1} == 0 ]]; then
        echo "logs: $exp_dir/slurm/"
        return 0
    fi
    local ensemble_cpus=$((PROCS_PER_NODE * ${CPUS_PER_GPU:-1}))
    (( GPUS_PER_NODE > 0 )) && ensemble_cpus=${CPUS_PER_GPU:-8}
    local ensemble_resources=(--nodes=1 --ntasks=1 --cpus-per-task="${ENSEMBLE_CPUS:-$ensemble_cpus}" --time="${ENSEMBLE_TIME:-02:00:00}")
    (( GPUS_PER_NODE > 0 )) && ensemble_resources+=(--gres=gpu:1)
    ensemble_id=$(sbatch "${common[@]}" "${ensemble_resources[@]}" "${extra[@]}" \
        --job-name="cxrdist-$experiment-ensemble" --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
        --output="$exp_dir/slurm/ensemble-%j.out" --export=ALL,CXRDIST_HOME="$ROOT" \
        "$ROOT/slurm/ensemble.sh" "$exp_dir") || die "sbatch of the ensemble job failed"
    ensemble_id=${ensemble_id%%;*}

    echo "ensemble job: $ensemble_id (runs when every fold succeeded)"
    echo "logs: $exp_dir/slurm/"
}

# ---------------------------------------------------------------------------------------------
# Stage 2: one fold, inside its array task.
# ---------------------------------------------------------------------------------------------

launcher_args() {
    # accelerate launch flags shared by every node; --machine_rank is added per node.
    local nodes=$SLURM_JOB_NUM_NODES head port total
    head=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    local args=(--num_machines "$nodes" --main_process_ip "$head" --main_process_port "$port" --dynamo_backend no)
    # A node that never starts: the others give up at the rendezvous after RDZV_TIMEOUT seconds
    # (torch elastic's static rendezvous, or its c10d one with restarts, which they need: with its
    # store unshared (train_fold exports TORCH_DISABLE_SHARE_RDZV_TCP_STORE) each restart gets a
    # fresh store, where a shared or static one keeps a dead peer's address; train.dist_timeout
    # bounds everything after it).
    if (( MAX_RESTARTS > 0 )); then
        args+=(--max_restarts "$MAX_RESTARTS" --rdzv_backend c10d)
        (( nodes > 1 )) && args+=(--rdzv_conf "join_timeout=$RDZV_TIMEOUT")
    elif (( nodes > 1 )); then
        args+=(--rdzv_conf "timeout=$RDZV_TIMEOUT")
    fi
    if (( GPUS_PER_NODE > 0 )); then
        total=$((nodes * GPUS_PER_NODE))
        args+=(--num_processes "$total" --mixed_precision "${MIXED_PRECISION:-bf16}")
    else
        total=$((nodes * PROCS_PER_NODE))
        args+=(--num_processes "$total" --mixed_precision "${MIXED_PRECISION:-no}")
    fi
    if [[ -n ${LAUNCH_CONFIG:-} ]]; then
        args=(--config_file "$LAUNCH_CONFIG" "${args[@]}")
    elif (( total > 1 )); then
        args+=(--multi_gpu)
    fi
    printf '%s\n' "${args[@]}"
}

preempt_requested=0
terminating=0
step_pid=
resender_pid=

forward_preemption() {
    preempt_requested=1
    log "USR1: preemption warning, asking the trainers to checkpoint"
    [[ -n $step_pid ]] || return 0
    # srun passes USR1 to every process of the step; the launchers ignore it (see below).
    kill -USR1 "$step_pid" 2>/dev/null
    # A trainer that has not installed its handler yet inherits the launcher's "ignore" and
    # would miss the signal: repeat it until the step is gone (the trainer's flag is idempotent).
    if [[ -z $resender_pid ]]; then
        (while sleep "${RESIGNAL_EVERY:-30}"; do kill -USR1 "$step_pid" 2>/dev/null || break; done) &
        resender_pid=$!
    fi
}

note_termination() {
    # SLURM is ending the job (scancel, time limit, preemption): the steps got SIGTERM from SLURM
    # itself; SLURM, not this script, decides whether the job comes back.
    terminating=1
    log "TERM: job is being ended by SLURM"
}

check_max_restarts() {
    [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] && (( MAX_RESTARTS <= 100 )) \
        || die "MAX_RESTARTS=$MAX_RESTARTS: expected 0 (no restarts) to 100 restarts of the trainers"
}

train_fold() {
    local config=$1; shift
    check_max_restarts
    if (( MAX_RESTARTS > 0 )); then
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # a fresh store per restart (cxrdist/training/cluster/elastic.py)
    fi
    local fold=${SLURM_ARRAY_TASK_ID:?not an array task}
    local restarts=${SLURM_RESTART_COUNT:-0}
    trap forward_preemption USR1
    trap note_termination TERM

    if (( GPUS_PER_NODE == 0 )); then
        # accelerate's --cpu starts ONE process; --multi_gpu with this variable starts them all on gloo.
        export ACCELERATE_USE_CPU=1
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / (GPUS_PER_NODE > 0 ? GPUS_PER_NODE : PROCS_PER_NODE) ))}
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1

    local args
    mapfile -t args < <(launcher_args)
    log "fold $fold of job ${SLURM_ARRAY_JOB_ID}_${fold} (job id $SLURM_JOB_ID, start $((restarts + 1))) on $SLURM_JOB_NODELIST"
    log "$(redacted "accelerate launch ${args[*]} $TRAIN_SCRIPT --config $config --fold $fold $*")"

    local srun_args=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    (( GPUS_PER_NODE > 0 )) && srun_args+=(--gres=gpu:"$GPUS_PER_NODE")
    # The launcher (torch elastic agent) would die on USR1; started with USR1 ignored it lives on,
    # while the trainers install their own handler and get the signal from srun directly.
    # shellcheck disable=SC2016  # $SLURM_NODEID expands on each node, not here
    srun "${srun_args[@]}" bash -c 'trap "" USR1; exec "$0" -m accelerate.commands.launch --machine_rank "$SLURM_NODEID" "$@"' \
        "$PYTHON" "${args[@]}" "$TRAIN_SCRIPT" --config "$config" --fold "$fold" "$@" &
    step_pid=$!
    # `wait` returns early whenever a trapped signal arrives: wait again until the step is gone.
    while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
    wait "$step_pid"
    local rc=$?
    step_pid=
    [[ -n $resender_pid ]] && kill "$resender_pid" 2>/dev/null

    if (( rc == 0 )); then
        log "fold $fold finished"
        return 0
    fi
    if (( terminating )); then
        log "fold $fold stopped with exit code $rc while SLURM ends the job"
        return "$rc"
    fi
    # accelerate launch turns the trainers' 75 into 1, so a preemption we forwarded counts too.
    if (( rc == EXIT_PREEMPTED || preempt_requested )); then
        if (( restarts >= MAX_REQUEUES )); then
            log "fold $fold preempted but already restarted $restarts times (MAX_REQUEUES=$MAX_REQUEUES): giving up"
            return 1
        fi
        log "fold $fold checkpointed (exit code $rc): requeueing ${SLURM_ARRAY_JOB_ID}_${fold}"
        scontrol requeue "${SLURM_ARRAY_JOB_ID}_${fold}" || { log "scontrol requeue failed"; return 1; }
        return 0
    fi
    log "fold $fold failed with exit code $rc"
    return "$rc"
}

(( $# >= 1 )) || die "usage: sbatch slurm/train_folds.sh CONFIG.yaml [key=value ...]"
if [[ ${CXRDIST_SLURM_ROLE:-} == fold && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    train_fold "$@"
else
    submit "$@"
fi
