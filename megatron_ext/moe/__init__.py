"""Top-2 dropless sparse MoE (Mixtral) for Megatron-Core with expert parallelism.

``smoe_mlp_spec()`` goes into ``TransformerLayerSubmodules.mlp``; ``collect_moe_stats`` and
``set_aux_loss_scale`` are what the training loop calls. See docs/moe.md.
"""

from megatron_ext.moe.dispatcher import DispatchMeta, MoEGroups, combine, dispatch
from megatron_ext.moe.experts import GroupedExperts, expert_mlp, swiglu
from megatron_ext.moe.layer import SMoELayer, collect_moe_stats, set_aux_loss_scale, smoe_mlp_spec
from megatron_ext.moe.router import (
    AttachLoss,
    Routing,
    TopKRouter,
    attach_loss,
    gate_logits,
    load_balancing_loss,
    topk_route,
    updated_expert_bias,
    z_loss,
)

__all__ = [
    "AttachLoss",
    "DispatchMeta",
    "GroupedExperts",
    "MoEGroups",
    "Routing",
    "SMoELayer",
    "TopKRouter",
    "attach_loss",
    "collect_moe_stats",
    "combine",
    "dispatch",
    "expert_mlp",
    "gate_logits",
    "load_balancing_loss",
    "set_aux_loss_scale",
    "smoe_mlp_spec",
    "swiglu",
    "topk_route",
    "updated_expert_bias",
    "z_loss",
]
