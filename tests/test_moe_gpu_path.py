"""The SMoE layer's GPU path under the GPU rules: grouped GEMM choice, host syncs, the benchmark.

* ``torch._grouped_mm`` is taken only where CUDA's kernel runs it (bf16, sm90, 16-byte
  strides), and for every expert shape we build it passes the CUDA rules (checked on the meta
  device, where PyTorch implements them);
* a layer forward and backward synchronises with the host exactly once (the split sizes);
* ``bench/moe_layer.py --device cuda`` builds every contender.
"""

import contextlib
import importlib.util
import io
import os

import pytest
import torch

from megatron_ext.model.presets import PRESETS
from megatron_ext.multirank import MultiRankError, run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experts(ffn, dtype_name, splits=(8, 0, 16, 8)):
    """expert_mlp on the device vs the loop; which grouped-GEMM path ran; host syncs."""
    from megatron_ext import gpu_rules
    from megatron_ext.moe.experts import _LoopExperts, expert_mlp

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    h, m = 64, sum(splits)
    x = torch.randn(m, h, device="cuda", dtype=dtype, requires_grad=True)
    w13 = (torch.randn(len(splits), 2 * ffn, h, device="cuda", dtype=dtype) * 0.1).requires_grad_()
    w2 = (torch.randn(len(splits), h, ffn, device="cuda", dtype=dtype) * 0.1).requires_grad_()
    splits_l = torch.tensor(splits, device="cuda")
    rules = gpu_rules.rules()
    rules.reset_counters()
    y = expert_mlp(x, w13, w2, splits, splits_l)
    grads = torch.autograd.grad(y.float().square().sum(), (x, w13, w2))
    paths = dict(rules.grouped_mm)
    y_ref = _LoopExperts.apply(x, w13, w2, splits)
    grads_ref = torch.autograd.grad(y_ref.float().square().sum(), (x, w13, w2))
    diffs = [
        float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))
        for a, b in zip((y, *grads), (y_ref, *grads_ref), strict=True)
    ]
    return paths, diffs


def test_grouped_gemm_runs_in_bf16_on_hopper_and_equals_the_loop():
    paths, diffs = run_on_ranks(_experts, 1, args=(128, "bfloat16"), gpu_rules=True)[0]
    assert paths == {"fast": 6}  # 2 forward GEMMs, 4 backward (dx and dw of each)
    assert max(diffs) < 2e-2, diffs  # bf16 rounding, one zero-row expert included


def _fused_wgrad(recompute, splits=(8, 0, 16, 8)):
    """expert_mlp with gradient accumulation fusion against the unfused grouped path."""
    from megatron_ext import gpu_rules
    from megatron_ext.moe.experts import expert_mlp

    torch.manual_seed(0)
    h, f, m = 64, 128, sum(splits)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, h, **bf16, requires_grad=True)
    w13 = (torch.randn(len(splits), 2 * f, h, **bf16) * 0.1).requires_grad_()
    w2 = (torch.randn(len(splits), h, f, **bf16) * 0.1).requires_grad_()
    splits_l = torch.tensor(splits, device="cuda")
    dy = torch.randn(m, h, **bf16)
    y_ref = expert_mlp(x, w13, w2, splits, splits_l)  # autograd's grouped GEMMs, bf16 grads
    ref = torch.autograd.grad(y_ref, (x, w13, w2), dy)
    before = [torch.randn(w.shape, device="cuda") for w in (w13, w2)]  # earlier micro-batches
    w13.main_grad, w2.main_grad = (b.clone() for b in before)
    rules = gpu_rules.rules()
    rules.reset_counters()
    y = expert_mlp(x, w13, w2, splits, splits_l, fuse_wgrad=True, recompute_act=recompute)
    y.backward(dy)
    paths, syncs = dict(rules.grouped_mm), dict(rules.syncs)
    added = [w.main_grad - b for w, b in zip((w13, w2), before, strict=True)]
    rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
    return dict(
        y=rel(y, y_ref), dx=rel(x.grad, ref[0]), dw13=rel(added[0], ref[1]),
        dw2=rel(added[1], ref[2]), paths=paths, syncs=syncs,
        empty_expert_untouched=all(bool(w.main_grad[1].eq(b[1]).all())
                                   for w, b in zip((w13, w2), before, strict=True)),
        flagged=(w13.grad_added_to_main_grad, w2.grad_added_to_main_grad),
    )  # fmt: skip


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_weight_gradients_go_into_main_grad_on_the_grouped_path(recompute):
    """Gradient accumulation fusion on the grouped path: the forward and the input gradients are
    the grouped GEMMs (4 of them), each expert's weight gradient is added into main_grad by one
    GEMM (fp32 accumulation), equal to autograd's bf16 weight gradients to bf16 rounding; an
    expert without rows keeps its main_grad; DDP's hook is told not to add again."""
    got = run_on_ranks(_fused_wgrad, 1, args=(recompute,), gpu_rules=True)[0]
    assert got["paths"] == {"fast": 4}, got
    assert got["syncs"] == {}, got
    assert got["y"] == 0.0 and got["dx"] == 0.0, got  # the same GEMMs as autograd's
    assert got["dw13"] < 1e-2 and got["dw2"] < 1e-2, got  # bf16 vs fp32 accumulation
    assert got["empty_expert_untouched"] and got["flagged"] == (True, True), got


@pytest.mark.parametrize(
    "ffn,dtype,device",
    [
        (132, "bfloat16", "H100_SXM"),  # F % 8 == 4: GEMM 2's strides are not 16-byte aligned
        (128, "float16", "H100_SXM"),  # fp16: PyTorch's slow per-group fallback
        (128, "bfloat16", "B200"),  # sm100: wrong grads for empty groups (pytorch#172439)
        (128, "bfloat16", "A100"),  # no kernel before sm90
    ],
)
def test_grouped_gemm_is_not_chosen_where_cuda_would_refuse_or_crawl(ffn, dtype, device):
    from megatron_ext import gpu_rules

    spec = getattr(gpu_rules, device)
    paths, diffs = run_on_ranks(_experts, 1, args=(ffn, dtype), gpu_rules=spec)[0]
    assert paths == {}, paths  # the loop ran: no grouped GEMM, no fallback
    assert max(diffs) == 0.0


def _grouped_mm_on_meta(hidden, ffn_shard, local_experts):
    """Our fast path's forward and backward GEMMs on meta tensors (CUDA's rules, no memory)."""
    from megatron_ext.moe.experts import _grouped_mm, swiglu

    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(64 * local_experts, hidden, **meta, requires_grad=True)
    w13 = torch.empty(local_experts, 2 * ffn_shard, hidden, **meta, requires_grad=True)
    w2 = torch.empty(local_experts, hidden, ffn_shard, **meta, requires_grad=True)
    splits = torch.full((local_experts,), 64, dtype=torch.long, device="meta")
    y = _grouped_mm(swiglu(_grouped_mm(x, w13, splits)), w2, splits)
    y.backward(torch.empty_like(y))  # contiguous, as the combine's backward hands it over


SHAPES = [
    (name, etp)
    for name, arch in PRESETS.items()
    for etp in (1, 2, 4, 8)
    if arch.expert_ffn % etp == 0
]


@pytest.mark.parametrize("name,etp", SHAPES)
def test_every_expert_shape_we_build_passes_cuda_grouped_gemm_rules(name, etp):
    from megatron_ext.moe.experts import grouped_mm_eligible

    arch = PRESETS[name]
    ffn_shard = arch.expert_ffn // etp
    assert grouped_mm_eligible(torch.bfloat16, (9, 0), arch.hidden_size, ffn_shard)
    _grouped_mm_on_meta(arch.hidden_size, ffn_shard, max(arch.num_experts // 8, 1))


def test_the_meta_check_refuses_what_the_guard_keeps_off_the_grouped_path():
    from megatron_ext.moe.experts import grouped_mm_eligible

    assert not grouped_mm_eligible(torch.bfloat16, (9, 0), 4096, 14336 // 8 + 4)
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        _grouped_mm_on_meta(4096, 14336 // 8 + 4, 2)


def _layer_syncs(ep):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext import gpu_rules
    from megatron_ext.moe import SMoELayer

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_moe_experts=4, moe_router_topk=2, add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, moe_aux_loss_coeff=1e-2, bf16=True,
        params_dtype=torch.bfloat16, expert_model_parallel_size=ep,
    )  # fmt: skip
    layer = SMoELayer(config)
    x = torch.randn(16, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rules = gpu_rules.rules()
    rules.reset_counters()
    out, _ = layer(x)
    forward = dict(rules.syncs)
    out.float().sum().backward()
    return forward, dict(rules.syncs), dict(rules.grouped_mm)


@pytest.mark.parametrize("ep", [1, 2])
def test_a_layer_syncs_with_the_host_once(ep):
    for forward, total, paths in run_on_ranks(_layer_syncs, ep, args=(ep,), gpu_rules=True):
        assert forward == {"tolist": 1}, forward  # the split sizes; no bincount syncs
        assert total == forward  # backward: none
        assert paths == {"fast": 6}


def _bench(argv):
    spec = importlib.util.spec_from_file_location(
        "moe_layer", os.path.join(REPO, "bench/moe_layer.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        bench.main(argv)
    return out.getvalue(), err.getvalue()


def test_moe_benchmark_builds_every_contender_on_cuda():
    argv = (
        "--device cuda --dtype bf16 --tokens 64 --hidden 64 --ffn 128 --experts 4 --iters 1 "
        "--warmup 0 --only ours ours-eager megatron-core ceiling"
    ).split()
    out, err = run_on_ranks(_bench, 1, args=(argv,), gpu_rules=True, timeout=300)[0]
    assert "not run" not in err, err
    for row in ("| ours |", "| ours-eager |", "| megatron-core |", "| ceiling |"):
        assert row in out, out


def test_rules_catch_a_misaligned_grouped_gemm_in_the_layer():
    """Without the F % 8 guard the layer would call the grouped GEMM with F = 132 and CUDA
    would refuse it; the rules make that refusal visible on CPU."""
    with pytest.raises(MultiRankError, match="multiple of 16 bytes"):
        run_on_ranks(_misaligned_grouped_mm, 1, gpu_rules=True)


def _misaligned_grouped_mm():
    from megatron_ext.moe.experts import _grouped_mm, swiglu

    dt = dict(device="cuda", dtype=torch.bfloat16)
    x, w13 = torch.randn(16, 64, **dt), torch.randn(2, 264, 64, **dt)
    w2, splits = torch.randn(2, 64, 132, **dt), torch.tensor([8, 8], device="cuda")
    _grouped_mm(swiglu(_grouped_mm(x, w13, splits)), w2, splits)


DESIGNS = {  # the issue-13 options, each path with its tensors made on the device
    "shared-groups-capacity-seq": dict(
        moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True,
        moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.0,
        moe_router_load_balancing_type="seq_aux_loss", moe_expert_capacity_factor=1.0,
        moe_pad_expert_input_to_capacity=True, moe_router_dtype="fp64",
        bias_activation_fusion=True,  # the shared experts' SwiGLU: Megatron's fused one
    ),
    "global-aux-forced-bias": dict(
        moe_router_load_balancing_type="global_aux_loss", moe_router_force_load_balancing=True,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    ),
}  # fmt: skip


def _design_layer_on_device(options):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.gpu_rules import is_device
    from megatron_ext.moe import SMoELayer

    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_moe_experts=8, moe_router_topk=4, moe_ffn_hidden_size=32, add_bias_linear=False,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        moe_aux_loss_coeff=1e-2, bf16=True, params_dtype=torch.bfloat16,
        expert_model_parallel_size=2, **options,
    )  # fmt: skip
    # .cuda() as engine.setup_model_and_optimizer does: Megatron's SharedExpertMLP makes its
    # gate weight on the host whatever the config says (a TODO in Megatron-Core 0.16.1).
    layer = SMoELayer(config, layer_number=1).cuda()
    x = torch.randn(16, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = layer(x)
    out.float().sum().backward()
    params = [p for p in layer.parameters() if p.grad is not None]
    return is_device(out), is_device(x.grad), all(is_device(p.grad) for p in params), len(params)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_design_options_keep_to_the_gpu_rules(design):
    """Shared experts, group-limited routing, capacity with padding, the seq/global aux losses
    (the latter all-reduces its counts over DP), forced balancing and the expert bias on 2 EP
    ranks with the GPU rules: no host tensor reaches a device op or an NCCL collective."""
    for result in run_on_ranks(_design_layer_on_device, 2, args=(DESIGNS[design],),
                               gpu_rules=True):  # fmt: skip
        assert result[:3] == (True, True, True) and result[3] >= 3
