"""Checkpoints with Megatron-Core's dist_checkpointing (``torch_dist``): save, load, reshard.

Layout on disk (Megatron-LM's names)::

    {save}/iter_0000100/                  one dist_checkpointing directory per saved iteration
    {save}/latest_checkpointed_iteration.txt   "100": written last, atomically

A save goes to ``iter_XXXXXXX.partial`` and is renamed only when every rank has finished; the
marker is then replaced atomically (write, fsync, rename). A process killed during a save
leaves the previous checkpoint and the marker untouched; the next save removes the debris.

What is saved: the model (every tensor keyed by its *global* name, so TP, PP, VPP and EP can all
change between save and load), the optimizer state in Megatron's ``fully_reshardable`` format
(DP can change too; it loads into the same kind of optimizer, distributed or not), the LR
scheduler, the iteration and consumed samples (the data order
continues), the architecture (a mismatch is reported by field, before any tensor is read), a
few hyper-parameters that do not change shapes (RoPE base, norm epsilon, ...: the HF converter
reads them), and each rank's RNG states (restored when the layout is unchanged).

A *weights-only* checkpoint (written by ``python -m megatron_ext.convert``: no optimizer,
scheduler or iteration) loads like ``--finetune``.

Test hook: ``MEGATRON_EXT_TEST_KILL_IN_SAVE=ITER:POINT`` SIGKILLs the process inside the save of
iteration ``ITER`` at ``POINT`` (``start``: partial directory made, nothing written; ``written``:
every rank has written, not yet renamed; ``renamed``: renamed, marker not yet updated). The
crash-safety tests use it; it is never set in normal runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from multiprocessing.managers import SyncManager

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_ext import engine
from megatron_ext.checkpoint_files import (  # noqa: F401  (re-exported: the on-disk layer)
    KILL_ENV,
    MARKER,
    clear_debris,
    is_checkpoint_dir,
    iteration_dir,
    maybe_kill,
    publish,
    read_marker,
    resolve,
    write_marker,
)
from megatron_ext.optimizer_state import ensure_optimizer_state, torch_adam_step_fix

# Megatron-LM's current default: optimizer state reshardable over every parallel dimension.
_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "num_experts",
    "moe_router_topk",
    "vocab_size",
    "normalization",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "position_embedding_type",
)
# Saved for information and for the HF converter; they do not change tensor shapes.
HPARAM_FIELDS = (
    "rotary_base",
    "norm_epsilon",
    "max_position_embeddings",
    "seq_length",
    "window_size",
    "make_vocab_size_divisible_by",
    "init_method_std",
    "moe_router_load_balancing_type",
)


class CheckpointMismatch(ValueError):
    """The checkpoint's architecture differs from the one asked for."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped: int = 0
    last_validation: float | None = None


class Preemption:
    """Records SIGTERM (Slurm sends it before the kill); the loop saves and exits 0."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


# ----------------------------------------------------------------------------- what is saved
def _layout() -> tuple[int, int, int, int]:
    ps = parallel_state
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
    )


def _layout_text(layout) -> str:
    pp, tp, dp, ep = layout
    return f"PP{pp} x TP{tp} x DP{dp} x EP{ep}"


def _rng_state() -> ShardedObject:
    """This rank's RNG states as one ShardedObject per (PP, TP, DP) position."""
    ps = parallel_state
    states = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp, dp, _ = _layout()
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", states, (pp, tp, dp), offset, replica_id=0)


def _set_rng_state(states: dict) -> None:
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_state(model) -> dict:
    return {
        f"chunk{i}": _unwrap(chunk).sharded_state_dict(metadata=_METADATA)
        for i, chunk in enumerate(model)
    }


def _optimizer_kind(args: argparse.Namespace) -> str:
    return "distributed" if args.use_distributed_optimizer else "local"


def arch_of(args: argparse.Namespace) -> dict:
    return {f: getattr(args, f) for f in ARCH_FIELDS}


def hparams_of(args: argparse.Namespace) -> dict:
    return {f: getattr(args, f, None) for f in HPARAM_FIELDS}


# ------------------------------------------------------------------------------------- save
def save(args: argparse.Namespace, state: TrainState, model, optimizer, scheduler) -> str:
    """Save iteration ``state.iteration`` under ``--save``; returns the directory."""
    final = iteration_dir(args.save, state.iteration)
    partial = final + ".partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(args.save, exist_ok=True)
        clear_debris(args.save, final, state.iteration)
        os.makedirs(partial)
    dist.barrier()
    maybe_kill("start", state.iteration)
    with engine.params_synced(model):  # --overlap-param-gather: this step's weights, not the last
        return _save(args, state, model, optimizer, scheduler, partial, final)


def _ignore_term() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def writer_helper_ignores_term() -> None:
    """Start Megatron-Core's checkpoint-writer helper ourselves, ignoring SIGTERM, once.

    Megatron's writer keeps a results queue in a helper process (a spawned multiprocessing
    Manager, made at the first save). Slurm signals every process of a job step on preemption,
    ``scontrol requeue`` or ``scancel``; a helper killed by that TERM made the very save the
    TERM asks for fail (BrokenPipeError, an ``iter_N.partial`` left behind). The same queue,
    from a Manager whose process ignores TERM, is put where Megatron looks for it; the queue
    proxy keeps its Manager (and so the helper) alive, and the helper ends with this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_ignore_term)
        filesystem_async._results_queue = manager.Queue()


def _save(args, state, model, optimizer, scheduler, partial: str, final: str) -> str:
    rank0 = dist.get_rank() == 0
    writer_helper_ignores_term()
    model_sd = _model_state(model)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_METADATA),
        "rng_state": _rng_state(),
        "scheduler": scheduler.state_dict(),
        "train_state": asdict(state),
        "arch": arch_of(args),
        "hparams": hparams_of(args),
        "layout": _layout(),
        "optimizer_kind": _optimizer_kind(args),
    }
    start = time.time()
    dist_checkpointing.save(sharded, partial, content_metadata=_METADATA)
    dist.barrier()
    maybe_kill("written", state.iteration)
    if rank0:
        publish(args.save, partial, final, state.iteration)
        print(f"saved checkpoint {final} in {time.time() - start:.1f}s", flush=True)
    dist.barrier()
    return final


# ------------------------------------------------------------------------------------- load
def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_arch(common: dict, args: argparse.Namespace, path: str) -> None:
    """Raise :class:`CheckpointMismatch` naming every architecture field that differs."""
    saved = common.get("arch", {})
    fields = [f for f in ARCH_FIELDS if f in saved and saved[f] != getattr(args, f)]
    if fields:
        diffs = [f"{f}: checkpoint {saved[f]!r}, now {getattr(args, f)!r}" for f in fields]
        raise CheckpointMismatch(
            f"{path} was saved for a different architecture ({len(fields)} field(s) differ): "
            + "; ".join(diffs)
            + f". Set the flags to the checkpoint's values ({', '.join(map(_flag, fields))})."
        )


def check_optimizer_kind(common: dict, args: argparse.Namespace, path: str) -> None:
    """Megatron's two optimizers keep different non-tensor state: a checkpoint's optimizer
    state loads into the same kind (at any layout) only."""
    saved, now = common.get("optimizer_kind"), _optimizer_kind(args)
    if saved is not None and saved != now:
        flag = "with --use-distributed-optimizer" if saved == "distributed" else "without it"
        raise CheckpointMismatch(
            f"{path}: its optimizer state was saved by the {saved} optimizer, this run uses the "
            f"{now} one. Run {flag} (any data-parallel size works), or pass --no-load-optim to "
            "load everything but the Adam state."
        )


def _load_scheduler(scheduler, saved: dict, path: str) -> None:
    try:
        scheduler.load_state_dict(saved)
    except AssertionError as e:  # Megatron's _check_and_set: a schedule flag changed
        raise CheckpointMismatch(
            f"{path}: the learning-rate schedule differs from the checkpoint's ({e}). Keep "
            "--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters, --train-iters and "
            "--weight-decay as saved, pass --override-opt-param-scheduler (these flags win) or "
            "--use-checkpoint-opt_param-scheduler (the checkpoint wins), or start a new "
            "schedule with --finetune."
        ) from None


def _may_be_missing(key: str, weights_only: bool) -> bool:
    """State a checkpoint may lack; the model keeps its own value: ``_extra_state`` (checkpoints
    converted from HF have none) and, in weights-only checkpoints, the aux-loss-free router's
    ``expert_bias`` (starts at 0)."""
    return key.endswith("_extra_state") or (weights_only and key.endswith("expert_bias"))


def _check_unexpected(unexpected, path: str, weights_only: bool) -> None:
    """Keys the model asks for that the checkpoint lacks: an error unless they may be missing."""
    missing = sorted(k for k in unexpected if not _may_be_missing(k, weights_only))
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointMismatch(f"{path} has no tensors for: {', '.join(missing[:8])}{more}")


def load(args: argparse.Namespace, model, optimizer, scheduler) -> TrainState:
    """Restore from ``--load`` (latest marked iteration); a fresh state if there is none."""
    if not args.load:
        return TrainState()
    path, _ = resolve(args.load)
    if path is None:
        if dist.get_rank() == 0:
            print(
                f"no checkpoint in {args.load} ({MARKER} missing): starting from scratch",
                flush=True,
            )
        return TrainState()
    common = dist_checkpointing.load_common_state_dict(path)
    check_arch(common, args, path)
    weights_only = "train_state" not in common  # converted checkpoints
    finetune = args.finetune or weights_only
    load_optim = not (args.no_load_optim or finetune)
    saved_layout = tuple(common.get("layout", ()))
    same_layout = saved_layout == _layout()
    load_rng = not (args.no_load_rng or finetune) and same_layout
    if load_optim:
        check_optimizer_kind(common, args, path)
    model_sd = _model_state(model)
    sharded = {"model": model_sd}
    if load_optim:
        ensure_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=_METADATA
        )
    if load_rng:
        sharded["rng_state"] = _rng_state()
    loaded, _, unexpected = dist_checkpointing.load(
        sharded, path, strict=StrictHandling.RETURN_UNEXPECTED
    )
    _check_unexpected(unexpected, path, weights_only)
    for i, chunk in enumerate(model):
        target = _unwrap(chunk)
        weights = loaded["model"][f"chunk{i}"]
        for key, value in target.state_dict().items():
            if key not in weights and _may_be_missing(key, weights_only):
                weights[key] = value
        target.load_state_dict(weights)
    if load_optim:
        with torch_adam_step_fix(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    else:  # main (fp32) params must follow the loaded weights, as Megatron-LM does
        optimizer.reload_model_params()
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    if dist.get_rank() == 0:
        skipped = [n for n, on in (("optimizer", load_optim), ("rng", load_rng)) if not on]
        note = f" (not restored: {', '.join(skipped)})" if skipped else ""
        if weights_only:
            note = " (weights only)"
        elif not same_layout and not (args.no_load_rng or finetune):
            note += (
                f"; resharded from {_layout_text(saved_layout)} to {_layout_text(_layout())},"
                " RNG states restart from --seed"
            )
        print(f"loaded checkpoint {path}{note}", flush=True)
    if finetune:
        return TrainState()
    _load_scheduler(scheduler, common["scheduler"], path)
    return TrainState(**common["train_state"])


# --------------------------------------------------------------------------- when to save/exit
def should_save(args: argparse.Namespace, state: TrainState) -> bool:
    return bool(args.save and args.save_interval and state.iteration % args.save_interval == 0)


def should_exit(
    args: argparse.Namespace, state: TrainState, start_time: float, preemption: Preemption
) -> str | None:
    """Why to stop after this step (SIGTERM, ``--exit-interval``, ``--exit-duration-in-mins``).

    SIGTERM and the wall clock are agreed over all ranks (one all-reduce of two numbers), so
    every rank stops after the same step even if only one got the signal."""
    flags = torch.tensor(
        [float(preemption.received), (time.time() - start_time) / 60],
        device=torch.cuda.current_device(),
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item():
        return "SIGTERM received"
    if args.exit_duration_in_mins and flags[1].item() > args.exit_duration_in_mins:
        return f"--exit-duration-in-mins {args.exit_duration_in_mins}"
    if args.exit_interval and state.iteration % args.exit_interval == 0:
        return f"--exit-interval {args.exit_interval}"
    return None
