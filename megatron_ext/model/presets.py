"""Mixtral architecture presets (``--model NAME`` fills the architecture flags from these).

| preset | layers | hidden | FFN   | heads | KV | experts | top-k | vocab | total / active  |
|--------|--------|--------|-------|-------|----|---------|-------|-------|-----------------|
| 8x7b   | 32     | 4096   | 14336 | 32    | 8  | 8       | 2     | 32000 | 46.7B / 12.9B   |
| 8x22b  | 56     | 6144   | 16384 | 48    | 8  | 8       | 2     | 32768 | 140.6B / 39.2B  |
| small  | 4      | 256    | 512   | 8     | 4  | 8       | 2     | 32000 | CPU demo        |
| tiny   | 2      | 64     | 128   | 4     | 2  | 4       | 2     | 32000 | tests           |

All share: RMSNorm (eps 1e-5), RoPE (base 1e6), SwiGLU experts, untied embeddings, no biases.
``param_counts`` gives the exact numbers for any preset (embeddings included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MixtralArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    num_experts: int
    vocab_size: int
    moe_router_topk: int = 2
    seq_length: int = 4096
    max_position_embeddings: int = 32768
    rotary_base: float = 1e6
    norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def as_flags(self) -> dict:
        return asdict(self)


PRESETS: dict[str, MixtralArch] = {
    "8x7b": MixtralArch(32, 4096, 14336, 32, 8, 8, 32000),
    "8x22b": MixtralArch(56, 6144, 16384, 48, 8, 8, 32768, max_position_embeddings=65536),
    "small": MixtralArch(4, 256, 512, 8, 4, 8, 32000, seq_length=256, max_position_embeddings=4096),
    "tiny": MixtralArch(2, 64, 128, 4, 2, 4, 32000, seq_length=64, max_position_embeddings=1024),
}


def param_counts(arch: MixtralArch) -> dict[str, int]:
    """Parameter counts: ``total``, ``active`` (per token, top-k experts), and parts.

    Per layer: attention ``H*(H + 2*G*d) + H*H`` (QKV and output projection, G KV heads of dim d),
    two RMSNorm weights ``2*H``, router ``H*E``, and per expert ``3*H*F`` (w1, w3, w2).
    Plus input embedding and output layer ``V*H`` each (untied) and the final norm ``H``.
    """
    h, f, e, v = arch.hidden_size, arch.ffn_hidden_size, arch.num_experts, arch.vocab_size
    kv = arch.num_query_groups * arch.head_dim
    attn = h * (h + 2 * kv) + h * h
    expert = 3 * h * f
    dense_per_layer = attn + 2 * h + h * e
    embeddings = 2 * v * h + h
    n = arch.num_layers
    total = n * (dense_per_layer + e * expert) + embeddings
    active = n * (dense_per_layer + arch.moe_router_topk * expert) + embeddings
    return {
        "total": total,
        "active": active,
        "experts": n * e * expert,
        "attention": n * attn,
        "embeddings": embeddings,
    }
