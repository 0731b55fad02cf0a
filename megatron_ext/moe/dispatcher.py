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
``y_TH[t] = sum_k probs_TK[t, k] * y_NH[pos_TK[t, k]]`` (``pos`` = where pair (t, k) went;
``unpermute.py``: one compiled kernel each way on CUDA). Every permutation is a gather whose
backward is the inverse gather; where rows fan in (the K copies of a token, the K outputs of a
token) an ``embedding_bag`` sums them: no scatter-add, no atomics, deterministic on GPUs.

Expert-TP apart from TP (MoE parallel folding, ``expt_tp`` smaller or larger than ``tp``): the
expert grid is EP x expert-TP x expert-DP over the ranks of a pipeline stage, and an EP
group's ranks no longer hold the same tokens. Each rank then dispatches only its own block of
tokens; the ``[E]`` counts are gathered over the expert-TP x EP group (``[P, A, P, L]``, A
expert-TP ranks), the rows received over EP are all-gathered over expert-TP (every FFN shard
of a local expert sees every row, :func:`~megatron_ext.moe.collectives.gather_uneven`), and
the experts' partial outputs are reduce-scattered back before the reverse all-to-all. With
expert-TP = TP the expert-TP ranks already hold the same tokens and neither step exists.

TP around the layer (:func:`gather_tokens` / :func:`scatter_output`, in ``collectives.py``):
the tokens of the TP group are brought together before routing and the experts' partial
(FFN-sharded) outputs reduced afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from megatron_ext.moe.collectives import (
    all_to_all,
    gather_uneven,
    group_rank,
    group_size,
    reduce_scatter_uneven,
)
from megatron_ext.moe.unpermute import WeightedUnpermute, sum_copies


@dataclass(frozen=True)
class MoEGroups:
    """Process groups the SMoE layer talks over (``None`` = a group of one).

    ``tp``: attention tensor parallel (token gather/scatter around the layer). ``ep``:
    expert-model parallel (all-to-all). ``expt_tp``: expert tensor parallel (FFN shards; equal
    to ``tp`` unless folded). ``expt_dp``: expert-data parallel (Megatron's DDP reduces expert
    grads over it). ``dp``: data parallel (``global_aux_loss`` sums its counts over it).
    ``tp_ep``: expert-TP x EP (the count exchange of a folded dispatch; rank = EP rank x
    expert-TP size + expert-TP rank, Megatron's order).
    """

    tp: object = None
    ep: object = None
    expt_tp: object = None
    expt_dp: object = None
    dp: object = None
    tp_ep: object = None

    @property
    def folded(self) -> bool:
        """Expert-TP apart from attention TP: EP groups cross TP groups."""
        return group_size(self.expt_tp) != group_size(self.tp)

    @staticmethod
    def from_parallel_state(pg_collection=None) -> MoEGroups:
        if pg_collection is not None:
            groups = MoEGroups(
                pg_collection.tp,
                pg_collection.ep,
                pg_collection.expt_tp,
                pg_collection.expt_dp,
                getattr(pg_collection, "dp", None),
                getattr(pg_collection, "tp_ep", None),
            )
        elif not parallel_state.model_parallel_is_initialized():
            return MoEGroups()  # single process, no torch.distributed (unit tests, benchmarks)
        else:
            ps = parallel_state
            groups = MoEGroups(
                ps.get_tensor_model_parallel_group(),
                ps.get_expert_model_parallel_group(),
                ps.get_expert_tensor_parallel_group(),
                ps.get_expert_data_parallel_group(),
                ps.get_data_parallel_group(),
                ps.get_expert_tensor_and_model_parallel_group(),
            )
        groups.check()
        return groups

    def check(self) -> None:
        """A folded dispatch reads the gathered counts as ``[EP, expert-TP]`` blocks."""
        if not self.folded:
            return
        ep, etp = group_size(self.ep), group_size(self.expt_tp)
        expected = group_rank(self.ep) * etp + group_rank(self.expt_tp)
        if group_size(self.tp_ep) != ep * etp or group_rank(self.tp_ep) != expected:
            raise ValueError(
                "folded MoE groups: the expert-TP x EP group must hold EP x expert-TP ranks "
                "ordered expert-TP fastest (Megatron-Core's default order)"
            )


@dataclass(frozen=True)
class DispatchGroups:
    """The groups one :func:`dispatch` exchanges over: ``ep`` (all-to-all), ``etp`` (rows
    gathered over expert-TP; None unless folded) and ``counts`` (the count all-gather: EP, or
    expert-TP x EP when folded)."""

    ep: object = None
    etp: object = None
    counts: object = None

    @staticmethod
    def of(groups: MoEGroups) -> DispatchGroups:
        if groups.folded:
            return DispatchGroups(groups.ep, groups.expt_tp, groups.tp_ep)
        return DispatchGroups(groups.ep, None, groups.ep)


class _Permute(torch.autograd.Function):
    """``y = x[fwd_idx]`` whose backward is the inverse gather ``dx = dy[bwd_idx]``.

    With ``fold = K`` every row of x was used K times and ``bwd_idx`` lists, per row of x, the
    K rows of y that copy it: the backward is then one fused gather-and-sum (``sum_copies``).
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
        return sum_copies(dy, bwd_idx.view(-1, ctx.fold)), None, None, None, None


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
    global_tokens_per_expert_E: torch.Tensor  # int64 counts summed over the count group
    tokens_per_local_expert: tuple[int, ...]  # host ints: rows of each local expert (M total)
    tokens_per_local_expert_L: torch.Tensor  # the same on device (int64)
    num_sent: int = -1  # pairs sent to experts (fewer than T*K when a capacity dropped some)
    send_splits: tuple[int, ...] = ()  # rows sent to each EP rank (empty when P == 1)
    recv_splits: tuple[int, ...] = ()  # rows received from each EP rank
    etp_splits: tuple[int, ...] = ()  # rows received over EP by each expert-TP rank (folded)
    regroup_M: torch.Tensor | None = None  # (src, expert)-ordered row -> expert-ordered
    ungroup_M: torch.Tensor | None = None  # inverse of regroup_M
    groups: DispatchGroups = DispatchGroups()

    @property
    def num_sources(self) -> int:
        """Ranks whose rows reach a local expert (each sends at most a capacity per expert)."""
        return max(len(self.recv_splits), 1) * max(len(self.etp_splits), 1)


def _send_rows(x_TH, sorted_token_N, pair_to_sorted_N, k: int, num_sent: int):
    """``x_NH``: the token of each sorted pair, without the dropped pairs (sorted last)."""
    n = sorted_token_N.numel()
    fwd = sorted_token_N if num_sent == n else sorted_token_N[:num_sent]
    return _permute(x_TH, fwd, pair_to_sorted_N, fold=k, rows=n)


def dispatch(
    x_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    groups: DispatchGroups = DispatchGroups(),
    send_rows: bool = True,
) -> tuple[torch.Tensor | None, DispatchMeta]:
    """Send every (token, choice) pair to the rank(s) owning its expert.

    Returns ``x_MH`` (rows for this rank's L local experts, grouped by local expert; folded:
    the rows of the whole expert-TP group) and the metadata for :func:`combine`.
    ``send_rows=False`` (one rank, no exchange): only the metadata, ``x_MH`` is None (experts
    that gather their rows themselves: ``GroupedExperts.forward(..., combine_with=...)``).
    """
    num_tokens, k = topk_ids_TK.shape
    ids_N = topk_ids_TK.reshape(-1)
    sorted_ids_N, sorted_pair_N = torch.sort(ids_N, stable=True)
    pair_to_sorted_N = _inverse(sorted_pair_N)
    sorted_token_N = sorted_pair_N // k
    counts_E = expert_counts(sorted_ids_N, num_experts)  # the sentinel id E is not counted
    order = dict(
        topk=k,
        sorted_pair_N=sorted_pair_N,
        sorted_token_N=sorted_token_N,
        pair_to_sorted_N=pair_to_sorted_N,
        tokens_per_expert_E=counts_E,
    )

    p, a = group_size(groups.ep), group_size(groups.etp)
    if p == 1 and a == 1:
        host = tuple(counts_E.tolist())
        x_NH = (
            _send_rows(x_TH, sorted_token_N, pair_to_sorted_N, k, sum(host)) if send_rows else None
        )
        meta = DispatchMeta(
            **order,
            global_tokens_per_expert_E=counts_E,
            tokens_per_local_expert=host,
            tokens_per_local_expert_L=counts_E,
            num_sent=sum(host),
        )
        return x_NH, meta

    me, j, n_local = group_rank(groups.ep), group_rank(groups.etp), num_experts // p
    counts_QE = counts_E.new_empty(p * a * num_experts)  # flat: gloo wants [Q*E], not [Q, E]
    dist.all_gather_into_tensor(counts_QE, counts_E, group=groups.counts)
    counts_QE = counts_QE.view(p * a, num_experts)
    # [source EP rank, source expert-TP rank, owner EP rank, local expert]
    counts_PAPL = counts_QE.view(p, a, p, n_local)
    host = counts_PAPL.tolist()  # the one device->host sync
    send = tuple(sum(host[me][j][q]) for q in range(p))
    recv = tuple(sum(host[src][j][me]) for src in range(p))
    per_etp = tuple(sum(sum(host[src][i][me]) for src in range(p)) for i in range(a))
    local = tuple(
        sum(host[src][i][me][e] for src in range(p) for i in range(a)) for e in range(n_local)
    )
    mine_APL = counts_PAPL[:, :, me].transpose(0, 1)  # rows arrive (expert-TP, source, expert)
    x_NH = _send_rows(x_TH, sorted_token_N, pair_to_sorted_N, k, sum(send))
    x_recv = all_to_all(x_NH, recv, send, groups.ep) if p > 1 else x_NH
    if a > 1:
        x_recv = gather_uneven(x_recv, per_etp, groups.etp)

    regroup = ungroup = None
    if n_local > 1:
        # Row r belongs to chunk c(r) = (etp * P + src) * L + local expert; a stable sort on
        # the local expert gives expert-major order with the sources in order inside each.
        chunk_ids = torch.arange(a * p * n_local, device=x_NH.device)
        chunk_of_row = torch.repeat_interleave(
            chunk_ids, mine_APL.reshape(-1), output_size=sum(local)
        )
        regroup = torch.argsort(chunk_of_row % n_local, stable=True)
        ungroup = _inverse(regroup)
        x_recv = _permute(x_recv, regroup, ungroup)
    meta = DispatchMeta(
        **order,
        global_tokens_per_expert_E=counts_QE.sum(dim=0),
        tokens_per_local_expert=local,
        tokens_per_local_expert_L=mine_APL.sum(dim=(0, 1)),
        num_sent=sum(send),
        send_splits=send if p > 1 else (),
        recv_splits=recv if p > 1 else (),
        etp_splits=per_etp if a > 1 else (),
        regroup_M=regroup,
        ungroup_M=ungroup,
        groups=groups,
    )
    return x_recv, meta


def combine(y_MH: torch.Tensor, probs_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """Reverse :func:`dispatch` and return ``y_TH = sum_k probs_TK[:, k] * expert_out``."""
    if meta.regroup_M is not None:
        y_MH = _permute(y_MH, meta.ungroup_M, meta.regroup_M)
    if meta.etp_splits:  # the experts' partial sums over the FFN shards
        y_MH = reduce_scatter_uneven(y_MH, meta.etp_splits, meta.groups.etp)
    if meta.send_splits:
        y_MH = all_to_all(y_MH, meta.send_splits, meta.recv_splits, meta.groups.ep)
    num_tokens, k = probs_TK.shape
    if meta.num_sent < num_tokens * k:  # dropped pairs: zero rows (their weights are 0 too)
        y_MH = F.pad(y_MH, (0, 0, 0, num_tokens * k - meta.num_sent))
    return WeightedUnpermute.apply(
        y_MH,
        probs_TK,
        meta.pair_to_sorted_N.view(num_tokens, k),
        meta.sorted_token_N,
        meta.sorted_pair_N,
    )
