"""The combine's weighted sum: unsort the expert outputs and add each token's top-k of them,
weighted by its routing probabilities, with its backward; and the dispatch's backward, which
adds the gradients of each token's K copies.

Shapes legend: T tokens, K top-k, N = T*K rows in expert order, H hidden; ``pos_TK[t, k]`` the
row of pair (t, k), ``token_N[n]`` the token of row n, ``probs_N[n]`` its probability.

    forward:   out[t]   = sum_k probs[t, k] * y[pos[t, k]]      (fp32 math, rounded once)
    backward:  g_n      = dout[token_n]
               dprob_n  = <g_n, y_n>                            (fp32)
               dy_n     = probs_n * g_n                         (fp32 math, rounded once)
    dispatch backward:  dx[t] = sum_k dx_rows[pos[t, k]]       (fp32 accumulation)

On the CPU the forward is one ``embedding_bag`` (gather, weight and sum in one pass). On CUDA
the expert outputs are bf16 and the probabilities fp32; ``embedding_bag`` wants one dtype, so
eager PyTorch makes fp32 copies of the ``[N, H]`` rows: ``y`` for the forward, ``g`` and ``y``
for ``dprob``, ``g`` for ``dy``, and a cast back. On the H200 (DeepSeek-MoE 16B layer, 16k
tokens) they were most of the ~8 ms of elementwise work around the layer's GEMMs (21.5 ms
forward and backward; ``docs/benchmarks.md``). There both directions run as
:func:`torch.compile`'d functions: Inductor fuses each into one Triton kernel that reads the bf16
rows once, converts in registers and writes bf16 (Transformer Engine's ``moe_unpermute`` does the
same by hand; Megatron-Core's own elementwise fusions are ``torch.compile``d too,
``megatron.core.jit.jit_fuser``). The dispatch's backward is compiled the same way: CUDA's
``embedding_bag`` took 0.78 ms per step for the bytes the compiled forward moves in 0.11 ms
(16k tokens, top-6, H 2048; the compiled backward itself not yet timed on a GPU). Compiled once
per process and shape; under ``torch.compiler.set_stance("force_eager")`` (and the GPU rules)
the same functions run eagerly.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def gather_sum(src_NH, idx_TK, weights_TK=None):
    """``out[t] = sum_k w[t, k] * src[idx[t, k]]`` in one pass (fp32 accumulation)."""
    if idx_TK.shape[0] == 0:
        return src_NH.new_zeros(0, src_NH.shape[-1])
    if weights_TK is not None and weights_TK.dtype != src_NH.dtype:
        src_NH = src_NH.to(weights_TK.dtype)  # bf16 activations, fp32 routing weights
    return F.embedding_bag(idx_TK, src_NH, per_sample_weights=weights_TK, mode="sum")


def scale_rows(g_NH, probs_N1):
    """``probs * g`` per row in g's dtype: in place when the dtypes agree, else in the
    probabilities' precision and rounded once (low-precision activations)."""
    if g_NH.dtype == probs_N1.dtype:
        return g_NH.mul_(probs_N1)
    return (g_NH.to(probs_N1.dtype) * probs_N1).to(g_NH.dtype)


def weighted_sum(y_NH, pos_TK, probs_TK):
    """``out[t] = sum_k probs[t, k] * y[pos[t, k]]`` in the probabilities' dtype, returned in
    y's (the CUDA form: one fused kernel once compiled)."""
    rows_TKH = y_NH[pos_TK].to(probs_TK.dtype)
    return (rows_TKH * probs_TK.unsqueeze(-1)).sum(dim=1).to(y_NH.dtype)


def weighted_sum_backward(dout_TH, y_NH, probs_N, token_N):
    """``(dy_NH, dprob_N)`` of :func:`weighted_sum` for the rows' tokens and probabilities."""
    g_NH = dout_TH[token_N].to(probs_N.dtype)
    dprob_N = (g_NH * y_NH.to(probs_N.dtype)).sum(dim=-1)
    dy_NH = (g_NH * probs_N.unsqueeze(-1)).to(y_NH.dtype)
    return dy_NH, dprob_N


def rows_sum(src_NH, idx_TK):
    """``out[t] = sum_k src[idx[t, k]]`` accumulated in fp32, returned in src's dtype (the
    CUDA form of :func:`sum_copies`)."""
    return src_NH[idx_TK].to(torch.float32).sum(dim=1).to(src_NH.dtype)


def sum_copies(src_NH, idx_TK):
    """The dispatch's backward: ``out[t] = sum_k src[idx[t, k]]`` (one compiled kernel on
    CUDA, ``embedding_bag`` elsewhere)."""
    if src_NH.is_cuda and idx_TK.shape[0]:
        return _compiled(rows_sum)(src_NH, idx_TK)
    return gather_sum(src_NH, idx_TK)


@functools.cache  # one wrapper per function and process; compiled at its first call
def _compiled(fn):
    """``fn`` compiled, or ``fn`` itself where Triton cannot run here (no Triton, or a GPU it
    does not support): the eager form, same results, slower."""
    from torch.utils._triton import has_triton

    return torch.compile(fn, fullgraph=True) if has_triton() else fn


class WeightedUnpermute(torch.autograd.Function):
    """``out_TH = weighted_sum(y_NH, pos_TK, probs_TK)`` (module docstring), differentiable in
    ``y_NH`` and ``probs_TK``: no scatter, no atomics (deterministic on GPUs)."""

    @staticmethod
    def forward(ctx, y_NH, probs_TK, pos_TK, token_N, sorted_pair_N):
        ctx.save_for_backward(y_NH, probs_TK, pos_TK, token_N, sorted_pair_N)
        if y_NH.is_cuda and pos_TK.shape[0]:
            return _compiled(weighted_sum)(y_NH, pos_TK, probs_TK)
        return gather_sum(y_NH, pos_TK, probs_TK).to(y_NH.dtype)

    @staticmethod
    def backward(ctx, dout_TH):
        y_NH, probs_TK, pos_TK, token_N, sorted_pair_N = ctx.saved_tensors
        probs_N = probs_TK.reshape(-1).index_select(0, sorted_pair_N)
        if y_NH.is_cuda and y_NH.shape[0]:
            dy_NH, dprob_N = _compiled(weighted_sum_backward)(dout_TH, y_NH, probs_N, token_N)
        else:
            g_NH = dout_TH.index_select(0, token_N)
            dprob_N = None
            if ctx.needs_input_grad[1]:
                dprob_N = torch.linalg.vecdot(g_NH.to(probs_N.dtype), y_NH.to(probs_N.dtype))
            dy_NH = scale_rows(g_NH, probs_N.unsqueeze(-1))
        dprobs_TK = None
        if ctx.needs_input_grad[1]:
            dprobs_TK = dprob_N.index_select(0, pos_TK.reshape(-1)).view_as(probs_TK)
        return dy_NH, dprobs_TK, None, None, None
