"""What the training loop reports: FLOPs, throughput, MFU, expert load; the log line and the sinks.

FLOPs (docs/flops.md has the derivation). Per token, forward, for each layer with hidden H,
FFN F, query heads A with head dim d, G KV groups, E experts, top-k K, sequence S:

    attention projections  2*H*(A*d + 2*G*d) + 2*(A*d)*H
    attention scores       2*2*S*A*d * 1/2          (QK^T and PV; causal: half the square)
    router                 2*H*E
    experts                K * 3 * 2*H*F            (w1, w3, w2 of the K selected experts)

plus the output layer 2*H*V once. Training counts forward + backward = 3x forward. MFU is
achieved FLOP/s per device over the device's peak: only *active* parameters count, so an MoE is
not credited for experts it did not run.
"""

from __future__ import annotations

import argparse
import math
import re
import time

import torch

from megatron_ext.model.stack import moe_layer_pattern
from megatron_ext.observe.load import summarize


def _peaks(bf16: float, fp8: float | None, tf32: float) -> dict[str, float]:
    out = {"bf16": bf16, "fp16": bf16, "fp32": tf32}  # fp32 matmuls: the TF32 tensor-core peak
    if fp8:
        out["fp8"] = fp8
    return out


# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets, by the name
# torch.cuda.get_device_name() reports; first match wins, so the more specific names come
# first ("GH200" before "H200", "H100 PCIe" before "H100"; "H20" must not match "H200").
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"GB200", _peaks(2500.0, 5000.0, 1250.0)),
    (r"B200", _peaks(2250.0, 4500.0, 1125.0)),
    (r"GH200", _peaks(989.4, 1978.9, 494.7)),
    (r"H200 NVL", _peaks(835.5, 1670.5, 417.5)),
    (r"H200", _peaks(989.4, 1978.9, 494.7)),  # SXM: the H100 SXM's compute, more memory
    (r"H100 PCIe", _peaks(756.0, 1513.0, 378.0)),
    (r"H100 NVL", _peaks(835.5, 1670.5, 417.5)),
    (r"H100|H800", _peaks(989.4, 1978.9, 494.7)),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH20\b", _peaks(148.0, 296.0, 74.0)),
    (r"L40S", _peaks(362.1, 733.0, 183.0)),
    (r"A100|A800", _peaks(312.0, None, 156.0)),
)


def device_peak(name: str, precision: str) -> float | None:
    """Peak TFLOP/s of GPU ``name`` at ``precision`` (bf16, fp16, fp8, fp32), None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks.get(precision)
    return None


def mlp_flops_per_token(args: argparse.Namespace) -> float:
    """Forward FLOPs per token of every layer's MLP part: an MoE layer's router ``2*H*E``, its
    top-k routed experts ``k * 6*H*Fe`` and shared experts ``6*H*Fs``; a dense layer's
    ``6*H*F`` (``--moe-layer-freq``)."""
    h = args.hidden_size
    fe = args.moe_ffn_hidden_size or args.ffn_hidden_size
    fs = getattr(args, "moe_shared_expert_intermediate_size", None) or 0
    moe = 2 * h * args.num_experts + args.moe_router_topk * 3 * 2 * h * fe + 3 * 2 * h * fs
    pattern = moe_layer_pattern(getattr(args, "moe_layer_freq", 1), args.num_layers)
    n_moe = sum(pattern)
    return n_moe * moe + (args.num_layers - n_moe) * 3 * 2 * h * args.ffn_hidden_size


def training_flops_per_token(args: argparse.Namespace) -> float:
    h, s = args.hidden_size, args.seq_length
    d = h // args.num_attention_heads
    q, kv = args.num_attention_heads * d, args.num_query_groups * d
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * s * q / 2
    forward = args.num_layers * attention + mlp_flops_per_token(args) + 2 * h * args.vocab_size
    return 3.0 * forward


def precision_of(args: argparse.Namespace) -> str:
    return "fp8" if args.fp8_format else "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def peak_tflops(args: argparse.Namespace) -> float | None:
    """``--peak-tflops``, else this GPU's datasheet peak (None on CPU or an unknown GPU)."""
    if args.peak_tflops:
        return args.peak_tflops
    if args.cpu or not torch.cuda.is_available():
        return None
    return device_peak(torch.cuda.get_device_name(), precision_of(args))


MAX_POINTS = 1000  # of the imbalance figure, per layer
FIGURE_EVERY_S = 60.0  # figures cost ~0.2 s to draw: at most one pair a minute (and the last)


class Reporter:
    """Prints one line per ``--log-interval`` (the caller prints on the last rank) and writes the
    same numbers, the expert-load scalars, histograms and figures to the sinks
    (``observe/sinks.py``: TensorBoard, W&B). Expert load: ``observe/load.py``."""

    def __init__(self, args: argparse.Namespace, sinks=()):
        self.args = args
        self.sinks = list(sinks)
        self.flops_per_token = training_flops_per_token(args)
        self.peak = peak_tflops(args)
        self.imbalance: list[tuple[int, dict[int, float]]] = []  # (iteration, layer -> ratio)
        self.last_figures = -math.inf  # time.monotonic() of the last drawn figures

    def log(self, it: int, values: dict, step_time: float, load: dict[int, dict]) -> str:
        a = self.args
        tokens = a.global_batch_size * a.seq_length
        values = dict(values)
        values["tokens/s"] = tokens / step_time
        values["TFLOP/s/device"] = self.flops_per_token * tokens / step_time / a.world_size / 1e12
        if self.peak:
            values["MFU"] = values["TFLOP/s/device"] / self.peak
        summary = summarize(load) if load else None
        dropless = a.moe_expert_capacity_factor is None
        line = format_line(it, a.train_iters, step_time, values, summary, dropless)
        if self.sinks:
            self._write(it, values, load, summary)
        return line

    def scalar(self, tag: str, value: float, it: int) -> None:
        for sink in self.sinks:
            sink.scalar(tag, value, it)
            sink.flush()

    def _write(self, it: int, values: dict, load: dict[int, dict], summary) -> None:
        from megatron_ext.observe import figures as figures_mod  # matplotlib: the last rank only

        scalars = {k.replace(" ", "_"): v for k, v in values.items()}
        figures = {}
        if load:
            for layer, v in load.items():
                scalars[f"expert_load/max_over_mean/layer_{layer}"] = v["max_over_mean"]
                scalars[f"router/aux_loss/layer_{layer}"] = v["aux_loss"]
                scalars[f"router/z_loss/layer_{layer}"] = v["z_loss"]
            scalars.update(summary.scalars())
            self.imbalance.append((it, {k: v["max_over_mean"] for k, v in load.items()}))
            if len(self.imbalance) > MAX_POINTS:  # thin by half, keep the first and the last
                self.imbalance = self.imbalance[:-1:2] + self.imbalance[-1:]
            last = it + self.args.log_interval > self.args.train_iters
            if last or time.monotonic() - self.last_figures >= FIGURE_EVERY_S:
                self.last_figures = time.monotonic()
                figures = {
                    "expert_load/heatmap": figures_mod.load_heatmap(load, it),
                    "expert_load/imbalance": figures_mod.imbalance_figure(self.imbalance),
                }
        for sink in self.sinks:
            for tag, value in scalars.items():
                sink.scalar(tag, value, it)
            for layer, v in load.items():  # x: expert id, height: tokens routed to it
                sink.histogram(f"expert_load/tokens_per_expert/layer_{layer}",
                               v["tokens_per_expert"], it)  # fmt: skip
            for tag, fig in figures.items():
                sink.figure(tag, fig, it)
            sink.flush()


# ------------------------------------------------------------------------------ the log line
SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))


def readable(v: float) -> str:
    """Three significant digits, thousands grouped from 1,000 up (``1,701``, ``45.3``,
    ``0.125``)."""
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def flops_text(tflops: float) -> str:
    """``tflops`` TFLOP/s with the SI prefix that puts the number in [1, 1000): ``15.0 GFLOP/s``."""
    flops = tflops * 1e12
    scale, prefix = next(((s, p) for s, p in SI if abs(flops) >= s), SI[-1])
    return f"{flops / scale:.3g} {prefix}FLOP/s"


def format_line(it, iters, step_time, values: dict, summary, dropless: bool) -> str:
    """``iter 10/40 | step 2,345 ms | lm loss 7.2345 | lr 3.00e-03 | grad norm 1.23 | skipped 0
    | router aux_loss 1.0012 | 1,701 tokens/s | 15.0 GFLOP/s/device | MFU 1.52% | expert
    max/mean 1.23 (layer 2, median 1.10) | tokens dropped 0 (dropless)``."""
    parts = [f"iter {it:6d}/{iters}", f"step {readable(step_time * 1e3)} ms"]
    for k, v in values.items():
        if k in ("tokens/s", "TFLOP/s/device", "MFU"):
            continue
        if k == "lr":
            parts.append(f"lr {v:.2e}")
        elif isinstance(v, int):
            parts.append(f"{k.replace('_', ' ')} {v}")
        elif k == "grad_norm":  # diagnostics: 4 decimals
            parts.append(f"grad norm {v:.4f}")
        elif "loss" in k and "scale" not in k:
            parts.append(f"{k} {v:.4f}")
        else:
            parts.append(f"{k.replace('_', ' ')} {readable(v)}")
    parts.append(f"{readable(values['tokens/s'])} tokens/s")
    parts.append(f"{flops_text(values['TFLOP/s/device'])}/device")
    if "MFU" in values:
        parts.append(f"MFU {readable(values['MFU'] * 100)}%")
    if summary is not None:
        parts.append(
            f"expert max/mean {summary.ratio_max:.2f} (layer {summary.worst_layer}, "
            f"median {summary.ratio_p50:.2f})"
        )
        dropped = "0 (dropless)" if dropless else f"{readable(summary.dropped_share * 100)}%"
        parts.append(f"tokens dropped {dropped}")
    return " | ".join(parts)


_LINE = {
    "step ms": r"step ([\d,.]+) ms",
    "lm loss": r"lm loss ([\d.]+)",
    "grad norm": r"grad norm ([\d.]+|nan|inf)",
    "skipped": r"skipped (\d+)",
    "loss scale": r"loss scale ([\d,.e+-]+)",
    "router aux_loss": r"router aux_loss ([\d.]+)",
    "tokens/s": r"([\d,.e+-]+) tokens/s",
    "MFU": r"MFU ([\d.e+-]+)%",
}


def parse_line(line: str) -> dict[str, float]:
    """The numbers of a :func:`format_line` line: step ms, lm loss, grad norm, skipped, loss
    scale, router aux_loss, tokens/s, TFLOP/s/device, MFU (a fraction), for scripts and tests
    that read the log (bench/gpu_check.py)."""
    out = {}
    for name, pattern in _LINE.items():
        if m := re.search(pattern, line):
            out[name] = float(m.group(1).replace(",", ""))
    if "MFU" in out:
        out["MFU"] /= 100
    if m := re.search(r"([\d.e+-]+) ([PTGMk]?)FLOP/s/device", line):
        scale = dict((p, s) for s, p in SI)[m.group(2)]
        out["TFLOP/s/device"] = float(m.group(1)) * scale / 1e12
    return out
