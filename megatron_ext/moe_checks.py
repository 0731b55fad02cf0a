"""Start-up checks of the MoE flags (Megatron-LM's rules, said with the flags' names) and the
notices they produce. Called by ``layout.validate`` before anything is built."""

from __future__ import annotations

import argparse

from megatron_ext.errors import LayoutError
from megatron_ext.errors import require_flags as _require
from megatron_ext.model.stack import moe_layer_pattern


def check_moe(args: argparse.Namespace) -> None:
    """Validate the MoE flags; fill ``args.moe_layer_pattern`` (True per MoE layer)."""
    tp, e, k = args.tensor_model_parallel_size, args.num_experts, args.moe_router_topk
    try:
        args.moe_layer_pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
    except ValueError as err:
        raise LayoutError(str(err)) from None
    _require(any(args.moe_layer_pattern), "--moe-layer-freq leaves no MoE layer")
    etp = args.expert_tensor_parallel_size or tp
    widths = [("--ffn-hidden-size", args.ffn_hidden_size, "--tensor-model-parallel-size", tp)]
    expert_ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    # expert-TP: its own flag when set apart from TP, else TP's (its default)
    by = "--tensor-model-parallel-size" if etp == tp else "--expert-tensor-parallel-size"
    widths.append(("--moe-ffn-hidden-size", expert_ffn, by, etp))
    if args.moe_shared_expert_intermediate_size:  # a dense MLP over attention's TP
        shared = args.moe_shared_expert_intermediate_size
        widths.append(
            ("--moe-shared-expert-intermediate-size", shared, "--tensor-model-parallel-size", tp)
        )
    for flag, width, by, size in widths:
        _require(width % size == 0, f"{flag} {width} is not divisible by {by} {size}")
    groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
    _require(
        bool(groups) == bool(group_topk),
        "--moe-router-num-groups and --moe-router-group-topk go together (group-limited routing)",
    )
    if groups:
        _require(e % groups == 0, f"--num-experts {e} is not divisible by --moe-router-num-groups "
                 f"{groups}")  # fmt: skip
        _require(
            group_topk <= groups,
            f"--moe-router-group-topk {group_topk} exceeds --moe-router-num-groups {groups}",
        )
        _require(
            k % group_topk == 0,
            f"--moe-router-topk {k} is not divisible by --moe-router-group-topk {group_topk} "
            "(each chosen group scores its top topk/group_topk experts)",
        )
        _require(
            k <= group_topk * (e // groups),
            f"--moe-router-topk {k} exceeds the experts of the {group_topk} chosen groups",
        )
    _require(
        not args.moe_pad_expert_input_to_capacity or args.moe_expert_capacity_factor,
        "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor",
    )
    _require(
        not args.moe_shared_expert_overlap or args.moe_shared_expert_intermediate_size,
        "--moe-shared-expert-overlap needs --moe-shared-expert-intermediate-size",
    )
    _require(
        not args.moe_shared_expert_gate or args.moe_shared_expert_intermediate_size,
        "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size",
    )
    if args.moe_router_force_load_balancing:
        args.notices.append(
            "WARNING --moe-router-force-load-balancing: tokens are routed on RANDOM logits, not "
            "on the model: use it to benchmark a balanced load only, never to train a model"
        )
    if args.moe_expert_capacity_factor:
        args.notices.append(
            f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor}: tokens beyond an "
            f"expert's capacity are dropped (policy {args.moe_token_drop_policy})"
        )


def moe_unhonoured(args: argparse.Namespace) -> list[str]:
    notes = []
    if args.moe_shared_expert_overlap:
        notes.append(
            "--moe-shared-expert-overlap: the shared experts run in line with the routed ones "
            "(same results; the overlap on a side stream is not implemented here)"
        )
    return notes
