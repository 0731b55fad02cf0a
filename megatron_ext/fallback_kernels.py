"""Faster stand-ins for the apex kernels Megatron-Core replaces with Python loops when neither
apex nor Transformer Engine is installed (pip installs, CPU ranks).

``multi_tensor_scale`` (gradient clipping scales every gradient by ``max_norm / norm``):
Megatron-Core's fallback ``local_multi_tensor_scale`` runs ``dst.copy_(src * scale)`` per
tensor, allocating a full copy of every gradient on every clipped step (60 ms of a 2.3 s CPU
step at issue 14's shape). When the source and destination lists are the same tensors, as
they are for clipping, one in-place ``torch._foreach_mul_`` does the same arithmetic.

``fused_weight_gradient_mlp_cuda`` (gradient accumulation fusion, Megatron-LM's default, off
with ``--no-gradient-accumulation-fusion``): the weight gradient GEMM of each linear layer adds
straight into the DDP buffer's ``main_grad`` instead of returning a fresh gradient that DDP's
hook then adds in (``main_grad.add_(grad)``). Without apex Megatron-Core refuses the option;
:class:`WgradAccumulation` is the same contract on ``torch.addmm_`` (a GEMM with beta = 1 on
CPU and CUDA alike; bf16 operands into fp32 ``main_grad`` on CUDA through ``addmm`` with
``out_dtype``): no gradient-sized allocation (page faults on CPU), no extra pass over it.
"""

from __future__ import annotations

import functools

import torch


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` for each pair."""
    srcs, dsts = tensor_lists[0], tensor_lists[1]
    if len(srcs) == len(dsts) and all(s is d for s, d in zip(srcs, dsts, strict=True)):
        if dsts:
            torch._foreach_mul_(dsts, scale)
        return
    for src, dst in zip(srcs, dsts, strict=True):
        dst.copy_(src * scale)


def use_in_place_grad_scaling() -> bool:
    """Point Megatron-Core's gradient clipping at :func:`multi_tensor_scale` where it uses its
    Python fallback (apex's and TE's kernels are left alone); True if it did."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_scale

    if clip_grads.multi_tensor_scale_impl is local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = multi_tensor_scale
    return clip_grads.multi_tensor_scale_impl is multi_tensor_scale


def accumulate_wgrad(main_grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``main_grad += a @ b``: inside the GEMM (beta = 1) when the dtypes agree. With bf16/fp16
    operands and fp32 ``main_grad``: on CUDA, where this PyTorch can (:func:`fp32_accumulation`),
    also inside the GEMM, products accumulated in fp32 and added into ``main_grad`` by cuBLAS's
    epilogue (apex's ``wgrad_gemm_accum_fp32``: no half-precision gradient, no second pass over
    ``main_grad``); elsewhere the half-precision product added in, exactly what DDP's hook would
    add from an unfused layer."""
    if main_grad.dtype == a.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda and fp32_accumulation(main_grad.device.index or 0):
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.add_(torch.mm(a, b))


def added_to_main_grad(param: torch.Tensor) -> torch.Tensor:
    """After a weight gradient went straight into ``param.main_grad``: flag the parameter so
    that DDP's hook does not add again, and return autograd's placeholder gradient (never read,
    never zeroed), the contract of Megatron-Core's fused linear layers."""
    param.grad_added_to_main_grad = True
    return torch.empty_like(param)


@functools.cache  # a property of this PyTorch build, asked once per process and device
def fp32_accumulation(device_index: int) -> bool:
    """Whether ``torch.addmm(c_fp32, a_half, b_half, out_dtype=float32, out=c_fp32)`` runs on
    this CUDA device. PyTorch's ``addmm.dtype_out`` exists since 2.8 but its CUDA kernel took an
    fp32 ``self`` only later ("self and mat2 must have the same dtype" before): tried once on
    2x2 matrices (the checks run on the host before the launch: no sync)."""
    c = torch.zeros(2, 2, device=f"cuda:{device_index}")
    a = torch.zeros(2, 2, dtype=torch.bfloat16, device=c.device)
    try:
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
        return False
    return True


class WgradAccumulation:
    """Drop-in for apex's ``fused_weight_gradient_mlp_cuda``: ``main_grad += d_outᵀ @ input``
    for ``input [T, in]``, ``d_out [T, out]``, ``main_grad [out, in]`` (fp32 or half)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(input_TI, grad_output_TO, main_grad_OI) -> None:
        accumulate_wgrad(main_grad_OI, grad_output_TO.t(), input_TI)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def use_wgrad_accumulation() -> bool:
    """Let Megatron-Core's linear layers take ``gradient_accumulation_fusion`` without apex
    (before the model is built: the layers check at construction); True when the fusion is
    available, apex's kernel or :class:`WgradAccumulation`."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = WgradAccumulation
        layers._grad_accum_fusion_available = True
    return layers._grad_accum_fusion_available
