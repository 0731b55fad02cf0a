"""Top-k router of the SMoE layer: gate, expert selection and the routing losses.

Shapes legend: T tokens (the TP-gathered tokens of one micro-batch on this rank), H hidden size,
E experts (global), K experts per token (top-k). Suffixes name the dims: ``logits_TE`` is [T, E].

Formulas (all in fp32, whatever the activation dtype):

* gate: ``logits_TE = x_TH @ W_EHᵀ`` (no bias).
* selection (score function "softmax", Mixtral): ``topk_ids_TK = topk(logits_TE, K)`` and the
  combine weights ``probs_TK = softmax(logits_TE.gather(topk_ids_TK))``: a softmax over the K
  selected logits, which equals HF Mixtral's "softmax over E, take top-k, renormalise".
  With ``pre_softmax`` (Megatron's ``moe_router_pre_softmax``; needed for K=1) the weights are the
  full-softmax probabilities of the selected experts, not renormalised.
  Score function "sigmoid" (DeepSeek-V3): ``scores = sigmoid(logits)``, top-k on the scores,
  weights = selected scores renormalised to sum to 1 (K>1).
* aux-loss-free balancing (DeepSeek-V3): a per-expert bias ``b_E`` is added to the scores used
  for *selection only* (full softmax probabilities or sigmoid scores); the weights never see it.
  After each global batch ``b_E += rate * sign(mean(c) - c_E)`` with ``c_E`` the tokens routed
  to each expert (:func:`updated_expert_bias`; Megatron's ``finalize_model_grads`` applies it to
  the router's ``expert_bias``/``local_tokens_per_expert`` buffers, which use Megatron's names).
* load-balancing loss (Switch Transformer, Megatron's normalisation):
  ``aux = E * sum_e f_e * P_e`` with ``f_e = c_e / (K * T)`` (fraction of the T*K
  (token, choice) assignments that went to e; ``sum_e f_e = 1``) and ``P_e = mean_t s_te``
  where ``s_TE`` is the full softmax (or the sum-normalised sigmoid scores). A perfectly
  balanced router gives ``aux = 1``. (HF's ``load_balancing_loss_func`` uses ``f_e = c_e / T``,
  i.e. K times ours.) The training loss gets ``moe_aux_loss_coeff * aux``.
* router z-loss (ST-MoE): ``z = mean_t logsumexp(logits_t)^2``; the loss gets
  ``moe_z_loss_coeff * z``.

The losses reach the training loss through :class:`AttachLoss`: an identity on the layer output
whose backward also emits ``d(total)/d(loss) = scale`` for the attached loss. The scale is an
explicit tensor (the layer's own buffer, read at backward time), not class-level state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    """What the router hands to the dispatcher and to the loss terms."""

    probs_TK: torch.Tensor  # combine weights, fp32, differentiable
    topk_ids_TK: torch.Tensor  # int64 expert ids
    logits_TE: torch.Tensor  # fp32 gate logits
    scores_TE: torch.Tensor  # fp32 full-softmax probs / normalised sigmoid scores (aux loss)
    logsumexp_T: torch.Tensor  # logsumexp of each row of logits_TE (z-loss)


def gate_logits(x_TH: torch.Tensor, weight_EH: torch.Tensor) -> torch.Tensor:
    """``logits_TE = x_TH @ weight_EHᵀ`` computed in fp32 (or wider if the input is wider)."""
    dtype = torch.promote_types(x_TH.dtype, torch.float32)
    return F.linear(x_TH.to(dtype), weight_EH.to(dtype))


def topk_route(
    logits_TE: torch.Tensor,
    k: int,
    *,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    expert_bias_E: torch.Tensor | None = None,
) -> Routing:
    """Select K experts per token and compute their combine weights (see module docstring)."""
    if score_function == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        if expert_bias_E is None:
            topk_ids_TK = torch.topk(logits_TE, k, dim=-1).indices
        else:
            topk_ids_TK = torch.topk(scores_TE.detach() + expert_bias_E, k, dim=-1).indices
        if pre_softmax:
            probs_TK = scores_TE.gather(1, topk_ids_TK)
        else:
            probs_TK = torch.softmax(logits_TE.gather(1, topk_ids_TK), dim=-1)
        # logsumexp(l) = l_m - log softmax(l)_m for the argmax m: two [T] gathers instead of a
        # second pass over [T, E] (same value and gradient; softmax(l)_m >= 1/E, no underflow).
        top1_T1 = topk_ids_TK[:, :1] if expert_bias_E is None else logits_TE.argmax(-1, True)
        lse_T = (logits_TE.gather(1, top1_T1) - scores_TE.gather(1, top1_T1).log()).squeeze(1)
    elif score_function == "sigmoid":
        sig_TE = torch.sigmoid(logits_TE)
        sel_TE = sig_TE.detach() if expert_bias_E is None else sig_TE.detach() + expert_bias_E
        topk_ids_TK = torch.topk(sel_TE, k, dim=-1).indices
        probs_TK = sig_TE.gather(1, topk_ids_TK)
        if k > 1:
            probs_TK = probs_TK / (probs_TK.sum(dim=-1, keepdim=True) + 1e-20)
        scores_TE = sig_TE / (sig_TE.sum(dim=-1, keepdim=True) + 1e-20)
        lse_T = torch.logsumexp(logits_TE, dim=-1)
    else:
        raise ValueError(f"unknown router score function {score_function!r}")
    return Routing(probs_TK, topk_ids_TK, logits_TE, scores_TE, lse_T)


def load_balancing_loss(
    scores_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, k: int
) -> torch.Tensor:
    """Switch-Transformer loss ``E * sum_e (c_e / (K*T)) * mean_t s_te`` (unscaled)."""
    num_tokens, num_experts = scores_TE.shape
    t = max(num_tokens, 1)
    f_E = tokens_per_expert_E.to(scores_TE.dtype) / (k * t)
    p_E = scores_TE.sum(dim=0) / t
    return num_experts * torch.sum(f_E * p_E)


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
    """DeepSeek-V3 bias update: raise the bias of under-loaded experts, lower the others.

    ``b_E + rate * sign(mean(c) - c_E)``; the counts must already be summed over every rank
    that shares the router (Megatron's ``finalize_model_grads`` does the same sum).
    """
    c_E = tokens_per_expert_E.to(torch.float32)
    return expert_bias_E + rate * torch.sign(c_E.mean() - c_E)


class AttachLoss(torch.autograd.Function):
    """``y = attach(x, loss, scale, divisor)``: identity on ``x``; backward sends
    ``scale / divisor`` as the gradient of ``loss`` so it joins the training loss.

    ``scale`` is a 0-d tensor read at backward time (the training loop may set it after the
    forward: grad-scaler scale / number of micro-batches). ``divisor`` undoes a sum that the
    backward will do anyway (the TP group: every TP rank attaches the same loss).
    """

    @staticmethod
    def forward(ctx, x, loss, scale, divisor: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        ctx.divisor = divisor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        (loss,) = ctx.saved_tensors
        grad_loss = torch.ones_like(loss) * (ctx.scale.to(loss.dtype) / ctx.divisor)
        return grad_x, grad_loss, None, None


def attach_loss(x, loss, scale: torch.Tensor, divisor: float = 1.0) -> torch.Tensor:
    """Functional form of :class:`AttachLoss`."""
    return AttachLoss.apply(x, loss, scale, divisor)


class TopKRouter(torch.nn.Module):
    """Holds the gate weight ``weight [E, H]`` and the optional expert bias.

    Buffers use Megatron's names so that ``megatron.core.distributed.finalize_model_grads``
    updates the bias once per global batch: ``expert_bias`` (persistent, fp32) and
    ``local_tokens_per_expert`` (non-persistent, fp32, counts since the last update).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        topk: int,
        *,
        score_function: str = "softmax",
        pre_softmax: bool = False,
        enable_expert_bias: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.num_experts, self.topk = num_experts, topk
        self.score_function, self.pre_softmax = score_function, pre_softmax
        self.weight = torch.nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=params_dtype, device=device)
        )
        if enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device))
            self.register_buffer(
                "local_tokens_per_expert", torch.zeros(num_experts, device=device), persistent=False
            )
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None

    def _apply(self, fn, recurse=True):
        """Keep ``expert_bias`` and its counts fp32, values untouched: ``Float16Module`` casts
        every floating buffer to bf16/fp16 when it wraps the model, before a checkpoint loads
        into them; a bf16 buffer would round the loaded bias (it moves in steps of ~1e-3) and
        make ``--bf16`` resume inexact. Device moves still apply."""
        kept = {
            n: b
            for n in ("expert_bias", "local_tokens_per_expert")
            if (b := getattr(self, n)) is not None
        }
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old if old.device == new.device else new.float()
        return self

    def forward(self, x_TH: torch.Tensor, weight_EH: torch.Tensor | None = None) -> Routing:
        """Route ``x_TH``. ``weight_EH`` overrides ``self.weight`` (the layer passes the weight
        through a TP all-reduce-on-backward op)."""
        logits_TE = gate_logits(x_TH, self.weight if weight_EH is None else weight_EH)
        return topk_route(
            logits_TE,
            self.topk,
            score_function=self.score_function,
            pre_softmax=self.pre_softmax,
            expert_bias_E=self.expert_bias,
        )

    @torch.no_grad()
    def count_for_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Accumulate this micro-batch's routed counts for the next bias update."""
        if self.local_tokens_per_expert is not None:
            self.local_tokens_per_expert += tokens_per_expert_E.to(torch.float32)
