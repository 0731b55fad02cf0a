"""RMSNorm / LayerNorm for the local (pure PyTorch) spec, usable with sequence parallel.

Megatron-Core's ``WrappedTorchNorm`` refuses ``sequence_parallel`` (apex's FusedLayerNorm and
TE's norms accept it; neither exists on CPU). With sequence parallel each TP rank normalises a
different slice of the sequence, so the norm weight's gradient is partial on every rank; marking
the weight ``sequence_parallel`` makes Megatron's ``finalize_model_grads`` all-reduce it over
the TP group, exactly as it does for the fused norms. Returns a plain ``torch.nn`` module, so
parameter and checkpoint names are those of ``WrappedTorchNorm`` (``weight``, ``bias``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelNorm:
    """Factory with a module's signature: ``SequenceParallelNorm(config, hidden_size, eps)``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        kwargs = {"eps": eps, "dtype": config.params_dtype}
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, **kwargs)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, **kwargs)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
