"""bench/gpu_check.py: skips cleanly without CUDA, and every part runs (toy sizes, GPU rules).

The real run needs a GPU (docs/benchmarks.md has its command and report); here its code runs in
a rank under ``megatron_ext.gpu_rules`` with ``--rehearse`` sizes, so a GPU session finds it
working. The wheelhouse script is run for real (it needs the package index, as CI has).
"""

import importlib.util
import os
import subprocess
import sys
import zipfile

from megatron_ext.multirank import run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


def test_without_cuda_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout


def _rehearse(report):
    import contextlib
    import io

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with contextlib.redirect_stdout(io.StringIO()):
        return gpu_check.main(["--rehearse", "--report", report])


def test_every_part_runs_under_gpu_rules(tmp_path):
    report = tmp_path / "report.md"
    assert run_on_ranks(_rehearse, 1, args=(str(report),), gpu_rules=True, timeout=600)[0] == 0
    text = report.read_text()
    for part in (
        "## Environment",
        "## GPU tests",
        "## MoE layer, bf16",
        "## Training proxy",
        "## Fine-grained MoE layer",
        "## Training proxy, DeepSeek-MoE 16B layers",
    ):
        assert part in text
    assert "| hf-deepseek-v3 |" in text and "| hf-qwen2-moe |" in text
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0" in text
    assert "| ours |" in text and "| ceiling |" in text
    assert "tokens/s" in text and "MFU" in text and "FAILED" not in text
    assert "skipped: Transformer Engine not importable" in text


def test_wheelhouse_holds_megatron_core_for_python_312(tmp_path):
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "bench", "gpu_wheelhouse.sh"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert wheel.startswith("megatron_core-0.16.1-cp312-cp312-manylinux")
    assert os.path.getsize(tmp_path / wheel) < 16 * 2**20  # far inside the 64 MiB carry limit
    with zipfile.ZipFile(tmp_path / wheel) as z:
        assert "megatron/core/__init__.py" in z.namelist()
