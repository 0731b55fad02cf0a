"""Opt-in token dropping (``--moe-expert-capacity-factor``); the layer is dropless without it.

Shapes legend: T tokens of this rank, K top-k, E experts, C capacity, L local experts,
P EP ranks.

* capacity (Megatron's ``get_capacity``): ``C = ceil(T * K / E * factor)`` (T: the tokens this
  rank routes, i.e. its TP group's tokens).
* dropping: each expert keeps at most C of the (token, choice) pairs routed to it:
  policy ``probs`` keeps the C with the largest combine weights (ties: earlier token first),
  ``position`` the C earliest tokens. A dropped pair gets expert id ``E`` (the sentinel the
  dispatcher skips) and weight 0, so it contributes nothing forward or backward.
* padding (``--moe-pad-expert-input-to-capacity``): every local expert's input is padded with
  zero rows to ``P * C`` rows (C from each source rank), so the expert GEMMs see fixed shapes.
  Megatron pads with real tokens of weight 0 on the sending side; the expert outputs and every
  gradient are the same, only the all-to-all here carries the unpadded rows.
"""

from __future__ import annotations

import math

import torch

DROP_POLICIES = ("probs", "position")


def expert_capacity(num_tokens: int, topk: int, num_experts: int, factor: float) -> int:
    """``ceil(T * K / E * factor)``."""
    return math.ceil(num_tokens * topk / num_experts * factor)


def drop_over_capacity(
    topk_ids_TK: torch.Tensor,
    probs_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    policy: str = "probs",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_TK, probs_TK)`` with the pairs beyond each expert's capacity dropped (id E,
    weight 0)."""
    if policy not in DROP_POLICIES:
        raise ValueError(f"unknown token drop policy {policy!r}")
    ids_N = topk_ids_TK.reshape(-1)
    order_N = torch.arange(ids_N.numel(), device=ids_N.device)  # token-major pair order
    if policy == "probs":  # largest weight first; stable sorts keep earlier tokens first on ties
        order_N = torch.sort(probs_TK.detach().reshape(-1), descending=True, stable=True).indices
    by_expert_N = order_N[torch.sort(ids_N[order_N], stable=True).indices]
    sorted_ids_N = ids_N[by_expert_N]
    # Rank of each pair inside its expert: position in the sorted list minus the expert's start.
    starts_E = torch.searchsorted(sorted_ids_N, torch.arange(num_experts, device=ids_N.device))
    rank_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[sorted_ids_N]
    keep_N = torch.empty_like(ids_N, dtype=torch.bool)
    keep_N[by_expert_N] = rank_N < capacity
    keep_TK = keep_N.view_as(topk_ids_TK)
    return topk_ids_TK.masked_fill(~keep_TK, num_experts), probs_TK * keep_TK


class _PadRows(torch.autograd.Function):
    """``out[index[m]] = x[m]``, zeros elsewhere; backward gathers the rows back."""

    @staticmethod
    def forward(ctx, x_MH, index_M, rows: int):
        ctx.save_for_backward(index_M)
        out = x_MH.new_zeros(rows, x_MH.shape[-1])
        out.index_copy_(0, index_M, x_MH)
        return out

    @staticmethod
    def backward(ctx, dout):
        (index_M,) = ctx.saved_tensors
        return dout.index_select(0, index_M), None, None


def padded_index(splits: tuple[int, ...], rows_per_expert: int, device) -> torch.Tensor:
    """Where each row of an expert-grouped input goes when every expert gets
    ``rows_per_expert`` rows: row j of expert e goes to ``e * rows_per_expert + j``."""
    parts = [torch.arange(n, device=device) + e * rows_per_expert for e, n in enumerate(splits)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def pad_expert_input(x_MH: torch.Tensor, index_M: torch.Tensor, rows: int) -> torch.Tensor:
    return _PadRows.apply(x_MH, index_M, rows)


def unpad_expert_output(y_RH: torch.Tensor, index_M: torch.Tensor) -> torch.Tensor:
    """The rows of the real inputs (differentiable gather)."""
    return y_RH.index_select(0, index_M)
