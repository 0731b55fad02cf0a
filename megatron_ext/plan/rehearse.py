"""Rehearse a cluster recipe on CPU ranks: its flags and parallel degrees, a model small enough.

What is kept, changed and dropped (``shrink``), and why:

* kept: every flag of the recipe, TP, PP, VPP (layers per virtual stage), EP and expert-TP
  exactly, the micro-batch size, the number of micro-batches per step, precision, the
  optimizer flags;
* DP: the smallest value the expert grid allows (EP x expert-TP must divide TP x DP:
  DP = lcm(TP, EP x expert-TP) / TP, which is EP when expert-TP = TP), so the rehearsal needs
  TP x PP x DP ranks instead of the cluster's world size; the global batch is scaled by the
  same factor, which keeps the micro-batches per step (the interleaved schedule needs a
  multiple of PP);
* model: the fewest layers that keep PP and VPP (PP x VPP, one per virtual stage), hidden 64,
  FFN 128, G = max(TP, 2) key/value groups and 2G query heads (divisible by TP, still grouped),
  sequence 64, a 1024-token vocabulary; the expert count stays (EP must divide it);
* data and checkpoints: --mock-data with a NullTokenizer instead of --data-path and the
  tokenizer; no --save / --load / --tensorboard-dir (a rehearsal must not touch the run's
  checkpoints); evaluation off;
* --sequence-parallel is kept: the CPU path's norms (``model/norm.py``) support it.

Then ``pretrain_mixtral.run`` trains for a few iterations on that many CPU ranks (gloo), in
child processes of ``megatron_ext.multirank``; a flag or layout error shows up as it would on
the cluster, with the failing rank's traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

from megatron_ext.arguments import LayoutError, parse_args
from megatron_ext.plan.recipe import Recipe, strip_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DROPPED = {
    "--data-path": "mock data instead",
    "--tokenizer-type": "NullTokenizer with mock data",
    "--tokenizer-model": "NullTokenizer with mock data",
    "--split": "mock data",
    "--data-cache-path": "mock data",
    "--save": "a rehearsal never writes the run's checkpoints",
    "--load": "a rehearsal never reads the run's checkpoints",
    "--save-interval": "no checkpoints",
    "--tensorboard-dir": "no logs",
}
SHRUNK = (
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--num-query-groups", "--seq-length", "--max-position-embeddings", "--vocab-size",
    "--global-batch-size", "--num-layers-per-virtual-pipeline-stage", "--train-iters",
    "--eval-iters", "--eval-interval", "--log-interval", "--lr-warmup-iters", "--lr-decay-iters",
    "--tokenizer-type", "--cpu", "--mock-data", "--model",
)  # fmt: skip


@dataclass
class Rehearsal:
    argv: list[str]
    world_size: int
    changes: list[str] = field(default_factory=list)


def shrink(recipe: Recipe, train_iters: int = 2, ep: int | None = None) -> Rehearsal:
    """The CPU rehearsal of ``recipe`` (module docstring); raises LayoutError if the recipe's
    layout is invalid at its own world size."""
    full = parse_args(recipe.argv, recipe.world_size)
    tp, pp = full.tensor_model_parallel_size, full.pipeline_model_parallel_size
    vpp = full.virtual_pipeline_model_parallel_size
    ep_full, etp = full.expert_model_parallel_size, full.expert_tensor_parallel_size
    ep = ep or ep_full
    dp = math.lcm(tp, ep * etp) // tp
    world = tp * pp * dp
    gbs = full.micro_batch_size * dp * full.num_microbatches
    groups = max(tp, 2)
    heads = 2 * groups
    layers = pp * (vpp or 1)
    kept, removed = strip_flags(recipe.argv, set(DROPPED) | set(SHRUNK))
    argv = kept + [
        "--cpu", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
        "--num-layers", str(layers), "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", str(heads), "--num-query-groups", str(groups),
        "--seq-length", "64", "--max-position-embeddings", "64",
        "--global-batch-size", str(gbs), "--train-iters", str(train_iters),
        "--eval-iters", "0", "--log-interval", "1", "--lr-warmup-iters", "0",
        "--lr-decay-iters", str(train_iters),
    ]  # fmt: skip
    if vpp:
        argv += ["--num-layers-per-virtual-pipeline-stage", "1"]
    if ep != ep_full:
        argv = _replace(argv, "--expert-model-parallel-size", str(ep))
    vpp_text = f" VPP{vpp}" if vpp else ""
    etp_text = f" ETP{etp}" if etp != tp else ""
    changes = [
        f"cluster layout TP{tp} PP{pp}{vpp_text} EP{ep_full}{etp_text} "
        f"DP{full.data_parallel_size} on {recipe.world_size} GPUs -> CPU layout TP{tp} PP{pp}"
        f"{vpp_text} EP{ep}{etp_text} DP{dp} on {world} ranks",
        f"DP {full.data_parallel_size} -> {dp} (the smallest EP {ep}{etp_text} allows); global "
        f"batch {full.global_batch_size} -> {gbs}, still {full.num_microbatches} micro-batches of "
        f"{full.micro_batch_size} per step",
        f"model: layers {full.num_layers} -> {layers}, hidden {full.hidden_size} -> 64, "
        f"FFN {full.ffn_hidden_size} -> 128, heads {full.num_attention_heads} -> {heads}, "
        f"query groups {full.num_query_groups} -> {groups}, sequence {full.seq_length} -> 64, "
        f"vocabulary -> 1024, experts {full.num_experts} (kept)",
    ]
    if ep != ep_full:
        changes.append(f"EP {ep_full} -> {ep} (asked for with --expert-parallel)")
    dropped = sorted({a for a in removed if a in DROPPED})
    changes += [f"dropped {f}: {DROPPED[f]}" for f in dropped]
    return Rehearsal(argv, world, changes)


def _replace(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(name) + 1] = value
    return out


def _rank_body(argv: list[str]):
    """One CPU rank of the rehearsal: the training script's own ``run``."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import pretrain_mixtral

    return pretrain_mixtral.run(argv)


def run(rehearsal: Rehearsal, timeout: float = 900.0) -> list:
    """Train on ``rehearsal.world_size`` CPU ranks; return each rank's loss history."""
    from megatron_ext.multirank import run_on_ranks

    return run_on_ranks(_rank_body, rehearsal.world_size, args=(rehearsal.argv,), timeout=timeout)


def main(argv: list[str]) -> int:
    from megatron_ext.multirank import MultiRankError
    from megatron_ext.plan import recipe as recipes
    from megatron_ext.plan.validate import validate_text

    p = argparse.ArgumentParser(prog="python -m megatron_ext.plan rehearse")
    p.add_argument("recipe", help="a cluster recipe, e.g. examples/mixtral_8x7b_64xh100.sh")
    p.add_argument("--train-iters", type=int, default=2)
    p.add_argument("--expert-parallel", type=int, default=None, help="override EP (fewer ranks)")
    p.add_argument("--max-ranks", type=int, default=64, help="refuse to start more CPU ranks")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds")
    p.add_argument("--dry-run", action="store_true", help="print the plan, do not train")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    opts = p.parse_args(argv)
    rec = recipes.load(opts.recipe)
    try:
        reh = shrink(rec, opts.train_iters, opts.expert_parallel)
    except LayoutError as e:
        print(f"{opts.recipe}: layout error at {rec.world_size} GPUs: {e}", file=sys.stderr)
        return 2
    print(f"== {opts.recipe} at full size, per the planner ==")
    text, _ = validate_text(rec.argv, rec.world_size, opts.gpu_memory_gb)
    print(text)
    print(f"\n== CPU rehearsal: {reh.world_size} ranks, {opts.train_iters} iterations ==")
    print("\n".join("  " + c for c in reh.changes))
    print("  flags: " + " ".join(reh.argv))
    if opts.dry_run:
        return 0
    if reh.world_size > opts.max_ranks:
        print(
            f"{reh.world_size} CPU ranks exceed --max-ranks {opts.max_ranks}: raise it on a "
            "big machine, or rehearse with a smaller --expert-parallel",
            file=sys.stderr,
        )
        return 2
    start = time.monotonic()
    try:
        histories = run(reh, opts.timeout)
    except MultiRankError as e:
        print(f"rehearsal FAILED:\n{e}", file=sys.stderr)
        return 1
    losses = histories[-1]
    print(
        f"rehearsal passed: {len(losses)} iterations on {reh.world_size} CPU ranks in "
        f"{time.monotonic() - start:.0f} s; loss {' '.join(f'{x:.4f}' for x in losses)}"
    )
    return 0
