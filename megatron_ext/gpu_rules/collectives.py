"""NCCL's rules for ``torch.distributed`` on CPU ranks: device tensors only, on NCCL groups.

Every process group remembers the backend it was asked for: ``init_process_group("nccl")``
and ``new_group()`` without a backend (NCCL under the default group) are NCCL groups,
``new_group(backend="gloo")`` is a gloo group; underneath, all of them are gloo. A collective
on an NCCL group refuses any host tensor with NCCL's own words ("No backend type associated
with device type cpu"); device tensors (``DeviceTensor``) go to gloo as plain aliases of their
storage. Passing aliases also gives the stream-ordered send semantics NCCL has: a pipeline
stage may replace a sent tensor's ``.data`` (Megatron's ``deallocate_pipeline_outputs``)
while gloo is still sending from the storage it was given.

Object collectives (``all_gather_object``, ...) move their byte tensors to ``cuda:N`` on NCCL
groups, as PyTorch does with a real NCCL group.

Megatron-Core binds some collectives to module-level names at import time
(``dist_all_gather_func = torch.distributed.all_gather_into_tensor``); those names are
re-pointed too, in every module already imported.
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.distributed.distributed_c10d as c10d

from megatron_ext.gpu_rules.checks import GpuRuleError
from megatron_ext.gpu_rules.tensor import DeviceTensor, plain

_TENSOR_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
    "send",
    "recv",
    "isend",
    "irecv",
)


class Backends:
    """The backend each process group was asked for (``"nccl"`` or ``"gloo"``)."""

    def __init__(self):
        self.asked: dict = {}

    def of(self, group) -> str:
        if group is None:
            group = c10d._get_default_group()
        return self.asked.get(group, "nccl")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _to_plain(value):
    if isinstance(value, DeviceTensor):
        return plain(value)
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_plain(v) for v in value)
    return value


def _wrap_collective(name: str, original, backends: Backends):
    signature = inspect.signature(original)

    def collective(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        if backends.of(group) == "nccl":
            for arg, value in bound.arguments.items():
                for t in _tensors(value):
                    if not isinstance(t, DeviceTensor):
                        raise GpuRuleError(
                            "No backend type associated with device type cpu (GPU rules: "
                            f"torch.distributed.{name} on an NCCL group got a host tensor as "
                            f"{arg!r}: shape {tuple(t.shape)}, {t.dtype}; NCCL takes CUDA "
                            "tensors only)"
                        )
        plain_args = {k: _to_plain(v) for k, v in bound.arguments.items()}
        # Without torch functions: c10d would hand the (now plain) call to CPU mode's function
        # mode, which calls this wrapper again.
        with torch._C.DisableTorchFunction():
            return original(**plain_args)

    collective.__name__ = collective.__qualname__ = name
    collective.__doc__ = original.__doc__
    collective.__wrapped__ = original
    return collective


def _init_process_group(original, backends: Backends):
    def init_process_group(backend=None, *args, **kwargs):
        asked = "gloo" if backend is not None and "nccl" not in str(backend) else "nccl"
        original("gloo", *args, **kwargs)
        backends.asked[c10d._get_default_group()] = asked

    return init_process_group


def _new_group(original, backends: Backends):
    signature = inspect.signature(original)

    def new_group(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        asked = bound.arguments.get("backend")
        asked = "nccl" if asked is None or "nccl" in str(asked) else "gloo"
        bound.arguments["backend"] = "gloo"
        bound.arguments.pop("pg_options", None)  # NCCL options mean nothing to gloo
        group = original(*bound.args, **bound.kwargs)
        if group is not None and group is not c10d.GroupMember.NON_GROUP_MEMBER:
            backends.asked[group] = asked
        return group

    return new_group


def _object_device(backends: Backends, rules):
    def _get_object_coll_device(group=None):
        if backends.of(group) == "nccl":
            return torch.device("cuda", rules.index)
        return torch.device("cpu")

    return _get_object_coll_device


def patches(backends: Backends, rules) -> list[tuple[object, str, object]]:
    """(owner, name, replacement) for ``torch.distributed`` and every module that bound one of
    the replaced functions to a name of its own."""
    replaced = {}
    for name in _TENSOR_COLLECTIVES:
        original = getattr(c10d, name)
        replaced[original] = _wrap_collective(name, original, backends)
    replaced[c10d.init_process_group] = _init_process_group(c10d.init_process_group, backends)
    replaced[c10d.new_group] = _new_group(c10d.new_group, backends)
    by_id = {id(original): wrapper for original, wrapper in replaced.items()}
    out = [(c10d, "_get_object_coll_device", _object_device(backends, rules))]
    for module in list(sys.modules.values()):  # torch.distributed and every alias of ours
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if id(value) in by_id:
                out.append((module, attr, by_id[id(value)]))
    return out
