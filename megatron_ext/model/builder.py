"""MoE GPT on Megatron-Core: flags -> ``TransformerConfig`` -> ``GPTModel`` with our SMoE layer.

``transformer_config(args)`` is the one visible place where command-line flags become
Megatron-Core config fields. ``layer_spec(config, impl)`` takes Megatron-Core's own GPT layer spec
(``local``: pure PyTorch; ``transformer_engine``: TE attention, norms and FP8, import-guarded) and
puts our SMoE layer in the MLP slot (Megatron-Core's dense MLP in the dense layers of a mixed
stack, ``--moe-layer-freq``). ``build_model(args, config)`` returns the
list of model chunks for this pipeline rank (one per virtual stage).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_ext import fallback_kernels
from megatron_ext.model.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.model.norm import SequenceParallelNorm
from megatron_ext.model.output_layer import reuse_logits_buffer
from megatron_ext.model.sdpa_attention import SDPAttention
from megatron_ext.model.stack import moe_layer_pattern

try:  # Transformer Engine needs CUDA; its spec is only offered where it imports.
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: round up to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args: argparse.Namespace) -> TransformerConfig:
    """Map parsed flags to Megatron-Core's ``TransformerConfig`` (flag -> field, one place)."""
    from megatron_ext.layout import recompute_modules  # layout -> moe_checks -> model: a cycle

    dtype = params_dtype(args)
    window = (args.window_size - 1, 0) if args.window_size else None
    config = TransformerConfig(
        # architecture
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        init_method_std=args.init_method_std,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        masked_softmax_fusion=args.masked_softmax_fusion,  # layout.py: only if the kernels exist
        window_size=window,
        # mixture of experts (our SMoE layer reads these)
        num_moe_experts=args.num_experts,
        moe_layer_freq=args.moe_layer_freq,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_shared_expert_overlap=False,  # accepted, runs in line: layout.unhonoured says so
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_dtype=args.moe_router_dtype,
        moe_router_force_load_balancing=args.moe_router_force_load_balancing,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_token_drop_policy=args.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        moe_grouped_gemm=args.moe_grouped_gemm and not args.cpu,
        moe_token_dispatcher_type="alltoall",
        # parallelism
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        # precision
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        fp8=args.fp8_format if not args.cpu else None,
        fp8_recipe=args.fp8_recipe,
        # fused kernels (Megatron-Core's torch.compile'd functions): GPU ranks only, as
        # Megatron-LM's flags ask; RoPE's fusion needs Transformer Engine's or apex's kernel
        bias_activation_fusion=args.bias_swiglu_fusion and not args.cpu,
        bias_dropout_fusion=args.bias_dropout_fusion and not args.cpu,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion and not args.cpu,
        cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
        # weight gradients added straight into DDP's main_grad (apex's kernel, or
        # fallback_kernels.WgradAccumulation), as Megatron-LM by default
        gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        use_cpu_initialization=args.cpu,
        # pipeline: as Megatron-LM sets them. Not deallocating on CPU: it swaps a sent
        # tensor's .data, which NCCL has already read on its stream but gloo's asynchronous
        # send may still read later (NaN gradients in a PP4 x VPP8 rehearsal).
        deallocate_pipeline_outputs=not args.cpu,
        overlap_p2p_comm=bool(args.virtual_pipeline_model_parallel_size),
        batch_p2p_comm=not args.virtual_pipeline_model_parallel_size,
        # activation recomputation
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        # moe_act is put back below: Megatron-Core accepts it only with its grouped-GEMM
        # experts, and ours always run as one grouped node (moe/experts.py)
        recompute_modules=[m for m in recompute_modules(args) if m != "moe_act"],
    )
    if "moe_act" in recompute_modules(args):
        config.recompute_modules.append("moe_act")
    return config


def layer_spec(
    config: TransformerConfig, impl: str = "local", moe: bool = True, sdpa: bool = True
) -> ModuleSpec:
    """Megatron-Core's GPT layer spec for ``impl``: with our SMoE layer as the MLP, or (``moe``
    False, a dense layer of a mixed stack) Megatron-Core's own MLP of ``ffn_hidden_size``. With
    the local implementation the core attention is ``SDPAttention`` (PyTorch's fused kernels)
    unless ``sdpa`` is False (Megatron-Core's unfused ``DotProductAttention``)."""
    from megatron_ext.moe import smoe_mlp_spec

    num_experts = config.num_moe_experts if moe else None
    if impl == "transformer_engine":
        if not HAVE_TE:
            raise RuntimeError(
                "--transformer-impl transformer_engine needs Transformer Engine (pip install "
                "'megatron-mixtral[gpu]' or an NGC PyTorch container); use --transformer-impl "
                "local otherwise"
            )
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    elif impl == "local":
        spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=config.normalization)
        spec.submodules.input_layernorm = SequenceParallelNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
        if sdpa:
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
        if moe:
            # The local spec maps pre_mlp_layernorm onto TE's fused dense-MLP name; with an MoE
            # there is no fused fc1, so keep the plain name (the TE MoE spec uses it too) and
            # checkpoints stay interchangeable between the two implementations.
            spec.submodules.sharded_state_dict_keys_map = {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_"
            }
    else:
        raise ValueError(f"unknown transformer implementation {impl!r}")
    if moe:
        # The class itself rather than its ModuleSpec: TransformerLayer passes no extra kwargs
        # to an MLP it does not know either way, but logs "Unknown MLP type" for every spec'd one.
        spec.submodules.mlp = smoe_mlp_spec().module
    return spec


def block_spec(config: TransformerConfig, impl: str, vp_stage: int | None, sdpa: bool = True):
    """The decoder block of one model chunk: per layer our MoE spec or, where
    ``--moe-layer-freq`` makes the layer dense, the dense one; the final norm works with
    sequence parallel (``norm.py``) for the local implementation, TE's otherwise."""
    pattern = moe_layer_pattern(config.moe_layer_freq, config.num_layers)
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    specs = {moe: layer_spec(config, impl, moe, sdpa) for moe in set(pattern[first : first + n])}
    if impl == "local":
        norm = SequenceParallelNorm
    else:
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    return TransformerBlockSubmodules(
        layer_specs=[specs[moe] for moe in pattern[first : first + n]], layer_norm=norm
    )


def uses_sdpa(args: argparse.Namespace) -> bool:
    """``--attention-backend`` (Megatron-LM's flag) for the local implementation: ``unfused`` or
    ``local`` keep Megatron-Core's ``DotProductAttention``; ``auto`` (default), ``flash`` and
    ``fused`` take ``SDPAttention``, where PyTorch picks its flash / memory-efficient kernel."""
    return args.transformer_impl == "local" and args.attention_backend not in ("unfused", "local")


class MoEGPTModel(GPTModel):
    """Megatron-Core's ``GPTModel``; on CPU ranks its loss is the blocked vocab-parallel
    cross-entropy (``cross_entropy.py``: the same arithmetic, a third of the memory traffic)."""

    def compute_language_model_loss(self, labels, logits):
        if logits.is_cuda or self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        labels_SB = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], as Megatron's
        loss_SB = vocab_parallel_cross_entropy(logits, labels_SB, self.pg_collection.tp)
        return loss_SB.transpose(0, 1).contiguous()


def build_model(args: argparse.Namespace, config: TransformerConfig) -> list[GPTModel]:
    """This pipeline rank's model chunks (one per virtual pipeline stage)."""
    if config.gradient_accumulation_fusion:  # the linear layers check for the kernel when built
        fallback_kernels.use_wgrad_accumulation()
    vocab = padded_vocab_size(
        args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )
    vpp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            MoEGPTModel(
                config=config,
                transformer_layer_spec=block_spec(
                    config, args.transformer_impl, stage, sdpa=uses_sdpa(args)
                ),
                vocab_size=vocab,
                max_sequence_length=args.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                position_embedding_type=args.position_embedding_type,
                rotary_base=int(args.rotary_base),
                vp_stage=stage,
            )
        )
        if args.cpu and chunks[-1].post_process:  # the step's largest tensor, CPU ranks
            reuse_logits_buffer(chunks[-1].output_layer)
    from megatron_ext.moe.layer import SMoELayer

    for module in (m for chunk in chunks for m in chunk.modules()):
        # Megatron's TransformerLayer takes only its own MoELayer for an MoE layer: "mlp"
        # recompute is for dense MLPs, ours recomputes itself for "moe" (moe/layer.py).
        if isinstance(getattr(module, "mlp", None), SMoELayer):
            module.recompute_mlp = False
    return chunks
