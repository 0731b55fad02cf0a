"""Top-k sparse MoE for Megatron-Core with expert parallelism: Mixtral, DeepSeek-MoE and
Qwen2-MoE designs (fine-grained and shared experts), dropless unless a capacity is set.

``smoe_mlp_spec()`` goes into ``TransformerLayerSubmodules.mlp``; ``collect_moe_stats`` and
``set_aux_loss_scale`` are what the training loop calls. See docs/moe.md.
"""

from megatron_ext.moe.balancing import (
    aux_loss_counts,
    load_balancing_loss,
    seq_load_balancing_loss,
    updated_expert_bias,
    z_loss,
)
from megatron_ext.moe.capacity import drop_over_capacity, expert_capacity
from megatron_ext.moe.dispatcher import DispatchGroups, DispatchMeta, MoEGroups, combine, dispatch
from megatron_ext.moe.experts import GroupedExperts, expert_mlp, swiglu
from megatron_ext.moe.layer import SMoELayer, collect_moe_stats, set_aux_loss_scale, smoe_mlp_spec
from megatron_ext.moe.router import AttachLoss, TopKRouter, attach_loss
from megatron_ext.moe.routing import (
    RouterOptions,
    Routing,
    gate_logits,
    group_limited_topk,
    topk_route,
)

__all__ = [
    "AttachLoss",
    "DispatchGroups",
    "DispatchMeta",
    "GroupedExperts",
    "MoEGroups",
    "Routing",
    "SMoELayer",
    "TopKRouter",
    "RouterOptions",
    "attach_loss",
    "aux_loss_counts",
    "drop_over_capacity",
    "expert_capacity",
    "group_limited_topk",
    "seq_load_balancing_loss",
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
