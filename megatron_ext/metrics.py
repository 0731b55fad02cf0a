"""What the training loop reports: FLOPs, throughput, MFU, expert load; stdout and TensorBoard.

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
import re

import numpy as np
import torch

from megatron_ext.model.stack import moe_layer_pattern


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


def expert_load(stats: dict) -> dict[int, dict]:
    """Per layer: tokens per expert, max/mean load ratio, mean router losses."""
    out = {}
    for layer, s in sorted(stats.items()):
        tokens = s["tokens_per_expert"].double()
        out[layer] = {
            "tokens_per_expert": tokens,
            "max_over_mean": float(tokens.max() / tokens.mean()) if tokens.sum() > 0 else 0.0,
            "aux_loss": float(s["aux_loss"]),  # already a mean per micro-batch
            "z_loss": float(s["z_loss"]),
        }
    return out


def load_heatmap(load: dict[int, dict]) -> np.ndarray:
    """A [1, layers*8, experts*8] grey image: brightness = tokens / (max over the matrix)."""
    rows = np.stack([v["tokens_per_expert"].numpy() for v in load.values()])
    rows = rows / max(rows.max(), 1.0)
    return np.kron(rows, np.ones((8, 8)))[None].astype(np.float32)


class Reporter:
    """Prints one line per ``--log-interval`` and writes the same numbers to TensorBoard."""

    def __init__(self, args: argparse.Namespace, writer=None):
        self.args = args
        self.writer = writer
        self.flops_per_token = training_flops_per_token(args)
        self.peak = peak_tflops(args)

    def log(self, it: int, values: dict, step_time: float, load: dict[int, dict]) -> str:
        a = self.args
        tokens = a.global_batch_size * a.seq_length
        values = dict(values)
        values["tokens/s"] = tokens / step_time
        values["TFLOP/s/device"] = self.flops_per_token * tokens / step_time / a.world_size / 1e12
        if self.peak:
            values["MFU"] = values["TFLOP/s/device"] / self.peak
        if load:
            ratios = [v["max_over_mean"] for v in load.values()]
            values["expert max/mean (worst layer)"] = max(ratios)
        parts = [f"iter {it:6d}/{a.train_iters}", f"step {step_time * 1e3:8.1f} ms"]
        parts += [f"{k} {_fmt(v)}" for k, v in values.items()]
        line = " | ".join(parts)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k.replace(" ", "_"), v, it)
            for layer, v in load.items():
                self.writer.add_scalar(
                    f"expert_load/max_over_mean/layer_{layer}", v["max_over_mean"], it
                )
                self.writer.add_scalar(f"router/aux_loss/layer_{layer}", v["aux_loss"], it)
                self.writer.add_scalar(f"router/z_loss/layer_{layer}", v["z_loss"], it)
                counts = v["tokens_per_expert"].double().numpy()
                experts = np.arange(len(counts), dtype=np.float64)
                self.writer.add_histogram_raw(  # x: expert id, height: tokens routed to it
                    f"expert_load/tokens_per_expert/layer_{layer}",
                    min=0.0,
                    max=float(len(counts) - 1),
                    num=float(counts.sum()),
                    sum=float((experts * counts).sum()),
                    sum_squares=float((experts**2 * counts).sum()),
                    bucket_limits=(experts + 0.5).tolist(),
                    bucket_counts=counts.tolist(),
                    global_step=it,
                )
            if load:
                self.writer.add_image(
                    "expert_load/heatmap_layers_x_experts", load_heatmap(load), it
                )
            self.writer.flush()
        return line


def _fmt(v) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4e}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}"
