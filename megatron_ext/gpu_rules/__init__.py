"""GPU rules on CPU: run the GPU code path on CPU ranks and refuse what a GPU would refuse.

CPU mode (``megatron_ext.cpu_mode``) makes Megatron-Core run on CPU ranks by mapping every CUDA
placement to the CPU, which also hides every GPU rule: a host tensor handed to an NCCL
collective, a kernel that exists only on GPUs, a grouped GEMM with misaligned strides, a host
sync in a hot loop. With the rules on, the process believes it has one GPU and behaves like it:

* ``torch.cuda.is_available()`` is True and the device queries answer from a
  :class:`~megatron_ext.gpu_rules.device.DeviceSpec` (H100 SXM unless told otherwise), so the
  code takes its GPU branches (``pretrain_mixtral.py`` runs WITHOUT ``--cpu``);
* whatever is placed on CUDA (``device="cuda"``, ``.cuda()``, ``.to("cuda")``, modules'
  ``.cuda()`` and ``.to("cuda")``) becomes a
  :class:`~megatron_ext.gpu_rules.tensor.DeviceTensor`: CPU storage that reports ``cuda:N``;
  results of ops on device tensors are device tensors, forward and backward; moving to or
  from the host copies, as on a GPU;
* ops mixing device and host tensors are refused, host syncs are counted, and grouped GEMMs
  are checked against CUDA's stride rules (``tensor.py``, ``checks.py``);
* process groups are gloo underneath, but NCCL groups refuse host tensors with NCCL's own error
  (``collectives.py``);
* ``torch.compile``d functions run eagerly (Dynamo cannot trace this tensor subclass; the
  compiled fusions are tested on plain CPU tensors instead).

Use it as ``gpu_rules.enable()`` before anything is built (the multi-rank harness does it with
``run_on_ranks(..., gpu_rules=True)``), then read :func:`rules` for the counters.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from megatron_ext import cpu_mode
from megatron_ext.gpu_rules import collectives
from megatron_ext.gpu_rules.checks import GpuRuleError, RuleSet
from megatron_ext.gpu_rules.device import A100, B200, H100_SXM, H200, DeviceSpec, cuda_patches
from megatron_ext.gpu_rules.tensor import DeviceTensor, is_device, plain

__all__ = [
    "A100",
    "B200",
    "H100_SXM",
    "H200",
    "DeviceSpec",
    "DeviceTensor",
    "GpuRuleError",
    "RuleSet",
    "disable",
    "enable",
    "is_device",
    "is_enabled",
    "plain",
    "rules",
]

_state: dict = {}  # the installed RuleSet and the originals it replaced, for disable()


class _DeviceSemantics:
    """The hooks CPU mode calls where code places tensors on CUDA or moves them back."""

    is_device = staticmethod(is_device)
    plain = staticmethod(plain)
    # PyTorch functions whose C++ implementations allocate with ``input.options()``: on a GPU
    # on the input's device; here (the storage is host memory) on the CPU, below anything that
    # could tag it. Inside them every factory op is device memory (``_FactoriesOnDevice``).
    # SDPA takes its math path on device tensors (the fused CPU kernels refuse subclasses),
    # which builds its causal mask and dropout mask that way. ``one_hot`` of a tensor subclass
    # compares with ``arange(num_classes, input.options())`` (HF's MoE blocks' expert masks).
    composites = frozenset(
        {torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.one_hot}
    )

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset

    @contextlib.contextmanager
    def inside_composite(self):
        self.ruleset.composite_depth += 1
        try:
            yield
        finally:
            self.ruleset.composite_depth -= 1

    def to_device(self, out, *sources):
        """Tag what a CUDA placement returned; a host tensor handed back as is (no copy was
        needed on the CPU) is copied first: host -> device is a copy on a GPU."""
        if not isinstance(out, torch.Tensor) or is_device(out):
            return out
        if any(out is s for s in sources if isinstance(s, torch.Tensor)):
            out = out.detach().clone().requires_grad_(out.requires_grad)
        return DeviceTensor(out)

    # Placements on CUDA that copy host data: ``tensor.to("cuda")``, ``.cuda()``, and the
    # factories that take Python data (``torch.tensor(data, device="cuda")``).
    _COPIES = frozenset({torch.Tensor.to, torch.Tensor.cuda, torch.tensor, torch.as_tensor})

    def host_to_device(self, func, args, kwargs) -> None:
        """A host -> device copy without ``non_blocking=True`` waits for the stream (PyTorch's
        ``memcpy_and_sync``: ``cudaMemcpyAsync`` + ``cudaStreamSynchronize``); with it, the
        copy is queued (from pinned memory, or staged from pageable memory) and nothing
        waits. ``torch.tensor(data, device="cuda")`` always copies that way."""
        if func not in self._COPIES:
            return
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            if not isinstance(args[0], torch.Tensor) or is_device(args[0]):
                return  # device -> device
            positional = [a for a in args[2:] if isinstance(a, bool)]
            if kwargs.get("non_blocking", positional[0] if positional else False):
                return
        self.ruleset.sync("host->device copy without non_blocking")

    def to_host(self, func, args, kwargs):
        """``.cpu()`` / ``.to("cpu")`` of a device tensor: a host copy (and a sync)."""
        self.ruleset.sync("device->host copy")
        source = plain(args[0])
        out = func(source, *args[1:], **kwargs)
        return out.clone() if out is source else out


class _FactoriesOnDevice(TorchDispatchMode):
    """Factory ops asked for CUDA memory below the function level (PyTorch's own Python
    functions, e.g. ``F.embedding_bag`` allocating offsets on ``input.device``, run with CPU
    mode's function mode popped): allocate on the CPU and tag. ``torch.cuda._lazy_init`` is a
    no-op while the rules are on, so such calls reach the dispatcher instead of failing."""

    def __init__(self, ruleset: RuleSet):
        super().__init__()
        self.ruleset = ruleset

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        on_cuda = device is not None and torch.device(device).type == "cuda"
        # A factory inside a device composite (see _DeviceSemantics.composites): no tensor in.
        in_composite = self.ruleset.composite_depth and not any(
            isinstance(t, torch.Tensor) for t in tree_flatten((args, kwargs))[0]
        )
        if not (on_cuda or in_composite):
            return func(*args, **kwargs)
        if on_cuda:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*args, **kwargs)
        return tree_map(lambda t: DeviceTensor(t) if isinstance(t, torch.Tensor) else t, out)


def _module_cuda(self, device=None):
    """``nn.Module.cuda()`` with the rules on: every parameter and buffer becomes a device
    tensor object (PyTorch's own ``.cuda()`` keeps the Parameter objects and swaps their
    ``.data``, which would leave them untagged). Attributes (Megatron's ``allreduce``,
    ``tensor_model_parallel``, ...) are kept; a shared parameter stays shared."""
    moved: dict[int, torch.Tensor] = {}
    for module in self.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None or is_device(t):
                    continue
                if id(t) not in moved:
                    new = DeviceTensor(t.detach().clone())
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    for attr, value in vars(t).items():
                        setattr(new, attr, value)
                    moved[id(t)] = new
                store[key] = moved[id(t)]
    return self


def _module_to(original):
    """``nn.Module.to(...)`` towards CUDA: as :func:`_module_cuda`, then any dtype change."""

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type != "cuda":
            return original(self, *args, **kwargs)
        _module_cuda(self)
        return original(self, dtype) if dtype is not None else self

    return to


def rules() -> RuleSet:
    """The installed rules (counters, device spec); raises if the rules are off."""
    return _state["rules"]


def is_enabled() -> bool:
    return "rules" in _state


def enable(spec: DeviceSpec = H100_SXM) -> RuleSet:
    """Turn the rules on for this process (CPU mode included); idempotent."""
    if is_enabled():
        return rules()
    ruleset = RuleSet(spec)
    cpu_mode.enable(device_semantics=_DeviceSemantics(ruleset))
    originals = []
    patches = cuda_patches(spec, ruleset) + collectives.patches(collectives.Backends(), ruleset)
    patches.append((torch.nn.Module, "cuda", _module_cuda))
    patches.append((torch.nn.Module, "to", _module_to(torch.nn.Module.to)))
    patches.append((torch.cuda, "_lazy_init", lambda: None))
    for owner, name, new in patches:
        originals.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)
    DeviceTensor.rules = ruleset
    stance = torch.compiler.set_stance("force_eager")
    stance.__enter__()
    factories = _FactoriesOnDevice(ruleset)
    factories.__enter__()
    _state.update(rules=ruleset, originals=originals, stance=stance, factories=factories)
    return ruleset


def disable() -> None:
    """Undo :func:`enable` (CPU mode too)."""
    if not is_enabled():
        return
    _state.pop("factories").__exit__(None, None, None)
    _state.pop("stance").__exit__(None, None, None)
    for owner, name, original in reversed(_state.pop("originals")):
        setattr(owner, name, original)
    DeviceTensor.rules = None
    _state.pop("rules")
    cpu_mode.disable()
