"""Router math: Mixtral top-k semantics, the aux and z losses, expert bias, loss attachment."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func
from moe_reference import reference_aux_loss, reference_z_loss, reference_z_loss_float

from megatron_ext.moe import (
    RouterOptions,
    attach_loss,
    gate_logits,
    load_balancing_loss,
    topk_route,
    updated_expert_bias,
    z_loss,
)


def _logits(t=32, e=8, seed=0, scale=2.0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_equals_hf_mixtral_router(seed):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
    hf = MixtralTopKRouter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(8, 16, generator=g))
    x = torch.randn(40, 16, generator=g)
    hf_logits, hf_weights, hf_ids = hf(x)
    r = topk_route(gate_logits(x, hf.weight), 2)
    torch.testing.assert_close(r.logits_TE, hf_logits, rtol=0, atol=0)
    assert torch.equal(r.topk_ids_TK, hf_ids)
    torch.testing.assert_close(r.probs_TK, hf_weights, rtol=1e-6, atol=1e-7)


def test_softmax_over_selected_and_pre_softmax():
    logits = _logits()
    r = topk_route(logits, 2)
    full = torch.softmax(logits, -1)
    top_vals, top_ids = torch.topk(full, 2)
    assert torch.equal(r.topk_ids_TK, top_ids)
    torch.testing.assert_close(r.probs_TK, top_vals / top_vals.sum(-1, keepdim=True))
    torch.testing.assert_close(r.scores_TE, full)
    pre = topk_route(logits, RouterOptions(2, pre_softmax=True))
    torch.testing.assert_close(pre.probs_TK, top_vals)  # not renormalised
    # Gradients reach only the selected logits.
    logits.requires_grad_(True)
    topk_route(logits, 2).probs_TK[:, 0].sum().backward()
    unselected = torch.ones_like(logits, dtype=torch.bool).scatter(1, top_ids, False)
    assert torch.all(logits.grad[unselected] == 0)
    assert torch.all(logits.grad[~unselected] != 0)


def test_sigmoid_score_function():
    logits = _logits(seed=3)
    r = topk_route(logits, RouterOptions(2, score_function="sigmoid"))
    sig = torch.sigmoid(logits)
    vals, ids = torch.topk(sig, 2)
    assert torch.equal(r.topk_ids_TK, ids)
    torch.testing.assert_close(r.probs_TK, vals / vals.sum(-1, keepdim=True))
    torch.testing.assert_close(r.scores_TE, sig / sig.sum(-1, keepdim=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_load_balancing_loss_equals_formula(seed):
    logits = _logits(seed=seed).double()
    r = topk_route(logits, 2)
    counts = torch.bincount(r.topk_ids_TK.flatten(), minlength=8)
    aux = load_balancing_loss(r.scores_TE, counts, 2)
    torch.testing.assert_close(aux, reference_aux_loss(logits, r.topk_ids_TK), rtol=1e-12, atol=0)
    # Megatron's normalisation (coefficient 1): the same number.
    mcore = switch_load_balancing_loss_func(r.scores_TE, counts, logits.shape[0], 2, 8, 1.0)
    torch.testing.assert_close(aux, mcore, rtol=1e-12, atol=0)


def test_load_balancing_loss_extremes():
    # Uniform probabilities and perfectly balanced counts: exactly 1.
    scores = torch.full((8, 4), 0.25, dtype=torch.float64)
    assert load_balancing_loss(scores, torch.tensor([4, 4, 4, 4]), 2).item() == pytest.approx(1.0)
    # Everything on one expert with probability 1 (top-1): E.
    scores = torch.zeros(8, 4, dtype=torch.float64)
    scores[:, 0] = 1
    assert load_balancing_loss(scores, torch.tensor([8, 0, 0, 0]), 1).item() == pytest.approx(4.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_z_loss_equals_formula(seed):
    logits = _logits(seed=seed, scale=4.0).double()
    z = z_loss(logits)
    torch.testing.assert_close(z, reference_z_loss(logits), rtol=1e-12, atol=0)
    assert z.item() == pytest.approx(reference_z_loss_float(logits), rel=1e-12)


def test_expert_bias_changes_selection_not_weights():
    logits = _logits(seed=4)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    r = topk_route(logits, 2, bias)
    assert torch.all((r.topk_ids_TK == 7).any(dim=1))  # expert 7 always selected
    expected = torch.softmax(logits.gather(1, r.topk_ids_TK), dim=-1)
    torch.testing.assert_close(r.probs_TK, expected)  # weights from the unbiased logits


def test_updated_expert_bias_sign_rule():
    bias = torch.tensor([0.0, 0.1, -0.1, 0.0])
    counts = torch.tensor([10, 2, 4, 4])  # mean 5
    new = updated_expert_bias(bias, counts, 1e-3)
    torch.testing.assert_close(new, torch.tensor([-1e-3, 0.1 + 1e-3, -0.1 + 1e-3, 1e-3]))


def test_attach_loss_adds_scaled_gradient():
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    loss = (w**2).sum()
    scale = torch.tensor(0.25)
    y = attach_loss(x * 2, loss, scale, 2.0)
    torch.testing.assert_close(y, x * 2)
    scale.fill_(0.5)  # read at backward time, not at forward time
    y.sum().backward()
    torch.testing.assert_close(w.grad, 2 * w.detach() * 0.5 / 2.0)
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("variant", ["softmax", "softmax-bias", "sigmoid"])
def test_routing_logsumexp_shortcut(variant):
    logits = _logits(seed=5, scale=6.0).double().requires_grad_(True)
    bias = torch.tensor([0.0] * 7 + [3.0]) if variant == "softmax-bias" else None
    fn = "sigmoid" if variant == "sigmoid" else "softmax"
    r = topk_route(logits, RouterOptions(2, score_function=fn), bias)
    expected = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(r.logsumexp_T, expected, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(z_loss(logits, r.logsumexp_T), logits)
    (g_ref,) = torch.autograd.grad(z_loss(logits), logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
