"""Pretrain a Mixtral-style sparse MoE on Megatron-Core with TP x PP x DP x EP.

    torchrun --nproc-per-node 8 pretrain_mixtral.py --model 8x7b --bf16 \
        --expert-model-parallel-size 8 --data-path my_text_document \
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model ...
    torchrun --nproc-per-node 2 pretrain_mixtral.py --cpu --model small ...   # CPU ranks, gloo

Flags are Megatron-LM's (``megatron_ext/arguments.py``). The file reads top to bottom: batch,
loss, forward step, datasets, evaluation, then the training loop.
"""

from __future__ import annotations

import math
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_ext import checkpointing, data, engine, preflight, profiling
from megatron_ext.arguments import check_environment, parse_args
from megatron_ext.checkpointing.lock import lock_save_dir
from megatron_ext.errors import TrainingStopped, UsageError, agreed
from megatron_ext.metrics import Reporter, precision_of
from megatron_ext.model import transformer_config
from megatron_ext.model.presets import describe as describe_model
from megatron_ext.moe import collect_moe_stats, set_aux_loss_scale
from megatron_ext.observe.load import expert_load
from megatron_ext.observe.sinks import open_sinks
from megatron_ext.profiling import phase


def print_rank_last(*parts) -> None:
    """Print on the last rank: it holds the loss (last pipeline stage)."""
    if dist.get_rank() == dist.get_world_size() - 1:
        print(*parts, flush=True)


# ---------------------------------------------------------------------------------------- batch
def get_batch(data_iterator, vp_stage=None):
    """Tokens, labels, loss mask and positions [micro_batch, seq]; None on middle stages."""
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if not (first or last):
        return None, None, None, None
    # The current CUDA device; under --cpu, CPU mode maps it to the CPU. non_blocking: from
    # pinned memory the copies are queued; a plain .to() would wait for the GPU to finish the
    # previous micro-batch (cudaStreamSynchronize) and leave it idle while this one launches.
    with phase(profiling.BATCH):
        device = torch.cuda.current_device()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    return batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"]


# ----------------------------------------------------------------------------------------- loss
def loss_func(loss_mask, output_tensor):
    """Mean cross-entropy over the micro-batch's unmasked tokens (router losses ride autograd)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1)
    # clone: the pipeline schedule scales the returned tensor in place.
    return loss, {"lm loss": loss.detach().clone()}


# --------------------------------------------------------------------------------- forward step
def forward_step(data_iterator, model):
    with phase(profiling.FORWARD):  # named ranges: --profile's breakdown (profiling.py)
        vp_stage = get_attr_wrapped_model(model, "vp_stage")  # through DDP / Float16Module
        tokens, labels, loss_mask, position_ids = get_batch(data_iterator, vp_stage)
        output_tensor = model(tokens, position_ids, None, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


# ------------------------------------------------------------------------------------- datasets
def check_inputs(args):
    """The machine, the tokenizer, the data and the checkpoint paths, before any build;
    returns the tokenizer (docs/reliability.md)."""
    check_environment(args)  # Transformer Engine, GPU generation, kernels
    tokenizer = data.build_tokenizer(args)
    args.vocab_size = tokenizer.vocab_size
    preflight.check_inputs(args, args.vocab_size)  # data, --save, --load: files only, cheap
    return tokenizer


def datasets_provider(args, tokenizer):
    train_ds, valid_ds, test_ds = data.build_datasets(args, tokenizer)
    return train_ds, valid_ds, test_ds


def data_iterators(args, dataset, consumed_samples, model):
    """One micro-batch iterator per model chunk (each chunk's first/last stage reads its own)."""
    if dataset is None:
        return None
    its = [data.micro_batches(dataset, consumed_samples, args) for _ in model]
    return its if len(its) > 1 else its[0]


# ------------------------------------------------------------------------------- one step, eval
def reduce_losses(losses_per_microbatch) -> dict[str, float]:
    """Average the reported losses over micro-batches and data-parallel ranks; all ranks get it."""
    keys = ["lm loss"]
    # On the device: NCCL groups take CUDA tensors only (a host tensor here killed every GPU
    # run at the end of step 1).
    values = torch.zeros(len(keys), dtype=torch.float64, device=torch.cuda.current_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses_per_microbatch:
        for i, k in enumerate(keys):
            values[i] = torch.stack([x[k].double() for x in losses_per_microbatch]).mean()
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    dist.broadcast(values, parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return dict(zip(keys, values.tolist(), strict=True))  # one device -> host copy


def forward_backward(args, data_iterator, model, forward_only=False):
    """One global batch through Megatron's pipeline schedule (1F1B, interleaved, or none)."""
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(args, data_iterator, model, optimizer, scheduler):
    with phase(profiling.ZERO_GRAD):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    # Router losses get the same gradient scale as the LM loss (loss scale / micro-batches).
    set_aux_loss_scale(model, optimizer.get_loss_scale() / args.num_microbatches)
    with phase(profiling.FWD_BWD):
        losses = forward_backward(args, data_iterator, model)
    with phase(profiling.OPTIMIZER):
        ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    with phase(profiling.LOGGING):
        return reduce_losses(losses), ok, grad_norm


@torch.no_grad()
def evaluate(args, data_iterator, model) -> dict[str, float]:
    for chunk in model:
        chunk.eval()
    totals = {}
    with engine.params_synced(model):  # --overlap-param-gather: evaluate this step's weights
        for _ in range(args.eval_iters):
            losses = forward_backward(args, data_iterator, model, forward_only=True)
            for k, v in reduce_losses(losses).items():
                totals[k] = totals.get(k, 0.0) + v / args.eval_iters
    collect_moe_stats(model, reset=True)  # eval routing is not training load
    for chunk in model:
        chunk.train()
    return totals


# ------------------------------------------------------------------------------------- the loop
class History(list):
    """Training loss per iteration; ``.validation`` holds (iteration, validation loss) pairs."""

    def __init__(self):
        super().__init__()
        self.validation: list[tuple[int, float]] = []


def train(args, model, optimizer, scheduler, train_ds, valid_ds, state, reporter, preemption):
    train_it = data_iterators(args, train_ds, state.consumed_samples, model)
    valid_it = data_iterators(args, valid_ds, 0, model)
    tick = time.time()
    history, saved = History(), state.iteration if args.load else None
    profiler = profiling.StepProfiler(
        profiling.Window.from_args(args), model, dist.get_rank(), on_gpu=not args.cpu
    )
    while state.iteration < args.train_iters:
        print_breakdown(profiler.step(state.iteration))  # --profile: opens/closes its window
        losses, ok, grad_norm = train_step(args, train_it, model, optimizer, scheduler)
        state.iteration += 1
        state.consumed_samples += args.global_batch_size
        state.skipped += 0 if ok else 1
        if args.check_for_nan_in_loss_and_grad:
            check_finite(args, state.iteration, losses["lm loss"], ok, grad_norm, saved)
        history.append(losses["lm loss"])
        if state.iteration % args.log_interval == 0:
            elapsed, tick = (time.time() - tick) / args.log_interval, time.time()
            with phase(profiling.LOGGING):
                load = expert_load(gather_moe_stats(model))
            values = {**losses, "lr": scheduler.get_lr(optimizer.param_groups[0])}
            values.update(grad_norm=float(grad_norm or 0.0), skipped=state.skipped)
            if args.fp16:  # the dynamic loss scale: halves on overflow, skipping the step
                values["loss scale"] = float(optimizer.get_loss_scale())
            for k in ("aux_loss", "z_loss"):
                values[f"router {k}"] = sum(v[k] for v in load.values()) / max(len(load), 1)
            with phase(profiling.LOGGING):
                print_rank_last(reporter.log(state.iteration, values, elapsed, load))
        if args.eval_iters and valid_it and state.iteration % args.eval_interval == 0:
            val = evaluate(args, valid_it, model)
            print_rank_last(f"validation at iter {state.iteration}: lm loss {val['lm loss']:.4f}")
            reporter.scalar("validation/lm_loss", val["lm loss"], state.iteration)
            state.last_validation = val["lm loss"]
            history.validation.append((state.iteration, val["lm loss"]))
        if checkpointing.should_save(args, state):
            checkpointing.save(args, state, model, optimizer, scheduler)
            saved = state.iteration
        reason = checkpointing.should_exit(args, state, args.start_time, preemption)
        if reason:
            print_rank_last(f"stopping after iteration {state.iteration}: {reason}")
            break
    print_breakdown(profiler.close())
    if args.save and saved != state.iteration:
        checkpointing.save(args, state, model, optimizer, scheduler)
    return history


def print_breakdown(report) -> None:
    """A profiled rank says where its step's time went (rank named: ranks differ)."""
    if report:
        print(report, flush=True)


def check_finite(args, iteration: int, loss: float, ok: bool, grad_norm, saved) -> None:
    """Stop on a NaN/Inf loss, or on NaN/Inf gradients that were applied, naming the iteration
    and the checkpoint to go back to (nothing of this step is saved). With --fp16 and the
    dynamic loss scale, overflowing gradients are normal: the step is skipped and the scale
    lowered (``ok`` False), as in Megatron-LM."""
    bad_grads = ok and grad_norm is not None and not math.isfinite(float(grad_norm))
    if math.isfinite(loss) and not bad_grads:
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    last = "none (no --save)" if not args.save else "none yet"
    if args.save and saved is not None:
        last = checkpointing.iteration_dir(args.save, saved)
    raise TrainingStopped(
        f"iteration {iteration}: {what}; training stopped, nothing of this step was saved. Last "
        f"complete checkpoint: {last}. Resume from it (perhaps with a lower --lr or --clip-grad); "
        "--no-check-for-nan-in-loss-and-grad turns this check off"
    )


def gather_moe_stats(model) -> dict:
    """Router statistics of every layer, gathered from all pipeline stages."""
    local = {
        k: {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in v.items()}
        for k, v in collect_moe_stats(model, reset=True).items()
    }
    gathered = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(
        gathered, local, group=parallel_state.get_pipeline_model_parallel_group()
    )
    return {k: v for part in gathered for k, v in part.items()}


def run(argv=None) -> History:
    """Parse flags, set up, train; return the training loss of every iteration."""
    args = parse_args(argv)  # the same flags on every rank: the same errors, no need to agree
    args.start_time = time.time()  # --exit-duration-in-mins counts from here, as in Megatron-LM
    preemption = checkpointing.Preemption()  # from the start: a SIGTERM during setup counts too
    engine.initialize(args)  # cheap, and lets the ranks agree on what the checks below find
    tokenizer = agreed(check_inputs, args)  # a file one node cannot read stops every rank
    lock = lock_save_dir(args.save, dist.get_rank())  # one run per --save directory
    if dist.get_rank() == 0:
        for note in args.notices + args.unhonoured + ([lock.note] if lock.note else []):
            print(f"note: {note}", flush=True)
        print(f"model: {describe_model(args)}", flush=True)
    plan = checkpointing.plan_load(args)  # checksums, architecture: before the model is built
    config = transformer_config(args)
    model, optimizer, scheduler = engine.setup_model_and_optimizer(args, config)
    state = checkpointing.load(args, model, optimizer, scheduler, plan)
    train_ds, valid_ds, _ = datasets_provider(args, tokenizer)
    last_rank = dist.get_rank() == dist.get_world_size() - 1  # it holds the loss: it reports
    sinks = open_sinks(args) if last_rank else []  # TensorBoard, W&B
    reporter = Reporter(args, sinks)
    if reporter.peak is None and not args.cpu:
        print_rank_last(
            f"note: MFU not reported: no datasheet peak for {torch.cuda.get_device_name()} "
            f"at {precision_of(args)} (megatron_ext/metrics.py); pass --peak-tflops"
        )
    try:
        history = train(
            args, model, optimizer, scheduler, train_ds, valid_ds, state, reporter, preemption
        )
    finally:
        for sink in sinks:
            sink.close()
        lock.release()
    parallel_state.destroy_model_parallel()
    return history


def main(argv=None) -> int:
    """The command line: an expected failure (bad flags, files, data, checkpoints, a NaN) is
    ONE line from ONE rank and a non-zero exit code, never a traceback from every rank."""
    code = 0
    try:
        run(argv)
    except UsageError as e:  # every rank raises it, with the same message
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"pretrain_mixtral.py: error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
