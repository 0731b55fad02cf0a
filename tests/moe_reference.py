"""Plain-PyTorch references for the SMoE tests: loops over tokens and experts, no batching.

Shapes legend: T tokens, H hidden, E experts, F expert FFN size, K top-k. Weights use the
``nn.Linear`` convention: ``gate [E, H]``, ``w1, w3 [E, F, H]``, ``w2 [E, H, F]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def moe_config(**overrides) -> TransformerConfig:
    """A tiny fp32 TransformerConfig with the SMoE fields set (overridable)."""
    kw = dict(
        num_layers=1,
        hidden_size=16,
        ffn_hidden_size=24,
        num_attention_heads=2,
        num_moe_experts=4,
        moe_router_topk=2,
        add_bias_linear=False,
        use_cpu_initialization=True,
        moe_aux_loss_coeff=0.0,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def random_weights(e, h, f, *, seed, gate_std=0.5, expert_std=0.1):
    """Full logical weights ``(gate, w1, w3, w2)``: O(1) logits, O(0.1-1) outputs and grads
    (so an fp32 layer meets 1e-6 against a float64 reference; a real bug is off by >1e-3)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(e, h, generator=g) * gate_std,
        torch.randn(e, f, h, generator=g) * expert_std,
        torch.randn(e, f, h, generator=g) * expert_std,
        torch.randn(e, h, f, generator=g) * expert_std,
    )


def reference_moe(x_TH, gate, w1, w3, w2, k, *, pre_softmax=False):
    """Returns ``(y_TH, logits_TE, topk_ids_TK)``; token by token, expert by expert."""
    outs, logits_all, ids_all = [], [], []
    for t in range(x_TH.shape[0]):
        x = x_TH[t]
        logits = torch.stack([gate[e] @ x for e in range(gate.shape[0])])
        ids = torch.topk(logits, k).indices
        if pre_softmax:
            weights = torch.softmax(logits, dim=0)[ids]
        else:
            weights = torch.softmax(logits[ids], dim=0)
        y = torch.zeros_like(x)
        for j in range(k):
            e = int(ids[j])
            h = F.silu(w1[e] @ x) * (w3[e] @ x)
            y = y + weights[j] * (w2[e] @ h)
        outs.append(y)
        logits_all.append(logits)
        ids_all.append(ids)
    return torch.stack(outs), torch.stack(logits_all), torch.stack(ids_all)


def reference_aux_loss(logits_TE, topk_ids_TK):
    """``E * sum_e f_e P_e``, f_e = share of the T*K assignments, P_e = mean softmax prob."""
    t, e = logits_TE.shape
    k = topk_ids_TK.shape[1]
    counts = [0] * e
    for row in topk_ids_TK.tolist():
        for expert in row:
            counts[expert] += 1
    probs = torch.softmax(logits_TE, dim=-1)
    total = 0.0
    for expert in range(e):
        p_e = sum(probs[i, expert] for i in range(t)) / t
        total = total + (counts[expert] / (k * t)) * p_e
    return e * total


def reference_z_loss(logits_TE):
    """``mean_t (log sum_e exp(logit_te))^2`` written out."""
    vals = [torch.log(torch.exp(row).sum()) ** 2 for row in logits_TE]
    return sum(vals) / len(vals)


def reference_z_loss_float(logits_TE) -> float:
    """The same in Python floats (no torch reduction at all)."""
    rows = logits_TE.double().tolist()
    return sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)


def load_full_weights(layer, gate, w1, w3, w2) -> None:
    """Copy logical full weights into a (possibly EP/TP-sharded) SMoELayer."""
    ex = layer.experts
    fs, lo = ex.ffn_shard, ex.local_offset
    tp_rank = _rank(ex.groups.expt_tp)
    shard = slice(tp_rank * fs, (tp_rank + 1) * fs)
    experts = slice(lo, lo + ex.num_local)
    with torch.no_grad():
        layer.router.weight.copy_(gate)
        ex.w13[:, :fs].copy_(w1[experts, shard])
        ex.w13[:, fs:].copy_(w3[experts, shard])
        ex.w2.copy_(w2[experts][:, :, shard])


def expert_grads_as_full(layer):
    """This rank's expert grads as (expert slice, F slice, g1, g3, g2) for comparison."""
    ex = layer.experts
    fs, lo = ex.ffn_shard, ex.local_offset
    tp_rank = _rank(ex.groups.expt_tp)
    g13, g2 = ex.w13.grad, ex.w2.grad
    return (lo, lo + ex.num_local), (tp_rank * fs, (tp_rank + 1) * fs), g13[:, :fs], g13[:, fs:], g2


def _rank(group) -> int:
    return 0 if group is None else group.rank()
