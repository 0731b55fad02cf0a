"""Checks that need a real CUDA GPU (``pytest -m gpu``; ``bench/gpu_check.py`` runs them).

Each check is a plain function run twice: on the GPU (marked ``gpu``, skipped without CUDA) at
realistic sizes, and, in every CI run, in a rank under the GPU rules at small sizes
(``megatron_ext.gpu_rules``) so that the checks themselves are known to work before a GPU is
lent to run them.

* the grouped GEMM path of the experts equals the loop in bf16, forward and backward;
* with gradient accumulation fusion, its weight gradients added into fp32 ``main_grad``
  expert by expert equal autograd's bf16 weight gradients (and whether this PyTorch's cuBLAS
  path with fp32 accumulation ran);
* the combine's weighted sum compiled by Inductor (Triton) equals the CPU's ``embedding_bag``
  path, forward and backward, and really was compiled;
* the expert-parallel all-to-all and count all-gather work over NCCL (world size 1);
* one training step, a save, and a resume that continues with the same loss.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_ext.multirank import free_port, run_on_ranks

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def grouped_gemm_equals_loop(hidden: int, ffn: int, splits: tuple[int, ...]) -> list[float]:
    """Relative max differences (y, dx, dw13, dw2) of the grouped path against the loop."""
    from megatron_ext.moe.experts import _LoopExperts, _use_torch_grouped_mm, expert_mlp

    torch.manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(sum(splits), hidden, **dev, requires_grad=True)
    w13 = (torch.randn(len(splits), 2 * ffn, hidden, **dev) * hidden**-0.5).requires_grad_()
    w2 = (torch.randn(len(splits), hidden, ffn, **dev) * ffn**-0.5).requires_grad_()
    assert _use_torch_grouped_mm(x, w13, w2), "the grouped GEMM path was not chosen"
    dy = torch.randn(sum(splits), hidden, **dev)
    y = expert_mlp(x, w13, w2, splits, torch.tensor(splits, device="cuda"))
    got = (y, *torch.autograd.grad(y, (x, w13, w2), dy))
    y_ref = _LoopExperts.apply(x, w13, w2, splits)
    want = (y_ref, *torch.autograd.grad(y_ref, (x, w13, w2), dy))
    return [
        float((a.float() - b.float()).abs().max() / b.float().abs().max())
        for a, b in zip(got, want, strict=True)
    ]


def fused_wgrad_equals_autograd(hidden: int, ffn: int, splits: tuple[int, ...]):
    """Relative max differences (dx, dw13, dw2) of the fused path (weight gradients into
    ``main_grad``) against autograd's grouped GEMMs, and whether fp32 accumulation ran."""
    from megatron_ext.fallback_kernels import fp32_accumulation
    from megatron_ext.moe.experts import expert_mlp

    torch.manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(sum(splits), hidden, **dev, requires_grad=True)
    w13 = (torch.randn(len(splits), 2 * ffn, hidden, **dev) * hidden**-0.5).requires_grad_()
    w2 = (torch.randn(len(splits), hidden, ffn, **dev) * ffn**-0.5).requires_grad_()
    splits_l = torch.tensor(splits, device="cuda")
    dy = torch.randn(sum(splits), hidden, **dev)
    want = torch.autograd.grad(expert_mlp(x, w13, w2, splits, splits_l), (x, w13, w2), dy)
    w13.main_grad = torch.zeros(w13.shape, device="cuda")
    w2.main_grad = torch.zeros(w2.shape, device="cuda")
    expert_mlp(x, w13, w2, splits, splits_l, fuse_wgrad=True).backward(dy)
    got = (x.grad, w13.main_grad, w2.main_grad)
    diffs = [
        float((a.float() - b.float()).abs().max() / b.float().abs().max())
        for a, b in zip(got, want, strict=True)
    ]
    return diffs, fp32_accumulation(torch.cuda.current_device())


def compiled_combine_equals_cpu(tokens: int, k: int, hidden: int, experts: int):
    """Relative max differences (out, dy, dprobs, and the dispatch's backward) of the combine
    on this device (compiled on CUDA, ``unpermute.py``) against the CPU path on the same bf16
    rows, and the number of graphs Dynamo compiled for them (0 under the GPU rules, where
    compiled functions run eagerly)."""
    from torch._dynamo.utils import counters

    from megatron_ext.moe.unpermute import WeightedUnpermute, sum_copies

    torch.manual_seed(0)
    ids_TK = torch.rand(tokens, experts).topk(k, dim=-1).indices
    sorted_pair_N = torch.sort(ids_TK.reshape(-1), stable=True).indices
    pos_TK = torch.empty_like(sorted_pair_N)
    pos_TK[sorted_pair_N] = torch.arange(sorted_pair_N.numel())
    index = (pos_TK.view(tokens, k), sorted_pair_N // k, sorted_pair_N)
    y_NH = torch.randn(tokens * k, hidden, dtype=torch.bfloat16)
    probs_TK = torch.rand(tokens, k).softmax(dim=-1)
    dout_TH = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    results = []
    for device in ("cuda", "cpu"):
        y, p = (t.to(device).requires_grad_() for t in (y_NH, probs_TK))
        before = counters["stats"]["unique_graphs"]
        out = WeightedUnpermute.apply(y, p, *(i.to(device) for i in index))
        out.backward(dout_TH.to(device))
        dx_TH = sum_copies(y.grad, index[0].to(device))  # the dispatch's backward
        results.append([t.float().cpu() for t in (out, y.grad, p.grad, dx_TH)])
        if device == "cuda":
            graphs = counters["stats"]["unique_graphs"] - before
    diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results, strict=True)]
    return diffs, graphs


def nccl_all_to_all(rows: int, hidden: int) -> bool:
    """Our differentiable all-to-all and the count all-gather over a 1-rank NCCL group."""
    import torch.distributed as dist

    from megatron_ext.moe.dispatcher import all_to_all

    group = dist.new_group([0])
    x = torch.randn(rows, hidden, device="cuda", requires_grad=True)
    y = all_to_all(x, [rows], [rows], group)
    y.backward(torch.ones_like(y))
    counts = torch.arange(8, device="cuda")
    gathered = torch.empty(8, dtype=counts.dtype, device="cuda")
    dist.all_gather_into_tensor(gathered, counts, group=group)
    return bool(torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x)))


@pytest.mark.gpu
@requires_cuda
def test_grouped_gemm_equals_loop_on_cuda():
    diffs = grouped_gemm_equals_loop(4096, 1792, (512, 0, 300, 2000, 16, 1000, 64, 500))
    assert max(diffs) < 2e-2, diffs


def test_grouped_gemm_check_under_gpu_rules():
    diffs = run_on_ranks(grouped_gemm_equals_loop, 1, args=(64, 128, (8, 0, 24)), gpu_rules=True)
    assert max(diffs[0]) < 2e-2, diffs


@pytest.mark.gpu
@requires_cuda
def test_fused_weight_gradients_equal_autograd_on_cuda():
    diffs, fp32 = fused_wgrad_equals_autograd(4096, 1792, (512, 0, 300, 2000, 16, 1000, 64, 500))
    print(f"fused expert wgrad: fp32 accumulation in cuBLAS: {fp32}; rel. diffs {diffs}")
    assert diffs[0] == 0.0, diffs  # the same grouped GEMMs for dx
    assert max(diffs[1:]) < 1e-2, diffs  # fp32 vs bf16 accumulation of the weight gradients


def test_fused_wgrad_check_under_gpu_rules():
    diffs, fp32 = run_on_ranks(
        fused_wgrad_equals_autograd, 1, args=(64, 128, (8, 0, 24)), gpu_rules=True
    )[0]
    assert fp32 and diffs[0] == 0.0 and max(diffs[1:]) < 1e-2, (diffs, fp32)


@pytest.mark.gpu
@requires_cuda
def test_compiled_combine_equals_the_cpu_path_on_cuda():
    diffs, graphs = compiled_combine_equals_cpu(16384, 6, 2048, 64)  # DeepSeek-MoE 16B layer
    print(f"compiled combine: {graphs} graphs; rel. diffs {diffs}")
    assert graphs == 3, graphs  # the combine's forward and backward, the dispatch's backward
    assert max(diffs) < 2**-8, diffs  # bf16 results of fp32 math: one rounding apart at most


def test_compiled_combine_check_under_gpu_rules():
    diffs, graphs = run_on_ranks(
        compiled_combine_equals_cpu, 1, args=(32, 6, 64, 16), gpu_rules=True
    )[0]
    assert graphs == 0 and max(diffs) < 2**-8, (diffs, graphs)


@pytest.mark.gpu
@requires_cuda
def test_expert_all_to_all_over_nccl():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    assert nccl_all_to_all(4096, 4096)


def test_all_to_all_check_under_gpu_rules():
    assert run_on_ranks(nccl_all_to_all, 1, args=(16, 8), gpu_rules=True)[0]


TRAIN = (
    "--model tiny --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 8 --attention-dropout 0 --hidden-dropout 0 --eval-iters 0"
    " --log-interval 1 --seed 7 --lr 3e-3 --transformer-impl local --bf16"
)


def train_save_resume(tmp: str) -> tuple[list[float], list[float]]:
    """2 steps with a save after each, then a resume from step 1: the losses of both runs."""
    import contextlib
    import io

    import pretrain_mixtral

    runs = (
        f"--train-iters 2 --save {tmp}/ckpt --save-interval 1",
        f"--train-iters 2 --load {tmp}/ckpt/iter_0000001",
    )
    out = []
    for extra in runs:
        with contextlib.redirect_stdout(io.StringIO()):
            out.append(list(pretrain_mixtral.run(f"{TRAIN} {extra}".split())))
    return out[0], out[1]


@pytest.mark.gpu
@requires_cuda
def test_training_step_save_and_exact_resume_on_cuda(tmp_path):
    whole, resumed = train_save_resume(str(tmp_path))
    assert len(whole) == 2 and len(resumed) == 1
    assert resumed[0] == pytest.approx(whole[1], rel=1e-3)  # bf16; atomics in backward


def test_training_check_under_gpu_rules(tmp_path):
    whole, resumed = run_on_ranks(train_save_resume, 1, args=(str(tmp_path),), gpu_rules=True)[0]
    assert len(whole) == 2 and len(resumed) == 1
    assert resumed[0] == pytest.approx(whole[1], rel=1e-6)
