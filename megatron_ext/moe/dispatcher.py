"""Dropless token dispatch and combine over the expert-model-parallel (EP) group.

Shapes legend: T tokens routed on this rank, K top-k, N = T*K (token, choice) pairs, H hidden,
E experts (global), P EP ranks, L = E/P local experts, M rows received by this rank
(``M = sum of tokens_per_local_expert``).

Dispatch (no token is dropped here; with an opt-in capacity, ``capacity.py`` marks the
pairs to drop with the expert id E, which sorts last and is not sent):

1. ``sorted_pair_N = stable_argsort(topk_ids_TK.flatten())``: (token, choice) pairs sorted by
   expert, ties in token order; ``x_NH = x_TH[sorted_pair_N // K]`` (one gather).
2. ``counts_E[e] = searchsorted(sorted_ids, e + 1) - searchsorted(sorted_ids, e)`` on the
   sorted expert ids (no host sync: CUDA's ``bincount`` would make two); with P>1 one
   ``all_gather`` of ``counts_E`` gives the ``[P, E]`` count matrix on every rank and ONE
   device->host copy turns it into the split sizes (the only sync of the layer): rank p sends
   ``sum_{e owned by q} counts[p, e]`` rows to rank q.
3. ``all_to_all_single`` with those uneven splits (differentiable: backward is the reverse
   all-to-all). Rows arrive ordered (source rank, local expert); one gather regroups them to
   (local expert, source rank) so every local expert owns one contiguous slice.

Combine is the exact reverse (ungroup, reverse all-to-all) and then one fused gather-and-sum
``y_TH[t] = sum_k probs_TK[t, k] * y_NH[pos_TK[t, k]]`` (``pos`` = where pair (t, k) went).
Every permutation is a gather whose backward is the inverse gather; where rows fan in (the K
copies of a token, the K outputs of a token) an ``embedding_bag`` sums them: no scatter-add, no
atomics, deterministic on GPUs.

TP: :func:`gather_tokens` / :func:`scatter_output` bring the tokens of the TP group together
before routing (all-gather along the sequence with sequence parallel; a copy whose backward
all-reduces without it) and reduce the experts' partial (FFN-sharded) outputs afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state


def group_size(group) -> int:
    return 1 if group is None else group.size()


def group_rank(group) -> int:
    return 0 if group is None else group.rank()


@dataclass(frozen=True)
class MoEGroups:
    """Process groups the SMoE layer talks over (``None`` = a group of one).

    ``tp``: tensor parallel (token gather/scatter). ``ep``: expert-model parallel (all-to-all).
    ``expt_tp``: expert tensor parallel (FFN shards; must equal ``tp``). ``expt_dp``:
    expert-data parallel (expert grads are reduced over it by Megatron's DDP). ``dp``: data
    parallel (``global_aux_loss`` sums its counts over it).
    """

    tp: object = None
    ep: object = None
    expt_tp: object = None
    expt_dp: object = None
    dp: object = None

    @staticmethod
    def from_parallel_state(pg_collection=None) -> MoEGroups:
        if pg_collection is not None:
            return MoEGroups(
                pg_collection.tp,
                pg_collection.ep,
                pg_collection.expt_tp,
                pg_collection.expt_dp,
                getattr(pg_collection, "dp", None),
            )
        if not parallel_state.model_parallel_is_initialized():
            return MoEGroups()  # single process, no torch.distributed (unit tests, benchmarks)
        ps = parallel_state
        return MoEGroups(
            ps.get_tensor_model_parallel_group(),
            ps.get_expert_model_parallel_group(),
            ps.get_expert_tensor_parallel_group(),
            ps.get_expert_data_parallel_group(),
            ps.get_data_parallel_group(),
        )


class _Permute(torch.autograd.Function):
    """``y = x[fwd_idx]`` whose backward is the inverse gather ``dx = dy[bwd_idx]``.

    With ``fold = K`` every row of x was used K times and ``bwd_idx`` lists, per row of x, the
    K rows of y that copy it: the backward is then one fused gather-and-sum (embedding_bag).
    """

    @staticmethod
    def forward(ctx, x, fwd_idx, bwd_idx, fold: int, rows: int):
        ctx.save_for_backward(bwd_idx)
        ctx.fold, ctx.rows = fold, rows
        return x.index_select(0, fwd_idx)

    @staticmethod
    def backward(ctx, dy):
        (bwd_idx,) = ctx.saved_tensors
        if dy.shape[0] < ctx.rows:  # dropped pairs (capacity) were not sent: zero gradient
            dy = torch.cat([dy, dy.new_zeros(ctx.rows - dy.shape[0], *dy.shape[1:])])
        if ctx.fold == 1:
            return dy.index_select(0, bwd_idx), None, None, None, None
        return _gather_sum(dy, bwd_idx.view(-1, ctx.fold)), None, None, None, None


def _gather_sum(src_NH, idx_TK, weights_TK=None):
    """``out[t] = sum_k w[t, k] * src[idx[t, k]]`` in one pass (fp32 accumulation)."""
    if idx_TK.shape[0] == 0:
        return src_NH.new_zeros(0, src_NH.shape[-1])
    if weights_TK is not None and weights_TK.dtype != src_NH.dtype:
        src_NH = src_NH.to(weights_TK.dtype)  # bf16 activations, fp32 routing weights
    return F.embedding_bag(idx_TK, src_NH, per_sample_weights=weights_TK, mode="sum")


class _WeightedUnpermute(torch.autograd.Function):
    """``out_TH[t] = sum_k probs_TK[t, k] * y_NH[pos_TK[t, k]]`` (unsort + top-k weighted sum).

    Backward: ``g_NH = dout[token of each row]``, ``dprobs = <g_n, y_n>`` per row and
    ``dy_NH = probs * g_NH``: two gathers and two passes, no scatter.
    """

    @staticmethod
    def forward(ctx, y_NH, probs_TK, pos_TK, token_N, sorted_pair_N):
        ctx.save_for_backward(y_NH, probs_TK, pos_TK, token_N, sorted_pair_N)
        return _gather_sum(y_NH, pos_TK, probs_TK).to(y_NH.dtype)

    @staticmethod
    def backward(ctx, dout_TH):
        y_NH, probs_TK, pos_TK, token_N, sorted_pair_N = ctx.saved_tensors
        g_NH = dout_TH.index_select(0, token_N)
        dprobs_TK = None
        if ctx.needs_input_grad[1]:
            dprob_N = torch.linalg.vecdot(g_NH.to(probs_TK.dtype), y_NH.to(probs_TK.dtype))
            dprobs_TK = dprob_N.index_select(0, pos_TK.reshape(-1)).view_as(probs_TK)
        probs_N = probs_TK.reshape(-1).index_select(0, sorted_pair_N).unsqueeze(-1)
        if g_NH.dtype == probs_N.dtype:
            dy_NH = g_NH.mul_(probs_N)
        else:  # low-precision activations: scale in fp32, round once
            dy_NH = (g_NH.to(probs_N.dtype) * probs_N).to(y_NH.dtype)
        return dy_NH, dprobs_TK, None, None, None


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inv[perm[i]] = i``."""
    arange = torch.arange(perm.numel(), device=perm.device)
    return torch.empty_like(perm).scatter_(0, perm, arange)


def expert_counts(sorted_ids_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``counts_E[e]`` = occurrences of ``e`` in the sorted ids: differences of their
    boundaries, ``searchsorted(ids, arange(E + 1))`` (int64, no host sync)."""
    edges = torch.arange(num_experts + 1, device=sorted_ids_N.device, dtype=sorted_ids_N.dtype)
    return torch.diff(torch.searchsorted(sorted_ids_N, edges))


def _permute(x, fwd_idx, bwd_idx, fold: int = 1, rows: int = 0):
    """``x[fwd_idx]``; ``rows``: the rows the backward's ``bwd_idx`` expects (more than
    ``fwd_idx`` selects when dropped pairs were left out)."""
    return _Permute.apply(x, fwd_idx, bwd_idx, fold, rows)


@dataclass(frozen=True)
class DispatchMeta:
    """Everything :func:`combine` needs to undo :func:`dispatch` (immutable, one per call)."""

    topk: int
    sorted_pair_N: torch.Tensor  # flat (token*K + choice) index of each sorted row
    sorted_token_N: torch.Tensor  # token of each sorted row (sorted_pair_N // K)
    pair_to_sorted_N: torch.Tensor  # inverse permutation
    tokens_per_expert_E: torch.Tensor  # int64 counts of this rank's tokens
    global_tokens_per_expert_E: torch.Tensor  # int64 counts summed over the EP group
    tokens_per_local_expert: tuple[int, ...]  # host ints: rows of each local expert (M total)
    tokens_per_local_expert_L: torch.Tensor  # the same on device (int64)
    num_sent: int = -1  # pairs sent to experts (fewer than T*K when a capacity dropped some)
    send_splits: tuple[int, ...] = ()  # rows sent to each EP rank (empty when P == 1)
    recv_splits: tuple[int, ...] = ()  # rows received from each EP rank
    regroup_M: torch.Tensor | None = None  # (src, expert)-ordered row -> expert-ordered
    ungroup_M: torch.Tensor | None = None  # inverse of regroup_M
    ep_group: object = None


def _send_rows(x_TH, sorted_token_N, pair_to_sorted_N, k: int, num_sent: int):
    """``x_NH``: the token of each sorted pair, without the dropped pairs (sorted last)."""
    n = sorted_token_N.numel()
    fwd = sorted_token_N if num_sent == n else sorted_token_N[:num_sent]
    return _permute(x_TH, fwd, pair_to_sorted_N, fold=k, rows=n)


def dispatch(
    x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int, ep_group=None
) -> tuple[torch.Tensor, DispatchMeta]:
    """Send every (token, choice) pair to the rank owning its expert.

    Returns ``x_MH`` (rows for this rank's L local experts, grouped by local expert) and the
    metadata for :func:`combine`.
    """
    num_tokens, k = topk_ids_TK.shape
    ids_N = topk_ids_TK.reshape(-1)
    sorted_ids_N, sorted_pair_N = torch.sort(ids_N, stable=True)
    pair_to_sorted_N = _inverse(sorted_pair_N)
    sorted_token_N = sorted_pair_N // k
    counts_E = expert_counts(sorted_ids_N, num_experts)  # the sentinel id E is not counted

    p = group_size(ep_group)
    if p == 1:
        host = tuple(counts_E.tolist())
        x_NH = _send_rows(x_TH, sorted_token_N, pair_to_sorted_N, k, sum(host))
        meta = DispatchMeta(
            topk=k,
            sorted_pair_N=sorted_pair_N,
            sorted_token_N=sorted_token_N,
            pair_to_sorted_N=pair_to_sorted_N,
            tokens_per_expert_E=counts_E,
            global_tokens_per_expert_E=counts_E,
            tokens_per_local_expert=host,
            tokens_per_local_expert_L=counts_E,
            num_sent=sum(host),
        )
        return x_NH, meta

    me, n_local = group_rank(ep_group), num_experts // p
    counts_PE = counts_E.new_empty(p * num_experts)  # flat: gloo wants [P*E], not [P, E]
    dist.all_gather_into_tensor(counts_PE, counts_E, group=ep_group)
    counts_PE = counts_PE.view(p, num_experts)
    counts_PPL = counts_PE.view(p, p, n_local)  # [source rank, owner rank, local expert]
    host = counts_PPL.tolist()  # the one device->host sync
    send = tuple(sum(host[me][q]) for q in range(p))
    recv = tuple(sum(host[src][me]) for src in range(p))
    local = tuple(sum(host[src][me][e] for src in range(p)) for e in range(n_local))
    local_L = counts_PPL[:, me].sum(dim=0)
    x_NH = _send_rows(x_TH, sorted_token_N, pair_to_sorted_N, k, sum(send))
    x_recv = all_to_all(x_NH, recv, send, ep_group)

    regroup = ungroup = None
    if n_local > 1:
        # Row r of x_recv belongs to chunk c(r) = src * L + local expert; a stable sort on the
        # local expert gives expert-major order with sources in rank order inside each expert.
        chunk_sizes = counts_PPL[:, me].reshape(-1)
        chunk_ids = torch.arange(p * n_local, device=x_NH.device)
        chunk_of_row = torch.repeat_interleave(chunk_ids, chunk_sizes, output_size=sum(recv))
        regroup = torch.argsort(chunk_of_row % n_local, stable=True)
        ungroup = _inverse(regroup)
        x_recv = _permute(x_recv, regroup, ungroup)
    meta = DispatchMeta(
        topk=k,
        sorted_pair_N=sorted_pair_N,
        sorted_token_N=sorted_token_N,
        pair_to_sorted_N=pair_to_sorted_N,
        tokens_per_expert_E=counts_E,
        global_tokens_per_expert_E=counts_PE.sum(dim=0),
        tokens_per_local_expert=local,
        tokens_per_local_expert_L=local_L,
        send_splits=send,
        recv_splits=recv,
        regroup_M=regroup,
        ungroup_M=ungroup,
        ep_group=ep_group,
        num_sent=sum(send),
    )
    return x_recv, meta


def combine(y_MH: torch.Tensor, probs_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """Reverse :func:`dispatch` and return ``y_TH = sum_k probs_TK[:, k] * expert_out``."""
    if meta.regroup_M is not None:
        y_MH = _permute(y_MH, meta.ungroup_M, meta.regroup_M)
    if meta.send_splits:
        y_MH = all_to_all(y_MH, meta.send_splits, meta.recv_splits, meta.ep_group)
    num_tokens, k = probs_TK.shape
    if meta.num_sent < num_tokens * k:  # dropped pairs: zero rows (their weights are 0 too)
        y_MH = F.pad(y_MH, (0, 0, 0, num_tokens * k - meta.num_sent))
    return _WeightedUnpermute.apply(
        y_MH,
        probs_TK,
        meta.pair_to_sorted_N.view(num_tokens, k),
        meta.sorted_token_N,
        meta.sorted_pair_N,
    )


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


# The TP collectives below allocate like their input (never on "the current CUDA device"), so
# they also run on CPU ranks, forward and backward.
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
