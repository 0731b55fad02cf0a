"""Saving: every rank writes its shards into ``iter_N.partial``, renamed when complete."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import asdict
from multiprocessing.managers import SyncManager

import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext import engine
from megatron_ext.checkpointing import checksums
from megatron_ext.checkpointing.files import clear_debris, iteration_dir, maybe_kill, publish
from megatron_ext.checkpointing.state import (
    _METADATA,
    TrainState,
    _layout,
    _model_state,
    _optimizer_kind,
    _rng_state,
    arch_of,
    hparams_of,
)
from megatron_ext.errors import agree


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


@contextlib.contextmanager
def _quiet_writer():
    """Megatron's checkpoint writer logs each writer failure; the failure itself is raised
    (a traceback) or turned into one line (a full disk) right after."""
    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


NEARLY_FULL = 64 << 20  # bytes free on --save's filesystem after a failed write: full


def _no_space(error: BaseException, save_dir: str) -> bool:
    """Whether a failed save ran out of space: ``ENOSPC``/``EDQUOT`` anywhere in what PyTorch's
    checkpoint writer collected from its writers, or (their errors often come out as a
    serialisation failure, "unexpected pos") a filesystem with almost nothing left."""
    if shutil.disk_usage(save_dir).free < NEARLY_FULL:
        return True
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's exception
        if isinstance(failures, dict):
            todo += [v for v in failures.values() if isinstance(v, BaseException)]
    return False


def disk_full_message(save_dir: str, partial: str, iteration: int) -> str:
    shutil.rmtree(partial, ignore_errors=True)  # give the space back; the last save is intact
    free = shutil.disk_usage(save_dir).free if os.path.isdir(save_dir) else 0
    return (
        f"--save {save_dir}: no space left on the device while writing the checkpoint of "
        f"iteration {iteration} ({partial}, now removed; {free / 2**30:.1f} GiB free there). "
        "The last complete checkpoint is untouched: free space or move --save, then resume"
    )


def _ignore_term() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def writer_helper_ignores_term() -> None:
    """Start Megatron-Core's checkpoint-writer helper ourselves, ignoring SIGTERM, once.

    Megatron's writer keeps a results queue in a helper process (a spawned multiprocessing
    Manager, made at the first save). Slurm signals every process of a job step on preemption,
    ``scontrol requeue`` or ``scancel``; a helper killed by that TERM made the very save the
    TERM asks for fail (BrokenPipeError, an ``iter_N.partial`` left behind). The same queue,
    from a Manager whose process ignores TERM (its initializer, which runs before it answers),
    is put where Megatron looks for it; the queue proxy keeps its Manager (and so the helper)
    alive, and the helper ends with this process. A TERM that reaches the helper while it is
    still starting (half a second of Python start-up) kills it before the initializer runs:
    the start then fails at once (EOFError), and a second helper, started after that signal,
    is safe."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    for _ in range(3):
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        try:
            manager.start(initializer=_ignore_term)
        except (EOFError, OSError):  # killed while starting: see above
            continue
        filesystem_async._results_queue = manager.Queue()
        return
    raise RuntimeError("the checkpoint writer's helper process died three times while starting")


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
    failure = None
    try:
        with _quiet_writer():  # its "Local process 0 encountered an error" precedes ours
            dist_checkpointing.save(sharded, partial, content_metadata=_METADATA)
    except (Exception, CheckpointException) as e:  # (PyTorch's is a BaseException)
        failure = _no_space(e, args.save) and disk_full_message(args.save, partial, state.iteration)
        if not failure:
            raise
    agree(failure)
    dist.barrier()
    checksums.write_manifest(partial)
    dist.barrier()
    maybe_kill("written", state.iteration)
    if rank0:
        publish(args.save, partial, final, state.iteration)
        print(f"saved checkpoint {final} in {time.time() - start:.1f}s", flush=True)
    dist.barrier()
    return final
