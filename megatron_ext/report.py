"""``python -m megatron_ext.report RUN_DIR [--out FILE]``: one self-contained HTML page of a run.

It reads the TensorBoard event files under RUN_DIR (``--tensorboard-dir`` of the run; the newest
value wins where a resumed run wrote a step twice) and writes, with every figure inline as a
PNG: a summary table, the training and validation loss, the learning rate, tokens/s, TFLOP/s
and MFU, the gradient norm and skipped steps, the router losses and expert-load statistics, and
the last expert-load heat map and imbalance figure the run logged. For clusters behind a
firewall: the page opens in any browser, without a TensorBoard server or the network.
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import os
import statistics
import sys
from dataclasses import dataclass, field

from megatron_ext.metrics import flops_text, readable
from megatron_ext.observe.figures import curves, png_bytes

# (section title, y label, {series name: scalar tag}); a section shows when any tag exists.
SECTIONS = (
    ("Loss", "cross-entropy", {"training": "lm_loss", "validation": "validation/lm_loss"}),
    ("Learning rate", "lr", {"lr": "lr"}),
    ("Throughput", "tokens/s", {"tokens/s": "tokens/s"}),
    ("Compute", "TFLOP/s per device", {"TFLOP/s/device": "TFLOP/s/device"}),
    ("Model FLOPs utilisation", "MFU", {"MFU": "MFU"}),
    ("Gradient norm", "norm", {"grad norm": "grad_norm"}),
    ("Skipped steps", "skipped (cumulative)", {"skipped": "skipped"}),
    ("Router losses", "loss", {"aux": "router_aux_loss", "z": "router_z_loss"}),
    (
        "Expert load imbalance across layers",
        "max / mean tokens per expert",
        {
            "median": "expert_load/max_over_mean_p50",
            "p90": "expert_load/max_over_mean_p90",
            "max": "expert_load/max_over_mean_max",
        },
    ),
    (
        "Dead experts and dropped tokens",
        "fraction",
        {
            "experts under 10% of the mean": "expert_load/dead_expert_fraction",
            "tokens dropped": "expert_load/dropped_fraction",
        },
    ),
)
FIGURES = ("expert_load/heatmap", "expert_load/imbalance")


@dataclass
class Run:
    path: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # the newest per tag


def read_run(run_dir: str) -> Run:
    """Every scalar and the newest image of each tag in the event files under ``run_dir``."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    files = sorted(glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files (events.out.tfevents.*)")
    run = Run(run_dir)
    for path in files:  # each file in time order; later values replace earlier ones
        acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0, ea.IMAGES: 1})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            points = dict(run.scalars.get(tag, []))
            points.update((e.step, e.value) for e in acc.Scalars(tag))
            run.scalars[tag] = sorted(points.items())
        for tag in tags.get("images", []):
            last = acc.Images(tag)[-1]
            if tag not in run.images or last.step >= run.images[tag][0]:
                run.images[tag] = (last.step, last.encoded_image_string)
    return run


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _summary(run: Run) -> list[tuple[str, str]]:
    rows = []
    loss = run.scalars.get("lm_loss")
    if loss:
        rows.append(("iterations logged", f"{loss[0][0]} to {loss[-1][0]}"))
        rows.append(("training loss (first, last)", f"{loss[0][1]:.4f}, {loss[-1][1]:.4f}"))
    val = run.scalars.get("validation/lm_loss")
    if val:
        rows.append(("validation loss (best)", f"{min(v for _, v in val):.4f}"))
    for tag, label, text in (
        ("tokens/s", "tokens/s (median)", readable),
        ("TFLOP/s/device", "compute per device (median)", lambda v: f"{flops_text(v)}"),
        ("MFU", "MFU (median)", lambda v: f"{readable(v * 100)}%"),
    ):
        if run.scalars.get(tag):
            rows.append((label, text(statistics.median(v for _, v in run.scalars[tag]))))
    skipped = run.scalars.get("skipped")
    if skipped:
        rows.append(("skipped steps", f"{skipped[-1][1]:.0f}"))
    return rows


def build_html(run: Run) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Run report: {html.escape(run.path)}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:auto}"
        "img{max-width:100%}td{padding:2px 12px}</style></head><body>",
        f"<h1>Run report</h1><p>{html.escape(os.path.abspath(run.path))}</p>",
        "<table>",
        *(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _summary(run)),
        "</table>",
    ]
    for title, ylabel, series in SECTIONS:
        data = {name: run.scalars.get(tag, []) for name, tag in series.items()}
        if any(data.values()):
            fig = curves(data, title, ylabel)
            parts += [f"<h2>{html.escape(title)}</h2>", _img(png_bytes(fig), title)]
    for tag in FIGURES:
        if tag in run.images:
            step, png = run.images[tag]
            parts += [f"<h2>{html.escape(tag)} (iteration {step})</h2>", _img(png, tag)]
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_ext.report", description=__doc__)
    p.add_argument("run_dir", help="the run's --tensorboard-dir")
    p.add_argument("--out", default=None, help="default: RUN_DIR/report.html")
    opts = p.parse_args(argv)
    try:
        run = read_run(opts.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = opts.out or os.path.join(opts.run_dir, "report.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(build_html(run))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
