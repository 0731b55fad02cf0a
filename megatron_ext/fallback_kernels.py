"""Faster stand-ins for the apex kernels Megatron-Core replaces with Python loops when neither
apex nor Transformer Engine is installed (pip installs, CPU ranks).

``multi_tensor_scale`` (gradient clipping scales every gradient by ``max_norm / norm``):
Megatron-Core's fallback ``local_multi_tensor_scale`` runs ``dst.copy_(src * scale)`` per
tensor, allocating a full copy of every gradient on every clipped step (60 ms of a 2.3 s CPU
step at issue 14's shape). When the source and destination lists are the same tensors, as
they are for clipping, one in-place ``torch._foreach_mul_`` does the same arithmetic.
"""

from __future__ import annotations

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
