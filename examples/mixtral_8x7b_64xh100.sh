# shellcheck shell=bash disable=SC2034  # a recipe only defines arrays; its sourcer reads them
# Mixtral 8x7B on 64 H100 (8 nodes x 8 GPUs): Megatron-Core's best published mapping for this
# model, TP1 PP4 EP8 with 8 virtual pipeline stages per rank, micro-batch 1, global batch 256,
# sequence 4096 (about 468 TFLOP/s per GPU, 47% MFU with Megatron-Core's own MoE layer).
#
#   sbatch slurm/mixtral_8x7b.sbatch                       # train (DATA_PATH, TOKENIZER_MODEL)
#   python -m megatron_ext.plan rehearse examples/mixtral_8x7b_64xh100.sh   # CPU rehearsal
#   python -m megatron_ext.plan --validate -- "${ALL_ARGS[@]}" --world-size 64 --gpu-memory-gb 80
#
# The arrays follow Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh; the Slurm
# launcher passes those named in ARG_GROUPS, in that order, to pretrain_mixtral.py. Paths come
# from the environment (the defaults are placeholders; the launcher sets CKPT_DIR per job).

NODES="${NODES:-8}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"  # env wins (smaller nodes, tests)

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --seq-length 4096
    --max-position-embeddings 32768
    --normalization RMSNorm
    --position-embedding-type rope
    --rotary-base 1000000
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.01
    --attention-dropout 0.0
    --hidden-dropout 0.0
)

MOE_ARGS=(
    --num-experts 8
    --moe-router-topk 2
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2
    --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall
)

DATA_ARGS=(
    --data-path "${DATA_PATH:-/path/to/my-corpus_text_document}"
    --tokenizer-type Llama2Tokenizer
    --tokenizer-model "${TOKENIZER_MODEL:-/path/to/tokenizer.model}"
    --split "99990,8,2"
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 256
    --train-iters 500000
    --lr 1e-4
    --min-lr 1.0e-5
    --lr-decay-style cosine
    --lr-decay-iters 320000
    --lr-warmup-iters 500
    --weight-decay 0.1
    --clip-grad 1.0
    --adam-beta1 0.9
    --adam-beta2 0.95
    --bf16
)

# 64 GPUs = TP 1 x PP 4 x DP 16; EP 8 divides DP (2 expert-data-parallel replicas). 32 layers /
# PP 4 = 8 per stage, one per virtual stage: VPP 8.
PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 4
    --num-layers-per-virtual-pipeline-stage 1
    --expert-model-parallel-size 8
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

CKPT_DIR="${CKPT_DIR:-checkpoints/mixtral_8x7b}"
LOGGING_ARGS=(
    --log-interval 10
    --eval-interval 1000
    --eval-iters 10
    --save-interval 1000
    --save "$CKPT_DIR"
    --load "$CKPT_DIR"
    --tensorboard-dir "${TENSORBOARD_DIR:-$CKPT_DIR/tensorboard}"
)

ARG_GROUPS=(MODEL_ARGS MOE_ARGS DATA_ARGS TRAINING_ARGS PARALLEL_ARGS LOGGING_ARGS)
