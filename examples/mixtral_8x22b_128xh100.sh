# shellcheck shell=bash disable=SC2034  # a recipe only defines arrays; its sourcer reads them
# Mixtral 8x22B on 128 H100 (16 nodes x 8 GPUs): the mapping of Megatron-MoE-ModelZoo's 8x22B
# benchmark, TP2 PP8 EP8 with expert-TP 1 (MoE parallel folding) and 7 virtual pipeline stages
# per rank, micro-batch 1, global batch 256, sequence 4096 (about 445 TFLOP/s per GPU there,
# dropless).
#
#   sbatch slurm/mixtral_8x22b.sbatch                      # train (DATA_PATH, TOKENIZER_MODEL)
#   python -m megatron_ext.plan rehearse examples/mixtral_8x22b_128xh100.sh  # CPU rehearsal
#
# One difference from that benchmark, from this stack: our MoE layer keeps more activations, so
# the planner puts pipeline stage 0 at about 83.5 GiB without recomputation; recomputing the
# experts' SwiGLU (--recompute-modules moe_act, Megatron-Core's memory control) brings it to
# about 67.5 GiB for about 1% of the step (docs/planner.md). Paths come from the environment
# (defaults are placeholders).

NODES="${NODES:-16}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"  # env wins (smaller nodes, tests)

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 56
    --hidden-size 6144
    --ffn-hidden-size 16384
    --num-attention-heads 48
    --group-query-attention
    --num-query-groups 8
    --seq-length 4096
    --max-position-embeddings 65536
    --normalization RMSNorm
    --position-embedding-type rope
    --rotary-base 1000000
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.008
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
    --tokenizer-model "${TOKENIZER_MODEL:-/path/to/tokenizer.model.v3}"
    --split "99,1,0"
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

# 128 GPUs = TP 2 x PP 8 x DP 8. The MoE layers regroup each stage's TP x DP = 16 GPUs as
# expert-TP 1 x EP 8 x expert-DP 2: an EP group is 8 consecutive GPUs, one node, and each GPU
# holds one whole expert. 56 layers / PP 8 = 7 per stage, one per virtual stage: VPP 7.
# 256 / (1 x 8) = 32 micro-batches, a multiple of PP as the interleaved schedule needs.
PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --sequence-parallel
    --pipeline-model-parallel-size 8
    --num-layers-per-virtual-pipeline-stage 1
    --expert-model-parallel-size 8
    --expert-tensor-parallel-size 1
    --recompute-granularity selective
    --recompute-modules moe_act
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

CKPT_DIR="${CKPT_DIR:-checkpoints/mixtral_8x22b}"
LOGGING_ARGS=(
    --log-interval 10
    --eval-interval 1000
    --eval-iters 10
    --save-interval 500
    --save "$CKPT_DIR"
    --load "$CKPT_DIR"
    --tensorboard-dir "${TENSORBOARD_DIR:-$CKPT_DIR/tensorboard}"
)

ARG_GROUPS=(MODEL_ARGS MOE_ARGS DATA_ARGS TRAINING_ARGS PARALLEL_ARGS LOGGING_ARGS)
