"""What the flags need from THIS machine (Transformer Engine, the GPU generation, apex's
softmax kernels), checked at start-up before anything is built. Apart from the layout checks
(``layout.py``): the planner and dry runs parse cluster command lines on machines without GPUs.
Each failure is one :class:`~megatron_ext.errors.LayoutError` naming the flag.
"""

from __future__ import annotations

import argparse
import importlib.util

from megatron_ext.errors import require_flags as _require

__all__ = ["FUSED_SOFTMAX_KERNELS", "check_environment", "fused_softmax_available"]


def check_environment(args: argparse.Namespace) -> None:
    """What the flags need from THIS machine, checked at start-up before anything is built (the
    planner and dry runs parse cluster command lines on machines without GPUs, so this is
    apart from :func:`validate`): Transformer Engine for its spec, FP8 and its cross-entropy, a
    Blackwell GPU for MXFP8, and apex's softmax kernels for the local attention's fused
    softmax."""
    te = importlib.util.find_spec("transformer_engine") is not None
    _require(
        te or args.transformer_impl != "transformer_engine",
        "--transformer-impl transformer_engine (the default on GPUs) needs Transformer Engine "
        "(pip install 'megatron-mixtral[gpu]', or an NGC PyTorch container); pass "
        "--transformer-impl local to run without it",
    )
    _require(
        te or "layernorm" not in (args.recompute_modules or ()),
        "--recompute-modules layernorm needs Transformer Engine: Megatron-Core 0.16.1's "
        "CheckpointWithoutOutput reads TE's FP8 state (a NameError without it)",
    )
    _require(
        te or args.cpu or not args.cross_entropy_loss_fusion
        or args.cross_entropy_fusion_impl != "te",
        "--cross-entropy-fusion-impl te needs Transformer Engine; --cross-entropy-fusion-impl "
        "native is Megatron-Core's own fused kernel",
    )  # fmt: skip
    if args.fp8_format and not args.cpu:
        _require(
            te,
            "--fp8-format needs Transformer Engine (pip install 'megatron-mixtral[gpu]', or an "
            "NGC PyTorch container)",
        )
        cap = _gpu_capability()
        _require(
            args.fp8_recipe != "mxfp8" or cap is None or cap >= (10, 0),
            f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.0 or newer), this "
            f"one is {cap[0] if cap else '?'}.{cap[1] if cap else '?'}: use --fp8-recipe "
            "delayed, tensorwise or blockwise",
        )
    args.masked_softmax_fusion = _masked_softmax_fusion(args)


def _gpu_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


# Megatron's FusedScaleMaskSoftmax imports these apex-built kernels (NGC containers have them;
# pip installs of PyTorch and Megatron-Core do not).
FUSED_SOFTMAX_KERNELS = (
    "scaled_masked_softmax_cuda",
    "scaled_upper_triang_masked_softmax_cuda",
    "scaled_softmax_cuda",
)


def fused_softmax_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in FUSED_SOFTMAX_KERNELS)


def _masked_softmax_fusion(args: argparse.Namespace) -> bool:
    """Fuse the local attention's softmax only on GPUs whose install has the kernels; say so
    once when they are missing (the first attention forward would fail on the import) and
    Megatron's ``DotProductAttention`` runs (``--attention-backend unfused|local``)."""
    if args.cpu or args.transformer_impl != "local" or args.no_masked_softmax_fusion:
        return False
    if fused_softmax_available():
        return True
    from megatron_ext.model.builder import uses_sdpa

    if uses_sdpa(args):  # PyTorch's flash / memory-efficient kernels: no softmax of ours runs
        return False
    args.notices.append(
        "masked softmax fusion is off: apex's scaled_masked_softmax_cuda kernels are not "
        "installed (NGC PyTorch containers have them); attention uses PyTorch's softmax"
    )
    return False
