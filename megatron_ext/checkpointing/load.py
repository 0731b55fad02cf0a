"""Loading: the architecture checked by field, then model, optimizer, scheduler and RNG."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_ext.checkpointing import checksums
from megatron_ext.checkpointing.files import MARKER, resolve
from megatron_ext.checkpointing.optimizer_state import ensure_optimizer_state, torch_adam_step_fix
from megatron_ext.checkpointing.state import (
    _METADATA,
    ARCH_FIELDS,
    CheckpointMismatch,
    TrainState,
    _layout,
    _layout_text,
    _model_state,
    _optimizer_kind,
    _rng_state,
    _set_rng_state,
    _unwrap,
    saved_layout_of,
)
from megatron_ext.errors import UsageError


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded as it is (damaged, unreadable)."""


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


def _read(reader, path: str, verified: bool, *args, **kwargs):
    """``reader(...)`` with its failures named: a checkpoint that cannot be read (truncated,
    damaged, not a checkpoint) is the user's to fix, not a traceback."""
    try:
        return reader(*args, path, **kwargs) if args else reader(path, **kwargs)
    except CheckpointMismatch:
        raise
    except Exception as e:  # noqa: BLE001 (PyTorch's readers raise many kinds)
        hint = "" if verified else " (it has no checksum manifest to say which file)"
        raise CheckpointError(
            f"--load: {path} cannot be read{hint}: {type(e).__name__}: {str(e)[:300]}"
        ) from None


@dataclass(frozen=True)
class LoadPlan:
    """What ``--load`` resolved to, checked before the model is built (``plan_load``)."""

    path: str
    common: dict
    verified: bool  # every file matched the checkpoint's checksums
    weights_only: bool  # a converted checkpoint: no optimizer, scheduler or iteration
    load_optim: bool
    load_rng: bool
    saved_layout: tuple


def plan_load(args: argparse.Namespace) -> LoadPlan | None:
    """Resolve ``--load``, verify the files' checksums and check the architecture and the
    optimizer kind: everything that can be wrong with a checkpoint is found here, before the
    model is built (all ranks; the checksum work is split between them). None: nothing to
    load."""
    if not args.load:
        return None
    try:
        path, _ = resolve(args.load)
    except (FileNotFoundError, ValueError) as e:  # a marker naming a missing directory, ...
        raise CheckpointError(f"--load {args.load}: {e}") from None
    if path is None:
        if dist.get_rank() == 0:
            print(
                f"no checkpoint in {args.load} ({MARKER} missing): starting from scratch",
                flush=True,
            )
        return None
    verified = args.verify_checkpoint and checksums.verify(path)
    common = _read(dist_checkpointing.load_common_state_dict, path, verified)
    check_arch(common, args, path)
    weights_only = "train_state" not in common  # converted checkpoints
    finetune = args.finetune or weights_only
    load_optim = not (args.no_load_optim or finetune)
    saved_layout = saved_layout_of(common)
    load_rng = not (args.no_load_rng or finetune) and saved_layout == _layout()
    if load_optim:
        check_optimizer_kind(common, args, path)
    return LoadPlan(path, common, verified, weights_only, load_optim, load_rng, saved_layout)


def load(args: argparse.Namespace, model, optimizer, scheduler, plan: LoadPlan | None = None):
    """Restore what ``plan`` (``plan_load(args)`` if not given) found; a fresh ``TrainState``
    if there is nothing to load."""
    plan = plan_load(args) if plan is None else plan
    if plan is None:
        return TrainState()
    path, common, verified, weights_only = plan.path, plan.common, plan.verified, plan.weights_only
    finetune = args.finetune or weights_only
    load_optim, load_rng, saved_layout = plan.load_optim, plan.load_rng, plan.saved_layout
    same_layout = saved_layout == _layout()
    model_sd = _model_state(model)
    sharded = {"model": model_sd}
    if load_optim:
        ensure_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=_METADATA
        )
    if load_rng:
        sharded["rng_state"] = _rng_state()
    loaded, _, unexpected = _read(
        dist_checkpointing.load, path, verified, sharded, strict=StrictHandling.RETURN_UNEXPECTED
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
        if not verified and args.verify_checkpoint:
            note += f" (no {checksums.MANIFEST}: not verified)"
        print(f"loaded checkpoint {path}{note}", flush=True)
    if finetune:
        return TrainState()
    _load_scheduler(scheduler, common["scheduler"], path)
    return TrainState(**common["train_state"])
