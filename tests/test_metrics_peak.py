"""MFU's denominator: the datasheet peak of the GPU the run is on, by the name CUDA reports.

The names are what ``torch.cuda.get_device_name()`` returns on those GPUs; the peaks are
NVIDIA's dense (no sparsity) figures.
"""

import pytest

from megatron_ext.metrics import device_peak
from megatron_ext.multirank import run_on_ranks

CASES = [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # SXM
    ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H100 NVL", "fp8", 1670.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA GH200 480GB", "fp8", 1978.9),
    ("NVIDIA H20", "bf16", 148.0),
    ("NVIDIA H800", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 156.0),
    ("NVIDIA B200", "fp8", 4500.0),
    ("NVIDIA GB200", "bf16", 2500.0),
    ("NVIDIA L40S", "bf16", 362.1),
]


@pytest.mark.parametrize("name,precision,peak", CASES)
def test_datasheet_peak_by_device_name(name, precision, peak):
    assert device_peak(name, precision) == peak


def test_unknown_gpu_or_precision_gives_no_peak():
    assert device_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert device_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 on Ampere


def _reported_mfu(spec_name):
    from megatron_ext.arguments import parse_args
    from megatron_ext.metrics import Reporter

    args = parse_args("--model tiny --mock-data --vocab-size 1000 --train-iters 1 --bf16".split())
    return Reporter(args).peak


@pytest.mark.parametrize("spec,peak", [("H100_SXM", 989.4), ("H200", 989.4), ("B200", 2250.0)])
def test_training_reports_mfu_against_the_gpu_it_runs_on(spec, peak):
    from megatron_ext import gpu_rules

    device = getattr(gpu_rules, spec)
    assert run_on_ranks(_reported_mfu, 1, args=(spec,), gpu_rules=device)[0] == peak
