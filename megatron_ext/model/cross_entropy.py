"""Vocab-parallel cross-entropy in cache-sized row blocks, for CPU ranks.

Megatron-Core's ``vocab_parallel_cross_entropy`` makes six passes over the whole ``[s, b, V/TP]``
logits (max, subtract, exp, sum, divide; the gradient's multiply): 262 MB each at issue 14's
shape (4 x 512 tokens, V 32000, fp32). On a CPU each pass streams from memory; its max also
computes arg-max indices nobody reads. :func:`vocab_parallel_cross_entropy` does the same
arithmetic block by block (``ROWS`` rows, ~4 MB, so that a block stays in cache from its max to
its division), in place like Megatron's: the logits buffer becomes the softmax saved for the
backward. Legend: N rows (tokens, ``s * b``), Vp this rank's vocabulary shard.

For each row (global over the TP group, as in Megatron-Core)::

    m = max_v x_v,   z = sum_v exp(x_v - m),   loss = log z - (x_target - m)
    d loss / d x_v = softmax_v - [v == target]   (times the incoming gradient)

With TP > 1 the row maxima, then the sums and the target logits, are all-reduced over the TP
group (once each, for all rows), so the blocks run in three sweeps instead of one.
On CUDA the model keeps Megatron-Core's own function: GPU memory is fast enough that fewer,
larger kernels win.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

BLOCK_BYTES = 4 << 20  # a block of rows stays in the core's cache across its passes


def _rows(vocab_shard: int) -> int:
    return max(1, BLOCK_BYTES // (4 * vocab_shard))


class _BlockedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_SBV, target_SB, group):
        vp = logits_SBV.shape[-1]
        x_NV, t_N = logits_SBV.view(-1, vp), target_SB.reshape(-1)
        tp, rank = dist.get_world_size(group), dist.get_rank(group)
        start = rank * vp
        local_N = (t_N >= start) & (t_N < start + vp)
        t_local_N = torch.where(local_N, t_N - start, torch.zeros_like(t_N))
        n, rows = x_NV.shape[0], _rows(vp)
        max_N = torch.empty(n, dtype=x_NV.dtype, device=x_NV.device)
        if tp > 1:  # the row maxima over the whole vocabulary first
            for i in range(0, n, rows):
                torch.amax(x_NV[i : i + rows], dim=-1, out=max_N[i : i + rows])
            dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        sum_pred_2N = torch.empty(2, n, dtype=x_NV.dtype, device=x_NV.device)
        for i in range(0, n, rows):
            x = x_NV[i : i + rows]
            m = max_N[i : i + rows]
            if tp == 1:
                torch.amax(x, dim=-1, out=m)
            x.sub_(m.unsqueeze(-1))
            sum_pred_2N[1, i : i + rows] = x.gather(1, t_local_N[i : i + rows, None]).squeeze(1)
            x.exp_()
            torch.sum(x, dim=-1, out=sum_pred_2N[0, i : i + rows])
            if tp == 1:
                x.div_(sum_pred_2N[0, i : i + rows].unsqueeze(-1))
        sum_pred_2N[1].masked_fill_(~local_N, 0.0)  # the target logit lives on one TP rank
        if tp > 1:
            dist.all_reduce(sum_pred_2N, group=group)
            for i in range(0, n, rows):
                x_NV[i : i + rows].div_(sum_pred_2N[0, i : i + rows].unsqueeze(-1))
        loss_N = sum_pred_2N[0].log() - sum_pred_2N[1]
        ctx.save_for_backward(logits_SBV, t_local_N, local_N)
        return loss_N.view(target_SB.shape)

    @staticmethod
    def backward(ctx, grad_SB):
        softmax_SBV, t_local_N, local_N = ctx.saved_tensors
        vp = softmax_SBV.shape[-1]
        p_NV, g_N = softmax_SBV.view(-1, vp), grad_SB.reshape(-1)
        rows_N = torch.arange(p_NV.shape[0], device=p_NV.device)
        p_NV[rows_N, t_local_N] -= local_N.to(p_NV.dtype)
        block = _rows(vp)
        for i in range(0, p_NV.shape[0], block):
            p_NV[i : i + block].mul_(g_N[i : i + block].unsqueeze(-1))
        return softmax_SBV, None, None


def vocab_parallel_cross_entropy(logits_SBV: torch.Tensor, target_SB: torch.Tensor, group=None):
    """Per-token loss ``[s, b]`` of the logits ``[s, b, V/TP]`` of the TP ``group`` (default
    Megatron's); fp32 logits are overwritten (they become the softmax kept for the backward),
    as in Megatron-Core's function."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    return _BlockedVocabParallelCE.apply(logits_SBV.float(), target_SB, group)
