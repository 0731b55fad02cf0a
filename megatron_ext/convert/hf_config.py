"""``config.json`` for the HF models we write: ``MixtralForCausalLM`` (Qwen2-MoE's builds on it
in ``qwen2_moe.py``)."""

from __future__ import annotations

import torch

from megatron_ext.convert.hf import Arch

_HF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def mixtral_config(arch: Arch, dtype: torch.dtype, template: dict | None = None) -> dict:
    """``config.json`` for ``MixtralForCausalLM`` (fields of ``template`` kept where unset)."""
    cfg = dict(template or {})
    cfg.pop("rope_scaling", None)
    cfg.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        rope_theta=arch.rotary_base,
        rope_parameters={"rope_theta": arch.rotary_base, "rope_type": "default"},
        sliding_window=arch.window_size,
        tie_word_embeddings=not arch.untie_embeddings_and_output_weights,
        num_local_experts=arch.num_experts,
        num_experts_per_tok=arch.moe_router_topk,
        torch_dtype=_HF_DTYPE.get(dtype, "float32"),
    )
    for key, value in {
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
        "use_cache": True,
    }.items():
        cfg.setdefault(key, value)
    return cfg
