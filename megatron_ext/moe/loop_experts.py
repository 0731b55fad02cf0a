"""The expert loop used off Hopper's grouped GEMM (CPU ranks, other GPUs, fp32/fp16): each local
expert's whole SwiGLU MLP on its rows, as one autograd node.

Shapes legend: M rows for this rank (grouped by local expert), H hidden, L local experts,
Fs the FFN shard of this expert-TP rank; ``w13 [L, 2Fs, H]`` (gate rows then up rows),
``w2 [L, H, Fs]``; ``y[rows of e] = (silu(x w1ᵀ) * (x w3ᵀ)) w2ᵀ``.

On CPU tensors with ``torch.get_num_threads() = P > 1`` and small experts (the mean expert's
``[n_e, 2Fs]`` GEMM1 output at most :data:`THREADED_MAX_BYTES`) the experts run side by side:
they are split into P groups of about equal rows (longest first, to the least loaded group) and
each group runs on its own worker thread with ONE intra-op thread. Why: fine-grained experts
make small GEMMs (``[384, 512] x [512, 448]`` in the DeepSeek-MoE benchmark case) that the BLAS
splits badly across threads: on the 2-core development VM one such GEMM per expert with 2
threads ran at ~250 GFLOP/s, two single-threaded ones side by side at ~360 GFLOP/s, and the
SwiGLU elementwise work then also runs in parallel with no fork/join per op. Large experts are
better served by both threads on one GEMM. Whole layer forward+backward, T = 4096, H = 512,
fp32, 2 threads (``bench/moe_layer.py``), side by side vs one expert after another:

====================  ============  ==========================
E x F, top-k          GEMM1 output  side by side
====================  ============  ==========================
64 x 224, top-2       0.2 MiB       30% faster
64 x 224, top-6       0.7 MiB       25% faster
32 x 448, top-4       1.8 MiB       19% faster
32 x 448, top-8       3.5 MiB       4% faster
16 x 896, top-4       7.0 MiB       1% slower
8 x 1792, top-2       14 MiB        8% slower (Mixtral's shape)
====================  ============  ==========================

Each expert's arithmetic does not depend on the grouping (its rows, its weights, its slice of
the outputs and of ``main_grad``), so results are the same either way.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from megatron_ext.fallback_kernels import accumulate_wgrad, added_to_main_grad
from megatron_ext.moe.unpermute import gather_sum, scale_rows


def thread_groups(splits: tuple[int, ...], threads: int) -> list[list[int]]:
    """The non-empty experts split into at most ``threads`` groups of about equal rows:
    longest expert first, each to the group with the fewest rows so far (ties: lowest group)."""
    loads, groups = [0] * threads, [[] for _ in range(threads)]
    for e in sorted((e for e, n in enumerate(splits) if n), key=lambda e: (-splits[e], e)):
        g = loads.index(min(loads))
        loads[g] += splits[e]
        groups[g].append(e)
    return [g for g in groups if g]


THREADED_MAX_BYTES = 4 << 20


def for_each_expert(fn, splits: tuple[int, ...], on_cpu: bool, row_bytes: int = 0) -> None:
    """``fn(e, rows)`` for every expert with rows; concurrently on CPU when the mean busy
    expert's rows times ``row_bytes`` (its GEMM1 output) is at most ``THREADED_MAX_BYTES``.

    Autograd's grad mode is thread-local and on in a fresh thread: the workers run under
    ``no_grad`` like the autograd node's own forward/backward. ``torch.set_num_threads(1)`` in
    a worker also moves the process-wide default, which the caller's count is restored to.
    """
    starts = [0]
    for n in splits:
        starts.append(starts[-1] + n)
    busy = [n for n in splits if n]
    small = bool(busy) and sum(busy) * row_bytes <= THREADED_MAX_BYTES * len(busy)
    threads = torch.get_num_threads() if on_cpu and small else 1
    groups = thread_groups(splits, threads)
    if len(groups) < 2:
        for e, n in enumerate(splits):
            if n:
                fn(e, slice(starts[e], starts[e] + n))
        return

    def run(group):
        with torch.no_grad():
            for e in group:
                fn(e, slice(starts[e], starts[e] + splits[e]))

    try:
        with ThreadPoolExecutor(
            len(groups), initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            for future in [pool.submit(run, g) for g in groups]:
                future.result()  # re-raises a worker's exception here
    finally:
        torch.set_num_threads(threads)


def swiglu_grad(da_MF, h_MF2, s_MF) -> torch.Tensor:
    """``dh = [silu'(g) * u * da | silu(g) * da]`` for ``h = [g | u]`` and ``s = silu(g)``,
    written into one ``[M, 2F]`` buffer in place of autograd's cat."""
    g_MF, u_MF = h_MF2.chunk(2, dim=-1)
    dh_MF2 = torch.empty_like(h_MF2)
    dg_MF, du_MF = dh_MF2.chunk(2, dim=-1)
    torch.mul(da_MF, s_MF, out=du_MF)
    torch.mul(da_MF, u_MF, out=dg_MF)
    torch.ops.aten.silu_backward.grad_input(dg_MF, g_MF, grad_input=dg_MF)  # in place
    return dh_MF2


def _forward(x_MH, w13_LFH, w2_LHF, splits, recompute_act, rows_of=None):
    """``(y_MH, saved)``: every expert's SwiGLU MLP on its rows; ``saved`` per busy expert
    ``(x, h)`` with ``recompute_act``, else ``(x, h, silu(g), a)`` (what autograd would save),
    x being the expert's input rows. ``rows_of(e, rows)`` gathers them (else ``x_MH[rows]``)."""
    fs = w2_LHF.shape[-1]
    y_MH = w2_LHF.new_empty(sum(splits), w2_LHF.shape[1])
    saved = [()] * len(splits)

    def expert(e, rows):
        x = rows_of(e, rows) if rows_of else x_MH[rows]
        h = torch.mm(x, w13_LFH[e].t())
        s = F.silu(h[:, :fs])
        a = s * h[:, fs:]
        torch.mm(a, w2_LHF[e].t(), out=y_MH[rows])
        saved[e] = (x, h) if recompute_act else (x, h, s, a)

    for_each_expert(expert, splits, not y_MH.is_cuda, 2 * fs * y_MH.element_size())
    return y_MH, [t for ts in saved for t in ts]


def _backward(ctx, w13_LFH, w2_LHF, flat, dy_of, dx_MH):
    """``(dw13, dw2)`` from the saved per-expert tensors ``flat``, the input gradient written
    into ``dx_MH``; ``dy_of(e, rows)`` gives expert e's output gradient rows (called on the
    expert's worker thread, before its rows of ``dx_MH`` are written)."""
    fs = w2_LHF.shape[-1]
    fused = ctx.params is not None
    if fused:
        dw13, dw2 = (p.main_grad for p in ctx.params)
    else:
        dw13, dw2 = torch.empty_like(w13_LFH), torch.empty_like(w2_LHF)
        for e, n in enumerate(ctx.splits):
            if not n:  # an expert without rows still gets a (zero) gradient
                dw13[e].zero_()
                dw2[e].zero_()
    wgrad = accumulate_wgrad if fused else _overwrite
    per = 2 if ctx.recompute_act else 4
    busy = [e for e, n in enumerate(ctx.splits) if n]
    saved = {e: flat[i * per : (i + 1) * per] for i, e in enumerate(busy)}

    def expert(e, rows):
        x, h, *sa = saved[e]
        if ctx.recompute_act:
            s = F.silu(h[:, :fs])
            a = s * h[:, fs:]
        else:
            s, a = sa
        dy = dy_of(e, rows)
        wgrad(dw2[e], dy.t(), a)
        dh = swiglu_grad(torch.mm(dy, w2_LHF[e]), h, s)
        torch.mm(dh, w13_LFH[e], out=dx_MH[rows])
        wgrad(dw13[e], dh.t(), x)

    for_each_expert(expert, ctx.splits, not dx_MH.is_cuda, 2 * fs * dx_MH.element_size())
    if fused:
        dw13, dw2 = (added_to_main_grad(p) for p in ctx.params)
    return dw13, dw2


def _overwrite(out, a, b):
    torch.mm(a, b, out=out)


class _LoopExperts(torch.autograd.Function):
    """``y = swiglu(x w13[e]ᵀ) w2[e]ᵀ`` on the rows of each expert e, as one autograd node.

    Why expert by expert rather than stage by stage (all GEMM1s, then the activation on all
    rows, then all GEMM2s): each expert's ``[n_e, 2Fs]`` intermediate is still in cache when
    the activation and the next GEMM read it. Intermediates are per expert, not slices of
    layer-wide buffers: allocations above the C allocator's mmap threshold (32 MiB) would be
    fresh pages every step, and their page faults cost more than the activation itself.

    ``fuse_wgrad`` (gradient accumulation fusion, as Megatron-Core's linear layers): the weight
    gradients are added straight into the parameters' DDP ``main_grad`` (``addmm_``), and
    autograd gets untouched placeholders with ``grad_added_to_main_grad`` set, so DDP's hook
    does not add them again.

    ``recompute_act`` (``moe_act`` in ``--recompute-modules``): only h is kept per expert;
    silu(g) and a are recomputed from it in the backward (half of the per-expert
    intermediates freed, ``[n_e, 2Fs]`` of ``[n_e, 4Fs]``; one SwiGLU forward more).
    """

    @staticmethod
    def forward(ctx, x_MH, w13_LFH, w2_LHF, splits, fuse_wgrad=False, recompute_act=False):
        y_MH, flat = _forward(x_MH, w13_LFH, w2_LHF, splits, recompute_act)
        ctx.save_for_backward(w13_LFH, w2_LHF, *flat)
        ctx.splits, ctx.recompute_act = splits, recompute_act
        ctx.params = (w13_LFH, w2_LHF) if fuse_wgrad else None  # their main_grad attributes
        return y_MH

    @staticmethod
    def backward(ctx, dy_MH):
        w13_LFH, w2_LHF, *flat = ctx.saved_tensors
        dy_MH = dy_MH.contiguous()
        dx_MH = dy_MH.new_empty(dy_MH.shape[0], w13_LFH.shape[-1])
        grads = _backward(ctx, w13_LFH, w2_LHF, flat, lambda e, rows: dy_MH[rows], dx_MH)
        return dx_MH, *grads, None, None, None


class _LocalExperts(torch.autograd.Function):
    """Dispatch, experts and combine of a local dispatch (no exchange, no dropped pair) as one
    node: ``out_TH[t] = sum_k probs_TK[t, k] * expert(x_TH[t])`` over the top-k pairs, with
    the rows sorted by expert (``token_M``: each row's token, ``pos_TK``: each pair's row,
    ``pair_M``: each row's flat pair index).

    Why: on its own, the dispatch writes ``x_MH = x_TH[token_M]`` (``[T*K, H]``), the combine's
    backward makes three passes over ``[T*K, H]`` (gather the output gradient per row,
    ``dprob = <g, y>``, ``dy = prob * g``), and ``[T*K, H]`` buffers are above the C
    allocator's mmap threshold: fresh pages, page-faulted, in every step (~11 ms per 50 MB on
    the development VM). Here each expert gathers its own input rows and its rows' output
    gradient on its worker thread, and the products run while they are in cache. The input
    gradient of the rows is written over ``y_MH`` (each expert's rows after its ``dprob``
    read them), then summed per token: one ``[T*K, H]`` buffer per step instead of three.
    So the backward runs once (as in training; a second one, ``retain_graph``, is refused).
    """

    @staticmethod
    def forward(
        ctx, x_TH, w13_LFH, w2_LHF, probs_TK, pos_TK, token_M, pair_M, splits, fuse_wgrad,
        recompute_act,
    ):  # fmt: skip
        def rows_of(e, rows):
            return x_TH.index_select(0, token_M[rows])

        y_MH, flat = _forward(None, w13_LFH, w2_LHF, splits, recompute_act, rows_of)
        ctx.save_for_backward(w13_LFH, w2_LHF, probs_TK, pos_TK, token_M, pair_M, *flat)
        ctx.y_MH = y_MH  # not a saved tensor: the backward writes over it (docstring)
        ctx.splits, ctx.recompute_act = splits, recompute_act
        ctx.params = (w13_LFH, w2_LHF) if fuse_wgrad else None
        return gather_sum(y_MH, pos_TK, probs_TK).to(y_MH.dtype)

    @staticmethod
    def backward(ctx, dout_TH):
        w13_LFH, w2_LHF, probs_TK, pos_TK, token_M, pair_M, *flat = ctx.saved_tensors
        y_MH = ctx.y_MH
        if y_MH is None:
            raise RuntimeError("the SMoE layer's local experts cannot run a backward twice")
        ctx.y_MH = None
        dout_TH = dout_TH.contiguous()
        probs_M = probs_TK.reshape(-1).index_select(0, pair_M).unsqueeze(-1)
        want_dprobs = ctx.needs_input_grad[3]
        dprob_M = probs_M.new_empty(y_MH.shape[0]) if want_dprobs else None

        def dy_of(e, rows):
            g = dout_TH.index_select(0, token_M[rows])
            if want_dprobs:
                y = y_MH[rows].to(probs_M.dtype)
                torch.linalg.vecdot(g.to(probs_M.dtype), y, out=dprob_M[rows])
            return scale_rows(g, probs_M[rows])

        dx_MH = y_MH  # each expert's rows of y are read (dy_of) before its dx is written
        dw13, dw2 = _backward(ctx, w13_LFH, w2_LHF, flat, dy_of, dx_MH)
        dx_TH = gather_sum(dx_MH, pos_TK).to(dx_MH.dtype) if ctx.needs_input_grad[0] else None
        dprobs_TK = None
        if want_dprobs:
            dprobs_TK = dprob_M.index_select(0, pos_TK.reshape(-1)).view_as(probs_TK)
        return dx_TH, dw13, dw2, dprobs_TK, None, None, None, None, None, None
