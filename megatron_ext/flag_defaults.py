"""What a ``pretrain_mixtral.py`` flag means when it is not given, in order: the architecture of
``--model PRESET`` (explicit flags win, and are reported in ``args.notices``), Megatron-LM's
aliases (``--recompute-activations``, ``--moe-layer-recompute``), Megatron-LM's defaults, and the
flags derived from others (``--max-position-embeddings``, ``--num-query-groups``).
"""

from __future__ import annotations

import argparse

from megatron_ext.layout import recompute_modules
from megatron_ext.model.presets import PRESETS

# Architecture flags a preset fills: flag dest -> preset field (None: a fixed Mixtral value).
_PRESET_FLAGS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "num_experts": "num_experts",
    "moe_router_topk": "moe_router_topk",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "moe_layer_freq": "moe_layer_freq",
    "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_router_score_function": "moe_router_score_function",
    "seq_length": "seq_length",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rotary_base",
    "norm_epsilon": "norm_epsilon",
    "vocab_size": "vocab_size",
}
_MIXTRAL_FIXED = {
    "group_query_attention": True,
    "normalization": "RMSNorm",
    "position_embedding_type": "rope",
    "swiglu": True,
    "disable_bias_linear": True,
    "untie_embeddings_and_output_weights": True,
}
_MEGATRON_DEFAULTS = {
    "group_query_attention": False,
    "normalization": "LayerNorm",
    "norm_epsilon": 1e-5,
    "position_embedding_type": "learned_absolute",
    "swiglu": False,
    "disable_bias_linear": False,
    "untie_embeddings_and_output_weights": False,
    "rotary_base": 10000.0,
    "moe_router_topk": 2,
    "moe_layer_freq": 1,
    "moe_router_pre_softmax": False,
    "moe_router_score_function": "softmax",
    "moe_shared_expert_gate": False,
}


def apply_defaults(args: argparse.Namespace) -> None:
    """Fill what the command line left out (module docstring); overrides go to ``args.notices``."""
    if args.model:
        arch = PRESETS[args.model]
        values = {dest: getattr(arch, field) for dest, field in _PRESET_FLAGS.items()}
        if isinstance(values["moe_layer_freq"], tuple):
            values["moe_layer_freq"] = list(values["moe_layer_freq"])
        values.update(_MIXTRAL_FIXED)
        for dest, value in values.items():
            given = getattr(args, dest)
            if given is None:
                setattr(args, dest, value)
            elif given != value:
                args.notices.append(
                    f"--{dest.replace('_', '-')} {given} overrides --model {args.model}"
                )
    if args.recompute_activations and args.recompute_granularity is None:
        args.recompute_granularity = "selective"
    if args.moe_layer_recompute and args.recompute_granularity != "full":
        args.recompute_granularity = "selective"  # as Megatron-Core's TransformerConfig does
        args.recompute_modules = recompute_modules(args)
        if "moe" not in args.recompute_modules:
            args.recompute_modules.append("moe")
    for dest, value in _MEGATRON_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.num_query_groups is None or not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
