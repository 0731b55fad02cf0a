"""The SMoE layer on gloo CPU ranks: EP, TP x EP (with and without sequence parallel),
dropless extremes, the TransformerLayer spec and checkpoint sharding, all against the float64
loop reference of tests/moe_reference.py on the same global batch.

Every layout splits one global batch over its data-parallel ranks (one micro-batch each); the
reference runs the same micro-batches one after the other and sums the weight gradients, which
is what the (expert-)data-parallel reduction computes. The aux and z losses are per micro-batch.
"""

from __future__ import annotations

import pytest
import torch
from moe_reference import (
    load_full_weights,
    moe_config,
    random_weights,
    reference_aux_loss,
    reference_moe,
    reference_z_loss,
)

from megatron_ext.multirank import run_on_ranks

H, FFN, S, B, SEED = 16, 32, 8, 2, 1234
TOL = dict(rtol=1e-6, atol=1e-6)

# (kind, top-k, pre_softmax, aux coeff, z coeff). "same": every token picks experts 0 and 1,
# "one": top-1 with every token on expert 0; with EP > 1 whole ranks then receive nothing.
RANDOM = ("random", 2, False, 0.1, 0.01)
SAME = ("same", 2, False, 0.1, 0.0)
ONE = ("one", 1, True, 0.0, 0.0)


def _weights(e, kind, seed):
    gate, w1, w3, w2 = random_weights(e, H, FFN, seed=seed)
    if kind in ("same", "one"):  # with x[..., 0] = 1: logits 4, 2.5 and O(0.1) for the rest
        # (no larger: fp32 softmax gradients lose ~ulp * logit scale, in any implementation)
        gate = gate * 0.05
        gate[:, 0] = 0.0
        gate[:2, 0] = torch.tensor([4.0, 2.5])
    return gate, w1, w3, w2


def _batch(dp, kind, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(dp, S, B, H, generator=g)
    if kind in ("same", "one"):
        xs[..., 0] = 1.0
    return xs, torch.randn(dp, S, B, H, generator=g)


def _body(tp, etp, ep, sp, e, scenarios):
    """One rank: for each scenario build the layer, run fwd+bwd on this DP rank's micro-batch,
    reduce grads as (expert-)DP would, and return everything the parent checks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_ext.moe import SMoELayer, collect_moe_stats

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )  # fmt: skip
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    # The token blocks whose counts the layer logs: the EP group's micro-batches, or (folded)
    # the TP blocks of the expert-TP x EP group's ranks.
    n = S * B
    block = (dp_rank, 0, n) if etp == tp else (dp_rank, tp_rank * n // tp, (tp_rank + 1) * n // tp)
    count_group = (
        ps.get_expert_model_parallel_group()
        if etp == tp
        else ps.get_expert_tensor_and_model_parallel_group()
    )
    count_blocks = [None] * count_group.size()
    dist.all_gather_object(count_blocks, block, group=count_group)
    results = []
    for _kind, k, pre, aux, z, weights, xs, dys in scenarios:
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
        cfg = moe_config(
            num_moe_experts=e, moe_router_topk=k, moe_router_pre_softmax=pre,
            ffn_hidden_size=FFN, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp, sequence_parallel=sp, num_attention_heads=4,
            moe_aux_loss_coeff=aux, moe_z_loss_coeff=z or None,
        )  # fmt: skip
        layer = SMoELayer(cfg, layer_number=1)
        init = [
            t.detach().clone() for t in (layer.router.weight, layer.experts.w13, layer.experts.w2)
        ]
        load_full_weights(layer, *weights)
        x, dy = xs[dp_rank], dys[dp_rank]
        if sp:
            x, dy = x.chunk(tp)[tp_rank], dy.chunk(tp)[tp_rank]
        x = x.clone().requires_grad_(True)
        y, _ = layer(x)
        (y * dy).sum().backward()
        gate_grad = layer.router.weight.grad.clone()
        dist.all_reduce(gate_grad, group=ps.get_data_parallel_group())
        g13, g2 = layer.experts.w13.grad.clone(), layer.experts.w2.grad.clone()
        for g in (g13, g2):
            dist.all_reduce(g, group=ps.get_expert_data_parallel_group())
        sharded = layer.sharded_state_dict(prefix="mlp.")
        apply_factories(sharded)
        shards = [
            (st.key, st.global_shape, st.global_offset, st.replica_id, st.data.detach().clone())
            for key in ("mlp.experts.w13", "mlp.experts.w2")
            for st in sharded[key]
        ]
        results.append(
            dict(
                y=y.detach(), x_grad=x.grad, gate_grad=gate_grad, g13=g13, g2=g2,
                init=init, stats=collect_moe_stats(layer)[1], shards=shards,
                experts=(layer.experts.local_offset, layer.experts.num_local),
                tp_rank=tp_rank, dp_rank=dp_rank, count_blocks=count_blocks,
                etp_rank=ps.get_expert_tensor_parallel_rank(),
            )
        )  # fmt: skip
    return results


def _reference(weights, xs, dys, k, pre, aux_c, z_c):
    rw = [w.double().requires_grad_(True) for w in weights]
    out = dict(y=[], x_grad=[], counts=[], ids=[], aux=[], z=[])
    for x, dy in zip(xs, dys, strict=True):
        xr = x.double().requires_grad_(True)
        y, logits, ids = reference_moe(xr.reshape(-1, H), *rw, k, pre_softmax=pre)
        aux, z = reference_aux_loss(logits, ids), reference_z_loss(logits)
        ((y.view_as(xr) * dy.double()).sum() + aux_c * aux + z_c * z).backward()
        out["y"].append(y.detach().view_as(xr))
        out["x_grad"].append(xr.grad)
        out["counts"].append(torch.bincount(ids.flatten(), minlength=rw[0].shape[0]))
        out["ids"].append(ids)
        out["aux"].append(aux.detach())
        out["z"].append(z.detach())
    out["grads"] = [w.grad for w in rw]
    return out


def _close(ours, ref):
    torch.testing.assert_close(ours, ref.to(ours.dtype), **TOL)


def _check_rank(res, ref, tp, etp, sp, k):
    d, t = res["dp_rank"], res["tp_rank"]
    y_ref, xg_ref = ref["y"][d], ref["x_grad"][d]
    if sp:
        y_ref, xg_ref = y_ref.chunk(tp)[t], xg_ref.chunk(tp)[t]
    _close(res["y"], y_ref)
    _close(res["x_grad"], xg_ref)
    gate_g, w1_g, w3_g, w2_g = ref["grads"]
    _close(res["gate_grad"], gate_g)
    lo, n = res["experts"]
    fs, et = FFN // etp, res["etp_rank"]
    ex, sh = slice(lo, lo + n), slice(et * fs, (et + 1) * fs)
    _close(res["g13"][:, :fs], w1_g[ex, sh])
    _close(res["g13"][:, fs:], w3_g[ex, sh])
    _close(res["g2"], w2_g[ex][:, :, sh])
    # Logging: counts summed over the count group's token blocks, losses of this micro-batch.
    e = gate_g.shape[0]
    counts = sum(torch.bincount(ref["ids"][i][a:b].flatten(), minlength=e)
                 for i, a, b in res["count_blocks"])  # fmt: skip
    assert torch.equal(res["stats"]["tokens_per_expert"], counts)
    _close(res["stats"]["aux_loss"], ref["aux"][d])
    _close(res["stats"]["z_loss"], ref["z"][d])
    # Dropless: every (token, choice) pair of those blocks was routed somewhere.
    rows = sum(b - a for _, a, b in res["count_blocks"])
    assert int(res["stats"]["tokens_per_expert"].sum()) == rows * k


def _check_shards(all_results, weights, tp, e):
    """Union over ranks of the main-replica expert shards = the full weights, each piece once."""
    gate, w1, w3, w2 = weights
    fc1 = torch.full((e, 2 * FFN, H), float("nan"))
    fc2 = torch.full((e, H, FFN), float("nan"))
    for res in all_results:
        for key, shape, offset, replica, data in res["shards"]:
            if replica != (0, 0, 0):
                continue
            full = fc1 if key.endswith("linear_fc1.weight") else fc2
            assert key in (
                "mlp.experts.experts.linear_fc1.weight",
                "mlp.experts.experts.linear_fc2.weight",
            )
            assert tuple(shape) == tuple(full.shape)
            idx = (
                offset[0],
                *(slice(o, o + s) for o, s in zip(offset[1:], data.shape, strict=True)),
            )
            assert torch.isnan(full[idx]).all(), "a piece of the global tensor is saved twice"
            full[idx] = data
    torch.testing.assert_close(fc1, torch.cat([w1, w3], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(fc2, w2, rtol=0, atol=0)


def _run_layout(world, tp, etp, ep, sp, e, scenarios):
    dp = world // tp
    prepared, refs = [], []
    for i, (kind, k, pre, aux, z) in enumerate(scenarios):
        weights = _weights(e, kind, seed=10 + i)
        xs, dys = _batch(dp, kind, seed=20 + i)
        prepared.append((kind, k, pre, aux, z, weights, xs, dys))
        refs.append(_reference(weights, xs, dys, k, pre, aux, z))
    per_rank = run_on_ranks(_body, world, args=(tp, etp, ep, sp, e, prepared), timeout=240)
    # Layout-invariant CPU initialisation: the shards are slices of the 1-process init.
    from megatron_ext.moe import SMoELayer

    torch.manual_seed(SEED)
    one = SMoELayer(moe_config(num_moe_experts=e, ffn_hidden_size=FFN))
    for i, (scenario, ref) in enumerate(zip(prepared, refs, strict=True)):
        weights = scenario[5]
        results = [r[i] for r in per_rank]
        for res in results:
            _check_rank(res, ref, tp, etp, sp, scenario[1])
        _check_shards(results, weights, tp, e)
        if scenario[0] in ("same", "one"):  # the extreme actually happened
            assert set(torch.nonzero(ref["counts"][0]).flatten().tolist()) <= {0, 1}
    for res in (r[0] for r in per_rank):
        gate0, w13, w2 = res["init"]
        lo, n = res["experts"]
        fs, t = FFN // etp, res["etp_rank"]
        torch.testing.assert_close(gate0, one.router.weight, rtol=0, atol=0)
        full13 = one.experts.w13[lo : lo + n]
        torch.testing.assert_close(w13[:, :fs], full13[:, t * fs : (t + 1) * fs], rtol=0, atol=0)
        torch.testing.assert_close(
            w13[:, fs:], full13[:, FFN + t * fs : FFN + (t + 1) * fs], rtol=0, atol=0
        )
        torch.testing.assert_close(
            w2, one.experts.w2[lo : lo + n][:, :, t * fs : (t + 1) * fs], rtol=0, atol=0
        )


@pytest.mark.parametrize(
    "world,tp,ep,sp,e,scenarios",
    [
        (2, 1, 1, False, 4, [RANDOM]),
        (2, 1, 2, False, 4, [RANDOM, SAME]),
        (4, 1, 4, False, 8, [RANDOM, SAME, ONE]),
        (4, 2, 2, False, 4, [RANDOM, SAME]),
        (4, 2, 2, True, 4, [RANDOM, ONE]),
    ],
    ids=["ep1-dp2", "ep2", "ep4", "tp2-ep2", "tp2-ep2-sp"],
)
def test_parallel_layouts_equal_reference(world, tp, ep, sp, e, scenarios):
    _run_layout(world, tp, tp, ep, sp, e, scenarios)


# MoE parallel folding: expert-TP apart from TP (EP groups cross TP groups, or expert-TP
# groups cross DP groups), every combination kind Megatron-Core's groups allow.
@pytest.mark.parametrize(
    "world,tp,etp,ep,sp,e,scenarios",
    [
        (2, 2, 1, 2, False, 4, [RANDOM, SAME]),
        (2, 2, 1, 2, True, 4, [RANDOM, ONE]),
        (4, 2, 1, 4, True, 8, [RANDOM, SAME, ONE]),
        (4, 2, 1, 2, False, 4, [RANDOM]),
        (2, 1, 2, 1, False, 4, [RANDOM, SAME]),
        (4, 1, 2, 2, False, 4, [RANDOM, ONE]),
        (4, 4, 2, 2, True, 4, [RANDOM, SAME]),
        (4, 2, 4, 1, True, 4, [RANDOM]),
    ],
    ids=[
        "tp2-etp1-ep2", "tp2-etp1-ep2-sp", "tp2-etp1-ep4-sp", "tp2-etp1-ep2-dp2",
        "tp1-etp2", "tp1-etp2-ep2", "tp4-etp2-ep2-sp", "tp2-etp4-sp",
    ],
)  # fmt: skip
def test_folded_layouts_equal_reference(world, tp, etp, ep, sp, e, scenarios):
    _run_layout(world, tp, etp, ep, sp, e, scenarios)


def _spec_layer(tp, ep, seed):
    """A Megatron TransformerLayer (local spec, RMSNorm) whose MLP is our SMoE layer."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ext.moe import smoe_mlp_spec

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.mlp = smoe_mlp_spec()
    cfg = moe_config(
        num_layers=4, ffn_hidden_size=FFN, normalization="RMSNorm",
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
    )  # fmt: skip
    return build_module(spec, config=cfg, layer_number=3)


def _save_body(ckpt_dir, weights, x):
    from megatron.core import dist_checkpointing

    from megatron_ext.moe import SMoELayer, collect_moe_stats

    layer = _spec_layer(tp=1, ep=2, seed=1)
    assert isinstance(layer.mlp, SMoELayer)
    load_full_weights(layer.mlp, *weights)
    out, _ = layer(x, attention_mask=None)
    out.sum().backward()
    stats = collect_moe_stats(layer)
    assert list(stats) == [3] and stats[3]["num_microbatches"] == 1
    dist_checkpointing.save(layer.sharded_state_dict(prefix="decoder.layers.2."), ckpt_dir)
    return out.detach()


def _load_body(ckpt_dir):
    from megatron.core import dist_checkpointing

    layer = _spec_layer(tp=2, ep=1, seed=2)
    sharded = layer.sharded_state_dict(prefix="decoder.layers.2.")
    loaded = dist_checkpointing.load(sharded, ckpt_dir)
    layer.load_state_dict({k.removeprefix("decoder.layers.2."): v for k, v in loaded.items()})
    ex = layer.mlp.experts
    return [t.detach().clone() for t in (layer.mlp.router.weight, ex.w13, ex.w2)]


def test_transformer_layer_spec_and_checkpoint_resharding(tmp_path):
    """Build TransformerLayer with smoe_mlp_spec() at EP=2, save a distributed checkpoint and
    load it at TP=2 x EP=1: every expert lands at its global index, on its FFN shard."""
    e = 4
    weights = _weights(e, "random", seed=5)
    x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(6))
    outs = run_on_ranks(_save_body, 2, args=(str(tmp_path), weights, x), timeout=240)
    assert torch.isfinite(outs[0]).all()
    shards = run_on_ranks(_load_body, 2, args=(str(tmp_path),), timeout=240)
    gate, w1, w3, w2 = weights
    fs = FFN // 2
    for t, (router, w13, w2_local) in enumerate(shards):
        sh = slice(t * fs, (t + 1) * fs)
        torch.testing.assert_close(router, gate, rtol=0, atol=0)
        torch.testing.assert_close(w13[:, :fs], w1[:, sh], rtol=0, atol=0)
        torch.testing.assert_close(w13[:, fs:], w3[:, sh], rtol=0, atol=0)
        torch.testing.assert_close(w2_local, w2[:, :, sh], rtol=0, atol=0)


def _bias_body(weights, xs):
    """Megatron's finalize_model_grads helper updates our router's expert bias."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_ext.moe import SMoELayer, updated_expert_bias

    ps.initialize_model_parallel(expert_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    cfg = moe_config(ffn_hidden_size=FFN, expert_model_parallel_size=2)
    cfg.moe_router_enable_expert_bias, cfg.moe_router_bias_update_rate = True, 0.01
    layer = SMoELayer(cfg, layer_number=1)
    load_full_weights(layer, *weights)
    layer(xs[ps.get_data_parallel_rank()])[0].sum().backward()
    counts = layer.router.local_tokens_per_expert.clone()
    total = counts.clone()
    dist.all_reduce(total)
    expected = updated_expert_bias(torch.zeros(4), total, 0.01)
    _update_router_expert_bias([layer], cfg)
    return counts, layer.router.expert_bias.clone(), expected


def test_expert_bias_is_updated_by_megatron_finalize():
    weights = _weights(4, "random", seed=3)
    xs, _ = _batch(2, "random", seed=4)
    res = run_on_ranks(_bias_body, 2, args=(weights, xs), timeout=240)
    for d, (counts, bias, expected) in enumerate(res):
        _, _, ids = reference_moe(xs[d].reshape(-1, H).double(), *(w.double() for w in weights), 2)
        assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=4).float())
        torch.testing.assert_close(bias, expected, rtol=0, atol=0)
        assert bias.abs().sum() > 0
    assert torch.equal(res[0][1], res[1][1])  # every rank applies the same global update
