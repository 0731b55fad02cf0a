"""Hugging Face Mixtral <-> our Megatron-Core checkpoint, streamed shard by shard.

HF layout (published Mixtral; what ``MixtralForCausalLM.save_pretrained`` writes, 5.x too)::

    model.embed_tokens.weight [V, H]            lm_head.weight [V, H]      model.norm.weight [H]
    model.layers.N.input_layernorm.weight [H]   model.layers.N.post_attention_layernorm.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.weight  (q [nh*d, H], k/v [ng*d, H], o [H, nh*d])
    model.layers.N.block_sparse_moe.gate.weight [E, H]
    model.layers.N.block_sparse_moe.experts.E.{w1,w3} [F, H] (gate, up), .w2 [H, F] (down)

Also read: the fused expert layout of transformers 5.x modules (``model.layers.N.mlp.experts.
gate_up_proj [E, 2F, H]`` / ``down_proj [E, H, F]``, ``mlp.gate.weight``).

Our checkpoint (global keys of the GPTModel with the SMoE layer, layers stacked on axis 0)::

    embedding.word_embeddings.weight [V, H]     output_layer.weight [V, H]   (padded rows: 0)
    decoder.final_layernorm.weight [H]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight [L, H]   (input_layernorm)
    decoder.layers.self_attention.linear_qkv.weight [L, (nh + 2 ng) d, H]
    decoder.layers.self_attention.linear_proj.weight [L, H, nh d]
    decoder.layers.pre_mlp_layernorm.weight [L, H]
    decoder.layers.mlp.router.weight [L, E, H]
    decoder.layers.mlp.experts.experts.linear_fc1.weight [L, E, 2F, H]  ([w1; w3] per expert)
    decoder.layers.mlp.experts.experts.linear_fc2.weight [L, E, H, F]   (w2)

``linear_qkv`` interleaves per query group g: ``[q heads of g (nh/ng of them), k_g, v_g]``, d
rows each; every head is written as its own piece, so no fused tensor is ever built. Both sides
use rotate-half RoPE (Megatron's default, ``rotary_interleaved=False``), so q/k need no
permutation. The vocabulary is stored unpadded; Megatron pads at load (the extra rows are 0).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from megatron_ext.convert.stream import empty_object, piece
from megatron_ext.errors import UsageError

EMB = "embedding.word_embeddings.weight"
OUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
MLP_NORM = "decoder.layers.pre_mlp_layernorm.weight"
ROUTER = "decoder.layers.mlp.router.weight"
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
EXTRA_STATES = (
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.linear_proj._extra_state",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Saved in a converted checkpoint's architecture (shapes and routing) and printed as flags.
_SAVED_MOE_FIELDS = (
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_router_pre_softmax",
    "moe_shared_expert_gate",
)
# Printed only: the factor that makes an upcycled model's step 0 the dense model.
_MOE_FLAGS = _SAVED_MOE_FIELDS + ("moe_router_topk_scaling_factor",)


class ConversionError(UsageError, ValueError):
    """The input cannot be converted (unsupported architecture, missing or unknown tensors)."""


@dataclass(frozen=True)
class Arch:
    """What the mapping needs; field names follow our flags."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    num_experts: int
    moe_router_topk: int
    vocab_size: int
    untie_embeddings_and_output_weights: bool = True
    rotary_base: float = 1e6
    norm_epsilon: float = 1e-5
    max_position_embeddings: int = 32768
    window_size: int | None = None
    moe_ffn_hidden_size: int | None = None  # upcycle --granularity / --method partition
    moe_shared_expert_intermediate_size: int | None = None
    moe_router_topk_scaling_factor: float | None = None  # what makes step 0 the dense model
    moe_router_pre_softmax: bool = False  # Qwen2-MoE's norm_topk_prob=False
    moe_shared_expert_gate: bool = False  # Qwen2-MoE's shared_expert_gate

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def common(self, source: str) -> dict:
        """``common.pt`` of a converted (weights-only) checkpoint."""
        arch = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "num_experts": self.num_experts,
            "moe_router_topk": self.moe_router_topk,
            "vocab_size": self.vocab_size,
            "normalization": "RMSNorm",
            "swiglu": True,
            "untie_embeddings_and_output_weights": self.untie_embeddings_and_output_weights,
            "position_embedding_type": "rope",
        }
        for field in _SAVED_MOE_FIELDS:
            if getattr(self, field):
                arch[field] = getattr(self, field)
        hparams = {
            "rotary_base": self.rotary_base,
            "norm_epsilon": self.norm_epsilon,
            "max_position_embeddings": self.max_position_embeddings,
            "window_size": self.window_size,
        }
        return {"arch": arch, "hparams": hparams, "converted_from": source}

    def flags(self) -> str:
        """``pretrain_mixtral.py`` flags for this architecture."""
        parts = [
            f"--num-layers {self.num_layers} --hidden-size {self.hidden_size}",
            f"--ffn-hidden-size {self.ffn_hidden_size}",
            f"--num-attention-heads {self.num_attention_heads}",
            f"--group-query-attention --num-query-groups {self.num_query_groups}",
            f"--num-experts {self.num_experts} --moe-router-topk {self.moe_router_topk}",
            "--normalization RMSNorm --swiglu --disable-bias-linear",
            f"--position-embedding-type rope --rotary-base {self.rotary_base:g}",
            f"--norm-epsilon {self.norm_epsilon:g}",
            f"--max-position-embeddings {self.max_position_embeddings}",
        ]
        for field in _MOE_FLAGS:
            value = getattr(self, field)
            if value:
                flag = "--" + field.replace("_", "-")
                parts.append(flag if value is True else f"{flag} {value:g}")
        if self.untie_embeddings_and_output_weights:
            parts.append("--untie-embeddings-and-output-weights")
        if self.window_size:
            parts.append(f"--window-size {self.window_size}")
        return " ".join(parts)


def _rope_theta(cfg: dict, default: float) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConversionError(f"RoPE scaling {kind!r} is not supported (plain RoPE only)")
    return float(rope.get("rope_theta") or cfg.get("rope_theta") or default)


def read_config(directory: str, moe: bool = True) -> tuple[dict, Arch]:
    """``config.json`` of an HF Mixtral (``moe``) or dense Llama/Mistral, checked and mapped."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    return cfg, arch_from_config(cfg, path, moe)


def arch_from_config(cfg: dict, path: str, moe: bool = True) -> Arch:
    """The checks and the mapping of :func:`read_config` on a parsed ``config.json``."""
    if moe and not cfg.get("num_local_experts"):
        raise ConversionError(
            f"{path}: a {cfg.get('model_type')!r} model without experts; hf-to-mcore reads "
            "Mixtral (for a dense Llama/Mistral use `upcycle`)"
        )
    problems = []
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim {cfg.get('head_dim')} != hidden_size / num_attention_heads")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (SwiGLU with SiLU only)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            problems.append(f"{flag} (no biases here)")
    if problems:
        raise ConversionError(f"{path}: unsupported: " + "; ".join(problems))
    return Arch(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        num_experts=cfg["num_local_experts"] if moe else 0,
        moe_router_topk=cfg.get("num_experts_per_tok", 2) if moe else 0,
        vocab_size=cfg["vocab_size"],
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        rotary_base=_rope_theta(cfg, 1e6 if moe else 1e4),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        window_size=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
    )


def hf_shards(directory: str) -> list[str]:
    """The safetensors files of an HF model directory (indexed shards or one file)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ConversionError(f"{directory}: no model.safetensors(.index.json)")


def iter_shards(directory: str, dtype: torch.dtype | None):
    """Yield ``(file, {name: tensor})`` one safetensors shard at a time."""
    for path in hf_shards(directory):
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        yield path, tensors
        del tensors  # before the next shard is read


# ------------------------------------------------------------------------------ HF -> pieces
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def qkv_pieces(arch: Arch, layer: int, which: str, weight: torch.Tensor) -> list:
    """Pieces of ``linear_qkv`` for HF ``{which}_proj`` (one per head, Megatron's order)."""
    d, ng = arch.head_dim, arch.num_query_groups
    per_group = arch.num_attention_heads // ng
    stride, count = per_group + 2, arch.num_attention_heads + 2 * ng
    out = []
    for head in range(weight.shape[0] // d):
        if which == "q":
            index = (head // per_group) * stride + head % per_group
        else:
            index = head * stride + per_group + (which == "v")
        rows = weight[head * d : (head + 1) * d]
        out.append(piece(QKV, rows, (0, layer, arch.num_layers), (1, index, count), prepend=1))
    return out


def expert_pieces(arch: Arch, layer: int, expert: int, part: str, weight: torch.Tensor) -> list:
    """Pieces of expert ``expert``: ``part`` is w1 (gate), w3 (up), w13 ([w1; w3]) or w2."""
    at = ((0, layer, arch.num_layers), (1, expert, arch.num_experts))
    if part == "w2":
        return [piece(FC2, weight, *at, prepend=2)]
    if part == "w13":
        return [piece(FC1, weight, *at, prepend=2)]
    return [piece(FC1, weight, *at, (2, 0 if part == "w1" else 1, 2), prepend=2)]


def layer_piece(key: str, arch: Arch, layer: int, weight: torch.Tensor) -> list:
    return [piece(key, weight, (0, layer, arch.num_layers), prepend=1)]


def common_pieces(arch: Arch, name: str, weight: torch.Tensor) -> list | None:
    """Embedding, final norm, output layer, and the per-layer attention tensors and norms
    (shared by Mixtral and dense models); ``None`` if ``name`` is none of them."""
    if name == "model.embed_tokens.weight":
        return [piece(EMB, weight, allow_shape_mismatch=True)]
    if name == "lm_head.weight":
        return [piece(OUT, weight, allow_shape_mismatch=True)] if _untied(arch) else []
    if name == "model.norm.weight":
        return [piece(FINAL_NORM, weight)]
    match = _LAYER.fullmatch(name)
    if not match:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if layer >= arch.num_layers:
        raise ConversionError(f"{name}: layer {layer} but num_hidden_layers={arch.num_layers}")
    proj = re.fullmatch(r"self_attn\.([qkvo])_proj\.weight", rest)
    if proj and proj.group(1) != "o":
        return qkv_pieces(arch, layer, proj.group(1), weight)
    simple = {
        "self_attn.o_proj.weight": PROJ,
        "input_layernorm.weight": QKV_NORM,
        "post_attention_layernorm.weight": MLP_NORM,
    }
    return layer_piece(simple[rest], arch, layer, weight) if rest in simple else None


def _untied(arch: Arch) -> bool:
    return arch.untie_embeddings_and_output_weights


def _moe_name(layer: int, rest: str) -> str:
    """The published name of a Mixtral MoE tensor (what coverage is checked against)."""
    return f"model.layers.{layer}.block_sparse_moe.{rest}"


def mixtral_pieces(arch: Arch, name: str, weight: torch.Tensor) -> tuple[list, list[str]]:
    """Our pieces for one HF Mixtral tensor, and the published names of what it covers."""
    found = common_pieces(arch, name, weight)
    if found is not None:
        return found, [name]
    match = _LAYER.fullmatch(name)
    layer, rest = (int(match.group(1)), match.group(2)) if match else (None, name)
    if rest in ("block_sparse_moe.gate.weight", "mlp.gate.weight"):
        return layer_piece(ROUTER, arch, layer, weight), [_moe_name(layer, "gate.weight")]
    expert = _EXPERT.fullmatch(rest)
    if expert:
        e, part = int(expert.group(1)), expert.group(2)
        covered = [_moe_name(layer, f"experts.{e}.{part}.weight")]
        return expert_pieces(arch, layer, e, part, weight), covered
    if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        part = "w13" if rest.endswith("gate_up_proj") else "w2"
        pieces, covered = [], []
        for e in range(arch.num_experts):
            pieces += expert_pieces(arch, layer, e, part, weight[e])
            for w in ("w1", "w3") if part == "w13" else ("w2",):
                covered.append(_moe_name(layer, f"experts.{e}.{w}.weight"))
        return pieces, covered
    if _IGNORED.fullmatch(name):
        return [], []
    raise ConversionError(f"unexpected tensor {name!r} in the HF checkpoint")


def expected_names(arch: Arch, dense: bool = False) -> set[str]:
    """Every tensor an HF Mixtral (or, ``dense``, Llama/Mistral) checkpoint must provide."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if _untied(arch):
        names.add("lm_head.weight")
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        if dense:
            names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
            continue
        names.add(_moe_name(n, "gate.weight"))
        experts = range(arch.num_experts)
        names |= {_moe_name(n, f"experts.{e}.w{i}.weight") for e in experts for i in (1, 2, 3)}
    return names


def extra_state_pieces(arch: Arch) -> list:
    return [
        empty_object(k, n, arch.num_layers) for k in EXTRA_STATES for n in range(arch.num_layers)
    ]


def check_complete(seen: set[str], expected: set[str], source: str) -> None:
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:6]) + (
            f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""
        )
        raise ConversionError(f"{source}: tensors missing from the checkpoint: {shown}")
