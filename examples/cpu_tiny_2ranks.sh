# shellcheck shell=bash disable=SC2034  # a recipe only defines arrays; its sourcer reads them
# The tiny model on 2 CPU ranks of one node (EP 2, distributed optimizer): for trying the Slurm
# scripts on a machine without GPUs, and for the real-Slurm tests (tests/test_slurm_real.py).
#
#   sbatch --nodes 1 --ntasks-per-node 2 --requeue --signal=B:TERM@60 \
#       slurm/launch.sh examples/cpu_tiny_2ranks.sh            # from the repository root
#
# TRAIN_ITERS and SAVE_INTERVAL (environment) set the run's length and checkpoint interval.

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-2}"  # here: CPU training processes per node
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

MODEL_ARGS=(--cpu --model tiny --vocab-size 1000 --seq-length 64)
TRAINING_ARGS=(
    --mock-data
    --micro-batch-size 2
    --global-batch-size 8
    --train-iters "${TRAIN_ITERS:-20}"
    --lr 3e-3
    --seed 7
    --eval-iters 0
    --attention-dropout 0
    --hidden-dropout 0
    --moe-aux-loss-coeff 1e-2
)
PARALLEL_ARGS=(--expert-model-parallel-size 2 --use-distributed-optimizer)
CKPT_DIR="${CKPT_DIR:-checkpoints/cpu_tiny}"
LOGGING_ARGS=(
    --log-interval 1
    --save-interval "${SAVE_INTERVAL:-1000}"
    --save "$CKPT_DIR"
    --load "$CKPT_DIR"
    --tensorboard-dir "${TENSORBOARD_DIR:-$CKPT_DIR/tensorboard}"
)

ARG_GROUPS=(MODEL_ARGS TRAINING_ARGS PARALLEL_ARGS LOGGING_ARGS)
