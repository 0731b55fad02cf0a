"""The combine's weighted sum and the dispatch's backward (``megatron_ext/moe/unpermute.py``).

* forward and backward, on the CPU path (``embedding_bag``) and in the CUDA form, equal the
  formula written here in float64 (``out[t] = sum_k p[t, k] y[pos[t, k]]`` and its autograd;
  the dispatch's backward ``dx[t] = sum_k g[pos[t, k]]``);
* each CUDA form compiles to ONE Inductor kernel (Inductor's C++ backend here, Triton
  on a GPU; a materialised fp32 copy would be a second kernel) and equals its eager self;
* the layer takes the compiled form on CUDA (under the GPU rules, EP 1 and 2) and never on the
  CPU.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ext.moe import unpermute
from megatron_ext.multirank import run_on_ranks


def _routing(tokens=48, k=6, experts=16, seed=0):
    """``(pos_TK, token_N, sorted_pair_N)`` of a random routing, sorted by expert as dispatch
    sorts it (stable)."""
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    sorted_pair_N = torch.sort(ids_TK.reshape(-1), stable=True).indices
    pos_TK = torch.empty_like(sorted_pair_N)
    pos_TK[sorted_pair_N] = torch.arange(sorted_pair_N.numel())
    return pos_TK.view(tokens, k), sorted_pair_N // k, sorted_pair_N


def _inputs(dtype, tokens=48, k=6, hidden=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y_NH = torch.randn(tokens * k, hidden, generator=g).to(dtype)
    probs_TK = torch.rand(tokens, k, generator=g)
    dout_TH = torch.randn(tokens, hidden, generator=g).to(dtype)
    return y_NH, probs_TK, dout_TH, *_routing(tokens, k, seed=seed)


def _reference(y_NH, probs_TK, dout_TH, pos_TK):
    """The formula in float64: ``out[t] = sum_k p[t, k] * y[pos[t, k]]``, and autograd of it."""
    y = y_NH.double().requires_grad_()
    p = probs_TK.double().requires_grad_()
    out = sum(p[:, k, None] * y[pos_TK[:, k]] for k in range(pos_TK.shape[1]))
    out.backward(dout_TH.double())
    return out, y.grad, p.grad


def _cuda_form(y_NH, probs_TK, dout_TH, pos_TK, token_N, sorted_pair_N, compile_=False):
    fwd, bwd = unpermute.weighted_sum, unpermute.weighted_sum_backward
    if compile_:
        fwd, bwd = (torch.compile(f, fullgraph=True) for f in (fwd, bwd))
    out = fwd(y_NH, pos_TK, probs_TK)
    dy_NH, dprob_N = bwd(dout_TH, y_NH, probs_TK.reshape(-1)[sorted_pair_N], token_N)
    return out, dy_NH, dprob_N[pos_TK.reshape(-1)].view_as(probs_TK)


def _cpu_path(y_NH, probs_TK, dout_TH, pos_TK, token_N, sorted_pair_N):
    y, p = y_NH.clone().requires_grad_(), probs_TK.clone().requires_grad_()
    out = unpermute.WeightedUnpermute.apply(y, p, pos_TK, token_N, sorted_pair_N)
    out.backward(dout_TH)
    return out, y.grad, p.grad


# bf16 results are rounded once from fp32 math: within one bf16 unit (2^-8 relative)
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", [_cpu_path, _cuda_form], ids=["cpu", "cuda-form"])
def test_weighted_sum_and_its_gradients_equal_the_formula(path, dtype):
    inputs = _inputs(dtype)
    got = path(*inputs)
    want = _reference(*inputs[:3], inputs[3])
    assert [t.dtype for t in got] == [dtype, dtype, torch.float32]  # dprobs stay fp32
    for name, a, b in zip(("out", "dy", "dprobs"), got, want, strict=True):
        rel = float((a.double() - b).abs().max() / b.abs().max())
        assert rel < TOLERANCE[dtype], (name, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn", [unpermute.sum_copies, unpermute.rows_sum], ids=["cpu", "cuda-form"])
def test_the_dispatch_backward_sums_the_copies_of_each_token(fn, dtype):
    g_NH, _, _, pos_TK, _, _ = _inputs(dtype, seed=2)
    want = sum(g_NH.double()[pos_TK[:, k]] for k in range(pos_TK.shape[1]))
    got = fn(g_NH, pos_TK)
    assert got.dtype == dtype
    assert float((got.double() - want).abs().max() / want.abs().max()) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_cuda_form_is_one_inductor_kernel_each_way(dtype):
    from torch._inductor import metrics

    inputs = _inputs(dtype, seed=1)
    kernels = []
    for fn, args in (
        (unpermute.weighted_sum, (inputs[0], inputs[3], inputs[1])),
        (
            unpermute.weighted_sum_backward,
            (inputs[2], inputs[0], inputs[1].reshape(-1)[inputs[5]], inputs[4]),
        ),
        (unpermute.rows_sum, (inputs[0], inputs[3])),
    ):
        torch._dynamo.reset()
        metrics.reset()
        torch.compile(fn, fullgraph=True)(*args)
        kernels.append(metrics.generated_kernel_count)
    assert kernels == [1, 1, 1]
    eager, compiled = _cuda_form(*inputs), _cuda_form(*inputs, compile_=True)
    for a, b in zip(compiled, eager, strict=True):
        rel = float((a.double() - b.double()).abs().max() / b.double().abs().max())
        assert rel < TOLERANCE[dtype], rel  # summation order may differ


def _layer_compiled_calls(ep, device):
    """The functions the layer's combine compiled, forward and backward, on ``device``."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.moe import SMoELayer

    calls = []

    def recorder(fn):
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)

        return run

    unpermute._compiled = recorder  # this rank's process only
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    if device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = TransformerConfig(
        num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_moe_experts=4, moe_router_topk=2, add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, bf16=device == "cuda", params_dtype=dtype,
        expert_model_parallel_size=ep, use_cpu_initialization=device == "cpu",
    )  # fmt: skip
    layer = SMoELayer(config).to(device)
    x = torch.randn(16, 2, 64, device=device, dtype=dtype, requires_grad=True)
    layer(x)[0].float().sum().backward()
    return calls


@pytest.mark.parametrize("ep", [1, 2])
def test_the_layer_combines_with_the_compiled_form_on_cuda(ep):
    for calls in run_on_ranks(_layer_compiled_calls, ep, args=(ep, "cuda"), gpu_rules=True):
        # the combine's forward and backward, then the dispatch's backward
        assert calls == ["weighted_sum", "weighted_sum_backward", "rows_sum"], calls


def test_the_layer_never_compiles_on_the_cpu():
    assert run_on_ranks(_layer_compiled_calls, 2, args=(2, "cpu")) == [[], []]


def test_without_a_usable_triton_the_cuda_form_runs_eagerly(monkeypatch):
    import torch.utils._triton as triton_probe

    compile_ = unpermute._compiled.__wrapped__  # the uncached function
    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    assert compile_(unpermute.rows_sum) is unpermute.rows_sum
    monkeypatch.setattr(triton_probe, "has_triton", lambda: True)
    compiled = compile_(unpermute.rows_sum)  # a Dynamo wrapper (run in the kernel test)
    assert compiled is not unpermute.rows_sum
    assert getattr(compiled, "_torchdynamo_orig_callable", None) is unpermute.rows_sum
