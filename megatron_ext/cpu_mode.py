"""CPU mode: run Megatron-Core 0.16.1 on CPU ranks over gloo.

Megatron-Core treats "the device" as CUDA in many places. CPU mode makes the CPU play that role,
so that Megatron-Core's own code paths (tensor-parallel layers, pipeline schedules, DDP, the
distributed optimizer, dist checkpointing) run unchanged on CPU processes talking over gloo. It
is what the test-suite runs on, and what lets a user rehearse a cluster layout on a workstation.

It is never switched on silently: call :func:`enable` (``pretrain_mixtral.py --cpu`` does) or set
``MEGATRON_EXT_CPU=1`` and call :func:`enable_from_env`.

What it does, and why each piece is needed (every one was found by running Megatron-Core here):

1. ``_CudaAsCpu``, a ``TorchFunctionMode`` pushed for the whole process:
   * any ``device=`` that names CUDA (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, a bare
     int ordinal) becomes ``"cpu"``: the causal mask
     (``device="cuda"``), the pipeline schedule's token counter, DDP's grad buffers, rotary
     embeddings (``.to(torch.cuda.current_device())``) and many ``torch.empty(...,
     device=torch.cuda.current_device())`` calls;
   * ``Tensor.cuda()`` and ``Tensor.to("cuda")`` keep the tensor where it is; ``pin_memory()`` and
     ``record_stream()`` are no-ops (both need a CUDA runtime);
   * ``Tensor.type()`` with no argument reports ``torch.cuda.<T>Tensor``: the optimizer,
     distributed optimizer and ``clip_grads`` assert ``param.type() == 'torch.cuda.FloatTensor'``.
   The mode is also pushed around the autograd engine (``torch.autograd._engine_run_backward``):
   PyTorch pops a function mode while the mode handles a call, and ``Tensor.backward`` is one,
   so custom ``backward``s and DDP hooks would otherwise run without it.
2. ``torch.cuda`` functions that would raise "Torch not compiled with CUDA enabled":
   ``current_device`` returns ``torch.device("cpu")`` (not 0: code that PyTorch runs with the
   mode popped, inside its own Python functions, may still allocate on it),
   ``device_count`` 1, ``set_device``, ``synchronize``, ``empty_cache`` and ``nvtx`` ranges do
   nothing; ``Stream``, ``Event``, ``stream()``, ``current_stream()`` and ``default_stream()``
   are inert stand-ins (Megatron's alltoall dispatcher and DDP's overlap create side streams;
   on CPU everything is already ordered); memory statistics read 0.
3. The CUDA RNG is the CPU default generator: ``torch.cuda.{get_rng_state, set_rng_state,
   manual_seed, manual_seed_all}`` and Megatron's ``_get_cuda_rng_state`` /
   ``_set_cuda_rng_state`` (used by ``CudaRNGStatesTracker``) read and write
   ``torch.default_generator``. On a GPU, random ops on CUDA tensors draw from the CUDA default
   generator; here they draw from the CPU one, so this mapping keeps the tracker's semantics:
   ``fork("model-parallel-rng")`` gives each TP rank its own stream for initialisation and
   dropout, exactly as on GPUs.
4. ``CudaRNGStatesTracker.fork`` warns "CPU RNG state changed within GPU RNG context" when the
   CPU generator moved inside a fork. Under CPU mode the CPU generator *is* the forked stream,
   so it always moves; a logging filter drops exactly that message (while the mode is on).

``megatron_ext.gpu_rules`` builds on this mode (``enable(device_semantics=...)``): there, what
is placed on CUDA is tagged as device memory and GPU rules are enforced (docs/gpu_rules.md).

Nothing else is changed (gloo in torch 2.13 has every collective Megatron-Core uses here,
including ``reduce_scatter_tensor`` for the distributed optimizer and uneven
``all_to_all_single``); numerics are those of Megatron-Core's own modules.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

ENV_VAR = "MEGATRON_EXT_CPU"

_state: dict = {}  # the active mode and the originals it replaced, for disable()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal (what torch.cuda.current_device() returns); bool is an int.
    return isinstance(device, int) and not isinstance(device, bool)


_KEEP = (torch.Tensor.cuda, torch.Tensor.pin_memory)
_CPU = torch.device("cpu")
_NOOP = (torch.Tensor.record_stream,)
_TO_HOST = (torch.Tensor.cpu, torch.Tensor.to)


def _targets_cuda(func, args, kwargs, device_semantics) -> bool:
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        return True
    if func is torch.Tensor.to and len(args) > 1:
        target = args[1]
        if torch.is_tensor(target):  # .to(other): other's device
            return device_semantics is not None and device_semantics.is_device(target)
        return _is_cuda_device(target)
    return func is torch.Tensor.cuda


def _targets_host(func, args, kwargs) -> bool:
    if func is torch.Tensor.cpu:
        return True
    if func is not torch.Tensor.to:
        return False
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if torch.is_tensor(target):
        return False
    return (
        target is not None and not isinstance(target, torch.dtype) and not _is_cuda_device(target)
    )


class _CudaAsCpu(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU (see the module docstring, point 1).

    ``device_semantics`` (``megatron_ext.gpu_rules``) makes the rewritten placements behave as
    on a GPU: what was placed on CUDA is tagged as device memory, host<->device moves copy."""

    def __init__(self, device_semantics=None):
        super().__init__()
        self.device_semantics = device_semantics

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = self.device_semantics
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            on_gpu = dev is None or dev.is_device(args[0])
            return (
                name.replace("torch.", "torch.cuda.", 1)
                if on_gpu and ".cuda." not in name
                else name
            )
        if func in _NOOP:
            return None
        if dev is None:
            if func in _KEEP:
                return args[0]
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = {**kwargs, "device": "cpu"}
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)
        if func is torch.Tensor.pin_memory:
            return args[0]
        if _targets_cuda(func, args, kwargs, dev):
            dev.host_to_device(func, args, kwargs)
            if func is torch.Tensor.cuda:
                return dev.to_device(args[0], args[0])
            if "device" in kwargs:
                kwargs = {**kwargs, "device": "cpu"}
            if func is torch.Tensor.to and len(args) > 1:
                args = (
                    args[0],
                    "cpu" if not torch.is_tensor(args[1]) else dev.plain(args[1]),
                    *args[2:],
                )
            return dev.to_device(func(*args, **kwargs), *args)
        if (
            func in _TO_HOST
            and args
            and dev.is_device(args[0])
            and _targets_host(func, args, kwargs)
        ):
            return dev.to_host(func, args, kwargs)
        if func in dev.composites:
            with dev.inside_composite():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class _Inert:
    """Stands in for torch.cuda.Stream / Event: every method does nothing and returns another
    inert object (so ``stream.record_event().synchronize()`` chains work)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: _Inert()

    def elapsed_time(self, other) -> float:
        return 0.0

    def query(self) -> bool:
        return True


class _DropForkRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_RNG_LOGGER = "megatron.core.tensor_parallel.random"


def _cpu_get_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))


def _patches() -> list[tuple[object, str, object]]:
    cuda = torch.cuda
    stream_ctx = contextlib.nullcontext
    patches = [
        (cuda, "current_device", lambda: _CPU),
        (cuda, "device_count", lambda: 1),
        (cuda, "set_device", lambda *a, **k: None),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "empty_cache", lambda *a, **k: None),
        (cuda, "Stream", _Inert),
        (cuda, "Event", _Inert),
        (cuda, "stream", lambda *a, **k: stream_ctx()),
        (cuda, "current_stream", lambda *a, **k: _Inert()),
        (cuda, "default_stream", lambda *a, **k: _Inert()),
        (cuda, "memory_allocated", lambda *a, **k: 0),
        (cuda, "max_memory_allocated", lambda *a, **k: 0),
        (cuda, "memory_reserved", lambda *a, **k: 0),
        (cuda, "max_memory_reserved", lambda *a, **k: 0),
        (cuda, "reset_peak_memory_stats", lambda *a, **k: None),
        (cuda.nvtx, "range_push", lambda *a, **k: None),
        (cuda.nvtx, "range_pop", lambda *a, **k: None),
        (cuda.nvtx, "range", lambda *a, **k: stream_ctx()),
        (cuda, "get_rng_state", _cpu_get_rng_state),
        (cuda, "set_rng_state", _cpu_set_rng_state),
        (cuda, "manual_seed", _cpu_manual_seed),
        (cuda, "manual_seed_all", _cpu_manual_seed),
        (cuda.random, "get_rng_state", _cpu_get_rng_state),
        (cuda.random, "set_rng_state", _cpu_set_rng_state),
        (cuda.random, "manual_seed", _cpu_manual_seed),
    ]
    from megatron.core.tensor_parallel import random as mcore_random

    patches += [
        (mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state),
        (mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state),
    ]
    return patches


def is_enabled() -> bool:
    return "mode" in _state


def _keep_mode_in_backward(original, mode):
    """The autograd engine entry point, run with ``mode`` pushed: PyTorch pops a function mode
    while the mode handles a call, and ``Tensor.backward`` is such a call, so without this
    the custom ``backward``s and DDP hooks the engine runs would see no mode at all."""

    def run(*args, **kwargs):
        if any(m is mode for m in torch.overrides._get_current_function_mode_stack()):
            return original(*args, **kwargs)
        with mode:
            return original(*args, **kwargs)

    return run


def enable(device_semantics=None) -> None:
    """Switch CPU mode on for this process (idempotent). Call before building any model.

    ``device_semantics``: ``megatron_ext.gpu_rules`` passes its tagging hooks here (what was
    placed on CUDA becomes tagged device memory); plain CPU mode leaves it None."""
    if is_enabled():
        return
    if torch.cuda.is_available() and os.environ.get(ENV_VAR) != "force":
        raise RuntimeError(
            "CPU mode was asked for on a machine with a CUDA device; drop --cpu to use the GPU "
            f"(set {ENV_VAR}=force to rehearse on CPU anyway)."
        )
    originals = []
    for owner, name, new in _patches():
        originals.append((owner, name, getattr(owner, name, None)))
        setattr(owner, name, new)
    mode = _CudaAsCpu(device_semantics)
    originals.append((torch.autograd, "_engine_run_backward", torch.autograd._engine_run_backward))
    torch.autograd._engine_run_backward = _keep_mode_in_backward(
        torch.autograd._engine_run_backward, mode
    )
    mode.__enter__()
    rng_filter = _DropForkRngWarning()
    logging.getLogger(_RNG_LOGGER).addFilter(rng_filter)
    _state.update(mode=mode, originals=originals, rng_filter=rng_filter)


def disable() -> None:
    """Undo :func:`enable` (used by tests that check the mode is what makes things work)."""
    if not is_enabled():
        return
    _state.pop("mode").__exit__(None, None, None)
    logging.getLogger(_RNG_LOGGER).removeFilter(_state.pop("rng_filter"))
    for owner, name, orig in reversed(_state.pop("originals")):
        setattr(owner, name, orig)


def enable_from_env() -> bool:
    """Enable CPU mode if ``MEGATRON_EXT_CPU`` is set to 1/true/force; return whether it is on."""
    if os.environ.get(ENV_VAR, "").lower() in ("1", "true", "yes", "force"):
        enable()
    return is_enabled()
