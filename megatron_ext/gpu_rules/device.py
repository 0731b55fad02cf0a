"""The emulated GPU: what ``torch.cuda`` reports while the GPU rules are on.

``DeviceSpec`` is what code may branch on (name, compute capability, memory, SM count); the
default is an H100 SXM, our users' machine. ``cuda_patches(spec, rules)`` lists the
``torch.cuda`` functions to replace: ``is_available`` is True, ``current_device`` returns the
ordinal set by ``set_device`` (an int, as on a GPU; CPU mode maps int devices to the CPU),
``device_count`` is the local world size, and the capability / name / properties queries
answer from the spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    name: str  # as torch.cuda.get_device_name() reports it
    capability: tuple[int, int]
    total_memory_gib: float = 80.0
    multi_processor_count: int = 132


H100_SXM = DeviceSpec("NVIDIA H100 80GB HBM3", (9, 0), 79.2, 132)
H200 = DeviceSpec("NVIDIA H200", (9, 0), 139.8, 132)
B200 = DeviceSpec("NVIDIA B200", (10, 0), 178.4, 148)
A100 = DeviceSpec("NVIDIA A100-SXM4-80GB", (8, 0), 79.2, 108)


@dataclass(frozen=True)
class _Properties:
    """What ``torch.cuda.get_device_properties`` returns (the fields code reads)."""

    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int
    gcnArchName: str = ""  # noqa: N815 (torch's name)


def cuda_patches(spec: DeviceSpec, rules) -> list[tuple[object, str, object]]:
    import torch

    cuda = torch.cuda

    def set_device(device) -> None:
        index = device.index if isinstance(device, torch.device) else int(device)
        if not 0 <= index < device_count():
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (GPU rules)")
        rules.index = index

    def device_count() -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    props = _Properties(
        spec.name,
        spec.capability[0],
        spec.capability[1],
        int(spec.total_memory_gib * 2**30),
        spec.multi_processor_count,
    )
    return [
        (cuda, "is_available", lambda: True),
        (cuda, "current_device", lambda: rules.index),
        (cuda, "set_device", set_device),
        (cuda, "device_count", device_count),
        (cuda, "get_device_capability", lambda device=None: spec.capability),
        (cuda, "get_device_name", lambda device=None: spec.name),
        (cuda, "get_device_properties", lambda device=None: props),
        (cuda, "is_bf16_supported", lambda including_emulation=True: spec.capability >= (8, 0)),
    ]
