"""Command-line flags of ``pretrain_mixtral.py``: Megatron-LM's names, grouped, validated early.

``parse_args(argv, world_size)`` returns an ``argparse.Namespace`` after
1. filling what was not given (``flag_defaults.py``: ``--model PRESET``'s architecture, where
   explicit flags win and are reported; Megatron-LM's aliases and defaults),
2. checking the parallel layout *before anything is built*; every error names the flags and
   numbers involved (``LayoutError``),
3. collecting, to be printed once by rank 0, what was changed (``args.notices``) and each
   flag that is accepted for Megatron-LM compatibility but not honoured here
   (``args.unhonoured``), instead of ignoring it silently.

``transformer_config`` (in ``megatron_ext.model.builder``) is the one place flags become
``TransformerConfig`` fields.
"""

from __future__ import annotations

import argparse
import os

from megatron_ext.flag_defaults import apply_defaults
from megatron_ext.layout import RECOMPUTE_MODULES, LayoutError, unhonoured, validate
from megatron_ext.machine_checks import check_environment
from megatron_ext.model.presets import PRESETS
from megatron_ext.model.stack import parse_moe_layer_freq

__all__ = ["LayoutError", "build_parser", "check_environment", "parse_args"]


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model architecture")
    g.add_argument("--model", choices=sorted(PRESETS), help="preset that fills the flags below")
    g.add_argument("--use-mcore-models", action="store_true", help="accepted; always true here")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true", default=None)
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default=None)
    g.add_argument("--norm-epsilon", type=float, default=None)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute", "none"])
    g.add_argument("--no-position-embedding", action="store_true", help="no learned positions")
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--swiglu", action="store_true", default=None)
    g.add_argument("--disable-bias-linear", action="store_true", default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--no-masked-softmax-fusion", action="store_true")
    g.add_argument("--window-size", type=int, default=None, help="sliding-window attention")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None)
    g.add_argument(
        "--attention-backend",
        choices=["auto", "flash", "fused", "unfused", "local"],
        default="auto",
        help="with --transformer-impl local: PyTorch's scaled_dot_product_attention (auto, "
        "flash, fused) or Megatron-Core's unfused DotProductAttention (unfused, local)",
    )


def _moe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts (docs/moe.md has every formula)")
    g.add_argument("--num-experts", type=int)
    g.add_argument("--moe-ffn-hidden-size", type=int, help="expert FFN width (default: FFN)")
    g.add_argument(
        "--moe-layer-freq",
        type=parse_moe_layer_freq,
        default=None,
        help='N: every N-th layer is MoE (layer i when i %% N == 0); or "[0]*1+[1]*27"',
    )
    g.add_argument("--moe-shared-expert-intermediate-size", type=int)
    g.add_argument("--moe-shared-expert-gate", action="store_true", default=None)
    g.add_argument("--moe-shared-expert-overlap", action="store_true")
    g.add_argument("--moe-router-topk", type=int)
    g.add_argument("--moe-router-pre-softmax", action="store_true", default=None)
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    g.add_argument("--moe-router-num-groups", type=int, default=None)
    g.add_argument("--moe-router-group-topk", type=int, default=None)
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"])  # fmt: skip
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default=None)
    g.add_argument(
        "--moe-router-enable-expert-bias",
        action="store_true",
        help="auxiliary-loss-free balancing (DeepSeek-V3); needs sigmoid scores",
    )
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None)
    g.add_argument(
        "--moe-router-force-load-balancing",
        action="store_true",
        help="benchmarks only: route on random logits (uniform load), not on the model",
    )
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument(
        "--moe-expert-capacity-factor",
        type=float,
        default=None,
        help="opt into token dropping at this capacity factor (default: dropless)",
    )
    g.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default="probs")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-grouped-gemm", action="store_true")
    g.add_argument(
        "--moe-token-dispatcher-type",
        default="alltoall",
        choices=["alltoall", "allgather", "flex", "alltoall_seq"],
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None, help="[weight] prefix ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument(
        "--tokenizer-type",
        default="Llama2Tokenizer",
        choices=[
            "Llama2Tokenizer",
            "SentencePieceTokenizer",
            "HuggingFaceTokenizer",
            "NullTokenizer",
        ],
    )
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-size", type=int, help="with NullTokenizer / --mock-data")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=0, help="accepted; data is read in-process")


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, required=False)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument(
        "--recompute-modules",
        nargs="*",
        choices=list(RECOMPUTE_MODULES),
        default=None,
        help="with --recompute-granularity selective: what to recompute (Megatron-Core's "
        "names; default core_attn). Our MoE layer honours moe (the whole layer) and moe_act "
        "(the experts' SwiGLU); mlp applies to dense layers",
    )
    g.add_argument(
        "--moe-layer-recompute",
        action="store_true",
        help="recompute each MoE layer in the backward (= --recompute-granularity selective "
        "--recompute-modules ... moe, as Megatron-LM)",
    )
    g.add_argument(
        "--recompute-activations",
        action="store_true",
        help="alias of --recompute-granularity selective (Megatron-LM)",
    )
    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=["adam"], default="adam")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument(
        "--check-for-nan-in-loss-and-grad",
        action="store_true",
        default=True,
        help="stop on a NaN/Inf loss or applied gradient, naming the iteration (default on)",
    )
    g.add_argument(
        "--no-check-for-nan-in-loss-and-grad",
        action="store_false",
        dest="check_for_nan_in_loss_and_grad",
    )
    g.add_argument(
        "--no-gradient-accumulation-fusion",
        action="store_false",
        dest="gradient_accumulation_fusion",
        help="return each weight gradient and let DDP add it to the grad buffer, instead of "
        "accumulating the weight-gradient GEMM into it (default: fused, as Megatron-LM)",
    )
    g.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on --load, take the schedule from these flags, not the checkpoint",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        action="store_true",
        dest="use_checkpoint_opt_param_scheduler",
        help="on --load, take the schedule from the checkpoint, ignoring these flags",
    )


def _parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="tensor parallelism of the experts (default: --tensor-model-parallel-size, as "
        "Megatron-LM); apart from it the MoE layers fold EP x expert-TP x expert-DP over the "
        "ranks of a pipeline stage (docs/moe.md)",
    )
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument(
        "--no-align-param-gather",
        action="store_false",
        dest="align_param_gather",
        help="let each pipeline stage start its param all-gathers itself",
    )
    g.add_argument(
        "--no-align-grad-reduce",
        action="store_false",
        dest="align_grad_reduce",
        help="let each pipeline stage start its grad reductions itself",
    )
    g.add_argument(
        "--ddp-bucket-size",
        type=int,
        default=None,
        help="elements per DDP bucket (default: max(40M, 1M x DP) when overlapping)",
    )
    g.add_argument("--cpu", action="store_true", help="CPU ranks over gloo (megatron_ext.cpu_mode)")


def _precision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16 static scale")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None)
    g.add_argument(
        "--fp8-recipe", choices=["tensorwise", "delayed", "mxfp8", "blockwise"], default="delayed"
    )


def _fusion_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's switches for its fused kernels, with its defaults; they act on GPU ranks
    only (CPU ranks never fuse, and a given flag that has no effect is reported)."""
    g = p.add_argument_group("fused kernels (GPU ranks)")
    g.add_argument(
        "--no-bias-swiglu-fusion",
        action="store_false",
        dest="bias_swiglu_fusion",
        help="the dense MLPs' and shared experts' SwiGLU as separate ops instead of "
        "Megatron-Core's torch.compile'd one (default: fused, as Megatron-LM)",
    )
    g.add_argument(
        "--no-bias-dropout-fusion",
        action="store_false",
        dest="bias_dropout_fusion",
        help="the residual's bias-dropout-add as separate ops instead of Megatron-Core's "
        "torch.compile'd one (default: fused, as Megatron-LM)",
    )
    g.add_argument(
        "--no-rope-fusion",
        action="store_false",
        dest="rope_fusion",
        help="accepted: rotary embeddings are applied unfused here in any case",
    )
    g.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="the loss by Megatron-Core's fused vocab-parallel cross-entropy (GPU ranks)",
    )
    g.add_argument(
        "--cross-entropy-fusion-impl",
        choices=["native", "te"],
        default="native",
        help="with --cross-entropy-loss-fusion: Megatron-Core's torch.compile'd kernel "
        "(native) or Transformer Engine's (te)",
    )
    g.add_argument(
        "--moe-permute-fusion",
        action="store_true",
        help="accepted: on CUDA the combine's gathers and sums are always fused "
        "(torch.compile, docs/moe.md); Transformer Engine's permute kernels are not used",
    )


def _logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per-device peak for MFU (default: the GPU's datasheet peak, e.g. H100 SXM "
        "989 bf16 / 1979 fp8)",
    )
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument(
        "--no-verify-checkpoint",
        action="store_false",
        dest="verify_checkpoint",
        help="load without checking the files against the checkpoint's checksums",
    )
    g.add_argument(
        "--profile",
        action="store_true",
        help="profile iterations --profile-step-start..--profile-step-end on --profile-ranks: "
        "for nsys (cudaProfilerStart/Stop), or torch.profiler with --use-pytorch-profiler (trace "
        "in --tensorboard-dir, and a per-phase breakdown of the step printed)",
    )
    g.add_argument("--use-pytorch-profiler", action="store_true")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", nargs="+", type=int, default=[0])
    g.add_argument(
        "--wandb-project",
        default=None,
        help="log to Weights & Biases too (the last rank; pip install 'megatron-mixtral[wandb]')",
    )
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run name")
    g.add_argument("--wandb-save-dir", default=None, help="default: <--save>/wandb")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_mixtral.py", description="Mixtral-style SMoE pretraining on Megatron-Core"
    )
    for add in (
        _model_args,
        _moe_args,
        _data_args,
        _training_args,
        _parallel_args,
        _precision_args,
        _fusion_args,
        _logging_args,
    ):
        add(p)
    return p


def parse_args(argv=None, world_size: int | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.notices = []  # said once by rank 0: overrides, switched-off flags
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    apply_defaults(args)
    validate(args, world_size)
    args.world_size = world_size
    args.unhonoured = unhonoured(args)
    return args
