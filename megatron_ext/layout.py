"""Layout validation: every invalid combination of flags fails here, before a model is built.

Each error names the flags and the numbers involved. Rules (as Megatron-LM, plus EP):
world size = TP x PP x DP; EP x expert-TP divides TP x DP (Megatron-Core's expert grid:
world size = expert-TP x EP x expert-DP x PP); experts divisible by EP; layers divisible by PP and,
with virtual stages, layers per stage divisible by ``--num-layers-per-virtual-pipeline-stage``;
heads and query groups divisible by TP; global batch divisible by micro batch x DP.
"""

from __future__ import annotations

import argparse

from megatron_ext.errors import LayoutError
from megatron_ext.errors import require_flags as _require
from megatron_ext.moe_checks import check_moe, moe_unhonoured
from megatron_ext.observe.sinks import check_wandb_flags

__all__ = ["LayoutError", "unhonoured", "validate"]


# Megatron-Core 0.16.1's --recompute-modules (TransformerConfig.recompute_modules).
RECOMPUTE_MODULES = (
    "core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts",
)  # fmt: skip


def recompute_modules(args: argparse.Namespace) -> list[str]:
    """``--recompute-modules`` as given, else Megatron-Core's default ``["core_attn"]`` (read
    only with ``--recompute-granularity selective``)."""
    return list(args.recompute_modules if args.recompute_modules is not None else ["core_attn"])


# Flag value ranges (dest names). Anything outside killed a rank later: SIGFPE on
# --seq-length 0, a traceback at the first forward, Megatron's bare AssertionErrors.
POSITIVE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "num_experts", "moe_router_topk", "seq_length", "max_position_embeddings", "micro_batch_size",
    "train_iters", "log_interval", "eval_interval", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "expert_model_parallel_size", "make_vocab_size_divisible_by",
)  # fmt: skip
POSITIVE_IF_GIVEN = (
    "global_batch_size", "save_interval", "exit_interval", "lr_decay_iters", "ddp_bucket_size",
    "num_layers_per_virtual_pipeline_stage", "recompute_num_layers", "window_size",
    "vocab_size", "exit_duration_in_mins", "loss_scale", "initial_loss_scale", "peak_tflops",
    "norm_epsilon", "rotary_base", "adam_eps", "init_method_std",
)  # fmt: skip
NON_NEGATIVE = (
    "eval_iters", "lr_warmup_iters", "seed", "lr", "min_lr", "weight_decay", "clip_grad",
    "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_router_bias_update_rate",
)  # fmt: skip
POSITIVE_IF_GIVEN += (
    "expert_tensor_parallel_size", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
    "moe_expert_capacity_factor",
)  # fmt: skip
FRACTION = ("attention_dropout", "hidden_dropout", "adam_beta1", "adam_beta2")  # in [0, 1)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_values(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, and the relations Megatron-Core asserts later."""
    for dest in POSITIVE + POSITIVE_IF_GIVEN:
        value = getattr(args, dest, None)
        if value is None and dest in POSITIVE_IF_GIVEN:
            continue
        _require(value is not None, f"{_flag(dest)} is required")
        _require(value > 0, f"{_flag(dest)} must be positive, not {value}")
    for dest in NON_NEGATIVE:
        value = getattr(args, dest, None)
        _require(value is None or value >= 0, f"{_flag(dest)} must be >= 0, not {value}")
    for dest in FRACTION:
        value = getattr(args, dest)
        _require(0 <= value < 1, f"{_flag(dest)} must be in [0, 1), not {value}")
    _require(
        args.moe_router_topk <= args.num_experts,
        f"--moe-router-topk {args.moe_router_topk} exceeds --num-experts {args.num_experts}: "
        "a token cannot pick more experts than there are",
    )
    if args.profile:
        _require(
            0 <= args.profile_step_start < args.profile_step_end,
            f"--profile-step-start {args.profile_step_start} and --profile-step-end "
            f"{args.profile_step_end}: need 0 <= start < end (iterations, end excluded)",
        )
    _require(args.min_lr <= args.lr, f"--min-lr {args.min_lr} exceeds --lr {args.lr} (the peak)")
    decay = args.lr_decay_iters or args.train_iters
    _require(
        args.lr_warmup_iters < decay,
        f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
        f"{decay}{' (default: --train-iters)' if args.lr_decay_iters is None else ''}",
    )


def validate(args: argparse.Namespace, world_size: int) -> None:
    """Check the layout and model flags; derive ``args.data_parallel_size`` and friends."""
    missing = [
        f
        for f in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "num_experts",
            "seq_length",
        )
        if getattr(args, f) is None
    ]
    _require(
        not missing,
        "missing "
        + ", ".join("--" + m.replace("_", "-") for m in missing)
        + " (or pass --model PRESET)",
    )
    _require(
        args.swiglu and args.disable_bias_linear,
        "the SMoE experts are SwiGLU without biases: pass --swiglu --disable-bias-linear "
        "(or --model PRESET)",
    )
    check_values(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep = args.expert_model_parallel_size
    _require(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
        f"--pipeline-model-parallel-size {pp} (world size = TP x PP x DP)",
    )
    given = args.expert_tensor_parallel_size
    etp = given or tp  # Megatron-LM's default: expert-TP = TP
    args.expert_tensor_parallel_size = etp
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    etp_text = f"--expert-tensor-parallel-size {etp}"
    if not given:
        etp_text = f"expert-TP {etp} (--expert-tensor-parallel-size, default TP)"
    _require(
        (tp * dp) % (etp * ep) == 0,
        f"--expert-model-parallel-size {ep} x {etp_text} = {ep * etp} must divide the "
        f"{tp * dp} ranks of a pipeline stage (TP {tp} x DP {dp} = world size {world_size} / "
        f"--pipeline-model-parallel-size {pp}), which the MoE layers regroup as EP x expert-TP "
        "x expert-DP",
    )
    args.expert_data_parallel_size = tp * dp // (etp * ep)
    _require(
        args.num_experts % ep == 0,
        f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size {ep}",
    )
    _require(
        args.num_layers % pp == 0,
        f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}",
    )
    if args.profile:
        outside = [r for r in args.profile_ranks if not 0 <= r < world_size]
        _require(
            not outside,
            f"--profile-ranks {' '.join(map(str, outside))}: no such rank (world size "
            f"{world_size})",
        )
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_stage, vl = args.num_layers // pp, args.num_layers_per_virtual_pipeline_stage
        _require(
            pp > 1,
            "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
        )
        _require(
            per_stage % vl == 0,
            f"--num-layers {args.num_layers} / --pipeline-model-parallel-size {pp} = "
            f"{per_stage} layers per stage, not divisible by "
            f"--num-layers-per-virtual-pipeline-stage {vl}",
        )
        args.virtual_pipeline_model_parallel_size = per_stage // vl
    _require(
        args.num_attention_heads % tp == 0,
        f"--num-attention-heads {args.num_attention_heads} is not divisible by "
        f"--tensor-model-parallel-size {tp}",
    )
    _require(
        args.num_query_groups % tp == 0,
        f"--num-query-groups {args.num_query_groups} is not divisible by "
        f"--tensor-model-parallel-size {tp}",
    )
    _require(
        args.num_attention_heads % args.num_query_groups == 0,
        f"--num-attention-heads {args.num_attention_heads} is not divisible by "
        f"--num-query-groups {args.num_query_groups}",
    )
    check_moe(args)
    check_wandb_flags(args)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    mb = args.micro_batch_size
    _require(
        args.global_batch_size % (mb * dp) == 0,
        f"--global-batch-size {args.global_batch_size} is not divisible by "
        f"--micro-batch-size {mb} x data-parallel size {dp} (= {mb * dp})",
    )
    args.num_microbatches = args.global_batch_size // (mb * dp)
    if args.virtual_pipeline_model_parallel_size:
        _require(
            args.num_microbatches % pp == 0,
            f"the interleaved schedule needs the number of micro-batches "
            f"({args.num_microbatches} = --global-batch-size / (--micro-batch-size x DP)) "
            f"to be a multiple of --pipeline-model-parallel-size {pp}",
        )
    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 are mutually exclusive")
    _require(
        not args.overlap_param_gather
        or (args.use_distributed_optimizer and args.overlap_grad_reduce),
        "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
        "(as in Megatron-LM)",
    )
    _require(
        args.seq_length <= args.max_position_embeddings,
        f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
        f"{args.max_position_embeddings}",
    )
    _require(args.train_iters is not None, "--train-iters is required")
    _require(
        args.mock_data or args.data_path,
        "pass --data-path PREFIX [PREFIX ...] (from `python -m data_tools preprocess`) "
        "or --mock-data",
    )
    if args.sequence_parallel and tp == 1:
        args.notices.append(
            "--sequence-parallel has no effect with --tensor-model-parallel-size 1; "
            "switched off (as Megatron-LM does)"
        )
        args.sequence_parallel = False
    _require(
        not (args.moe_layer_recompute and args.recompute_granularity == "full"),
        "--moe-layer-recompute cannot be combined with --recompute-granularity full (the whole "
        "layer is recomputed already), as in Megatron-LM",
    )
    modules = args.recompute_modules or []
    _require(
        "mla_up_proj" not in modules,
        "--recompute-modules mla_up_proj: this stack has no multi-latent attention",
    )
    _require(
        not ("shared_experts" in modules and args.moe_shared_expert_overlap),
        "--recompute-modules shared_experts cannot work with --moe-shared-expert-overlap "
        "(Megatron-Core's rule)",
    )
    _require(
        not ("moe" in modules and args.moe_router_force_load_balancing),
        "--recompute-modules moe (or --moe-layer-recompute) with "
        "--moe-router-force-load-balancing: the recomputation would draw other random routes",
    )
    if args.recompute_granularity == "full":
        _require(
            args.recompute_method is not None and args.recompute_num_layers,
            "--recompute-granularity full needs --recompute-method (uniform|block) and "
            "--recompute-num-layers",
        )
    _require(
        not args.moe_router_enable_expert_bias or args.moe_router_score_function == "sigmoid",
        "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
        "(as in Megatron-LM)",
    )
    _require(
        not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
        "--override-opt-param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive",
    )
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.transformer_impl is None:
        args.transformer_impl = "local" if args.cpu else "transformer_engine"
    args.masked_softmax_fusion = False  # machine_checks.check_environment() turns it on


def unhonoured(args: argparse.Namespace) -> list[str]:
    """Flags accepted for Megatron-LM compatibility that have no effect here, with the reason."""
    notes = []
    if args.moe_token_dispatcher_type != "alltoall":
        notes.append(
            f"--moe-token-dispatcher-type {args.moe_token_dispatcher_type}: this stack "
            "always uses its dropless all-to-all dispatcher"
        )
    if args.no_position_embedding and args.position_embedding_type == "rope":
        pass  # meaningful: no learned positions; RoPE is used
    if args.cpu:
        if args.moe_grouped_gemm:
            notes.append("--moe-grouped-gemm: on CPU the experts run as a loop of GEMMs")
        if args.fp8_format:
            notes.append(
                f"--fp8-format {args.fp8_format}: FP8 needs a GPU with Transformer "
                "Engine; CPU ranks compute in fp32/bf16"
            )
        if args.bf16:
            notes.append("--bf16 on CPU: supported but slow; use it to rehearse, fp32 to test")
        if args.cross_entropy_loss_fusion:
            notes.append(
                "--cross-entropy-loss-fusion: CPU ranks compute the loss with the blocked "
                "cross-entropy (model/cross_entropy.py), not Megatron-Core's fused one"
            )
    if args.no_masked_softmax_fusion and args.transformer_impl != "local":
        notes.append(
            "--no-masked-softmax-fusion: no effect with --transformer-impl "
            f"{args.transformer_impl} (Transformer Engine's attention picks its own kernels)"
        )
    elif args.no_masked_softmax_fusion and args.cpu:
        notes.append("--no-masked-softmax-fusion: CPU ranks never fuse the softmax")
    if args.profile and not args.use_pytorch_profiler and args.cpu:
        notes.append(
            "--profile without --use-pytorch-profiler brackets the steps for nsys "
            "(cudaProfilerStart/Stop): nothing to capture on CPU ranks; add --use-pytorch-profiler"
        )
    if args.recompute_modules and args.recompute_granularity != "selective":
        notes.append(
            "--recompute-modules: only read with --recompute-granularity selective "
            f"(here: {args.recompute_granularity})"
        )
    if args.num_workers:
        notes.append("--num-workers: batches are read in the training process")
    if args.attention_backend != "auto" and args.transformer_impl != "local":
        notes.append(
            f"--attention-backend {args.attention_backend}: only chooses the local "
            "implementation's core attention; Transformer Engine picks its own kernels"
        )
    return notes + moe_unhonoured(args)
