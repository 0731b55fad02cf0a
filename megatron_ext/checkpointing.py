"""Checkpoints with Megatron-Core's dist_checkpointing (``torch_dist``): save, load, reshard.

Layout on disk (Megatron-LM's names)::

    {save}/iter_0000100/                  one dist_checkpointing directory per saved iteration
    {save}/latest_checkpointed_iteration.txt   "100": written last, atomically

A save goes to ``iter_XXXXXXX.partial`` and is renamed only when every rank has finished; the
marker is then replaced atomically (write, fsync, rename). A process killed during a save
leaves the previous checkpoint and the marker untouched; the next save removes the debris.

What is saved: the model (every tensor keyed by its *global* name, so TP, PP, VPP and EP can all
change between save and load), the optimizer state in Megatron's ``fully_reshardable`` format
(DP can change too), the LR scheduler, the iteration and consumed samples (the data order
continues), the architecture (a mismatch is reported by field, before any tensor is read), and
each rank's RNG states (restored when the layout is unchanged).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

MARKER = "latest_checkpointed_iteration.txt"
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


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_marker(root: str) -> int | None:
    path = os.path.join(root, MARKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _layout() -> tuple[int, int, int, int]:
    ps = parallel_state
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
    )


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


def _model_state(model) -> dict:
    return {
        f"chunk{i}": chunk.module.sharded_state_dict(metadata=_METADATA)
        if hasattr(chunk, "module")
        else chunk.sharded_state_dict(metadata=_METADATA)
        for i, chunk in enumerate(model)
    }


def save(args: argparse.Namespace, state: TrainState, model, optimizer, scheduler) -> str:
    """Save iteration ``state.iteration`` under ``--save``; returns the directory."""
    final = iteration_dir(args.save, state.iteration)
    partial = final + ".partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(args.save, exist_ok=True)
        for leftover in (partial, final):  # debris of a save killed before its marker
            if os.path.exists(leftover) and read_marker(args.save) != state.iteration:
                shutil.rmtree(leftover)
        os.makedirs(partial)
    dist.barrier()
    model_sd = _model_state(model)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_METADATA),
        "rng_state": _rng_state(),
        "scheduler": scheduler.state_dict(),
        "train_state": asdict(state),
        "arch": {f: getattr(args, f) for f in ARCH_FIELDS},
        "layout": _layout(),
    }
    start = time.time()
    dist_checkpointing.save(sharded, partial, content_metadata=_METADATA)
    dist.barrier()
    if rank0:
        os.replace(partial, final)
        _fsync_dir(args.save)
        _atomic_write(os.path.join(args.save, MARKER), f"{state.iteration}\n")
        print(f"saved checkpoint {final} in {time.time() - start:.1f}s", flush=True)
    dist.barrier()
    return final


def check_arch(common: dict, args: argparse.Namespace, path: str) -> None:
    saved = common.get("arch", {})
    diffs = [
        f"{f}: checkpoint {saved[f]!r}, now {getattr(args, f)!r}"
        for f in ARCH_FIELDS
        if f in saved and saved[f] != getattr(args, f)
    ]
    if diffs:
        raise CheckpointMismatch(
            f"{path} was saved for a different architecture ({len(diffs)} field(s) differ): "
            + "; ".join(diffs)
        )


def load(args: argparse.Namespace, model, optimizer, scheduler) -> TrainState:
    """Restore from ``--load`` (latest marked iteration); a fresh state if there is none."""
    if not args.load:
        return TrainState()
    iteration = read_marker(args.load)
    if iteration is None:
        if dist.get_rank() == 0:
            print(
                f"no checkpoint in {args.load} ({MARKER} missing): starting from scratch",
                flush=True,
            )
        return TrainState()
    path = iteration_dir(args.load, iteration)
    common = dist_checkpointing.load_common_state_dict(path)
    check_arch(common, args, path)
    finetune = args.finetune
    load_optim = not (args.no_load_optim or finetune)
    same_layout = tuple(common.get("layout", ())) == _layout()
    load_rng = not (args.no_load_rng or finetune) and same_layout
    model_sd = _model_state(model)
    sharded = {"model": model_sd}
    if load_optim:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=_METADATA
        )
    if load_rng:
        sharded["rng_state"] = _rng_state()
    loaded = dist_checkpointing.load(sharded, path)
    for i, chunk in enumerate(model):
        target = chunk.module if hasattr(chunk, "module") else chunk
        target.load_state_dict(loaded["model"][f"chunk{i}"])
    if load_optim:
        optimizer.load_state_dict(loaded["optimizer"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    if dist.get_rank() == 0:
        skipped = [n for n, on in (("optimizer", load_optim), ("rng", load_rng)) if not on]
        note = f" (not restored: {', '.join(skipped)})" if skipped else ""
        print(f"loaded checkpoint {path}{note}", flush=True)
    if finetune:
        return TrainState()
    scheduler.load_state_dict(common["scheduler"])
    return TrainState(**common["train_state"])


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
