"""What a checkpoint holds besides tensors, and when the loop saves or stops.

``TrainState`` (iteration, consumed samples, skipped steps), the architecture and
hyper-parameter fields recorded with every checkpoint, the layout, each rank's RNG states, the
SIGTERM flag (``Preemption``) and the save/exit decisions of the training loop.
"""

from __future__ import annotations

import argparse
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_ext.errors import UsageError

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
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_layer_freq",
)
# Saved for information and for the HF converter; they do not change tensor shapes.
HPARAM_FIELDS = (
    "moe_router_pre_softmax",
    "rotary_base",
    "norm_epsilon",
    "max_position_embeddings",
    "seq_length",
    "window_size",
    "make_vocab_size_divisible_by",
    "init_method_std",
    "moe_router_load_balancing_type",
)


class CheckpointMismatch(UsageError, ValueError):
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
def _layout() -> tuple[int, int, int, int, int]:
    """(PP, TP, DP, EP, expert-TP): the RNG states are per position in this grid."""
    ps = parallel_state
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    )


def saved_layout_of(common: dict) -> tuple:
    """The layout a checkpoint was saved at; checkpoints from before expert-TP was recorded
    had expert-TP = TP."""
    layout = tuple(common.get("layout", ()))
    return layout + (layout[1],) if len(layout) == 4 else layout


def _layout_text(layout) -> str:
    pp, tp, dp, ep, etp = layout
    return f"PP{pp} x TP{tp} x DP{dp} x EP{ep} x expert-TP{etp}"


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
    pp, tp, dp, _, _ = _layout()
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
