"""Megatron-LM's ``--profile``: a profiler window over training steps, and where a step's time goes.

``--profile --use-pytorch-profiler`` runs ``torch.profiler`` over the iterations the log numbers
``--profile-step-start`` to ``--profile-step-end - 1`` (Megatron-LM's schedule: ``wait = start - 1,
warmup = 1, active = end - start``, stepped at the top of each iteration) on the ranks in
``--profile-ranks``; the trace goes to ``--tensorboard-dir`` (TensorBoard's profiler plugin,
Perfetto). Without
``--use-pytorch-profiler``, ``--profile`` brackets the same window with ``cudaProfilerStart/Stop``
and NVTX ranges for ``nsys profile --capture-range=cudaProfilerApi`` (GPU only).

On top of Megatron-LM, the profiled ranks print a per-phase breakdown of the step when the window
closes (``Breakdown``). The phases come from named ranges (``torch.profiler.record_function``):
the training loop marks its own (``RANGES``), and while the window is open forward hooks mark the
attention, MoE and output layers. Ranges nest, so the table subtracts::

    forward: other    = forward_step - get_batch - attention - MoE - output layer and loss
    backward          = forward_backward - forward_step - finalize_model_grads
    other             = ProfilerStep (the whole step) - every phase above

``backward`` therefore also holds the schedule's own work (the loss function, loss scaling). On a
GPU the ranges synchronise the device while the window is open, so each phase is charged its own
kernels (and overlap is lost: the profiled steps run slower than the others, as with any
profiler).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.profiler import record_function

# Ranges the training loop opens, by name (pretrain_mixtral.py, engine.py).
STEP, FWD_BWD, FORWARD, BATCH = "ProfilerStep", "forward_backward", "forward_step", "get_batch"
GRAD_SYNC, ZERO_GRAD, OPTIMIZER, LOGGING = (
    "finalize_model_grads",
    "zero_grad",
    "optimizer.step",
    "logging",
)
# Ranges the forward hooks open while profiling.
ATTENTION, MOE, OUTPUT = "self_attention", "moe_layer", "output_layer_and_loss"
_RECORDING = (
    torch.profiler.ProfilerAction.RECORD,
    torch.profiler.ProfilerAction.RECORD_AND_SAVE,
)


@dataclasses.dataclass(frozen=True)
class Window:
    """Which iterations (0-based, end excluded) and ranks to profile, and with what."""

    start: int
    end: int
    ranks: tuple[int, ...]
    pytorch: bool  # torch.profiler; False: cudaProfilerStart/Stop for nsys
    trace_dir: str | None

    @classmethod
    def from_args(cls, args) -> Window | None:
        if not args.profile:
            return None
        return cls(
            args.profile_step_start,
            args.profile_step_end,
            tuple(args.profile_ranks),
            args.use_pytorch_profiler,
            args.tensorboard_dir,
        )


class StepProfiler:
    """Call :meth:`step` at the top of every training iteration, as Megatron-LM's loop does,
    and :meth:`close` after the loop; both return the breakdown text once it is ready."""

    def __init__(self, window: Window | None, model, rank: int, on_gpu: bool):
        self.window = window if window is not None and rank in window.ranks else None
        self.model, self.rank, self.on_gpu = model, rank, on_gpu
        self.prof, self.hooks, self.report, self.nvtx = None, [], None, None
        if self.window is not None and self.window.pytorch:
            w = self.window
            self.prof = torch.profiler.profile(
                schedule=torch.profiler.schedule(
                    wait=max(w.start - 1, 0), warmup=1 if w.start > 0 else 0,
                    active=w.end - w.start, repeat=1,
                ),
                on_trace_ready=self._ready,
                record_shapes=True,
            )  # fmt: skip
            self.prof.start()

    def step(self, iteration: int) -> str | None:
        w = self.window
        if w is None:
            return self._take_report()
        if self.prof is not None:
            if iteration == w.end:
                return self.close()
            self.prof.step()
            if self.prof.current_action in _RECORDING and not self.hooks:
                self._add_hooks()
        elif self.on_gpu and iteration == w.start:
            torch.cuda.cudart().cudaProfilerStart()
            self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.nvtx.__enter__()
        elif self.on_gpu and iteration == w.end:
            self.close()
        return self._take_report()

    def close(self) -> str | None:
        """Close the window if it is still open (training ended inside it)."""
        if self.prof is not None:
            self.prof.stop()  # saves the window if it was recording
            self.prof = None
        if self.nvtx is not None:
            torch.cuda.cudart().cudaProfilerStop()
            self.nvtx.__exit__(None, None, None)
            self.nvtx = None
        self._remove_hooks()
        self.window = None
        return self._take_report()

    def _take_report(self) -> str | None:
        report, self.report = self.report, None
        return report

    def _ready(self, prof) -> None:
        self._remove_hooks()
        where = ""
        if self.window.trace_dir:
            torch.profiler.tensorboard_trace_handler(self.window.trace_dir)(prof)
            where = f"; trace in {self.window.trace_dir}"
        self.report = Breakdown.from_events(prof.key_averages()).format(self.rank, where)

    def _remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def _add_hooks(self) -> None:
        """Named ranges around the attention, MoE and output layers of every model chunk."""
        from megatron.core.transformer.attention import Attention

        from megatron_ext.moe.layer import SMoELayer

        for chunk in self.model:
            for name, module in chunk.named_modules():
                if isinstance(module, Attention):
                    self._bracket(module, ATTENTION)
                elif isinstance(module, SMoELayer):
                    self._bracket(module, MOE)
                elif name.endswith("output_layer"):
                    # the logits, then the vocab-parallel cross-entropy the model computes itself
                    self._bracket(module, OUTPUT, until_loss=True)

    def _bracket(self, module, label: str, until_loss: bool = False) -> None:
        open_ranges = []
        sync = torch.cuda.synchronize if self.on_gpu else (lambda: None)

        def enter(*_):
            sync()
            open_ranges.append(record_function(label).__enter__())

        def leave(*_):
            sync()
            open_ranges.pop().__exit__(None, None, None)

        self.hooks.append(module.register_forward_pre_hook(enter))
        if not until_loss:
            self.hooks.append(module.register_forward_hook(leave))
            return
        # GPTModel.compute_language_model_loss runs right after the output layer.
        owner = _owner_of_output_layer(self.model, module)
        if owner is None:
            self.hooks.append(module.register_forward_hook(leave))
            return
        original = owner.compute_language_model_loss

        def loss_then_leave(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                leave()

        owner.compute_language_model_loss = loss_then_leave
        self.hooks.append(_Restore(owner, "compute_language_model_loss"))


class _Restore:
    """A removable 'hook' that drops an instance attribute, uncovering the class's method."""

    def __init__(self, obj, attr: str):
        self.obj, self.attr = obj, attr

    def remove(self) -> None:
        self.obj.__dict__.pop(self.attr, None)


def _owner_of_output_layer(model, layer):
    for chunk in model:
        for module in chunk.modules():
            if getattr(module, "output_layer", None) is layer and hasattr(
                module, "compute_language_model_loss"
            ):
                return module
    return None


def phase(name: str):
    """A named range for the breakdown (and any trace); nearly free when no profiler runs."""
    return record_function(name)


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Milliseconds per step of each phase (the module docstring says how they are derived)."""

    steps: int
    step_ms: float
    phases: tuple[tuple[str, float], ...]

    @classmethod
    def from_events(cls, averages) -> Breakdown:
        """From ``profiler.key_averages()``: the recorded steps are its ``ProfilerStep*`` events."""
        total, steps = {}, 0
        for e in averages:
            key = STEP if e.key.startswith(STEP) else e.key  # "ProfilerStep*"
            total[key] = total.get(key, 0.0) + e.cpu_time_total / 1e3  # us -> ms
            steps += e.count if key == STEP else 0
        return cls.from_totals(total, steps)

    @classmethod
    def from_totals(cls, total: dict[str, float], steps: int) -> Breakdown:
        t = {k: total.get(k, 0.0) / max(steps, 1) for k in (
            STEP, FWD_BWD, FORWARD, BATCH, GRAD_SYNC, ZERO_GRAD, OPTIMIZER, LOGGING, ATTENTION,
            MOE, OUTPUT)}  # fmt: skip
        phases = [
            ("data (get_batch)", t[BATCH]),
            ("forward: attention", t[ATTENTION]),
            ("forward: MoE layers", t[MOE]),
            ("forward: output layer + loss", t[OUTPUT]),
            ("forward: other", t[FORWARD] - t[BATCH] - t[ATTENTION] - t[MOE] - t[OUTPUT]),
            ("backward", t[FWD_BWD] - t[FORWARD] - t[GRAD_SYNC]),
            ("grad machinery (zero, DDP finalize)", t[ZERO_GRAD] + t[GRAD_SYNC]),
            ("optimizer (clip, step)", t[OPTIMIZER]),
            ("logging (losses, load, log line)", t[LOGGING]),
        ]
        phases.append(("other", t[STEP] - sum(ms for _, ms in phases)))
        return cls(steps, t[STEP], tuple(phases))

    def format(self, rank: int, where: str = "") -> str:
        lines = [
            f"profile of {self.steps} steps on rank {rank} (torch.profiler; ms per step, "
            f"CPU-side time of each range{where}):",
            f"  {'phase':<38} {'ms/step':>9} {'share':>7}",
        ]
        for name, ms in self.phases:
            share = ms / self.step_ms if self.step_ms else 0.0
            lines.append(f"  {name:<38} {ms:9.1f} {share:7.1%}")
        lines.append(f"  {'whole step':<38} {self.step_ms:9.1f} {1:7.1%}")
        return "\n".join(lines)
