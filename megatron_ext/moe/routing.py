"""Expert selection: gate logits -> (top-k expert ids, combine weights). Plain functions.

Shapes legend: T tokens, H hidden, E experts, K top-k, G expert groups (E/G experts each).

Formulas (the semantics of Megatron-Core's ``topk_routing_with_score_function``; computed in
fp32, or fp64 with ``--moe-router-dtype fp64``):

* gate: ``logits_TE = x_TH @ W_EHᵀ`` (no bias).
* score function "softmax" (Mixtral): ``ids = topk(logits, K)`` and the weights
  ``probs_TK = softmax(logits.gather(ids))``: the softmax over the K selected logits, equal to
  HF Mixtral's "softmax over E, take top-k, renormalise". With ``pre_softmax`` the weights are
  the full-softmax probabilities of the selected experts, not renormalised (Qwen2-MoE's
  ``norm_topk_prob=False``; needed for K=1).
* score function "sigmoid" (DeepSeek-V3): ``s = sigmoid(logits)``, top-k on ``s + b_E``
  (``b_E``: aux-loss-free expert bias, selection only), weights = selected ``s`` divided by
  their sum when K > 1.
* group-limited routing (DeepSeek-V2/V3, ``num_groups`` G, ``group_topk`` Gk): the scores
  used for selection (logits; softmax probs with ``pre_softmax``; ``s + b`` for sigmoid) are
  split into G groups of E/G experts; a group's score is the sum of its top ``K // Gk``
  scores; the Gk best groups stay and the top-K experts are chosen among theirs only.
* ``scaling_factor`` (``--moe-router-topk-scaling-factor``): ``probs_TK *= factor``.
* forced balancing (``--moe-router-force-load-balancing``, benchmarks only): the logits are
  replaced by standard normal noise (straight-through: the gradient still reaches the gate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class Routing:
    """What the router hands to the dispatcher and to the loss terms."""

    probs_TK: torch.Tensor  # combine weights, fp32, differentiable
    topk_ids_TK: torch.Tensor  # int64 expert ids
    logits_TE: torch.Tensor  # fp32 gate logits
    scores_TE: torch.Tensor  # fp32 full-softmax probs / normalised sigmoid scores (aux loss)
    logsumexp_T: torch.Tensor  # logsumexp of each row of logits_TE (z-loss)


@dataclass(frozen=True)
class RouterOptions:
    """Selection settings of one router (Megatron-LM flag names without ``--moe-router-``)."""

    topk: int
    score_function: str = "softmax"
    pre_softmax: bool = False
    num_groups: int | None = None
    group_topk: int | None = None
    topk_scaling_factor: float | None = None
    dtype: torch.dtype = torch.float32
    force_load_balancing: bool = False

    @staticmethod
    def from_config(config) -> RouterOptions:
        return RouterOptions(
            topk=config.moe_router_topk,
            score_function=config.moe_router_score_function,
            pre_softmax=config.moe_router_pre_softmax,
            num_groups=config.moe_router_num_groups,
            group_topk=config.moe_router_group_topk,
            topk_scaling_factor=config.moe_router_topk_scaling_factor,
            dtype=ROUTER_DTYPES[config.moe_router_dtype or "fp32"],
            force_load_balancing=config.moe_router_force_load_balancing,
        )


def gate_logits(
    x_TH: torch.Tensor, weight_EH: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``logits_TE = x_TH @ weight_EHᵀ`` in ``dtype`` (fp32 at least, wider if the input is)."""
    dtype = torch.promote_types(torch.promote_types(x_TH.dtype, torch.float32), dtype)
    return F.linear(x_TH.to(dtype), weight_EH.to(dtype))


class _RandomLogits(torch.autograd.Function):
    """Forward: standard normal noise shaped like the logits; backward: identity (STE)."""

    @staticmethod
    def forward(ctx, logits_TE, generator):
        return torch.randn(
            logits_TE.shape, generator=generator, dtype=logits_TE.dtype, device="cpu"
        ).to(logits_TE.device)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def random_logits(logits_TE: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Forced balancing: noise replaces the logits (drawn on the host from ``generator``, so
    every TP rank of a group draws the same noise and CPU and GPU runs route alike)."""
    return _RandomLogits.apply(logits_TE, generator)


def group_limited_topk(
    sel_TE: torch.Tensor, k: int, num_groups: int, group_topk: int
) -> torch.Tensor:
    """Top-K expert ids restricted to the ``group_topk`` best of ``num_groups`` groups."""
    t, e = sel_TE.shape
    grouped_TGe = sel_TE.view(t, num_groups, e // num_groups)
    group_score_TG = grouped_TGe.topk(k // group_topk, dim=-1).values.sum(dim=-1)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_score_TG.topk(group_topk, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(t, e)
    return sel_TE.masked_fill(~keep_TE, float("-inf")).topk(k, dim=-1).indices


def _select(sel_TE: torch.Tensor, opts: RouterOptions) -> torch.Tensor:
    if opts.group_topk:
        return group_limited_topk(sel_TE, opts.topk, opts.num_groups, opts.group_topk)
    return torch.topk(sel_TE, opts.topk, dim=-1).indices


def topk_route(
    logits_TE: torch.Tensor,
    opts: RouterOptions | int,
    expert_bias_E: torch.Tensor | None = None,
) -> Routing:
    """Select K experts per token and compute their combine weights (module docstring);
    ``opts`` may be just K (Mixtral: softmax over the selected logits)."""
    opts = RouterOptions(topk=opts) if isinstance(opts, int) else opts
    k = opts.topk
    if opts.score_function == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        if expert_bias_E is not None:
            topk_ids_TK = _select(scores_TE.detach() + expert_bias_E, opts)
        else:
            topk_ids_TK = _select((scores_TE if opts.pre_softmax else logits_TE).detach(), opts)
        if opts.pre_softmax:
            probs_TK = scores_TE.gather(1, topk_ids_TK)
        else:
            probs_TK = torch.softmax(logits_TE.gather(1, topk_ids_TK), dim=-1)
        # logsumexp(l) = l_m - log softmax(l)_m for the argmax m: two [T] gathers instead of a
        # second pass over [T, E] (same value and gradient; softmax(l)_m >= 1/E, no underflow).
        plain = expert_bias_E is None and not opts.group_topk
        top1_T1 = topk_ids_TK[:, :1] if plain else logits_TE.argmax(-1, True)
        lse_T = (logits_TE.gather(1, top1_T1) - scores_TE.gather(1, top1_T1).log()).squeeze(1)
    elif opts.score_function == "sigmoid":
        sig_TE = torch.sigmoid(logits_TE)
        sel_TE = sig_TE.detach() if expert_bias_E is None else sig_TE.detach() + expert_bias_E
        topk_ids_TK = _select(sel_TE, opts)
        probs_TK = sig_TE.gather(1, topk_ids_TK)
        if k > 1:
            probs_TK = probs_TK / (probs_TK.sum(dim=-1, keepdim=True) + 1e-20)
        scores_TE = sig_TE / (sig_TE.sum(dim=-1, keepdim=True) + 1e-20)
        lse_T = torch.logsumexp(logits_TE, dim=-1)
    else:
        raise ValueError(f"unknown router score function {opts.score_function!r}")
    if opts.topk_scaling_factor:
        probs_TK = probs_TK * opts.topk_scaling_factor
    return Routing(probs_TK, topk_ids_TK, logits_TE, scores_TE, lse_T)
