"""Enumerate layouts, reject invalid ones with the training script's own messages, rank the rest.

A layout is (TP, PP, VPP, EP, expert-TP, micro-batch, recomputation); DP follows (world /
(TP x PP)). Candidates: TP in the powers of two up to the GPUs of a node (tensor-parallel traffic
stays on NVLink), PP every divisor of world / TP, VPP none or every split of a stage's layers
into 2 or more virtual stages, EP every divisor of the expert count, expert-TP every power of
two up to TP (MoE parallel folding; expert-TP = TP is Megatron-LM's default), micro-batch sizes
as asked, and recomputation none / full / selective (``RECOMPUTE_CHOICES``). Each candidate's
flags go through ``parse_args`` of
``pretrain_mixtral.py`` (``megatron_ext.arguments``), so an invalid layout is rejected with
exactly the ``LayoutError`` the training script would print; a valid one is then estimated
(``memory.py``, ``cost.py``) and either fits the GPU or is reported with its memory.
"""

from __future__ import annotations

import argparse
import functools
import re
from dataclasses import dataclass

from megatron_ext.arguments import LayoutError, build_parser, parse_args
from megatron_ext.plan import activations, cost, memory
from megatron_ext.plan.hardware import Hardware

GIB = memory.GIB
RECOMPUTE_FLAGS = ["--recompute-granularity", "full", "--recompute-method", "uniform"]
RECOMPUTE_FLAGS += ["--recompute-num-layers", "1"]


@functools.lru_cache(maxsize=1)
def recompute_supported() -> bool:
    """Does ``pretrain_mixtral.py`` accept Megatron-LM's ``--recompute-granularity``?"""
    return any("--recompute-granularity" in a.option_strings for a in build_parser()._actions)


def recompute_requested(args: argparse.Namespace) -> bool:
    return getattr(args, "recompute_granularity", None) == "full"


def recompute_label(args: argparse.Namespace) -> str:
    """`` recompute`` (full), `` recompute moe,moe_act`` (selective), or nothing."""
    if recompute_requested(args):
        return " recompute"
    modules = activations.selective_modules(args)
    return f" recompute {','.join(sorted(modules))}" if modules else ""


# The recomputation a layout is tried with: none, full, or selective modules (MoE first).
RECOMPUTE_CHOICES = (False, True, "moe_act", "moe")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int
    mb: int
    layers_per_virtual_stage: int | None = None  # --num-layers-per-virtual-pipeline-stage
    recompute: bool | str = False  # True: full; a module name: selective (RECOMPUTE_CHOICES)
    etp: int | None = None  # --expert-tensor-parallel-size (None: TP, Megatron-LM's default)

    def flags(self, recompute_flag: bool = True) -> list[str]:
        out = [
            "--tensor-model-parallel-size", str(self.tp),
            "--pipeline-model-parallel-size", str(self.pp),
            "--expert-model-parallel-size", str(self.ep),
            "--micro-batch-size", str(self.mb),
        ]  # fmt: skip
        if self.etp is not None and self.etp != self.tp:
            out += ["--expert-tensor-parallel-size", str(self.etp)]
        if self.layers_per_virtual_stage:
            out += ["--num-layers-per-virtual-pipeline-stage", str(self.layers_per_virtual_stage)]
        if self.tp > 1:
            out.append("--sequence-parallel")
        if self.recompute is True and recompute_flag:
            out += RECOMPUTE_FLAGS
        elif self.recompute:
            out += ["--recompute-granularity", "selective", "--recompute-modules", self.recompute]
        return out


def describe(layout: Layout, world: int) -> str:
    """``TP1 PP4 EP8 DP16 mb1`` for a layout that may be invalid (VPP as layers per stage)."""
    vl = layout.layers_per_virtual_stage
    dp = world // (layout.tp * layout.pp) if world % (layout.tp * layout.pp) == 0 else "?"
    text = f"TP{layout.tp} PP{layout.pp}" + (f" ({vl} layers/virtual stage)" if vl else "")
    text += f" EP{layout.ep}" + _etp_text(layout.tp, layout.etp or layout.tp)
    text += f" DP{dp} mb{layout.mb}"
    if layout.recompute is True:
        return text + " recompute"
    return text + (f" recompute {layout.recompute}" if layout.recompute else "")


def _etp_text(tp: int, etp: int) -> str:
    return f" ETP{etp}" if etp != tp else ""  # shown only apart from TP (the default)


def describe_args(args: argparse.Namespace) -> str:
    """``TP2 PP8 VPP7 EP8 ETP1 DP8 mb1`` (+ `` recompute``) of parsed flags (ETP only when it
    differs from TP)."""
    vpp = args.virtual_pipeline_model_parallel_size
    tp = args.tensor_model_parallel_size
    text = f"TP{tp} PP{args.pipeline_model_parallel_size}"
    text += f" VPP{vpp}" if vpp else ""
    text += f" EP{args.expert_model_parallel_size}"
    text += _etp_text(tp, args.expert_tensor_parallel_size or tp)
    text += f" DP{args.data_parallel_size}"
    text += f" mb{args.micro_batch_size}"
    return text + recompute_label(args)


@dataclass
class Candidate:
    layout: Layout
    name: str
    argv: list[str]
    args: argparse.Namespace | None = None
    error: str | None = None  # why the layout is invalid (LayoutError text)
    memory: memory.RankMemory | None = None
    cost: cost.StepCost | None = None
    usable: float = 0.0  # bytes the layout may use per GPU

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.usable


def base_argv(model: str, seq_length: int, global_batch: int, precision: str = "bf16") -> list[str]:
    """The flags every candidate shares: Megatron-LM's Mixtral recipe settings."""
    argv = ["--model", model, "--seq-length", str(seq_length)]
    argv += ["--global-batch-size", str(global_batch), "--mock-data", "--train-iters", "1"]
    argv += ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    argv += ["--attention-dropout", "0", "--hidden-dropout", "0"]
    return argv + ([f"--{precision}"] if precision in ("bf16", "fp16") else [])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(
    world: int, num_layers: int, num_experts: int, gpus_per_node: int, micro_batches, recompute
) -> list[Layout]:
    """Every candidate layout (valid or not: ``parse_args`` decides)."""
    out = []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and world % t == 0]
    for tp in tps:
        for pp in _divisors(world // tp):
            splits = [None]
            if pp > 1 and num_layers % pp == 0:
                per_stage = num_layers // pp
                splits += [v for v in _divisors(per_stage) if v < per_stage]
            for vl in splits:
                for ep in _divisors(num_experts):
                    for etp in (e for e in (1, 2, 4, 8, 16) if e <= tp):
                        for mb in micro_batches:
                            for rc in recompute:
                                out.append(Layout(tp, pp, ep, mb, vl, rc, etp))
    return out


def evaluate(
    layout: Layout,
    base: list[str],
    world: int,
    hw: Hardware,
    imbalance: float = 1.0,
) -> Candidate:
    """Validate ``layout`` through ``parse_args`` and estimate memory and step time."""
    supported = recompute_supported()
    argv = base + layout.flags(recompute_flag=supported)
    cand = Candidate(layout, describe(layout, world), argv)
    cand.usable = hw.memory_gib * GIB
    try:
        args = parse_args(argv, world)
    except LayoutError as e:
        cand.error = str(e)
        return cand
    cand.args = args
    full = layout.recompute is True
    cand.name = describe_args(args) + (" recompute" if full and not supported else "")
    if full and not supported:
        cand.error = (
            "full recomputation needs --recompute-granularity full, which pretrain_mixtral.py "
            "does not accept yet"
        )
        return cand
    # selective recomputation is read from the parsed flags by the activation and cost models
    cand.memory = memory.peak_memory(args, recompute=full, imbalance=imbalance)
    cand.cost = cost.step_cost(args, hw, recompute=full, imbalance=imbalance)
    return cand


def search(
    model: str,
    world: int,
    hw: Hardware,
    seq_length: int,
    global_batch: int,
    micro_batches=(1, 2, 4),
    recompute=RECOMPUTE_CHOICES,
    imbalance: float = 1.0,
    precision: str = "bf16",
) -> list[Candidate]:
    """All candidates, ranked: fitting ones by step time, then the rest (module docstring)."""
    from megatron_ext.model import PRESETS

    arch = PRESETS[model]
    base = base_argv(model, seq_length, global_batch, precision)
    found = [
        evaluate(lay, base, world, hw, imbalance)
        for lay in layouts(
            world, arch.num_layers, arch.num_experts, hw.gpus_per_node, micro_batches, recompute
        )
    ]
    return rank(found)


def rank(found: list[Candidate]) -> list[Candidate]:
    fitting = sorted(
        (c for c in found if c.error is None and c.fits),
        key=lambda c: (c.cost.step_s, c.memory.total),
    )
    too_big = sorted(
        (c for c in found if c.error is None and not c.fits), key=lambda c: c.memory.total
    )
    invalid = [c for c in found if c.error is not None]
    return fitting + too_big + invalid


def rule_of(message: str) -> str:
    """The rule behind a rejection message: its text with the numbers taken out."""
    return re.sub(r"\d+", "#", message)
