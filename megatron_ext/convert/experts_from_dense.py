"""How ``upcycle`` builds experts (and routers) from one dense SwiGLU FFN. Plain functions.

Shapes legend: F dense FFN width, H hidden, E routed experts, G granularity, S shared groups,
Fe = F / G (copy) or F / (E + S) (partition) the expert width. Dense weights (HF names):
``gate [F, H]``, ``up [F, H]``, ``down [H, F]``. The dense FFN is a sum over its neurons:
``ffn(x) = sum_j down[:, j] * silu(gate[j] x) * (up[j] x)``, so any split of the neurons into
groups gives FFNs whose sum is the dense FFN, exactly.

* ``copy`` (Sparse Upcycling; with ``G > 1`` Megatron's ``--moe-upcycling-granularity``): the
  neurons are cut into G contiguous segments and expert e is segment ``e mod G``; the E/G
  copies of the whole FFN each get one fresh router row, repeated for the G experts of the copy
  (equal logits: a copy's experts are chosen together). With top-k = m*G the output is
  ``sum over m copies of (1/(m*G)) * sum_g segment_g(x) * factor``: the dense FFN exactly when
  ``--moe-router-topk-scaling-factor G`` (Megatron instead scales the weights by
  ``G^(1/3)``, exact only for homogeneous activations, which SiLU is not).
* ``partition`` (LLaMA-MoE): the neurons are split into E + S disjoint groups of Fe (a seeded
  random permutation, or contiguous); S groups together form one shared expert, the other E
  are the routed experts. The router starts at zero: every expert gets the same logit, and with
  top-k = E the weights are 1/E each, so ``--moe-router-topk-scaling-factor E`` makes the first
  step compute the dense FFN exactly; training then specialises the experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("copy", "partition")
ORDERS = ("random", "contiguous")


@dataclass(frozen=True)
class ExpertPlan:
    """Which dense neurons each expert (and the shared expert) takes, and its router."""

    method: str
    num_experts: int
    expert_neurons: tuple[torch.Tensor, ...]  # E index tensors into the F neurons
    shared_neurons: torch.Tensor | None  # the shared expert's neurons, or None
    scaling_factor: float | None  # --moe-router-topk-scaling-factor for an exact step 0
    granularity: int = 1  # copy: experts per copy of the dense FFN (one router row each copy)

    @property
    def expert_ffn(self) -> int:
        return int(self.expert_neurons[0].numel())


def plan_copy(ffn: int, num_experts: int, granularity: int = 1) -> ExpertPlan:
    """Expert e = contiguous segment ``e mod G`` of the F neurons."""
    if granularity < 1 or ffn % granularity or num_experts % granularity:
        raise ValueError(
            f"--granularity {granularity} must divide the FFN size {ffn} and --num-experts "
            f"{num_experts}"
        )
    segments = torch.arange(ffn).view(granularity, ffn // granularity)
    experts = tuple(segments[e % granularity] for e in range(num_experts))
    factor = float(granularity) if granularity > 1 else None
    return ExpertPlan("copy", num_experts, experts, None, factor, granularity)


def plan_partition(
    ffn: int, num_experts: int, shared_groups: int = 0, order: str = "random", seed: int = 1234
) -> ExpertPlan:
    """E routed experts and (S > 0) one shared expert from E + S disjoint neuron groups."""
    groups = num_experts + shared_groups
    if ffn % groups:
        raise ValueError(
            f"the FFN size {ffn} is not divisible by --num-experts {num_experts} + "
            f"--num-shared-groups {shared_groups}"
        )
    if order == "random":
        neurons = torch.randperm(ffn, generator=torch.Generator().manual_seed(seed))
    elif order == "contiguous":
        neurons = torch.arange(ffn)
    else:
        raise ValueError(f"unknown partition order {order!r}")
    # Sorted inside each group: the order of a group's neurons does not change its function,
    # and sorted indices keep every expert a subsequence of the dense FFN.
    split = neurons.view(groups, ffn // groups).sort(dim=1).values
    shared = split[:shared_groups].reshape(-1).sort().values if shared_groups else None
    experts = tuple(split[shared_groups:])
    return ExpertPlan("partition", num_experts, experts, shared, float(num_experts))


def expert_weights(plan: ExpertPlan, part: str, weight: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s slice of a dense ``gate``/``up`` ([F, H]: rows) or ``down`` ([H, F]:
    columns) weight."""
    idx = plan.expert_neurons[expert]
    return weight[:, idx] if part == "down" else weight[idx]


def shared_weights(plan: ExpertPlan, part: str, weight: torch.Tensor) -> torch.Tensor:
    idx = plan.shared_neurons
    return weight[:, idx] if part == "down" else weight[idx]


def router_rows(
    plan: ExpertPlan, hidden: int, std: float, generator: torch.Generator
) -> torch.Tensor:
    """The gate ``[E, H]``: zeros (partition), or one N(0, std) row per copy of the dense FFN
    repeated for its G experts (copy)."""
    if plan.method == "partition":
        return torch.zeros(plan.num_experts, hidden)
    rows = torch.empty(plan.num_experts // plan.granularity, hidden).normal_(
        0.0, std, generator=generator
    )
    return rows.repeat_interleave(plan.granularity, dim=0)
