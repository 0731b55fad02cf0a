"""DeepSeek-MoE / Qwen2-MoE designs on one rank: shared and fine-grained experts against HF
transformers' own blocks, and each router option against a formula written here."""

import math

import pytest
import torch
import torch.nn.functional as F
from moe_reference import load_full_weights, moe_config, random_weights

from megatron_ext.moe import (
    RouterOptions,
    SMoELayer,
    drop_over_capacity,
    expert_capacity,
    group_limited_topk,
    load_balancing_loss,
    seq_load_balancing_loss,
    topk_route,
)

H = 16
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo group and Megatron's parallel state: the shared experts are Megatron's
    TP layers, which need a (trivial) TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.multirank import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)  # fmt: skip
    ps.initialize_model_parallel()
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _design_layer(e, k, ffn, shared, **cfg):
    cfg = dict(num_moe_experts=e, moe_router_topk=k, moe_ffn_hidden_size=ffn, **cfg)
    if shared:
        cfg.update(moe_shared_expert_intermediate_size=shared, gated_linear_unit=True,
                   activation_func=F.silu)  # fmt: skip
    return SMoELayer(moe_config(**cfg), layer_number=1)


def _copy_into_hf(hf, weights, hf_shared, shared):
    """Routed ``(gate, w1, w3, w2)`` and shared ``(gate_proj, up_proj, down_proj)`` weights
    into an HF block (``hf_shared``: its shared-expert MLP)."""
    gate, w1, w3, w2 = weights
    with torch.no_grad():
        hf.gate.weight.copy_(gate)
        hf.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
        hf.experts.down_proj.copy_(w2)
        for name, w in zip(("gate_proj", "up_proj", "down_proj"), shared, strict=True):
            getattr(hf_shared, name).weight.copy_(w)


def _random_shared(width, g):
    return (torch.randn(width, H, generator=g) * 0.1, torch.randn(width, H, generator=g) * 0.1,
            torch.randn(H, width, generator=g) * 0.1)  # fmt: skip


def _load_shared(layer, gate_proj, up_proj, down_proj, gate_weight=None):
    """Megatron's MLP keeps ``linear_fc1 = [gate; up]`` (SwiGLU halves) and ``linear_fc2``."""
    sh = layer.shared_experts
    with torch.no_grad():
        sh.linear_fc1.weight.copy_(torch.cat([gate_proj, up_proj]))
        sh.linear_fc2.weight.copy_(down_proj)
        if gate_weight is not None:
            sh.gate_weight.copy_(gate_weight)


def _run_both(layer, hf, seed, s=5, b=4):
    """Forward + backward through ours ([S, B, H]) and HF (batch first, float64)."""
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(s, b, H, generator=g)
    dy = torch.randn(s, b, H, generator=g)
    x_ours = x.clone().requires_grad_(True)
    y, _ = layer(x_ours)
    (y * dy).sum().backward()
    x_hf = x.transpose(0, 1).double().contiguous().requires_grad_(True)
    y_hf = hf(x_hf)
    (y_hf * dy.transpose(0, 1).double()).sum().backward()
    _close(y.transpose(0, 1), y_hf)
    _close(x_ours.grad.transpose(0, 1), x_hf.grad)
    return x


def _check_router(layer, hf, x):
    """The router picks the same experts with the same weights per token as HF's gate."""
    x_TH = x.reshape(-1, H)
    ours = layer.router(x_TH)
    _, w_hf, ids_hf = hf.gate(x_TH.double())
    assert torch.equal(ours.topk_ids_TK.sort(-1).values, ids_hf.sort(-1).values)
    _close(ours.probs_TK.gather(1, ours.topk_ids_TK.argsort(-1)),
           w_hf.gather(1, ids_hf.argsort(-1)))  # fmt: skip
    return ours


def _close(ours, ref):
    torch.testing.assert_close(ours, ref.to(ours.dtype), **TOL)


def _hf_experts_grads(hf_experts, ffn):
    gu = hf_experts.gate_up_proj.grad
    return gu[:, :ffn], gu[:, ffn:], hf_experts.down_proj.grad


def _check_expert_grads(layer, hf_experts, ffn):
    g1, g3, g2 = _hf_experts_grads(hf_experts, ffn)
    ex = layer.experts
    _close(ex.w13.grad[:, :ffn], g1)
    _close(ex.w13.grad[:, ffn:], g3)
    _close(ex.w2.grad, g2)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_hf_qwen2_moe_block_with_gated_shared_expert(one_rank, seed):
    """Qwen2-MoE: softmax over all experts, top-k weights not renormalised (pre-softmax), one
    shared SwiGLU expert behind a sigmoid gate, fine-grained experts (FFN 8 vs hidden 16)."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    e, k, ffn, shared = 8, 4, 8, 24
    hf_cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=ffn, num_experts=e,
                            num_experts_per_tok=k, norm_topk_prob=False,
                            shared_expert_intermediate_size=shared)  # fmt: skip
    hf = Qwen2MoeSparseMoeBlock(hf_cfg).double()
    gate, w1, w3, w2 = random_weights(e, H, ffn, seed=seed)
    g = torch.Generator().manual_seed(50 + seed)
    sg, su, sd = _random_shared(shared, g)
    sgate = torch.randn(1, H, generator=g) * 0.3
    _copy_into_hf(hf, (gate, w1, w3, w2), hf.shared_expert, (sg, su, sd))
    with torch.no_grad():
        hf.shared_expert_gate.weight.copy_(sgate)
    layer = _design_layer(e, k, ffn, shared, moe_router_pre_softmax=True,
                          moe_shared_expert_gate=True)  # fmt: skip
    load_full_weights(layer, gate, w1, w3, w2)
    _load_shared(layer, sg, su, sd, sgate)
    x = _run_both(layer, hf, seed)
    _check_expert_grads(layer, hf.experts, ffn)
    _close(layer.router.weight.grad, hf.gate.weight.grad)
    sh = layer.shared_experts
    _close(sh.linear_fc1.weight.grad[:shared], hf.shared_expert.gate_proj.weight.grad)
    _close(sh.linear_fc1.weight.grad[shared:], hf.shared_expert.up_proj.weight.grad)
    _close(sh.linear_fc2.weight.grad, hf.shared_expert.down_proj.weight.grad)
    _close(sh.gate_weight.grad, hf.shared_expert_gate.weight.grad)
    _check_router(layer, hf, x)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_hf_deepseek_v3_moe(one_rank, seed):
    """DeepSeek-V3: sigmoid scores, expert bias (selection only), group-limited routing (4
    groups, best 2), weights renormalised then scaled by 2.5, two shared experts (no gate)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    e, k, ffn, n_shared = 16, 4, 8, 2
    hf_cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=ffn, n_routed_experts=e,
                              num_experts_per_tok=k, n_group=4, topk_group=2,
                              routed_scaling_factor=2.5, norm_topk_prob=True,
                              n_shared_experts=n_shared)  # fmt: skip
    hf = DeepseekV3MoE(hf_cfg).double()
    gate, w1, w3, w2 = random_weights(e, H, ffn, seed=seed)
    g = torch.Generator().manual_seed(60 + seed)
    shared = ffn * n_shared
    sg, su, sd = _random_shared(shared, g)
    bias = torch.randn(e, generator=g) * 0.2
    _copy_into_hf(hf, (gate, w1, w3, w2), hf.shared_experts, (sg, su, sd))
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(bias)
    layer = _design_layer(
        e, k, ffn, shared, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5,
    )  # fmt: skip
    load_full_weights(layer, gate, w1, w3, w2)
    _load_shared(layer, sg, su, sd)
    with torch.no_grad():
        layer.router.expert_bias.copy_(bias)
    x = _run_both(layer, hf, seed)
    _check_expert_grads(layer, hf.experts, ffn)
    _close(layer.router.weight.grad, hf.gate.weight.grad)
    ours = _check_router(layer, hf, x)
    # The groups mattered: without them some token picks an expert outside its best 2 groups.
    plain = topk_route(ours.logits_TE, RouterOptions(k, score_function="sigmoid"), bias)
    assert not torch.equal(plain.topk_ids_TK.sort(-1).values, ours.topk_ids_TK.sort(-1).values)


# ----------------------------------------------------------------------- router formulas
def _logits(t=24, e=8, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_group_limited_topk_equals_brute_force():
    logits = _logits(t=40, e=12, seed=3)
    k, groups, gk = 4, 4, 2
    ids = group_limited_topk(logits, k, groups, gk)
    for t in range(logits.shape[0]):
        row = logits[t].view(groups, -1)
        score = [sorted(row[g].tolist(), reverse=True)[: k // gk] for g in range(groups)]
        best = sorted(range(groups), key=lambda g: -sum(score[g]))[:gk]
        allowed = [g * 3 + j for g in best for j in range(3)]
        want = sorted(allowed, key=lambda i: -logits[t, i].item())[:k]
        assert sorted(ids[t].tolist()) == sorted(want)


def test_scaling_factor_and_pre_softmax_weights():
    logits = _logits(seed=4)
    r = topk_route(logits, RouterOptions(2, topk_scaling_factor=3.0))
    top = logits.topk(2).values
    torch.testing.assert_close(r.probs_TK, 3.0 * torch.softmax(top, -1))
    r = topk_route(logits, RouterOptions(2, pre_softmax=True, topk_scaling_factor=0.5))
    torch.testing.assert_close(r.probs_TK, 0.5 * torch.softmax(logits, -1).topk(2).values)


def test_router_dtype_fp64():
    from megatron_ext.moe.routing import gate_logits

    x, w = torch.randn(5, H), torch.randn(4, H)
    assert gate_logits(x, w).dtype == torch.float32
    out = gate_logits(x, w, torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x.double() @ w.double().T, rtol=0, atol=0)


def _aux(scores, ids, k, t=None):
    """E * sum_e f_e P_e written out: f_e = c_e / (K T), P_e = mean_t s_te."""
    t = t or scores.shape[0]
    e = scores.shape[1]
    counts = [sum(int(e_ in row) for row in ids.tolist()) for e_ in range(e)]
    return e * sum(counts[i] / (k * t) * scores[:, i].sum().item() / t for i in range(e))


def test_seq_aux_loss_is_the_mean_of_per_sequence_losses():
    s, b, e, k = 6, 3, 8, 2
    logits = _logits(t=s * b, e=e, seed=5)
    scores = torch.softmax(logits, -1)
    got = seq_load_balancing_loss(scores, k, b).item()
    rows = scores.view(s, b, e)
    want = 0.0
    for seq in range(b):
        sc = rows[:, seq]
        want += _aux(sc, sc.topk(k).indices, k) / b
    assert got == pytest.approx(want, rel=1e-12)
    assert got != pytest.approx(load_balancing_loss(scores, _counts(scores, k), k).item())


def _counts(scores, k):
    return torch.bincount(scores.topk(k).indices.reshape(-1), minlength=scores.shape[1])


def test_aux_loss_counts_ignore_bias_and_groups(one_rank):
    """Megatron computes the aux-loss counts from the plain top-k of the scores, whatever the
    bias or the groups selected."""
    e, k = 8, 2
    layer = _design_layer(e, k, 8, 0, moe_router_score_function="sigmoid",
                          moe_router_enable_expert_bias=True, moe_aux_loss_coeff=1.0)  # fmt: skip
    load_full_weights(layer, *random_weights(e, H, 8, seed=9))
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([5.0] + [0.0] * 7))  # everyone picks 0
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(9))
    layer(x)
    from megatron_ext.moe import collect_moe_stats

    stats = collect_moe_stats(layer)[1]
    assert stats["tokens_per_expert"][0] == 12  # dispatched: every token to expert 0
    r = layer.router(x.reshape(-1, H))
    want = _aux(r.scores_TE, r.scores_TE.topk(k).indices, k)
    assert stats["aux_loss"].item() == pytest.approx(want, rel=1e-5)


def test_global_aux_loss_accumulates_over_micro_batches(one_rank):
    e, k = 8, 2
    layer = _design_layer(e, k, 8, 0, moe_router_load_balancing_type="global_aux_loss",
                          moe_aux_loss_coeff=1.0)  # fmt: skip
    load_full_weights(layer, *random_weights(e, H, 8, seed=11))
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(4, 2, H, generator=g) for _ in range(2)]
    from megatron_ext.moe import collect_moe_stats

    seen = []
    for x in xs:
        layer(x)
        seen.append(collect_moe_stats(layer)[1]["aux_loss"].item())
    s0, s1 = (layer.router(x.reshape(-1, H)).scores_TE for x in xs)
    c0, c1 = _counts(s0, k).double(), _counts(s1, k).double()
    mean_c = (c0 + c1) / 2
    want1 = e * sum(mean_c[i] / (k * 8) * s1[:, i].sum() / 8 for i in range(e))
    assert seen[0] == pytest.approx(_aux(s0, s0.topk(k).indices, k), rel=1e-5)
    assert seen[1] == pytest.approx(want1.item(), rel=1e-5)
    layer.router.reset_global_aux_loss_tracker()  # what finalize_model_grads calls per step
    layer(xs[1])
    assert collect_moe_stats(layer)[1]["aux_loss"].item() == pytest.approx(
        _aux(s1, s1.topk(k).indices, k), rel=1e-5
    )


def test_force_load_balancing_routes_on_noise():
    torch.manual_seed(0)
    layer = SMoELayer(moe_config(num_moe_experts=8, moe_router_topk=2,
                                 moe_router_force_load_balancing=True), layer_number=1)  # fmt: skip
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0  # the real logits would send everything to expert 0
    x = torch.ones(64, 4, H, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    from megatron_ext.moe import collect_moe_stats

    counts = collect_moe_stats(layer)[1]["tokens_per_expert"]
    assert counts.sum() == 512 and counts.max() < 100  # ~64 each, not 256 on expert 0
    assert layer.router.weight.grad.abs().sum() > 0  # straight-through: the gate still learns


# ----------------------------------------------------------------------------- capacity
def test_capacity_and_drop_policies_drop_exactly_the_named_pairs():
    assert expert_capacity(10, 2, 4, 1.0) == 5 and expert_capacity(10, 2, 4, 1.1) == 6
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [2, 0]])
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.5, 0.5], [0.8, 0.2]])
    # expert 0 has 5 pairs (tokens 0..4, weights .6 .3 .9 .5 .2); capacity 3
    pos_ids, pos_p = drop_over_capacity(ids, probs, 4, 3, "position")
    assert (pos_ids == 4).nonzero().tolist() == [[3, 0], [4, 1]]  # the last two tokens
    prob_ids, prob_p = drop_over_capacity(ids, probs, 4, 3, "probs")
    assert (prob_ids == 4).nonzero().tolist() == [[1, 0], [4, 1]]  # weights .3 and .2
    assert prob_p[1, 0] == 0 and prob_p[4, 1] == 0 and prob_p[0, 0] == 0.6
    # Other experts stay under capacity: nothing else changes.
    assert torch.equal(pos_ids[:3], ids[:3]) and pos_ids[4, 0] == 2


def _skewed_layer(**cfg):
    torch.manual_seed(1)
    layer = SMoELayer(moe_config(num_moe_experts=4, moe_router_topk=2, **cfg), layer_number=1)
    load_full_weights(layer, *random_weights(4, H, 24, seed=1))
    with torch.no_grad():
        layer.router.weight[0] += 3.0 * torch.ones(H)  # expert 0 takes almost every token
    return layer


def test_capacity_drops_tokens_and_default_stays_dropless():
    x = torch.rand(8, 2, H) + 0.5  # positive: expert 0's logit dominates
    from megatron_ext.moe import collect_moe_stats

    dropless = _skewed_layer()
    y_free, _ = dropless(x)
    counts = collect_moe_stats(dropless)[1]["tokens_per_expert"]
    assert counts[0] == 16 and counts.sum() == 32  # skewed, and no token lost
    capped = _skewed_layer(moe_expert_capacity_factor=1.0)
    y, _ = capped(x)
    cap = expert_capacity(16, 2, 4, 1.0)
    kept = collect_moe_stats(capped)[1]["tokens_per_expert"]
    assert kept[0] == cap == 8 and kept.sum() < 32
    # A dropped pair contributes nothing: recompute the output from the kept pairs.
    r = capped.router(x.reshape(-1, H))
    ids, probs = drop_over_capacity(r.topk_ids_TK, r.probs_TK, 4, cap, "probs")
    ex = capped.experts
    want = torch.zeros(16, H)
    for t in range(16):
        for j in range(2):
            e = int(ids[t, j])
            if e < 4:
                h = ex.w13[e] @ x.reshape(-1, H)[t]
                want[t] += probs[t, j] * (ex.w2[e] @ (F.silu(h[:24]) * h[24:]))
    torch.testing.assert_close(y.reshape(-1, H), want, **TOL)
    assert not torch.allclose(y, y_free)


def test_pad_expert_input_to_capacity_gives_fixed_shapes():
    x = torch.rand(8, 2, H) + 0.5
    layer = _skewed_layer(moe_expert_capacity_factor=1.5, moe_pad_expert_input_to_capacity=True)
    shapes = []
    layer.experts.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    y, _ = layer(x)
    cap = expert_capacity(16, 2, 4, 1.5)
    assert shapes == [torch.Size([4 * cap, H])]
    unpadded = _skewed_layer(moe_expert_capacity_factor=1.5)
    y_ref, _ = unpadded(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert math.ceil(16 * 2 / 4 * 1.5) == cap


def test_load_balancing_type_none_attaches_no_loss():
    """``none``: the aux coefficient is ignored (no gradient from the balancing loss); the
    z-loss still applies."""
    grads = {}
    for kind in ("aux_loss", "none"):
        torch.manual_seed(3)
        cfg = moe_config(num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=1.0,
                         moe_router_load_balancing_type=kind)  # fmt: skip
        layer = SMoELayer(cfg, layer_number=1)
        load_full_weights(layer, *random_weights(4, H, 24, seed=3))
        x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(3))
        y, _ = layer(x)
        (y * 0).sum().backward()  # only the attached losses send gradient to the gate
        grads[kind] = layer.router.weight.grad.clone()
    assert grads["aux_loss"].abs().sum() > 0
    assert torch.count_nonzero(grads["none"]) == 0
