#!/usr/bin/env bash
# Shared Slurm launcher: one torchrun per node, started by srun, running a recipe's flags.
#
#   bash slurm/launch.sh RECIPE [--dry-run] [--nodes N] [--nodelist h1,h2,...] [-- FLAGS...]
#
# The sbatch scripts exec this in the batch shell (so the batch shell's TERM lands here). It
#   1. finds the repository (MIXTRAL_ROOT, else the sbatch submit directory, else this file's),
#      sources the recipe and makes the run's directories: runs/<job name>-<job id>/{logs,
#      checkpoints,tensorboard} (RUN_DIR / CKPT_DIR override them; a requeued job keeps its id,
#      so it resumes from its own checkpoints through --load),
#   2. takes the rendezvous from Slurm: master = first host of SLURM_JOB_NODELIST (scontrol show
#      hostnames), port from the job id; each node runs
#         torchrun --nnodes $SLURM_NNODES --node-rank $SLURM_NODEID --nproc-per-node 8 ...
#   3. runs `srun ... bash slurm/launch.sh --node RECIPE`, optionally inside a container
#      (CONTAINER_IMAGE, CONTAINER_MOUNTS: pyxis/enroot), with the NCCL/InfiniBand environment,
#   4. on SIGTERM (#SBATCH --signal=B:TERM@<lead>: time limit ahead, or preemption) forwards TERM
#      to the srun step, whose node scripts forward it to the training processes (they save
#      and exit 0), waits for them, then requeues the job (REQUEUE=0 to skip).
# --dry-run prints the srun line and every node's torchrun command instead (no Slurm needed;
# SLURM_* are faked from --nodes / --nodelist or the recipe).
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
# torchrun_command NODE_RANK: fills CMD with what node NODE_RANK runs. Used by the nodes and by
# --dry-run, so the dry run prints exactly what would run.
torchrun_command() {
    local node_rank="$1" group
    CMD=(torchrun
        --nnodes "$NNODES" --node-rank "$node_rank" --nproc-per-node "$GPUS_PER_NODE"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        "$ROOT/pretrain_mixtral.py")
    for group in "${ARG_GROUPS[@]}"; do
        local -n flags="$group"
        CMD+=("${flags[@]}")
        unset -n flags
    done
    CMD+=("${EXTRA_FLAGS[@]}")
}

# Settings every node needs; exported so srun (and a pyxis container) pass them on.
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
    # torchrun sends TERM to its workers and kills them this many seconds later (recent torch).
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
}

# ----------------------------------------------------------------------------- on each node
node_main() {
    if [[ -n "${VENV:-}" ]]; then
        # shellcheck disable=SC1091  # the user's environment
        source "$VENV/bin/activate"
    fi
    torchrun_command "$SLURM_NODEID"
    cd "$ROOT"
    # TERM (forwarded by srun) goes to the training processes themselves, so that they save and
    # exit 0 (torchrun would kill them after its shutdown timeout); torchrun ends with them.
    TORCHRUN_PID=""
    trap forward_term TERM
    "${CMD[@]}" &
    TORCHRUN_PID=$!
    wait_for "$TORCHRUN_PID"
}

forward_term() {
    local child
    echo "launch.sh[node $SLURM_NODEID]: TERM: asking the training processes to save" >&2
    [[ -n "$TORCHRUN_PID" ]] || return 0
    for child in $(ps -o pid= --ppid "$TORCHRUN_PID"); do
        kill -TERM "$child" 2>/dev/null || true
    done
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
on_term() {
    TERMINATED=1
    [[ -n "$SRUN_PID" ]] || return 0
    echo "launch.sh: TERM at $(date +%T): forwarding to srun step $SRUN_PID; waiting for" \
        "the save" >&2
    kill -TERM "$SRUN_PID" 2>/dev/null || true
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
    local srun_cmd=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
        --output "$LOG_DIR/%x-%j-node%n.log" --open-mode append)
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        # The repository (and the run directory, if outside it) at the same paths; add your
        # data and tokenizer directories through CONTAINER_MOUNTS.
        local mounts="$ROOT:$ROOT"
        [[ "$RUN_DIR" == "$ROOT"/* ]] || mounts+=",$RUN_DIR:$RUN_DIR"
        srun_cmd+=(--container-image "$CONTAINER_IMAGE"
            --container-mounts "${CONTAINER_MOUNTS:-$mounts}"
            --container-workdir "$ROOT")
    fi
    srun_cmd+=(bash "$ROOT/slurm/launch.sh" --node "$RECIPE" -- "${EXTRA_FLAGS[@]}")

    echo "# recipe $RECIPE: $NNODES nodes x $GPUS_PER_NODE GPUs; run directory $RUN_DIR"
    echo "# rendezvous: master $MASTER_ADDR:$MASTER_PORT; hosts ${HOSTS[*]}"
    if ((dry_run)); then
        echo "# dry run: nothing is submitted or started. The batch shell would run:"
        printf '%q ' "${srun_cmd[@]}"
        echo
        local i
        for ((i = 0; i < NNODES; i++)); do
            echo "# node $i (${HOSTS[i]}) would run:"
            torchrun_command "$i"
            printf '%q ' "${CMD[@]}"
            echo
        done
        return 0
    fi
    check_placeholders
    mkdir -p "$LOG_DIR" "$CKPT_DIR" "$TENSORBOARD_DIR"
    TERMINATED=0 SRUN_PID=""
    trap on_term TERM
    "${srun_cmd[@]}" &
    SRUN_PID=$!
    local status=0
    wait_for "$SRUN_PID" || status=$?
    echo "launch.sh: srun step finished with code $status at $(date +%T)" >&2
    if ((TERMINATED)) && [[ "${REQUEUE:-1}" == 1 ]]; then
        echo "launch.sh: requeueing job $SLURM_JOB_ID; it resumes from $CKPT_DIR" >&2
        scontrol requeue "$SLURM_JOB_ID" || true
    fi
    return "$status"
}

# ------------------------------------------------------------------------------------- main
main() {
    local role=batch
    if [[ "${1:-}" == --node ]]; then
        role=node
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
    GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
    nccl_environment
    if [[ "$role" == node ]]; then
        [[ "${1:-}" == -- ]] && shift
        EXTRA_FLAGS=("$@")
        node_main
    else
        batch_main "$@"
    fi
}

main "$@"
