"""One command that proves the GPU path on a machine with one CUDA GPU, and reports.

    python bench/gpu_check.py [--report gpu_check.md] [--wheelhouse .whl]

On a machine without CUDA it says so and exits 0. With a GPU it runs, in about 3 minutes on
an H100/H200 (each part bounded; a part that fails is reported and the rest still run):

1. the environment: GPU, compute capability, torch / CUDA / Megatron-Core / TE versions;
2. ``pytest -m gpu tests/test_gpu.py``: grouped GEMM = loop in bf16, the expert all-to-all
   over NCCL, one training step with save and exact resume;
3. the MoE layer in bf16 at Mixtral 8x7B shapes (hidden 4096, FFN 14336, 8 experts, top-2,
   16384 tokens) beside a dense bf16 SwiGLU MLP of equal FLOPs and its bare GEMMs
   (``bench/moe_layer.py``);
4. the fine-grained layer in bf16 at DeepSeek-MoE 16B shapes (hidden 2048, 64 experts of FFN
   1408, top-6, shared width 2816, 16384 tokens) beside HF transformers' ``DeepseekV3MoE`` and
   ``Qwen2MoeSparseMoeBlock`` and the dense ceilings of equal FLOPs;
5. a 2-layer Mixtral-8x7B-shaped bf16 training proxy on this GPU (``pretrain_mixtral.py``,
   sequence 4096, mock data): tokens/s, TFLOP/s and MFU (median of the timed iterations), and
   the same for DeepSeek-MoE 16B's first two layers (one dense, one fine-grained MoE);
6. the 8x7B proxy with FP8 (``--fp8-format hybrid``) when Transformer Engine imports.

Each part is printed to stderr and written to the report as soon as it ends, so a run cut short
keeps what it finished.

Machines without package access: Megatron-Core is the one dependency a CUDA PyTorch image may
lack. ``bash bench/gpu_wheelhouse.sh`` (here, with pip) downloads its wheel for Python 3.12
into ``.whl/`` (about 3 MB); carried along, ``--wheelhouse .whl`` installs it into a temporary
directory first. ``--rehearse`` runs every part at toy sizes (the CI test does it on CPU under
``megatron_ext.gpu_rules``).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MOE_8X7B = "--tokens 16384 --hidden 4096 --ffn 14336 --experts 8 --topk 2 --iters 10 --warmup 3"
MOE_TOY = "--tokens 64 --hidden 64 --ffn 128 --experts 4 --topk 2 --iters 1 --warmup 0"
# DeepSeek-MoE 16B's MoE layer: 64 routed experts of FFN 1408, top-6, shared width 2816
FINE_16B = (
    "--tokens 16384 --hidden 2048 --ffn 1408 --experts 64 --topk 6 --shared-ffn 2816"
    " --iters 10 --warmup 3"
)
FINE_TOY = (
    "--tokens 64 --hidden 64 --ffn 32 --experts 8 --topk 4 --shared-ffn 64 --iters 1 --warmup 0"
)
MOE_ONLY = ("ours", "ours-eager", "ceiling", "gemm-chain")
FINE_ONLY = ("ours", "ours-eager", "hf-deepseek-v3", "hf-qwen2-moe", "ceiling", "ceiling-wide")
PROXY_8X7B = (
    "--model 8x7b --num-layers 2 --seq-length 4096 --micro-batch-size 1 --global-batch-size 8"
    " --train-iters 8 --log-interval 1 --eval-iters 0 --mock-data --vocab-size 32000 --bf16"
    " --lr 1e-4 --lr-warmup-iters 0 --seed 1"
)
# DeepSeek-MoE 16B's first (dense) layer and one MoE layer, vocabulary 102400
PROXY_16B = (
    "--model deepseek-moe-16b --num-layers 2 --moe-layer-freq [0]*1+[1]*1 --seq-length 4096"
    " --micro-batch-size 1 --global-batch-size 8 --train-iters 8 --log-interval 1 --eval-iters 0"
    " --mock-data --vocab-size 102400 --bf16 --lr 1e-4 --lr-warmup-iters 0 --seed 1"
)
PROXY_TOY = (
    "--model tiny --seq-length 64 --micro-batch-size 2 --global-batch-size 4 --train-iters 3"
    " --log-interval 1 --eval-iters 0 --mock-data --vocab-size 1000 --bf16 --lr 1e-4 --seed 1"
)


def use_wheelhouse(directory: str) -> str:
    """Install the wheels of ``directory`` into a temporary target and import from there."""
    target = os.path.join(tempfile.gettempdir(), "megatron-mixtral-site")
    wheels = sorted(glob.glob(os.path.join(directory, "*.whl")))
    if not wheels:
        raise SystemExit(f"gpu_check: no wheels in {directory} (bash bench/gpu_wheelhouse.sh)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--no-compile", "--upgrade", "--target", target, *wheels],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = os.pathsep.join([target, REPO, os.environ.get("PYTHONPATH", "")])
    return target


# ------------------------------------------------------------------------------------- parts
def environment() -> list[str]:
    import torch

    lines = [
        f"- GPU: {torch.cuda.get_device_name()} (compute capability "
        f"{'.'.join(map(str, torch.cuda.get_device_capability()))}, "
        f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}",
    ]
    from megatron_ext.fallback_kernels import fp32_accumulation

    lines.append(
        "- weight gradients accumulate in fp32 inside cuBLAS (`addmm` with `out_dtype`): "
        f"{'yes' if fp32_accumulation(torch.cuda.current_device()) else 'no (this PyTorch)'}"
    )
    for name in ("megatron.core", "transformer_engine"):
        try:
            module = importlib.import_module(name)
            lines.append(f"- {name} {getattr(module, '__version__', '(version unknown)')}")
        except ImportError as e:
            lines.append(f"- {name}: not importable ({e})")
    return lines


def gpu_tests() -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
         os.path.join(REPO, "tests", "test_gpu.py")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    lines = [f"- `pytest -m gpu tests/test_gpu.py`: {tail[0]} (exit {proc.returncode})"]
    if proc.returncode not in (0, 5):  # 5: nothing collected (no GPU in a rehearsal)
        lines += ["", "```", *proc.stdout.strip().splitlines()[-30:], "```"]
    return lines


def moe_layer(shapes: str, only: tuple[str, ...] = MOE_ONLY) -> list[str]:
    import importlib.util as iu

    spec = iu.spec_from_file_location("moe_layer", os.path.join(REPO, "bench", "moe_layer.py"))
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = f"--device cuda --dtype bf16 {shapes} --only {' '.join(only)}".split()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            bench.main(argv)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()  # the training proxy sets up its own
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    notes = [f"- {line}" for line in err.getvalue().splitlines() if "not run" in line]
    return [f"`python bench/moe_layer.py {' '.join(argv)}`", "", *lines, *notes]


def training_proxy(flags: str, label: str) -> list[str]:
    """Run pretrain_mixtral in this process (one rank) and summarise its log lines."""
    import torch

    import pretrain_mixtral

    argv = flags.split()
    out = io.StringIO()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    with contextlib.redirect_stdout(out):
        losses = pretrain_mixtral.run(argv)
    wall = time.time() - start
    rows = [line for line in out.getvalue().splitlines() if line.startswith("iter ")]
    timed = rows[2:] or rows  # the first iterations include allocation and warm-up
    from megatron_ext.metrics import parse_line

    parsed = [parse_line(row) for row in timed]
    summary = {}
    for name in ("tokens/s", "TFLOP/s/device", "MFU", "step ms", "lm loss"):
        values = [p[name] for p in parsed if name in p]
        if values:
            summary[name] = statistics.median(values)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    cells = " | ".join(f"{k} {v:.4g}" for k, v in summary.items())
    notes = [line for line in out.getvalue().splitlines() if line.startswith("note:")]
    return [
        f"- {label}: `python pretrain_mixtral.py {flags}`",
        f"  - median of iterations 3-{len(rows)}: {cells}",
        f"  - losses {[round(x, 3) for x in losses]}, peak memory {peak_mem:.1f} GiB, "
        f"{wall:.0f} s in all",
        *[f"  - {n}" for n in notes],
    ]


def _part(title: str, fn, *args) -> list[str]:
    start = time.time()
    try:
        body = fn(*args)
    except Exception as e:  # one failing part must not hide the others
        body = [f"- FAILED: {type(e).__name__}: {str(e)[-2000:]}"]
    return [f"## {title} ({time.time() - start:.0f} s)", "", *body, ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", help="also write the report (markdown) to this file")
    p.add_argument("--wheelhouse", help="install these wheels first (bench/gpu_wheelhouse.sh)")
    p.add_argument("--rehearse", action="store_true", help="toy sizes (CI, under GPU rules)")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to "
              "check. Run it on a machine with one GPU.")  # fmt: skip
        return 0
    if a.wheelhouse:
        use_wheelhouse(a.wheelhouse)
    if importlib.util.find_spec("megatron.core") is None:
        print("gpu_check: Megatron-Core is not importable; carry a wheelhouse (bash "
              "bench/gpu_wheelhouse.sh) and pass --wheelhouse .whl", file=sys.stderr)  # fmt: skip
        return 2
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    impl = "--transformer-impl transformer_engine" if _has_te() else "--transformer-impl local"
    toy = a.rehearse
    proxy = PROXY_TOY if toy else PROXY_8X7B
    proxy_16b = PROXY_TOY.replace("--model tiny", "--model tiny-deepseek") if toy else PROXY_16B
    parts = [
        ("Environment", environment),
        ("GPU tests", gpu_tests),
        ("MoE layer, bf16", moe_layer, MOE_TOY if toy else MOE_8X7B),
        ("Fine-grained MoE layer (DeepSeek-MoE 16B shapes), bf16", moe_layer,
         FINE_TOY if toy else FINE_16B, FINE_ONLY),
        ("Training proxy, bf16", training_proxy, f"{proxy} {impl}", "bf16"),
        ("Training proxy, DeepSeek-MoE 16B layers, bf16", training_proxy,
         f"{proxy_16b} {impl}", "bf16, first layer dense, second fine-grained MoE"),
    ]  # fmt: skip
    if _has_te():
        fp8 = f"{proxy} {impl} --fp8-format hybrid --fp8-recipe delayed"
        parts.append(("Training proxy, FP8", training_proxy, fp8, "fp8 (hybrid, delayed)"))
    report = ["# GPU check", ""]
    for title, fn, *args in parts:
        # each part is printed and written as soon as it ends: a run cut short keeps the rest
        report += _part(title, fn, *args)
        _publish(report, a.report)
    if not _has_te():
        report += ["## Training proxy, FP8", "", "- skipped: Transformer Engine not importable", ""]
    text = _publish(report, a.report)
    print(text, flush=True)
    import torch.distributed as dist

    if dist.is_initialized():  # the proxies' group (NCCL warns at exit otherwise)
        dist.destroy_process_group()
    return 1 if "FAILED" in text else 0


def _publish(report: list[str], path: str | None) -> str:
    text = "\n".join(report)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(f"gpu_check: {report[-1] if report[-1] else report[-2]}", file=sys.stderr, flush=True)
    return text


def _has_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


if __name__ == "__main__":
    sys.exit(main())
