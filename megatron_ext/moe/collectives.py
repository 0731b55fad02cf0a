"""Collectives of the SMoE layer, each differentiable and allocating like its input (never on
"the current CUDA device"), so they also run on CPU ranks, forward and backward.

- :func:`all_to_all`: uneven ``all_to_all_single`` along dim 0 (EP dispatch and combine);
- :func:`gather_uneven` / :func:`reduce_scatter_uneven`: the expert-TP all-gather of the rows
  each rank received and the reduce-scatter of the experts' partial outputs (MoE parallel
  folding), each other's adjoint;
- :func:`copy_to_tp`, :func:`gather_tokens`, :func:`scatter_output`, :func:`token_block`,
  :func:`folded_output`: attention TP (the token layout around the layer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def group_size(group) -> int:
    return 1 if group is None else group.size()


def group_rank(group) -> int:
    return 0 if group is None else group.rank()


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` along dim 0; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        y = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(y, x.contiguous(), list(out_splits), list(in_splits), group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(dy, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x, out_splits, in_splits, group) -> torch.Tensor:
    return _AllToAll.apply(x, tuple(out_splits), tuple(in_splits), group)


def gather_uneven(x, sizes: tuple[int, ...], group) -> torch.Tensor:
    """All-gather along dim 0 where rank ``i`` of ``group`` holds ``sizes[i]`` rows (the
    concatenation in rank order on every rank).

    One ``all_to_all_single`` that sends this rank's rows to every peer (gloo and NCCL both have
    uneven all-to-all; neither has an uneven ``all_gather_into_tensor``). Backward, through
    autograd: the reverse all-to-all, then ``repeat``'s sum of the copies = reduce-scatter."""
    n, me = len(sizes), group.rank()
    copies = x.repeat(n, *([1] * (x.dim() - 1)))
    return all_to_all(copies, sizes, (sizes[me],) * n, group)


def reduce_scatter_uneven(y, sizes: tuple[int, ...], group) -> torch.Tensor:
    """Sum ``y`` (``sum(sizes)`` rows, the same layout on every rank) over ``group`` and keep
    this rank's ``sizes[rank]`` rows: chunk ``i`` goes to rank ``i``, the received chunks are
    added. The adjoint of :func:`gather_uneven` (backward: the same all-gather)."""
    n, me = len(sizes), group.rank()
    parts = all_to_all(y, (sizes[me],) * n, sizes, group)
    return parts.view(n, sizes[me], *y.shape[1:]).sum(dim=0)


# Attention TP: the token layout around the layer.
def _all_gather_dim0(x, group):
    y = x.new_empty((x.shape[0] * group.size(), *x.shape[1:]))
    dist.all_gather_into_tensor(y, x.contiguous(), group=group)
    return y


def _reduce_scatter_dim0(x, group):
    y = x.new_empty((x.shape[0] // group.size(), *x.shape[1:]))
    dist.reduce_scatter_tensor(y, x.contiguous(), group=group)
    return y


def _all_reduce(x, group):
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


class _TPComm(torch.autograd.Function):
    """``forward_op`` in forward, ``backward_op`` in backward (ops: the helpers above or None
    for identity)."""

    @staticmethod
    def forward(ctx, x, group, forward_op, backward_op):
        ctx.group, ctx.backward_op = group, backward_op
        return x.view_as(x) if forward_op is None else forward_op(x, group)

    @staticmethod
    def backward(ctx, dy):
        op = ctx.backward_op
        return (dy if op is None else op(dy, ctx.group)), None, None, None


def copy_to_tp(x, tp_group):
    """Identity; backward all-reduces over TP (the consumer's grads are partial per TP rank)."""
    if group_size(tp_group) == 1:
        return x
    return _TPComm.apply(x, tp_group, None, _all_reduce)


def gather_tokens(x: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """Give every TP rank all the tokens of its TP group (dim 0 = sequence).

    Sequence parallel: all-gather along dim 0 (backward: reduce-scatter). Otherwise every TP
    rank already holds them: identity whose backward all-reduces (the experts' input grads are
    partial over the FFN shards).
    """
    if group_size(tp_group) == 1:
        return x
    if sequence_parallel:
        return _TPComm.apply(x, tp_group, _all_gather_dim0, _reduce_scatter_dim0)
    return copy_to_tp(x, tp_group)


def scatter_output(y: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """Sum the TP ranks' partial outputs: reduce-scatter along dim 0 (sequence parallel) or
    all-reduce; backward all-gathers or passes the gradient through."""
    if group_size(tp_group) == 1:
        return y
    if sequence_parallel:
        return _TPComm.apply(y, tp_group, _reduce_scatter_dim0, _all_gather_dim0)
    return _TPComm.apply(y, tp_group, _all_reduce, None)


def token_block(num_tokens: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of TP rank ``rank``: with sequence parallel exactly its own chunk of
    the sequence (tokens are sequence-major), otherwise a near-equal share."""
    return rank * num_tokens // size, (rank + 1) * num_tokens // size


def folded_output(
    y_TH, lo: int, gathered_shape, local_shape, tp_group, sequence_parallel: bool
) -> torch.Tensor:
    """The layer's output in attention's layout from this TP rank's block of complete outputs
    (the expert-TP reduce-scatter already summed the FFN shards). Sequence parallel: the block
    is this rank's chunk. Otherwise every TP rank needs every row: the blocks, zero elsewhere,
    summed over TP (all-reduce whose backward is the identity, as the unfolded path's)."""
    tp = group_size(tp_group)
    if tp == 1:
        return y_TH.view(gathered_shape)
    if sequence_parallel:
        return y_TH.view(local_shape)
    num_tokens = gathered_shape[0] * gathered_shape[1]
    full_TH = F.pad(y_TH, (0, 0, lo, num_tokens - lo - y_TH.shape[0]))
    return scatter_output(full_TH.view(gathered_shape), tp_group, False)
