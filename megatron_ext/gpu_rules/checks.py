"""The per-op rules device tensors obey (``tensor.DeviceTensor`` calls :meth:`RuleSet.check_op`).

A :class:`RuleSet` holds the emulated device (:class:`~megatron_ext.gpu_rules.device.DeviceSpec`),
the CUDA ordinal this rank uses and the counters tests read (host syncs by op, grouped-GEMM
paths). One is installed per process by ``gpu_rules.enable``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from megatron_ext.gpu_rules.device import DeviceSpec
from megatron_ext.gpu_rules.tensor import _NO_DEVICE_CHECK, _SYNCS, DeviceTensor, aten


class GpuRuleError(RuntimeError):
    """Something a CUDA device (or NCCL) would refuse."""


@dataclass
class RuleSet:
    spec: DeviceSpec
    index: int = 0
    syncs: Counter = field(default_factory=Counter)  # op name -> host syncs
    grouped_mm: Counter = field(default_factory=Counter)  # "fast" / "fallback" calls
    composite_depth: int = 0  # > 0 inside a PyTorch composite that allocates like its input

    def sync(self, what: str, n: int = 1) -> None:
        self.syncs[what] += n

    def host_syncs(self) -> int:
        return sum(self.syncs.values())

    def reset_counters(self) -> None:
        self.syncs.clear()
        self.grouped_mm.clear()

    # ----------------------------------------------------------------------------------- ops
    def check_op(self, func, args, kwargs, leaves) -> None:
        if func not in _NO_DEVICE_CHECK:
            for x in leaves:
                if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) and x.dim():
                    raise GpuRuleError(
                        f"Expected all tensors to be on the same device, but found at least two "
                        f"devices, cuda:{self.index} and cpu! (GPU rules: {func} got a host "
                        f"tensor of shape {tuple(x.shape)})"
                    )
        n = _SYNCS.get(func, 0)
        if func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in args[1]
            if i is not None
        ):
            n = 1  # boolean mask indexing: nonzero() on the device
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            n = 1
        if n:
            self.sync(str(func.overloadpacket.__name__), n)
        if func is aten._grouped_mm.default:
            self._check_grouped_mm(args, kwargs)

    def _check_grouped_mm(self, args, kwargs) -> None:
        """CUDA's ``_grouped_mm``: a CUTLASS kernel for bf16 on sm90 (checked here against the
        meta kernel, which implements the same stride/dtype/offset rules), else a per-group
        fallback loop that first copies ``offs`` to the host."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        mat_a, mat_b = args[:2]
        fast = self.spec.capability[0] == 9 and mat_a.dtype == mat_b.dtype == torch.bfloat16
        if not fast:
            self.grouped_mm["fallback"] += 1
            self.sync("_grouped_mm fallback")
            return
        self.grouped_mm["fast"] += 1
        meta_args = [_meta_like(a) if isinstance(a, torch.Tensor) else a for a in args]
        meta_kwargs = {
            k: _meta_like(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        with torch._C._DisableTorchDispatch():
            try:
                aten._grouped_mm.default(*meta_args, **meta_kwargs)
            except RuntimeError as e:
                shapes = [(tuple(t.shape), t.stride(), t.dtype) for t in tensors]
                raise GpuRuleError(f"torch._grouped_mm on CUDA would fail: {e} {shapes}") from e


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    with torch._C._DisableTorchDispatch():
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
