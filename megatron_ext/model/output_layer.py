"""The output layer's logits in a reused buffer, on CPU ranks.

The logits ``[s, b, V]`` are the largest tensor of a step (262 MB at issue 14's shape: 4 x 512
tokens, V 32000, fp32). PyTorch's CPU allocator hands blocks that large straight back to the
operating system, so every step the GEMM writing them first page-faults every page in (a
quarter of that GEMM's time on the development VM); a GPU's caching allocator never does this.
:func:`reuse_logits_buffer` gives one output layer a small pool: the forward GEMM writes into a
free buffer of the right shape (``torch.mm(..., out=)``), and the buffer returns to the pool when
the layer's backward has consumed it (the blocked cross-entropy turns the logits into the
softmax and then into their own gradient, in place: the gradient arriving here is the buffer).

The arithmetic is Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication`` at TP 1:
``y = x Wᵀ (+ b)``, ``dx = dy W``, ``dW = dyᵀ x`` (added into ``main_grad`` with gradient
accumulation fusion), ``db = sum dy``. Anything else (CUDA tensors, TP > 1, sequence parallel,
deferred embedding gradients, frozen weights, no grad) takes Megatron-Core's own path. A
backward with ``retain_graph=True`` would need the logits twice and must not run through this
(Megatron-Core's training never does).
"""

from __future__ import annotations

import types

import torch

from megatron_ext.fallback_kernels import accumulate_wgrad, added_to_main_grad


class _LogitsPool:
    """Free logits buffers of one output layer (at most one per micro-batch in flight)."""

    def __init__(self, limit: int = 4):
        self.free: list[torch.Tensor] = []
        self.limit = limit

    def take(self, shape, dtype, device) -> torch.Tensor:
        for i, buf in enumerate(self.free):
            if buf.shape == shape and buf.dtype == dtype and buf.device == device:
                return self.free.pop(i)
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        if len(self.free) < self.limit:
            self.free.append(buf)


class _PooledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fuse_wgrad, pool):
        out_shape = (*x.shape[:-1], weight.shape[0])
        y = pool.take(out_shape, x.dtype, x.device)
        torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out=y.view(-1, weight.shape[0]))
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, weight)
        # The parameter itself: a saved tensor may come back as another object, without the
        # main_grad attribute DDP set (Megatron-Core's layer keeps main_grad on ctx likewise).
        ctx.param = weight if fuse_wgrad else None
        ctx.has_bias, ctx.pool, ctx.ptr = bias is not None, pool, y.data_ptr()
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        x_TI, dy_TO = x.reshape(-1, x.shape[-1]), dy.reshape(-1, weight.shape[0])
        dx = torch.mm(dy_TO, weight).view(x.shape)
        if ctx.param is not None:
            accumulate_wgrad(ctx.param.main_grad, dy_TO.t(), x_TI)
            dw = added_to_main_grad(ctx.param)
        else:
            dw = torch.mm(dy_TO.t(), x_TI)
        db = dy_TO.sum(0) if ctx.has_bias else None
        if dy.data_ptr() == ctx.ptr and dy.is_contiguous():  # our buffer, now consumed
            ctx.pool.give(dy)
        return dx, dw, db, None, None


def reuse_logits_buffer(output_layer) -> None:
    """Route ``output_layer`` (Megatron's ``ColumnParallelLinear``) through the pool where the
    conditions of the module docstring hold; Megatron-Core's path everywhere else."""
    megatron_impl = output_layer._forward_impl
    pool = _LogitsPool()

    def forward_impl(self, input, weight, **kw):  # Megatron calls it with keywords only
        pooled = (
            not input.is_cuda
            and weight.requires_grad
            and torch.is_grad_enabled()
            and not (kw.get("allreduce_dgrad") or kw.get("sequence_parallel"))
            and kw.get("grad_output_buffer") is None
            and (kw.get("tp_group") is None or kw["tp_group"].size() == 1)
        )
        if not pooled:
            return megatron_impl(input=input, weight=weight, **kw)
        fuse = kw.get("gradient_accumulation_fusion", False) and hasattr(weight, "main_grad")
        return _PooledLinear.apply(input, weight, kw.get("bias"), fuse, pool)

    output_layer._forward_impl = types.MethodType(forward_impl, output_layer)
    output_layer.logits_pool = pool
