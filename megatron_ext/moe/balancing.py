"""Routing losses and the aux-loss-free bias update. Plain functions, formulas below.

Shapes legend: T tokens, E experts, K top-k, S sequence length, B sequences (T = S*B, token
``t = s*B + b``: the layer flattens ``[S, B, H]``).

* counts for the losses: ``c_E`` = number of tokens whose plain top-K of the scores
  ``s_TE`` contains e (Megatron's ``compute_routing_scores_for_aux_loss``: no expert bias, no
  groups, no capacity), :func:`aux_loss_counts`.
* load balancing ``aux_loss`` (Switch Transformer, Megatron's normalisation):
  ``aux = E * sum_e f_e * P_e``, ``f_e = c_e / (K*T)``, ``P_e = mean_t s_te``, ``s_TE`` the
  full softmax (or the sum-normalised sigmoid scores). Balanced routing gives 1. (HF's
  ``load_balancing_loss_func`` uses ``f_e = c_e / T``, K times ours.)
* ``seq_aux_loss`` (DeepSeek-V2/V3): the same loss per sequence, averaged over the B
  sequences: ``mean_b E * sum_e (c_be / (K*S)) * (mean_s s_(s,b),e)``.
* ``global_aux_loss``: ``aux`` with ``c_E`` replaced by the counts accumulated over the
  micro-batches of the global batch so far, summed over the data-parallel ranks and averaged
  per micro-batch (``T`` then counts the tokens of all DP ranks); ``P_E`` stays local.
* router z-loss (ST-MoE): ``z = mean_t logsumexp(logits_t)^2``.
* aux-loss-free bias (DeepSeek-V3): after each global batch ``b_E += rate * sign(mean(c) -
  c_E)`` with the routed counts summed over every rank that shares the router.
"""

from __future__ import annotations

import torch

LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def aux_loss_counts(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """``c_E``: tokens whose top-K of ``scores_TE`` contains e (int64)."""
    ids_TK = torch.topk(scores_TE.detach(), k, dim=-1).indices
    return torch.zeros(scores_TE.shape[1], dtype=torch.long, device=scores_TE.device).index_add_(
        0, ids_TK.reshape(-1), torch.ones_like(ids_TK.reshape(-1))
    )


def load_balancing_loss(
    scores_TE: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    k: int,
    total_tokens: int | None = None,
) -> torch.Tensor:
    """``E * sum_e (c_e / (K*T)) * (sum_t s_te / T)`` (unscaled); ``T`` = the rows of
    ``scores_TE`` unless ``total_tokens`` says how many tokens the counts cover."""
    num_tokens, num_experts = scores_TE.shape
    t = max(num_tokens if total_tokens is None else total_tokens, 1)
    f_E = tokens_per_expert_E.to(scores_TE.dtype) / (k * t)
    p_E = scores_TE.sum(dim=0) / t
    return num_experts * torch.sum(f_E * p_E)


def seq_load_balancing_loss(scores_TE: torch.Tensor, k: int, num_sequences: int) -> torch.Tensor:
    """Mean over the B sequences of each sequence's :func:`load_balancing_loss` (counts from
    the plain top-K of the scores)."""
    t, e = scores_TE.shape
    s = t // num_sequences
    topk_ids_TK = torch.topk(scores_TE.detach(), k, dim=-1).indices
    seq_of_t = torch.arange(t, device=scores_TE.device) % num_sequences
    # Counts per (sequence, expert): flat index b*E + e of each (token, choice) pair.
    flat_N = (seq_of_t.unsqueeze(1) * e + topk_ids_TK).reshape(-1)
    c_BE = torch.zeros(num_sequences * e, dtype=scores_TE.dtype, device=scores_TE.device)
    c_BE = c_BE.index_add_(0, flat_N, torch.ones_like(flat_N, dtype=scores_TE.dtype))
    p_BE = scores_TE.view(s, num_sequences, e).sum(dim=0).reshape(-1)
    return e * torch.sum(c_BE * p_BE) / (k * s * s * num_sequences)


def z_loss(logits_TE: torch.Tensor, logsumexp_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (unscaled); pass ``logsumexp_T``
    (``Routing.logsumexp_T``) when it is already known."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    lse_T = torch.logsumexp(logits_TE, dim=-1) if logsumexp_T is None else logsumexp_T
    return lse_T.square().mean()


def updated_expert_bias(
    expert_bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float
) -> torch.Tensor:
    """DeepSeek-V3 bias update ``b_E + rate * sign(mean(c) - c_E)``: raise the bias of
    under-loaded experts, lower the others (counts summed over every rank sharing the router;
    Megatron's ``finalize_model_grads`` does the same sum)."""
    c_E = tokens_per_expert_E.to(torch.float32)
    return expert_bias_E + rate * torch.sign(c_E.mean() - c_E)
