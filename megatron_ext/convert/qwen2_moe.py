"""HF ``Qwen2MoeForCausalLM`` <-> our checkpoints: fine-grained experts with a gated shared
expert, streamed like Mixtral (``core.py``).

What maps, per layer (HF name -> ours):

* ``mlp.gate.weight [E, H]`` -> ``mlp.router.weight``; softmax over all experts, top-k, not
  renormalised when ``norm_topk_prob`` is false (``--moe-router-pre-softmax``);
* ``mlp.experts.<e>.{gate,up,down}_proj.weight`` (or the fused ``mlp.experts.gate_up_proj
  [E, 2Fe, H]`` / ``down_proj [E, H, Fe]``) -> experts ``w1 / w3 / w2`` (``moe_intermediate_size``
  -> ``--moe-ffn-hidden-size``);
* ``mlp.shared_expert.{gate,up,down}_proj.weight`` -> ``mlp.shared_experts.linear_fc1 = [gate;
  up]``, ``linear_fc2`` (``shared_expert_intermediate_size``), ``mlp.shared_expert_gate.weight
  [1, H]`` -> ``mlp.shared_experts.gate_weight`` (``--moe-shared-expert-gate``);
* attention, norms, embeddings: as Mixtral.

What does not map, refused by name: q/k/v biases (``qkv_bias``, true in the released Qwen1.5/2
MoE models; our attention has no biases: a checkpoint whose biases are all zero converts, any
other is refused), dense layers (``decoder_sparse_step`` > 1 or ``mlp_only_layers``), sliding
windows. Exports write ``qkv_bias: false``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import torch

from megatron_ext.convert import hf, shapes
from megatron_ext.convert.hf import Arch, ConversionError
from megatron_ext.convert.hf_config import mixtral_config
from megatron_ext.convert.upcycle import SHARED_FC1, SHARED_FC2, shared_pieces

SHARED_GATE = "decoder.layers.mlp.shared_experts.gate_weight"
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_PART = {"gate": "w1", "up": "w3", "down": "w2"}


def is_qwen2_moe(directory: str) -> bool:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f).get("model_type") == "qwen2_moe"


def read_config(directory: str) -> tuple[dict, Arch]:
    """``config.json`` of an HF Qwen2-MoE, checked and mapped to our flags."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    problems = []
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        problems.append("dense layers (decoder_sparse_step > 1 or mlp_only_layers)")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window")
    if problems:
        raise ConversionError(f"{path}: not converted here: " + "; ".join(problems))
    moe_cfg = dict(cfg, num_local_experts=cfg["num_experts"], use_sliding_window=False)
    mixtral_like = hf.arch_from_config(moe_cfg, path, moe=True)
    arch = replace(
        mixtral_like,
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"],
        moe_router_pre_softmax=not cfg.get("norm_topk_prob", False),
        moe_shared_expert_gate=True,
        window_size=None,
    )
    return cfg, arch


def pieces(arch: Arch, name: str, weight: torch.Tensor) -> tuple[list, list[str]]:
    """Our pieces for one HF Qwen2-MoE tensor, and the names it covers."""
    found = hf.common_pieces(arch, name, weight)
    if found is not None:
        return found, [name]
    match = hf._LAYER.fullmatch(name)
    if not match:
        raise ConversionError(f"unexpected tensor {name!r} in the HF checkpoint")
    layer, rest = int(match.group(1)), match.group(2)
    at = (0, layer, arch.num_layers)
    if rest in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
        if torch.count_nonzero(weight):
            raise ConversionError(
                f"{name}: non-zero q/k/v biases (qkv_bias) cannot be represented here (the "
                "attention has no biases); this checkpoint is not converted"
            )
        return [], []
    if rest == "mlp.gate.weight":
        return hf.layer_piece(hf.ROUTER, arch, layer, weight), [name]
    if rest == "mlp.shared_expert_gate.weight":
        return [hf.piece(SHARED_GATE, weight, at, prepend=1)], [name]
    shared = re.fullmatch(r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", rest)
    if shared:
        return shared_pieces(arch, layer, shared.group(1), weight), [name]
    expert = _EXPERT.fullmatch(rest)
    if expert:
        e, part = int(expert.group(1)), _PART[expert.group(2)]
        return hf.expert_pieces(arch, layer, e, part, weight), [name]
    if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        fused = "w13" if rest.endswith("gate_up_proj") else "w2"
        out, covered = [], []
        for e in range(arch.num_experts):
            out += hf.expert_pieces(arch, layer, e, fused, weight[e])
            names = ("gate", "up") if fused == "w13" else ("down",)
            covered += [f"model.layers.{layer}.mlp.experts.{e}.{x}_proj.weight" for x in names]
        return out, covered
    if hf._IGNORED.fullmatch(name):
        return [], []
    raise ConversionError(f"unexpected tensor {name!r} in the HF checkpoint")


def expected_names(arch: Arch) -> set[str]:
    names = hf.expected_names(arch, dense=True)
    for n in range(arch.num_layers):
        p = f"model.layers.{n}.mlp."
        names -= {p + f"{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + "gate.weight", p + "shared_expert_gate.weight"}
        names |= {p + f"shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {
            p + f"experts.{e}.{x}_proj.weight"
            for e in range(arch.num_experts)
            for x in ("gate", "up", "down")
        }
    return names


def parts(src: str, arch: Arch, dtype, seen: set):
    for path, tensors in hf.iter_shards(src, dtype):
        out = []
        for name, weight in tensors.items():
            shapes.check_shape(arch, name, weight, path)
            found, covered = pieces(arch, name, weight)
            out += found
            seen.update(covered)
        del tensors
        yield out
        del out


# ------------------------------------------------------------------------------ ours -> HF
def mlp_requests(arch: Arch, n: int, req, one):
    """The MLP tensors of layer ``n`` to read from our checkpoint, with their HF names."""
    at, p = (0, n, arch.num_layers), f"model.layers.{n}.mlp."
    E, H = arch.num_experts, arch.hidden_size
    fe, fs = (
        arch.moe_ffn_hidden_size or arch.ffn_hidden_size,
        arch.moe_shared_expert_intermediate_size,
    )
    yield req(hf.ROUTER, (E, H), at, prepend=1), one(p + "gate.weight")
    for e in range(E):
        ex, w = (at, (1, e, E)), p + f"experts.{e}."
        yield req(hf.FC1, (fe, H), *ex, (2, 0, 2), prepend=2), one(w + "gate_proj.weight")
        yield req(hf.FC1, (fe, H), *ex, (2, 1, 2), prepend=2), one(w + "up_proj.weight")
        yield req(hf.FC2, (H, fe), *ex, prepend=2), one(w + "down_proj.weight")
    s = p + "shared_expert."
    yield req(SHARED_FC1, (fs, H), at, (1, 0, 2), prepend=1), one(s + "gate_proj.weight")
    yield req(SHARED_FC1, (fs, H), at, (1, 1, 2), prepend=1), one(s + "up_proj.weight")
    yield req(SHARED_FC2, (H, fs), at, prepend=1), one(s + "down_proj.weight")
    if arch.moe_shared_expert_gate:
        yield req(SHARED_GATE, (1, H), at, prepend=1), one(p + "shared_expert_gate.weight")


def hf_config(arch: Arch, dtype: torch.dtype, template: dict | None = None) -> dict:
    """``config.json`` for ``Qwen2MoeForCausalLM``."""
    if not arch.moe_shared_expert_gate:
        raise ConversionError(
            "Qwen2-MoE always gates its shared expert; this checkpoint has no "
            "--moe-shared-expert-gate (train with it, or export another format)"
        )
    cfg = mixtral_config(arch, dtype, template)
    for key in ("num_local_experts", "router_jitter_noise", "sliding_window"):
        cfg.pop(key, None)
    cfg.update(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        num_experts=arch.num_experts,
        moe_intermediate_size=arch.moe_ffn_hidden_size or arch.ffn_hidden_size,
        shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
        norm_topk_prob=not arch.moe_router_pre_softmax,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=False,
        use_sliding_window=False,
    )
    return cfg
