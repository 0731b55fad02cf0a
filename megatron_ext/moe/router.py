"""The router module of the SMoE layer and the op that joins its losses to the training loss.

:class:`TopKRouter` holds the gate weight ``[E, H]``, the optional aux-loss-free expert bias
and, for ``global_aux_loss``, the counts of the global batch so far; selection and weights are
``routing.py``'s plain functions, the losses ``balancing.py``'s.

The losses reach the training loss through :class:`AttachLoss`: an identity on the layer output
whose backward also emits ``d(total)/d(loss) = scale`` for the attached loss. The scale is an
explicit tensor (the layer's own buffer, read at backward time), not class-level state.
"""

from __future__ import annotations

import torch

from megatron_ext.moe.routing import (
    RouterOptions,
    Routing,
    gate_logits,
    random_logits,
    topk_route,
)

_FP32_BUFFERS = ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert", "ga_steps")


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
        opts: RouterOptions,
        *,
        enable_expert_bias: bool = False,
        global_aux_loss: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device=None,
        noise_seed: int = 0,
    ):
        super().__init__()
        self.num_experts, self.opts, self.topk = num_experts, opts, opts.topk
        self.weight = torch.nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=params_dtype, device=device)
        )
        self.expert_bias = self.local_tokens_per_expert = None
        if enable_expert_bias:
            del self.expert_bias, self.local_tokens_per_expert  # plain attributes -> buffers
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device))
            self.register_buffer(
                "local_tokens_per_expert", torch.zeros(num_experts, device=device), persistent=False
            )
        # global_aux_loss: counts of the global batch so far (summed over DP) and micro-batches;
        # Megatron's finalize_model_grads calls reset_global_aux_loss_tracker once per step.
        self.global_tokens_per_expert = self.ga_steps = None
        if global_aux_loss:
            del self.global_tokens_per_expert, self.ga_steps
            self.register_buffer(
                "global_tokens_per_expert",
                torch.zeros(num_experts, device=device),
                persistent=False,
            )
            self.register_buffer("ga_steps", torch.zeros((), device=device), persistent=False)
        self.noise = None  # forced balancing: host generator, same stream on every TP rank
        if opts.force_load_balancing:
            self.noise = torch.Generator().manual_seed(noise_seed)

    def _apply(self, fn, recurse=True):
        """Keep ``expert_bias`` and the counts fp32, values untouched: ``Float16Module`` casts
        every floating buffer to bf16/fp16 when it wraps the model, before a checkpoint loads
        into them; a bf16 buffer would round the loaded bias (it moves in steps of ~1e-3) and
        make ``--bf16`` resume inexact. Device moves still apply."""
        kept = {n: b for n in _FP32_BUFFERS if (b := getattr(self, n)) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old if old.device == new.device else new.float()
        return self

    def forward(self, x_TH: torch.Tensor, weight_EH: torch.Tensor | None = None) -> Routing:
        """Route ``x_TH``. ``weight_EH`` overrides ``self.weight`` (the layer passes the weight
        through a TP all-reduce-on-backward op)."""
        weight_EH = self.weight if weight_EH is None else weight_EH
        logits_TE = gate_logits(x_TH, weight_EH, self.opts.dtype)
        if self.noise is not None:
            logits_TE = random_logits(logits_TE, self.noise)
        return topk_route(logits_TE, self.opts, self.expert_bias)

    @torch.no_grad()
    def average_global_counts(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """global_aux_loss: add this micro-batch's counts (already summed over DP) and return
        the mean counts per micro-batch of the global batch so far."""
        self.global_tokens_per_expert += tokens_per_expert_E.to(torch.float32)
        self.ga_steps += 1
        return self.global_tokens_per_expert / self.ga_steps

    def reset_global_aux_loss_tracker(self) -> None:
        """Called by Megatron's ``finalize_model_grads`` after each global batch."""
        if self.global_tokens_per_expert is not None:
            self.global_tokens_per_expert.zero_()
            self.ga_steps.zero_()

    @torch.no_grad()
    def count_for_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Accumulate this micro-batch's routed counts for the next bias update."""
        if self.local_tokens_per_expert is not None:
            self.local_tokens_per_expert += tokens_per_expert_E.to(torch.float32)
