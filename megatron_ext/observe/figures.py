"""Figures of a run, drawn with matplotlib's object API (no pyplot state): the expert-load heat
map, the per-layer imbalance over iterations, and the curves of the HTML report."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from megatron_ext.observe.load import shares, summarize

NUMBERS_UP_TO = (40, 16)  # (layers, experts): write the share in each cell up to this size


def load_heatmap(load: dict[int, dict], iteration: int) -> Figure:
    """Layers x experts: colour = share of the layer's routed tokens (%), the numbers in the
    cells when they fit, the worst layer (largest max/mean) outlined and named in the title."""
    share = shares(load) * 100
    layers = list(load)
    n_layers, n_experts = share.shape
    summary = summarize(load)
    fig = Figure(figsize=(min(3 + 0.5 * n_experts, 16), min(max(3.2, 1.5 + 0.3 * n_layers), 14)))
    ax = fig.add_subplot()
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="% of the layer's tokens")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(_ticks(n_experts), [str(e) for e in _ticks(n_experts)])
    worst = layers.index(summary.worst_layer)
    rows = sorted(set(_ticks(n_layers)) | {worst})
    ax.set_yticks(rows, [str(layers[i]) for i in rows])
    for label in ax.get_yticklabels():
        if label.get_text() == str(summary.worst_layer):
            label.set_color("red")
            label.set_fontweight("bold")
    if n_layers <= NUMBERS_UP_TO[0] and n_experts <= NUMBERS_UP_TO[1]:
        middle = (share.max() + share.min()) / 2
        digits = 1 if share.max() < 100 else 0  # 6.2% each when 16 experts are balanced
        for (i, e), value in np.ndenumerate(share):
            colour = "black" if value > middle else "white"
            text = f"{value:.{digits}f}"
            ax.text(e, i, text, ha="center", va="center", fontsize=7, color=colour)
    ax.add_patch(
        Rectangle((-0.5, worst - 0.5), n_experts, 1, fill=False, edgecolor="red", linewidth=2)
    )
    ax.set_title(
        f"expert load at iteration {iteration}: worst layer {summary.worst_layer} "
        f"(max/mean {summary.ratio_max:.2f}; balanced = {100 / n_experts:.1f}% each)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def imbalance_figure(history: list[tuple[int, dict[int, float]]]) -> Figure:
    """max/mean tokens per expert of every layer over the logged iterations (one line per
    layer up to 12 layers; more: the median, p90 and max across layers)."""
    its = [it for it, _ in history]
    layers = sorted(history[-1][1]) if history else []
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    if len(layers) <= 12:
        for layer in layers:
            ax.plot(its, [r.get(layer, np.nan) for _, r in history], label=f"layer {layer}")
    else:
        ratios = np.array([[r.get(k, np.nan) for k in layers] for _, r in history])
        for q, label in ((50, "median over layers"), (90, "p90 over layers")):
            ax.plot(its, np.nanpercentile(ratios, q, axis=1), label=label)
        ax.plot(its, np.nanmax(ratios, axis=1), label="max over layers")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="balanced")
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title("expert load imbalance per layer", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def curves(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str) -> Figure:
    """Line plots of named (step, value) series on one axis."""
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    for name, points in series.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _ticks(n: int) -> list[int]:
    step = 1 if n <= 32 else int(np.ceil(n / 32))
    return list(range(0, n, step))
