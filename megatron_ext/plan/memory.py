"""Memory per GPU: weights, gradients, optimizer states (exact) plus activations (estimated).

Static memory of a rank (exact: the same arithmetic as Megatron-Core's DDP and optimizers,
see ``params.py``), with ``n`` the rank's parameter elements, ``N`` its DDP buffer elements
(``n`` plus alignment padding with the distributed optimizer), ``p`` bytes per parameter
element (2 with --bf16/--fp16, 4 otherwise) and ``n_s`` the elements of its optimizer shard:

    weights            N * p           (the DDP param buffer; without the distributed
                                        optimizer the parameters themselves, n * p)
    gradients          N * 4           (fp32 grad buffers: engine.py sets grad_reduce_in_fp32)
    main params        n_s * 4         (fp32 master copy; only for bf16/fp16 parameters)
    Adam exp_avg/sq    n_s * 8

``n_s`` is the rank's shard of every bucket with --use-distributed-optimizer (dense parameters
over DP ranks, expert parameters over the expert-DP ranks, TP x DP / (expert-TP x EP):
``~ n_dense/DP + n_expert/expert-DP``), and ``n`` without it.

Activations: ``activations.py``. Totals add a fixed allowance for the CUDA context, NCCL and
cuBLAS workspaces and allocator fragmentation (``OVERHEAD_GIB``; a stated guess, see
docs/planner.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megatron_ext.plan import activations
from megatron_ext.plan.params import (
    BYTES,
    ddp_buffers,
    expert_dp,
    expert_tp,
    rank_params,
    shard_elements,
)

GIB = 2**30
OVERHEAD_GIB = 3.0  # CUDA context (~0.5), NCCL + cuBLAS/TE workspaces (~1.5), fragmentation


@dataclass
class StaticMemory:
    """Exact bytes (and elements) of one rank's weights, gradients and optimizer state."""

    params: int = 0  # parameter elements held by this rank (all chunks)
    weights: int = 0
    grads: int = 0
    main_params: int = 0
    optimizer_states: int = 0  # exp_avg + exp_avg_sq
    optimizer_elements: int = 0  # elements this rank's optimizer updates

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.main_params + self.optimizer_states


def static_memory(
    args: argparse.Namespace, pp_rank: int, dp_rank: int | None = None, tp_rank: int = 0
) -> StaticMemory:
    """Static bytes on the rank of pipeline stage ``pp_rank``, data-parallel rank ``dp_rank``
    and TP rank ``tp_rank``.

    Its expert-data-parallel rank is ``(TP x dp_rank + tp_rank) // (expert-TP x EP)``
    (Megatron-Core's orders over the same ranks of a stage: TP then DP for attention, expert-TP
    then EP then expert-DP for the experts; with expert-TP = TP that is ``dp_rank // EP``).
    ``dp_rank=None``: the largest over the data-parallel ranks. Shards differ only
    by alignment padding, so the planner uses DP rank 0 (its shard starts every bucket and is
    never short); tests/test_plan.py compares every rank.
    """
    dp, edp = args.data_parallel_size, expert_dp(args)
    grid = expert_tp(args) * args.expert_model_parallel_size  # stage ranks per expert-DP rank
    if dp_rank is None:
        candidates = [static_memory(args, pp_rank, r) for r in range(dp)]
        return max(candidates, key=lambda m: m.total)
    out = StaticMemory()
    for index, chunk in enumerate(rank_params(args, pp_rank)):
        out.params += sum(p.numel for p in chunk)
        for buf in ddp_buffers(args, chunk, pp_rank, index):
            elems = [(p, s, e) for b in buf.buckets for p, s, e in b.params]
            half = BYTES[buf.param_dtype] < 4
            if args.use_distributed_optimizer:
                out.weights += buf.numel * BYTES[buf.param_dtype]
                group = edp if buf.expert else dp
                stage_rank = args.tensor_model_parallel_size * dp_rank + tp_rank
                rank = stage_rank // grid if buf.expert else dp_rank
                n_s = shard_elements(buf, rank, group)
            else:
                out.weights += sum(e - s for _, s, e in elems) * BYTES[buf.param_dtype]
                n_s = sum(e - s for _, s, e in elems)
            out.grads += buf.numel * BYTES[buf.grad_dtype]
            out.main_params += 4 * n_s if half else 0
            out.optimizer_states += 8 * n_s
            out.optimizer_elements += n_s
    return out


@dataclass
class RankMemory:
    """Everything on one GPU of a pipeline stage, in bytes."""

    pp_rank: int
    static: StaticMemory
    activations: activations.ActivationMemory
    overhead: int = int(OVERHEAD_GIB * GIB)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.static.total + self.activations.total + self.overhead


def rank_memory(
    args: argparse.Namespace, pp_rank: int, recompute: bool = False, imbalance: float = 1.0
) -> RankMemory:
    return RankMemory(
        pp_rank,
        static_memory(args, pp_rank, 0),
        activations.stage_activations(args, pp_rank, recompute, imbalance),
    )


def peak_memory(
    args: argparse.Namespace, recompute: bool = False, imbalance: float = 1.0
) -> RankMemory:
    """The pipeline stage with the most memory (first: embedding and most micro-batches in
    flight; last: output layer and logits)."""
    pp = args.pipeline_model_parallel_size
    stages = {0, pp - 1} | ({1} if pp > 2 else set())  # stage 1 stands for the middle stages
    ranks = sorted(stages)
    return max((rank_memory(args, r, recompute, imbalance) for r in ranks), key=lambda m: m.total)
