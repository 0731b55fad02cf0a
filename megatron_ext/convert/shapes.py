"""The shape ``config.json`` implies for each Hugging Face tensor, checked before converting.

A checkpoint whose tensors disagree with its config (an edited ``intermediate_size``, a tensor
with extra rows) used to be written out and fail only when loaded, or raise a traceback half
way through; ``check_shape`` names the tensor, its file and both shapes first.
"""

from __future__ import annotations

import re

import torch

from megatron_ext.convert.hf import _EXPERT, _LAYER, Arch, ConversionError

_QWEN_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def expected_shape(arch: Arch, name: str) -> tuple[int, ...] | None:
    """The shape config.json implies for HF tensor ``name`` (None: a name not checked here;
    unknown names are reported by the converters themselves)."""
    h, f, e, v = arch.hidden_size, arch.ffn_hidden_size, arch.num_experts, arch.vocab_size
    fe, fs = arch.moe_ffn_hidden_size or f, arch.moe_shared_expert_intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (v, h)
    if name == "model.norm.weight":
        return (h,)
    match = _LAYER.fullmatch(name)
    if not match:
        return None
    rest = match.group(2)
    expert = _EXPERT.fullmatch(rest) or _QWEN_EXPERT.fullmatch(rest)
    if expert:
        return (h, fe) if expert.group(2) in ("w2", "down") else (fe, h)
    return {
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "mlp.shared_expert.gate_proj.weight": (fs, h),
        "mlp.shared_expert.up_proj.weight": (fs, h),
        "mlp.shared_expert.down_proj.weight": (h, fs),
        "mlp.shared_expert_gate.weight": (1, h),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "block_sparse_moe.gate.weight": (e, h),
        "mlp.gate.weight": (e, h),
        "mlp.experts.gate_up_proj": (e, 2 * fe, h),
        "mlp.experts.down_proj": (e, h, fe),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }.get(rest)


def check_shape(arch: Arch, name: str, weight: torch.Tensor, path: str) -> None:
    """Refuse a tensor whose shape disagrees with config.json, naming both (the checkpoint
    would be written, then fail to load, or load shifted)."""
    want = expected_shape(arch, name)
    if want is not None and tuple(weight.shape) != want:
        raise ConversionError(
            f"{path}: {name} has shape {tuple(weight.shape)}, but config.json (hidden_size "
            f"{arch.hidden_size}, intermediate_size {arch.ffn_hidden_size}, vocab_size "
            f"{arch.vocab_size}, {arch.num_attention_heads} heads, {arch.num_query_groups} KV "
            f"heads, {arch.num_experts or 0} experts) implies {want}"
        )
