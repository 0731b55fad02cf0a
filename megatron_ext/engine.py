"""Process setup for training: distributed init, parallel groups, seeds, model, DDP, optimizer.

Everything here is Megatron-Core's own machinery (``parallel_state``, ``DistributedDataParallel``,
the (distributed) optimizer, ``OptimizerParamScheduler``); this module only wires it to the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_ext import cpu_mode, fallback_kernels, profiling
from megatron_ext.errors import UsageError
from megatron_ext.model import build_model


def check_gpus() -> None:
    """A GPU for every rank of this node, or one line saying what is missing (every rank sees
    the same, so every rank raises the same error and rank 0 prints it)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"
    if n == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UsageError(
            f"no CUDA GPU is visible (torch {torch.__version__}, {build}; {visible}): pass "
            "--cpu to train on CPU ranks over gloo"
        )
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if per_node > n:
        raise UsageError(
            f"{per_node} ranks on this node (torchrun --nproc-per-node) but {n} GPU"
            f"{'s' if n > 1 else ''} visible ({visible}): one rank per GPU"
        )


def initialize(args: argparse.Namespace) -> None:
    """CPU mode (if asked), the process group, Megatron's parallel groups, and the seeds."""
    if args.cpu:
        cpu_mode.enable()
    else:
        check_gpus()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ and args.world_size == 1:
            # `python pretrain_mixtral.py ...` without torchrun: one rank, a local rendezvous.
            from megatron_ext.multirank import free_port

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if not args.cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="gloo" if args.cpu else "nccl",
            rank=int(os.environ.get("RANK", "0")),
            world_size=args.world_size,
            timeout=timedelta(minutes=30),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    set_seed(args.seed)


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: the same seed, offset by 100 x pipeline rank; TP RNG streams."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def use_fused_torch_adam(optimizer) -> int:
    """Switch Megatron-Core's fallback optimizer to PyTorch's fused AdamW kernel; returns how
    many inner optimizers were switched.

    Without apex or Transformer Engine (pip installs, CPU ranks) Megatron-Core builds
    ``torch.optim.AdamW`` with PyTorch's default implementation, which on CPU is the
    single-tensor loop: about ten elementwise passes per parameter, 11% of a training step at
    issue 14's shape. The fused kernel (CPU and CUDA) does the same update in one pass (0.06 s
    instead of 0.34 s per step there; results equal to float rounding, ~4e-9 after 3 steps).
    Apex's and TE's fused Adams are left alone. Set before the first step, when the state
    (``step`` as a device tensor, as the fused path wants) is created."""
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)
            inner.defaults.update(fused=True, foreach=False)
            switched += 1
    return switched


def setup_model_and_optimizer(args: argparse.Namespace, config):
    """Model chunks wrapped in Megatron DDP, the Megatron optimizer and the LR scheduler."""
    chunks = build_model(args, config)
    if not args.cpu:
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    if args.bf16 or args.fp16:  # half-precision parameters, fp32 main copies in the optimizer
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        # Non-finite values are checked by the training loop, which names the iteration and
        # the checkpoint to resume from; in here they raised "iteration -1" from deep inside
        # DDP, and with --fp16 they are expected (the loss scaler skips the step).
        check_for_nan_in_grad=False,
        # None: Megatron-Core's max(40M, 1M x DP) elements when overlapping, else one bucket.
        bucket_size=args.ddp_bucket_size,
        # With --overlap-param-gather the pipeline schedule dispatches each chunk's param
        # all-gather (param_sync_func below); the forward pre-hooks must then not dispatch the
        # next bucket themselves, or the schedule finds a gather already in flight.
        align_param_gather=args.align_param_gather,
    )
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer=args.optimizer,
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            fp16=args.fp16,
            params_dtype=config.params_dtype,
            loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale,
            use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_param_gather_with_optimizer_step=False,
        ),
        model,
    )
    use_fused_torch_adam(optimizer)
    fallback_kernels.use_in_place_grad_scaling()
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
    # The pipeline schedules take these from the config.
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = _named_range(finalize_model_grads, profiling.GRAD_SYNC)
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if args.overlap_grad_reduce and args.align_grad_reduce:
        config.grad_sync_func = [m.start_grad_sync for m in model]
        if len(model) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    if args.overlap_param_gather and args.align_param_gather:  # both, as Megatron-LM
        config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]
    return model, optimizer, scheduler


def _named_range(fn, name: str):
    """``fn`` inside a named profiler range (--profile's breakdown)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with profiling.phase(name):
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def params_synced(model):
    """Model weights that equal the optimizer's, for as long as the block runs.

    With ``--overlap-param-gather`` the distributed optimizer's step updates only each rank's
    shard; the other shards arrive by the all-gathers the next forward pass starts. A save (or
    an evaluation) between the two would see weights one step old. As Megatron-LM does around
    save and evaluation: remove the forward pre-hooks with a synchronous param all-gather,
    and put them back afterwards."""
    hooked = [m for m in model if getattr(m, "use_forward_hook", False)]
    for m in hooked:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in hooked:
            m.enable_forward_pre_hook()
