"""GPU and interconnect figures the cost model uses (datasheet peaks, typical NCCL bandwidths).

Bandwidths are NCCL *bus* bandwidths per GPU (what nccl-tests report as busbw), so a ring
all-reduce of ``V`` bytes over ``n`` ranks takes ``2 (n-1)/n V / bw`` and a reduce-scatter or
all-gather ``(n-1)/n V / bw``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16/fp16, no sparsity
    hbm_gbps: float  # memory bandwidth, GB/s
    nvlink_gbps: float  # intra-node NCCL bus bandwidth per GPU, GB/s
    network_gbps: float  # inter-node NCCL bus bandwidth per GPU (one NIC per GPU), GB/s
    gpus_per_node: int = 8

    def with_memory(self, gib: float | None) -> Hardware:
        return self if gib is None else replace(self, memory_gib=gib)


GPUS = {
    # H100 SXM: 989 TFLOP/s bf16, 3.35 TB/s HBM3, NVLink 4 (~360 GB/s busbw in nccl-tests
    # all-reduce on 8 GPUs), 8 x 400 Gb/s InfiniBand NDR per node (~45 GB/s busbw per GPU).
    "h100": Hardware("H100 SXM 80GB", 80.0, 989.4, 3350.0, 360.0, 45.0),
    # H200: same compute, 141 GB HBM3e at 4.8 TB/s.
    "h200": Hardware("H200 SXM 141GB", 141.0, 989.4, 4800.0, 360.0, 45.0),
    # A100 SXM 80GB: 312 TFLOP/s bf16, 2.0 TB/s, NVLink 3 (~230 GB/s busbw), 200 Gb/s HDR.
    "a100": Hardware("A100 SXM 80GB", 80.0, 312.0, 2039.0, 230.0, 22.0),
}
