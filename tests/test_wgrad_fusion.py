"""Gradient accumulation fusion (Megatron-LM's default; --no-gradient-accumulation-fusion turns
it off): weight gradients are added straight into DDP's main_grad, by Megatron-Core's linear
layers (through fallback_kernels.WgradAccumulation where apex is absent) and by our experts.
The gradients must be exactly what autograd plus DDP's hook would have accumulated."""

import pytest
import torch

from megatron_ext import fallback_kernels
from megatron_ext.moe.experts import _LoopExperts
from megatron_ext.multirank import run_on_ranks


def test_wgrad_accumulation_adds_the_weight_gradient_in_place():
    g = torch.Generator().manual_seed(0)
    x_TI, dy_TO = torch.randn(10, 6, generator=g), torch.randn(10, 4, generator=g)
    main_grad = torch.randn(4, 6, generator=g)
    want = main_grad + dy_TO.t() @ x_TI
    ptr = main_grad.data_ptr()
    fallback_kernels.WgradAccumulation.wgrad_gemm_accum_fp32(x_TI, dy_TO, main_grad)
    torch.testing.assert_close(main_grad, want, rtol=1e-6, atol=1e-6)
    assert main_grad.data_ptr() == ptr


def test_half_precision_operands_accumulate_like_ddps_hook():
    """bf16 layers, fp32 main_grad: the bf16 product added in (what the unfused layer's grad
    plus DDP's ``main_grad.add_(grad)`` gives)."""
    g = torch.Generator().manual_seed(2)
    x_TI = torch.randn(10, 6, generator=g).bfloat16()
    dy_TO = torch.randn(10, 4, generator=g).bfloat16()
    main_grad = torch.randn(4, 6, generator=g)
    want = main_grad.clone().add_(dy_TO.t().matmul(x_TI))
    fallback_kernels.WgradAccumulation.wgrad_gemm_accum_fp16(x_TI, dy_TO, main_grad)
    assert main_grad.dtype == torch.float32
    torch.testing.assert_close(main_grad, want, rtol=0, atol=0)


def _half_operands_on_cuda():
    from megatron_ext import gpu_rules

    g = torch.Generator().manual_seed(2)
    x_TI = torch.randn(64, 48, generator=g).bfloat16()
    dy_TO = torch.randn(64, 32, generator=g).bfloat16()
    main_grad = torch.randn(32, 48, generator=g)
    fp32 = main_grad + dy_TO.float().t() @ x_TI.float()
    half = main_grad + (dy_TO.t() @ x_TI).float()
    on_gpu = main_grad.cuda()
    ptr = on_gpu.data_ptr()
    fallback_kernels.WgradAccumulation.wgrad_gemm_accum_fp32(x_TI.cuda(), dy_TO.cuda(), on_gpu)
    assert on_gpu.data_ptr() == ptr
    got = gpu_rules.plain(on_gpu)
    return float((got - fp32).abs().max()), float((got - half).abs().max())


def test_half_precision_operands_accumulate_in_fp32_on_cuda():
    """On CUDA the bf16 product accumulates in fp32 inside the GEMM (cuBLAS, beta = 1), as
    apex's wgrad_gemm_accum_fp32 does: no bf16-rounded gradient in between (before, the
    bf16 product was added in, a second pass over main_grad: 18% of the first H200 run's
    kernel time)."""
    to_fp32, to_half = run_on_ranks(_half_operands_on_cuda, 1, gpu_rules=True)[0]
    assert to_fp32 < 1e-4, (to_fp32, to_half)  # fp32 rounding only
    assert to_half > 1e-2, (to_fp32, to_half)  # the bf16-rounded product differs


def test_megatron_linear_layers_accept_the_fusion_without_apex(monkeypatch):
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    assert fallback_kernels.use_wgrad_accumulation()
    assert layers.fused_weight_gradient_mlp_cuda is fallback_kernels.WgradAccumulation


@pytest.mark.parametrize("splits", [(5, 0, 7), (3, 4, 2)])  # an expert without rows
def test_fused_expert_wgrads_equal_autograd_plus_ddps_add(splits):
    g = torch.Generator().manual_seed(1)
    L, H, F = 3, 8, 6
    x = torch.randn(sum(splits), H, generator=g)
    dy = torch.randn(sum(splits), H, generator=g)
    w13 = torch.nn.Parameter(torch.randn(L, 2 * F, H, generator=g) * 0.3)
    w2 = torch.nn.Parameter(torch.randn(L, H, F, generator=g) * 0.3)

    x_ref = x.clone().requires_grad_()
    _LoopExperts.apply(x_ref, w13, w2, splits).backward(dy)
    grads = w13.grad.clone(), w2.grad.clone()
    w13.grad = w2.grad = None

    earlier = [torch.randn(p.shape, generator=g) for p in (w13, w2)]  # micro-batches before
    for p, e in zip((w13, w2), earlier, strict=True):
        p.main_grad, p.grad_added_to_main_grad = e.clone(), False
    x_fused = x.clone().requires_grad_()
    _LoopExperts.apply(x_fused, w13, w2, splits, True).backward(dy)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=0, atol=0)
    for p, e, grad in zip((w13, w2), earlier, grads, strict=True):
        torch.testing.assert_close(p.main_grad, e + grad, rtol=1e-6, atol=1e-6)
        assert p.grad_added_to_main_grad  # DDP's hook will not add the placeholder


COMMON = (
    "--cpu --model tiny --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 8 --attention-dropout 0 --hidden-dropout 0 --eval-iters 0"
    " --moe-aux-loss-coeff 1e-2 --log-interval 1 --seed 7 --lr 3e-3 --train-iters 3"
    " --expert-model-parallel-size 2 --use-distributed-optimizer"
)


def _run(argv):
    import contextlib
    import io

    import pretrain_mixtral

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain_mixtral.run(argv)
    return out.getvalue()


def _losses_and_norms(text):
    from megatron_ext.metrics import parse_line

    rows = [parse_line(x) for x in text.splitlines() if x.startswith("iter ")]
    return [(r["lm loss"], r["grad norm"]) for r in rows]


def test_training_with_and_without_the_fusion_is_the_same():
    """4 micro-batches per step (accumulated into main_grad), EP2 x DP2: equal losses and
    gradient norms (a missing or doubled addition anywhere shows in the norm; Adam alone
    would hide a scale error)."""
    fused = _losses_and_norms(run_on_ranks(_run, 2, args=(COMMON.split(),), timeout=300)[-1])
    plain_argv = (COMMON + " --no-gradient-accumulation-fusion").split()
    plain = _losses_and_norms(run_on_ranks(_run, 2, args=(plain_argv,), timeout=300)[-1])
    assert len(fused) == len(plain) == 3
    flat = [v for pair in fused for v in pair]
    assert flat == pytest.approx([v for pair in plain for v in pair], rel=1e-4)
