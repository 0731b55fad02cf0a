"""The grouped-GEMM experts with their weight gradients added straight into DDP's ``main_grad``.

Shapes legend: M rows grouped by local expert (``splits[e]`` rows for expert e), H hidden, L local
experts, F the FFN shard (``w13 [L, 2F, H]``, ``w2 [L, H, F]``).

Autograd's ``torch._grouped_mm`` returns bf16 weight gradients ``[L, 2F, H]`` and ``[L, H, F]``
that Megatron's DDP hook then adds into the fp32 ``main_grad`` (``main_grad.add_(grad)``): one
more write and read of a gradient-sized bf16 tensor and a mixed-dtype elementwise pass over
``main_grad`` per micro-batch. On the first H200 run (2-layer 8x7B proxy, EP 1, micro-batch 1)
those adds took 92 of the step's 507 ms of kernel time. With gradient accumulation fusion
(Megatron-LM's default) :class:`GroupedExpertsWgrad` keeps the grouped GEMMs for the forward and
the input gradients and computes each expert's weight gradient as one GEMM that accumulates into
``main_grad[e]`` (:func:`~megatron_ext.fallback_kernels.accumulate_wgrad`: cuBLAS with fp32
accumulation and beta = 1 where PyTorch can, as apex's ``wgrad_gemm_accum_fp32`` and TE's
grouped linear do). Autograd then gets untouched placeholders and ``grad_added_to_main_grad``,
so DDP's hook does not add them again (the contract of Megatron-Core's linear layers).

Forward: ``h = x w13ᵀ`` (grouped), ``a = silu(g) * u`` for ``h = [g | u]``, ``y = a w2ᵀ``
(grouped). Backward, per expert e on its rows: ``dW2[e] += dyᵀ a``, ``da = dy W2[e]`` (grouped),
``dh = [silu'(g) * u * da | silu(g) * da]``, ``dx = dh W13[e]`` (grouped),
``dW13[e] += dhᵀ x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ext.fallback_kernels import accumulate_wgrad, added_to_main_grad
from megatron_ext.moe.loop_experts import for_each_expert, swiglu_grad


def _grouped(a_MK, b_LKN, offs_L) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]`` (one CUTLASS grouped GEMM on sm90, bf16)."""
    return torch._grouped_mm(a_MK, b_LKN, offs=offs_L)


class GroupedExpertsWgrad(torch.autograd.Function):
    """SwiGLU experts on grouped rows; weight gradients accumulated into ``main_grad``."""

    @staticmethod
    def forward(ctx, x_MH, w13_LFH, w2_LHF, splits, splits_L, recompute_act=False):
        offs_L = torch.cumsum(splits_L, dim=0, dtype=torch.int32)
        h_MF2 = _grouped(x_MH, w13_LFH.transpose(-2, -1), offs_L)
        g_MF, u_MF = h_MF2.chunk(2, dim=-1)
        s_MF = F.silu(g_MF)
        a_MF = s_MF * u_MF
        y_MH = _grouped(a_MF, w2_LHF.transpose(-2, -1), offs_L)
        saved = (h_MF2,) if recompute_act else (h_MF2, s_MF, a_MF)
        ctx.save_for_backward(x_MH, w13_LFH, w2_LHF, offs_L, *saved)
        ctx.splits, ctx.recompute_act = splits, recompute_act
        # The parameters themselves (their main_grad attributes), as the expert loop keeps them
        ctx.params = (w13_LFH, w2_LHF)
        return y_MH

    @staticmethod
    def backward(ctx, dy_MH):
        x_MH, w13_LFH, w2_LHF, offs_L, h_MF2, *sa = ctx.saved_tensors
        if ctx.recompute_act:
            g_MF, u_MF = h_MF2.chunk(2, dim=-1)
            s_MF = F.silu(g_MF)
            a_MF = s_MF * u_MF
        else:
            s_MF, a_MF = sa
        dy_MH = dy_MH.contiguous()
        dh_MF2 = swiglu_grad(_grouped(dy_MH, w2_LHF, offs_L), h_MF2, s_MF)
        dx_MH = _grouped(dh_MF2, w13_LFH, offs_L)
        w13, w2 = ctx.params

        def wgrad(e, rows):  # an expert without rows adds nothing (for_each_expert skips it)
            accumulate_wgrad(w2.main_grad[e], dy_MH[rows].t(), a_MF[rows])
            accumulate_wgrad(w13.main_grad[e], dh_MF2[rows].t(), x_MH[rows])

        for_each_expert(wgrad, ctx.splits, on_cpu=False)
        return dx_MH, added_to_main_grad(w13), added_to_main_grad(w2), None, None, None
