"""The local spec's core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-Core's ``DotProductAttention`` (the local spec's core) materialises the scores
``[b, heads, s, s]``, copies them through its masked softmax and keeps them for the backward:
at sequence 4096 that is 2 GiB per layer and micro-batch in bf16, and on CPU 13% of a training
step at issue 14's shape. ``SDPAttention`` keeps its contract (queries, keys, values
``[s, b, heads, d]`` in, ``[s, b, heads * d]`` out; the same scale, causal mask, sliding window
and dropout; its constructor, so heads per TP rank and the window come from the same place) and
hands the work to PyTorch's fused kernels: FlashAttention-2 or memory-efficient attention on
CUDA (PyTorch's own selection; both take bf16 and fp16, FlashAttention needs head dim <= 256),
a flash-style kernel on CPU. Results equal ``DotProductAttention``'s to float rounding
(tests/test_sdpa_attention.py). Grouped-query attention uses the kernel's ``enable_gqa`` (no
copies of the keys and values).

Where this module cannot follow Megatron's core (query-key layer scaling, a non-vanilla softmax
type), it defers to ``DotProductAttention.forward``. Dropout draws from Megatron's CUDA RNG
tracker like the original (outside sequence parallel), so TP ranks drop the same way; its mask
differs from the unfused path's (a different kernel draws it), as on any change of kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def sliding_window_mask(sq: int, skv: int, window: tuple[int, int], device) -> torch.Tensor:
    """``[sq, skv]`` boolean mask, True where query i may attend to key j: ``i - left <= j <=
    i + right`` (keys aligned to the end of the queries), Megatron's sliding-window rule."""
    i = torch.arange(sq, device=device).unsqueeze(1) + (skv - sq)
    j = torch.arange(skv, device=device).unsqueeze(0)
    return (j >= i - window[0]) & (j <= i + window[1])


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` on ``F.scaled_dot_product_attention`` (module docstring)."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if self.config.apply_query_key_layer_scaling or self.softmax_offset is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)  # fmt: skip
        assert packed_seq_params is None and attention_bias is None, (
            "packed sequences and attention bias need Transformer Engine's attention"
        )
        sq, b = query.shape[:2]
        skv = key.shape[0]
        q_BNSD, k_BGSD, v_BGSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if not query.is_cuda:
            # PyTorch's CPU flash kernel is ~15% slower (forward + backward, issue 14's shape)
            # on the strided [s, b] -> [b, s] views than on contiguous copies; CUDA's kernels
            # take the strides as they are.
            q_BNSD, k_BGSD, v_BGSD = (t.contiguous() for t in (q_BNSD, k_BGSD, v_BGSD))
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        window = self.scale_mask_softmax.window_size
        mask = None
        if attention_mask is not None:  # Megatron's masks say True = masked out
            mask = ~attention_mask
        elif window is not None:
            mask = sliding_window_mask(sq, skv, window, query.device)
        dropout = self.attention_dropout.p if self.training else 0.0
        kwargs = dict(
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal and mask is None,
            scale=self.softmax_scale,
            enable_gqa=q_BNSD.shape[1] != k_BGSD.shape[1],
        )
        if dropout and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, **kwargs)
        else:
            out_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BGSD, v_BGSD, **kwargs)
        return out_BNSD.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
