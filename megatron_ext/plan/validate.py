r"""Check one command line: is the layout valid, what does each GPU hold, does it fit.

    python -m megatron_ext.plan --validate -- <pretrain_mixtral.py flags> \
        --world-size 64 --gpu-memory-gb 80
    python -m megatron_ext.plan --validate --recipe examples/mixtral_8x7b_64xh100.sh

The flags go through the training script's own ``parse_args`` (same errors); memory is given
per pipeline stage (first, a middle one, last), with the step-time estimate of ``cost.py``.
"""

from __future__ import annotations

import argparse

from megatron_ext.arguments import LayoutError, parse_args
from megatron_ext.plan import cost, memory
from megatron_ext.plan.activations import selective_modules
from megatron_ext.plan.hardware import GPUS
from megatron_ext.plan.report import gib, memory_table
from megatron_ext.plan.search import describe_args, recompute_requested

# Planner options that may appear among the training flags (pretrain_mixtral.py has none).
_OPTIONS = {
    "--world-size": int,
    "--gpu-memory-gb": float,
    "--gpu": str,
    "--imbalance": float,
    "--recipe": str,  # take the flags (first) and the world size from a cluster recipe
}


def split_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Take the planner options out of ``argv`` (wherever they are); return them and the rest."""
    opts, rest, i = {}, [], 0
    while i < len(argv):
        if argv[i] in _OPTIONS and i + 1 < len(argv):
            opts[argv[i][2:].replace("-", "_")] = _OPTIONS[argv[i]](argv[i + 1])
            i += 2
        elif argv[i] == "--":
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return opts, rest


def validate_text(
    flags: list[str],
    world_size: int,
    gpu_memory_gb: float | None = None,
    gpu: str = "h100",
    imbalance: float = 1.0,
) -> tuple[str, bool | None]:
    """(report, fits); fits is None when the layout is invalid."""
    hw = GPUS[gpu].with_memory(gpu_memory_gb)
    try:
        args = parse_args(flags, world_size)
    except LayoutError as e:
        return f"invalid layout (pretrain_mixtral.py would stop here): {e}", None
    assumed = args.vocab_size is None
    if assumed:
        args.vocab_size = 32000  # the tokenizer decides at run time; Mixtral's v1 vocabulary
    recompute = recompute_requested(args)
    pp = args.pipeline_model_parallel_size
    stages = sorted({0, min(1, pp - 1), pp - 1})
    per_stage = [memory.rank_memory(args, r, recompute, imbalance) for r in stages]
    usable = hw.memory_gib * memory.GIB
    worst = max(per_stage, key=lambda m: m.total)
    fits = worst.total <= usable
    lines = [
        f"layout {describe_args(args)} on {world_size} x {hw.name}: "
        f"{args.num_microbatches} micro-batches of {args.micro_batch_size} per step "
        f"(global batch {args.global_batch_size}), sequence {args.seq_length}, "
        f"{_recomputation_text(args, recompute)}",
    ]
    lines += [f"note: {n}" for n in args.notices + args.unhonoured]
    if assumed:
        lines.append("note: vocabulary 32000 assumed (the tokenizer sets it; or --vocab-size)")
    lines += ["memory per GPU (GiB; pipeline rank 1 stands for the middle stages):"]
    lines += memory_table(per_stage, usable)
    verdict = "fits" if fits else "DOES NOT FIT"
    lines.append(
        f"largest: {gib(worst.total)} GiB on pipeline rank {worst.pp_rank} of "
        f"{hw.memory_gib:g} GiB: {verdict}"
    )
    if args.transformer_impl == "transformer_engine":
        c = cost.step_cost(args, hw, recompute, imbalance)
        lines.append(
            f"estimated step {c.step_s:.2f} s, {c.tflops_per_gpu:.0f} TFLOP/s per GPU, "
            f"MFU {c.mfu:.1%} (cost model: docs/planner.md)"
        )
    return "\n".join(lines), fits


def main(argv: list[str]) -> int:
    opts, flags = split_options(argv)
    if "recipe" in opts:
        from megatron_ext.plan.recipe import load

        recipe = load(opts.pop("recipe"))
        flags = recipe.argv + flags
        opts.setdefault("world_size", recipe.world_size)
    if "world_size" not in opts:
        raise SystemExit("--validate needs --world-size N (the number of GPUs)")
    p = argparse.Namespace(gpu_memory_gb=None, gpu="h100", imbalance=1.0)
    vars(p).update(opts)
    text, fits = validate_text(flags, p.world_size, p.gpu_memory_gb, p.gpu, p.imbalance)
    print(text)
    return 2 if fits is None else 0 if fits else 1


def _recomputation_text(args, full: bool) -> str:
    if full:
        return "full recomputation"
    modules = selective_modules(args)
    return f"recomputing {', '.join(sorted(modules))}" if modules else "no recomputation"
