"""The SMoE layer on one process (no torch.distributed): exact references, HF, losses, stats."""

import pytest
import torch
import torch.nn.functional as F
from moe_reference import (
    load_full_weights,
    moe_config,
    random_weights,
    reference_aux_loss,
    reference_moe,
    reference_z_loss,
)

from megatron_ext.moe import SMoELayer, collect_moe_stats, set_aux_loss_scale

H, FFN = 16, 24
TOL = dict(rtol=1e-6, atol=1e-6)


def _close(ours, ref):
    torch.testing.assert_close(ours, ref.to(ours.dtype), **TOL)


def _layer(e=4, k=2, **cfg):
    return SMoELayer(moe_config(num_moe_experts=e, moe_router_topk=k, **cfg), layer_number=1)


def _skew(gate, kind):
    """Make routing skewed: 'skewed' favours expert 0, 'same' sends every token to 0 and 1."""
    gate = gate.clone()
    if kind == "skewed":
        gate[0, 0] += 1.5
    elif kind == "same":  # with x[..., 0] = 1: logits 4, 2.5, O(0.1); not saturated in fp32
        gate = gate * 0.05
        gate[:, 0] = 0.0
        gate[:2, 0] = torch.tensor([4.0, 2.5])
    return gate


def _inputs(seed, s=6, b=3, kind="random"):
    x = torch.randn(s, b, H, generator=torch.Generator().manual_seed(100 + seed))
    if kind == "same":
        x[..., 0] = 1.0  # with _skew(...,'same'): logits of experts 0, 1 dominate for all tokens
    return x


def _full_grads(layer):
    ex = layer.experts
    fs = ex.ffn_shard
    return layer.router.weight.grad, ex.w13.grad[:, :fs], ex.w13.grad[:, fs:], ex.w2.grad


def test_one_expert_top1_equals_dense_swiglu():
    layer = _layer(e=1, k=1, moe_router_pre_softmax=True)
    gate, w1, w3, w2 = random_weights(1, H, FFN, seed=7)
    load_full_weights(layer, gate, w1, w3, w2)
    x = _inputs(0)
    y, bias = layer(x)
    assert bias is None
    # Dense SwiGLU as Megatron's MLP (gated_linear_unit) computes it: fused [gate | up] GEMM.
    gate_out, up_out = F.linear(x, torch.cat([w1[0], w3[0]])).chunk(2, dim=-1)
    dense = F.linear(F.silu(gate_out) * up_out, w2[0])
    assert torch.equal(y, dense)
    # and, to rounding, the textbook form.
    textbook = F.linear(F.silu(F.linear(x, w1[0])) * F.linear(x, w3[0]), w2[0])
    torch.testing.assert_close(y, textbook, **TOL)


@pytest.mark.parametrize("kind", ["random", "skewed", "same"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_backward_equal_loop_reference(seed, kind):
    e, k = 4, 2
    layer = _layer(e=e, k=k)
    gate, w1, w3, w2 = random_weights(e, H, FFN, seed=seed)
    gate = _skew(gate, kind)
    load_full_weights(layer, gate, w1, w3, w2)
    x = _inputs(seed, kind=kind).requires_grad_(True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    y, _ = layer(x)
    (y * dy).sum().backward()

    # The reference runs in float64: the comparison then measures our fp32 error only.
    ref_w = [t.double().requires_grad_(True) for t in (gate, w1, w3, w2)]
    x_ref = x.detach().double().requires_grad_(True)
    y_ref, _, ids = reference_moe(x_ref.reshape(-1, H), *ref_w, k)
    (y_ref.view_as(x_ref) * dy.double()).sum().backward()
    if kind == "same":
        assert set(ids.flatten().tolist()) == {0, 1}
    _close(y, y_ref.view_as(y))
    _close(x.grad, x_ref.grad)
    for ours, ref in zip(_full_grads(layer), ref_w, strict=True):
        _close(ours, ref.grad)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_hf_mixtral_sparse_moe_block(seed):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    e = 8
    hf_cfg = MixtralConfig(
        hidden_size=H, intermediate_size=FFN, num_local_experts=e, num_experts_per_tok=2
    )
    hf = MixtralSparseMoeBlock(hf_cfg)
    gate, w1, w3, w2 = random_weights(e, H, FFN, seed=seed)
    with torch.no_grad():
        hf.gate.weight.copy_(gate)
        hf.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
        hf.experts.down_proj.copy_(w2)
    layer = _layer(e=e)
    load_full_weights(layer, gate, w1, w3, w2)
    # Our w13/w2 are HF's gate_up_proj/down_proj bit for bit at TP=1.
    assert torch.equal(layer.experts.w13, hf.experts.gate_up_proj)
    assert torch.equal(layer.experts.w2, hf.experts.down_proj)

    x_sbh = _inputs(seed, s=5, b=4)
    x_bsh = x_sbh.transpose(0, 1).contiguous()  # HF is batch-first
    y_hf = hf(x_bsh)
    y, _ = layer(x_sbh)
    torch.testing.assert_close(y.transpose(0, 1), y_hf, **TOL)
    hf_logits = hf.gate(x_bsh.reshape(-1, H))[0]
    ours = layer.router(x_bsh.reshape(-1, H)).logits_TE
    torch.testing.assert_close(ours, hf_logits, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_aux_and_z_losses_reach_the_training_loss(scale):
    e, k, a, zc = 4, 2, 0.3, 0.05
    layer = _layer(e=e, k=k, moe_aux_loss_coeff=a, moe_z_loss_coeff=zc)
    set_aux_loss_scale(layer, scale)
    gate, w1, w3, w2 = random_weights(e, H, FFN, seed=5)
    load_full_weights(layer, gate, w1, w3, w2)
    x = _inputs(5).requires_grad_(True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    y, _ = layer(x)
    (y * dy).sum().backward()

    ref_w = [t.double().requires_grad_(True) for t in (gate, w1, w3, w2)]
    x_ref = x.detach().double().requires_grad_(True)
    y_ref, logits, ids = reference_moe(x_ref.reshape(-1, H), *ref_w, k)
    aux, z = reference_aux_loss(logits, ids), reference_z_loss(logits)
    ((y_ref.view_as(x_ref) * dy.double()).sum() + scale * (a * aux + zc * z)).backward()
    _close(y, y_ref.view_as(y))  # the forward output is unchanged
    _close(x.grad, x_ref.grad)
    for ours, ref in zip(_full_grads(layer), ref_w, strict=True):
        _close(ours, ref.grad)
    stats = collect_moe_stats([layer])[1]
    _close(stats["aux_loss"], aux.detach())
    _close(stats["z_loss"], z.detach())


def test_collect_moe_stats_sums_resets_and_skips_eval():
    e = 4
    layer = _layer(e=e)
    gate, w1, w3, w2 = random_weights(e, H, FFN, seed=3)
    load_full_weights(layer, gate, w1, w3, w2)
    xs = [_inputs(i) for i in range(3)]
    counts, auxes, zs = torch.zeros(e, dtype=torch.long), [], []
    for x in xs:
        layer(x)[0].sum().backward()
        _, logits, ids = reference_moe(x.reshape(-1, H), gate, w1, w3, w2, 2)
        counts += torch.bincount(ids.flatten(), minlength=e)
        auxes.append(reference_aux_loss(logits, ids))
        zs.append(reference_z_loss(logits))
    layer.eval()
    layer(xs[0])  # eval passes are not counted
    layer.train()
    with torch.no_grad():
        layer(xs[0])  # nor passes without grad (the first pass of activation recomputation)
    stats = collect_moe_stats(layer)
    assert list(stats) == [1]
    s = stats[1]
    assert s["num_microbatches"] == 3
    assert s["tokens_per_expert"].dtype == torch.long
    assert torch.equal(s["tokens_per_expert"], counts)
    torch.testing.assert_close(s["aux_loss"], sum(auxes) / 3, **TOL)
    torch.testing.assert_close(s["z_loss"], sum(zs) / 3, **TOL)
    again = collect_moe_stats(layer)[1]  # reset=True zeroed the sums
    assert again["num_microbatches"] == 0 and int(again["tokens_per_expert"].sum()) == 0
    # Logging never changes numerics: coefficients are zero, so no gradient from the losses.
    assert all(b.grad is None for b in layer.buffers())


def test_expert_bias_routes_and_counts():
    cfg = moe_config(num_moe_experts=4, moe_router_topk=2)
    cfg.moe_router_enable_expert_bias = True  # Megatron's config check wants sigmoid; we allow both
    layer = SMoELayer(cfg, layer_number=1)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    x = _inputs(0)
    y, _ = layer(x)
    y.sum().backward()
    counts = layer.router.local_tokens_per_expert
    assert counts[3].item() == x.shape[0] * x.shape[1]  # expert 3 took every token
    assert counts.sum().item() == 2 * x.shape[0] * x.shape[1]
    assert "router.expert_bias" in layer.state_dict()
    assert "router.local_tokens_per_expert" not in layer.state_dict()


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="moe_input_jitter_eps"):
        _layer(moe_input_jitter_eps=0.01)
    with pytest.raises(ValueError, match="add_bias_linear"):
        SMoELayer(moe_config(add_bias_linear=True))
    layer = _layer()
    with pytest.raises(NotImplementedError):
        layer(_inputs(0), padding_mask=torch.zeros(3, 6, dtype=torch.bool))


@pytest.mark.parametrize("splits", [(3, 0, 5), (0, 0, 0), (4,)])
def test_expert_mlp_gradcheck_with_empty_experts(splits):
    from megatron_ext.moe import expert_mlp

    g = torch.Generator().manual_seed(sum(splits))
    m, n = sum(splits), len(splits)
    x = torch.randn(m, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(n, 8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(n, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c: expert_mlp(a, b, c, splits, torch.tensor(splits))
    assert torch.autograd.gradcheck(fn, (x, w13, w2))
    fn(x, w13, w2).sum().backward()
    for e, n_e in enumerate(splits):
        if n_e == 0:  # an expert without tokens gets an all-zero (not a missing) gradient
            assert torch.all(w13.grad[e] == 0) and torch.all(w2.grad[e] == 0)


def test_the_experts_run_through_their_module_call():
    """Megatron's DDP waits for an overlapped parameter all-gather in forward pre-hooks: the
    local path (dispatch, experts and combine in one node) must call the experts module too
    (calling a method of it instead left --overlap-param-gather reading stale weights)."""
    layer = _layer()
    calls = []
    layer.experts.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    layer(_inputs(0))[0].sum().backward()
    assert calls == [4]  # x_TH, splits, splits_L, (probs_TK, meta): the local node
