"""Mixtral presets and the Megatron-Core model builder."""

from megatron_ext.model.builder import (
    build_model,
    layer_spec,
    padded_vocab_size,
    transformer_config,
)
from megatron_ext.model.presets import PRESETS, MixtralArch, param_counts

__all__ = [
    "PRESETS",
    "MixtralArch",
    "build_model",
    "layer_spec",
    "padded_vocab_size",
    "param_counts",
    "transformer_config",
]
