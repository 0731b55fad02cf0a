"""Expert-load statistics of one log interval (plain functions over the routers' counts).

Input: :func:`megatron_ext.moe.collect_moe_stats` of every pipeline stage, per MoE layer l the
tokens routed to each expert e over the interval, ``c[l, e]`` (summed over the micro-batches and
the dispatch's count group), the mean router losses, and the (token, choice) pairs a capacity
dropped and routed on this rank's TP group.

    share[l, e]     = c[l, e] / sum_e c[l, e]            (the heat map)
    ratio[l]        = max_e c[l, e] / mean_e c[l, e]     (1 = perfectly balanced, E = one expert)
    p50, p90, max   of ratio[l] over the layers (linear interpolation between ranks)
    dead fraction   = #{(l, e): c[l, e] < 0.1 * mean_e c[l, e]} / (layers * E)
    dropped share   = sum_l dropped[l] / sum_l (dropped[l] + routed[l]) (0 when dropless)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEAD_BELOW = 0.1  # an expert under 10% of its layer's mean load counts as dead


def expert_load(stats: dict) -> dict[int, dict]:
    """Per layer: tokens per expert (float64 numpy), max/mean ratio, mean router losses,
    dropped and routed pairs."""
    out = {}
    for layer, s in sorted(stats.items()):
        tokens = np.asarray(s["tokens_per_expert"], dtype=np.float64)
        out[layer] = {
            "tokens_per_expert": tokens,
            "max_over_mean": float(tokens.max() / tokens.mean()) if tokens.sum() > 0 else 0.0,
            "aux_loss": float(s["aux_loss"]),  # already a mean per micro-batch
            "z_loss": float(s["z_loss"]),
            "dropped": int(s.get("dropped", 0)),
            "routed": int(s.get("routed", 0)),
        }
    return out


@dataclass(frozen=True)
class LoadSummary:
    """Across layers (see the module docstring)."""

    ratio_p50: float
    ratio_p90: float
    ratio_max: float
    worst_layer: int
    dead_fraction: float
    dropped: int
    dropped_share: float

    def scalars(self) -> dict[str, float]:
        return {
            "expert_load/max_over_mean_p50": self.ratio_p50,
            "expert_load/max_over_mean_p90": self.ratio_p90,
            "expert_load/max_over_mean_max": self.ratio_max,
            "expert_load/dead_expert_fraction": self.dead_fraction,
            "expert_load/tokens_dropped": float(self.dropped),
            "expert_load/dropped_fraction": self.dropped_share,
        }


def summarize(load: dict[int, dict]) -> LoadSummary:
    layers = list(load)
    ratios = np.array([load[k]["max_over_mean"] for k in layers])
    counts = np.stack([load[k]["tokens_per_expert"] for k in layers])  # [layers, E]
    means = counts.mean(axis=1, keepdims=True)
    dead = float((counts < DEAD_BELOW * means).mean()) if counts.sum() > 0 else 0.0
    dropped = sum(v["dropped"] for v in load.values())
    pairs = dropped + sum(v["routed"] for v in load.values())
    return LoadSummary(
        ratio_p50=float(np.percentile(ratios, 50)),
        ratio_p90=float(np.percentile(ratios, 90)),
        ratio_max=float(ratios.max()),
        worst_layer=layers[int(ratios.argmax())],
        dead_fraction=dead,
        dropped=dropped,
        dropped_share=dropped / pairs if pairs else 0.0,
    )


def shares(load: dict[int, dict]) -> np.ndarray:
    """``share[l, e]`` in layer order (rows of zeros for layers that routed nothing)."""
    counts = np.stack([v["tokens_per_expert"] for v in load.values()])
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
