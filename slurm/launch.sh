#!/usr/bin/env bash
# Shared Slurm launcher: srun starts one training process per GPU, running a recipe's flags.
#
#   bash slurm/launch.sh RECIPE [--dry-run] [--nodes N] [--nodelist h1,h2,...] [-- FLAGS...]
#
# The sbatch scripts exec this in the batch shell (so the batch shell's TERM lands here). It
#   1. finds the repository (MIXTRAL_ROOT, else the sbatch submit directory, else this file's),
#      sources the recipe and makes the run's directories: runs/<job name>-<job id>/{logs,
#      checkpoints,tensorboard} (RUN_DIR / CKPT_DIR override them; a requeued job keeps its id,
#      so it resumes from its own checkpoints through --load),
#   2. takes the rendezvous from Slurm: master = first host of SLURM_JOB_NODELIST (scontrol show
#      hostnames), port from the job id, and runs
#         srun --nodes N --ntasks-per-node GPUS_PER_NODE bash slurm/launch.sh --task RECIPE
#      optionally inside a container (CONTAINER_IMAGE, CONTAINER_MOUNTS: pyxis/enroot), with the
#      NCCL/InfiniBand environment; each task sets RANK / WORLD_SIZE / LOCAL_RANK from SLURM_*
#      and execs `python pretrain_mixtral.py FLAGS` (no torchrun: whatever Slurm signals
#      reaches the training processes themselves, and the step's exit code is theirs),
#   3. on TERM decides from the job's state (scontrol) what it means (docs/cluster.md):
#      - the job still RUNNING (the time-limit signal, #SBATCH --signal=B:TERM@<lead>, or
#        `scancel -b -s TERM`): only this shell got it, so it sends TERM to the tasks (scancel
#        --signal=TERM), waits for them to save and exit 0, then requeues the job (REQUEUE=0
#        to skip);
#      - the restart count already raised (`scontrol requeue`, preemption with requeue): Slurm
#        signalled the tasks and requeues the job itself; just wait;
#      - otherwise (a user's scancel): the tasks save and exit; the job is not requeued.
# --dry-run prints the srun line and each task's command instead (no Slurm needed; SLURM_* are
# faked from --nodes / --nodelist or the recipe).
set -euo pipefail

usage() {
    sed -n '2,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

find_root() {
    if [[ -n "${MIXTRAL_ROOT:-}" ]]; then
        ROOT="$MIXTRAL_ROOT"
    elif [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/pretrain_mixtral.py" ]]; then
        ROOT="$SLURM_SUBMIT_DIR"
    else
        ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    fi
    if [[ ! -f "$ROOT/pretrain_mixtral.py" ]]; then
        echo "launch.sh: no pretrain_mixtral.py in $ROOT: submit from the repository root" \
            "or set MIXTRAL_ROOT" >&2
        exit 2
    fi
}

# ------------------------------------------------------------------------------- the command
# training_command: fills CMD with what every task runs (the dry run prints exactly this).
training_command() {
    local group
    CMD=("${PYTHON:-python}" "$ROOT/pretrain_mixtral.py")
    for group in "${ARG_GROUPS[@]}"; do
        local -n flags="$group"
        CMD+=("${flags[@]}")
        unset -n flags
    done
    CMD+=("${EXTRA_FLAGS[@]}")
}

# Settings every task needs; exported so srun (and a pyxis container) pass them on.
nccl_environment() {
    # Megatron-Core: one hardware queue keeps TP/SP communication ordered with compute.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    # A hung or failed collective aborts the job (and Slurm can requeue it) instead of idling.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
    # InfiniBand: NCCL finds the HCAs itself; pin them for your fabric if needed, e.g.
    # NCCL_IB_HCA=mlx5_0,mlx5_1,... and NCCL_SOCKET_IFNAME=ib0 (bootstrap interface).
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-10}"
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
}

# ------------------------------------------------------------------------------- each task
task_main() {
    # Each task writes its node's log itself (appending), not through srun's I/O: when Slurm
    # signals the job, srun ends first, and output relayed through it would break the pipe
    # (BrokenPipeError) under a process that is still saving.
    exec >>"$LOG_DIR/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID-node${SLURM_NODEID:-0}.log" 2>&1
    if [[ -n "${VENV:-}" ]]; then
        # shellcheck disable=SC1091  # the user's environment
        source "$VENV/bin/activate"
    fi
    export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
    export LOCAL_WORLD_SIZE="$GPUS_PER_NODE"
    training_command
    cd "$ROOT"
    exec "${CMD[@]}"  # the task IS the training process: Slurm's signals reach it directly
}

# wait_for PID: wait until PID has exited (a trapped signal interrupts `wait`), return its code.
wait_for() {
    local pid="$1" status=0
    while true; do
        status=0
        wait "$pid" || status=$?
        kill -0 "$pid" 2>/dev/null || return "$status"
    done
}

# ----------------------------------------------------------------------------- the batch shell
# job_field NAME: a field of `scontrol show job` for this job ("" when it cannot be read).
job_field() {
    scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p" || true
}

on_term() {
    local state restarts
    state="$(job_field JobState)"
    restarts="$(job_field Restarts)"
    if ((${restarts:-0} > ${SLURM_RESTART_COUNT:-0})); then
        ON_TERM="requeued by Slurm"
        echo "launch.sh: TERM at $(date +%T): Slurm is requeueing job $SLURM_JOB_ID (restart" \
            "${restarts}); the tasks save and exit" >&2
    elif [[ -n "$state" && "$state" != RUNNING ]]; then
        ON_TERM="cancelled"
        echo "launch.sh: TERM at $(date +%T): job $SLURM_JOB_ID is $state (cancelled): the" \
            "tasks save and exit; not requeueing" >&2
    else
        ON_TERM="requeue"
        echo "launch.sh: TERM at $(date +%T) (time limit ahead or preemption): asking the" \
            "tasks to save (scancel --signal=TERM $SLURM_JOB_ID), then requeueing" >&2
        if [[ -n "$SRUN_PID" ]]; then
            scancel --signal=TERM "$SLURM_JOB_ID" || true
        fi
    fi
}

# A recipe's placeholder paths (/path/to/...) mean DATA_PATH / TOKENIZER_MODEL were not set.
check_placeholders() {
    local group value
    for group in "${ARG_GROUPS[@]}"; do
        local -n flags="$group"
        for value in "${flags[@]}"; do
            if [[ "$value" == /path/to/* ]]; then
                echo "launch.sh: $RECIPE still has the placeholder $value: set DATA_PATH" \
                    "(prefix of your .bin/.idx) and TOKENIZER_MODEL" >&2
                exit 2
            fi
        done
        unset -n flags
    done
}

hostnames() {
    if [[ -n "${FAKE_NODELIST:-}" ]]; then
        tr ',' '\n' <<<"$FAKE_NODELIST"
    elif command -v scontrol >/dev/null && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        scontrol show hostnames "$SLURM_JOB_NODELIST"
    else
        local i
        for ((i = 1; i <= NNODES; i++)); do printf 'node%03d\n' "$i"; done
    fi
}

print_dry_run() {
    local i
    echo "# dry run: nothing is submitted or started. The batch shell would run:"
    printf '%q ' "${srun_cmd[@]}"
    echo
    echo "# every task (RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID) would run:"
    training_command
    printf '%q ' "${CMD[@]}"
    echo
    for ((i = 0; i < NNODES; i++)); do
        echo "# node $i (${HOSTS[i]}): RANK $((i * GPUS_PER_NODE))-$(((i + 1) * GPUS_PER_NODE - 1))" \
            "of WORLD_SIZE $((NNODES * GPUS_PER_NODE)), LOCAL_RANK 0-$((GPUS_PER_NODE - 1))," \
            "MASTER_ADDR $MASTER_ADDR, MASTER_PORT $MASTER_PORT"
    done
}

batch_main() {
    local dry_run="${DRY_RUN:-0}" nodes=""
    while (($#)); do
        case "$1" in
            --dry-run) dry_run=1 ;;
            --nodes) nodes="$2"; shift ;;
            --nodelist) FAKE_NODELIST="$2"; shift ;;
            --) shift; EXTRA_FLAGS=("$@"); break ;;
            *) echo "launch.sh: unknown option $1" >&2; usage ;;
        esac
        shift
    done
    if ((dry_run)); then
        export SLURM_JOB_ID="${SLURM_JOB_ID:-0}"
        if [[ -n "${FAKE_NODELIST:-}" ]]; then
            nodes="${nodes:-$(tr ',' '\n' <<<"$FAKE_NODELIST" | wc -l)}"
        fi
        export SLURM_NNODES="${nodes:-${SLURM_NNODES:-$NODES}}"
    elif [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "launch.sh: not inside a Slurm job; submit with sbatch, or pass --dry-run" >&2
        exit 2
    fi
    NNODES="$SLURM_NNODES"
    mapfile -t HOSTS < <(hostnames)
    if ((${#HOSTS[@]} != NNODES)); then
        echo "launch.sh: ${#HOSTS[@]} host names for $NNODES nodes" >&2
        exit 2
    fi
    export NNODES MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    if ((NNODES != NODES)); then
        echo "launch.sh: warning: the recipe is laid out for $NODES nodes, this job has" \
            "$NNODES; pretrain_mixtral.py checks the layout against" \
            "$((NNODES * GPUS_PER_NODE)) GPUs" >&2
    fi
    local srun_cmd=(srun --nodes "$NNODES" --ntasks-per-node "$GPUS_PER_NODE"
        --kill-on-bad-exit=1 --output /dev/null)  # each task writes its node's log itself
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        # The repository (and the run directory, if outside it) at the same paths; add your
        # data and tokenizer directories through CONTAINER_MOUNTS.
        local mounts="$ROOT:$ROOT"
        [[ "$RUN_DIR" == "$ROOT"/* ]] || mounts+=",$RUN_DIR:$RUN_DIR"
        srun_cmd+=(--container-image "$CONTAINER_IMAGE"
            --container-mounts "${CONTAINER_MOUNTS:-$mounts}"
            --container-workdir "$ROOT")
    fi
    srun_cmd+=(bash "$ROOT/slurm/launch.sh" --task "$RECIPE" -- "${EXTRA_FLAGS[@]}")

    echo "# recipe $RECIPE: $NNODES nodes x $GPUS_PER_NODE GPUs; run directory $RUN_DIR"
    echo "# rendezvous: master $MASTER_ADDR:$MASTER_PORT; hosts ${HOSTS[*]}"
    if ((dry_run)); then
        print_dry_run
        return 0
    fi
    check_placeholders
    mkdir -p "$LOG_DIR" "$CKPT_DIR" "$TENSORBOARD_DIR"
    ON_TERM="" SRUN_PID=""
    trap on_term TERM
    echo "launch.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) starts" \
        "$((NNODES * GPUS_PER_NODE)) tasks at $(date +%T); their logs: $LOG_DIR/" \
        "${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID-node<N>.log" >&2
    "${srun_cmd[@]}" &
    SRUN_PID=$!
    if [[ "$ON_TERM" == requeue ]]; then  # TERM arrived while srun was being started
        scancel --signal=TERM "$SLURM_JOB_ID" || true
    fi
    local status=0
    wait_for "$SRUN_PID" || status=$?
    echo "launch.sh: the tasks finished with code $status at $(date +%T)" >&2
    if [[ "$ON_TERM" == requeue && "${REQUEUE:-1}" == 1 ]]; then
        if ((status == 0)); then
            echo "launch.sh: requeueing job $SLURM_JOB_ID; it resumes from $CKPT_DIR" >&2
            scontrol requeue "$SLURM_JOB_ID" || true
        else
            echo "launch.sh: not requeueing: the tasks failed (code $status)" >&2
        fi
    fi
    return "$status"
}

# ------------------------------------------------------------------------------------- main
main() {
    local role=batch
    if [[ "${1:-}" == --task ]]; then
        role=task
        shift
    fi
    [[ $# -ge 1 ]] || usage
    RECIPE="$1"
    shift
    find_root
    [[ "$RECIPE" = /* ]] || RECIPE="$ROOT/$RECIPE"
    EXTRA_FLAGS=()
    local job_name="${SLURM_JOB_NAME:-$(basename "$RECIPE" .sh)}"
    RUN_DIR="${RUN_DIR:-${RUN_ROOT:-$ROOT/runs}/$job_name-${SLURM_JOB_ID:-0}}"
    export RUN_DIR CKPT_DIR="${CKPT_DIR:-$RUN_DIR/checkpoints}"
    export LOG_DIR="${LOG_DIR:-$RUN_DIR/logs}"
    export TENSORBOARD_DIR="${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}"
    # shellcheck source=examples/mixtral_8x7b_64xh100.sh
    source "$RECIPE"
    GPUS_PER_NODE="${GPUS_PER_NODE:-8}"  # training processes per node (recipes: env wins)
    nccl_environment
    if [[ "$role" == task ]]; then
        [[ "${1:-}" == -- ]] && shift
        EXTRA_FLAGS=("$@")
        task_main
    else
        batch_main "$@"
    fi
}

main "$@"
