"""Architecture presets (``--model NAME`` fills the architecture flags from these).

| preset           | layers | hidden | FFN   | heads/KV | experts x FFN  | top-k | vocab  | params |
|------------------|--------|--------|-------|----------|----------------|-------|--------|--------|
| 8x7b             | 32     | 4096   | 14336 | 32/8     | 8              | 2     | 32000  | 46.7B  |
| 8x22b            | 56     | 6144   | 16384 | 48/8     | 8              | 2     | 32768  | 140.6B |
| deepseek-moe-16b | 28     | 2048   | 10944 | 16/16    | 64x1408 + 2816 | 6     | 102400 | 16.4B  |
| small            | 4      | 256    | 512   | 8/4      | 8              | 2     | 32000  | demo   |
| tiny             | 2      | 64     | 128   | 4/2      | 4              | 2     | 32000  | tests  |
| tiny-deepseek    | 4      | 64     | 176   | 4/4      | 16x64 + 128    | 4     | 32000  | tests  |

Active per token: 8x7b 12.9B, 8x22b 39.2B, deepseek-moe-16b 2.8B ("+ N": shared experts' width).
Mixtral presets: RMSNorm (eps 1e-5), RoPE (base 1e6), SwiGLU experts, untied embeddings, no
biases, every layer MoE. DeepSeek-MoE 16B (DeepSeek-MoE report, Table/§5 and the released
``config.json``): fine-grained experts of FFN 1408 (a quarter of a 5632-wide SwiGLU FFN), 6 of 64
routed per token, 2 always-on shared experts (one SwiGLU of 2816), the first layer dense (FFN
10944), softmax over all experts without renormalising the top 6 (``--moe-router-pre-softmax``),
multi-head attention (16 KV heads), RoPE base 10000, RMSNorm eps 1e-6, sequence 4096. Where it
differs from the report: the report says a 100K vocabulary, the released model has 102400 rows;
the report's 16.4B total / 2.8B active match :func:`param_counts` (16.38B / 2.83B).
``param_counts`` gives the exact numbers for any preset (embeddings included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_ext.model.stack import moe_layer_pattern


@dataclass(frozen=True)
class MixtralArch:
    """An MoE decoder's architecture (the Mixtral family and its fine-grained relatives)."""

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
    moe_ffn_hidden_size: int | None = None  # None: ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None
    moe_layer_freq: int | tuple[int, ...] = 1
    moe_router_pre_softmax: bool = False
    moe_router_score_function: str = "softmax"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def as_flags(self) -> dict:
        flags = asdict(self)
        if isinstance(self.moe_layer_freq, tuple):
            flags["moe_layer_freq"] = list(self.moe_layer_freq)
        return flags


PRESETS: dict[str, MixtralArch] = {
    "8x7b": MixtralArch(32, 4096, 14336, 32, 8, 8, 32000),
    "8x22b": MixtralArch(56, 6144, 16384, 48, 8, 8, 32768, max_position_embeddings=65536),
    "deepseek-moe-16b": MixtralArch(
        28,
        2048,
        10944,
        16,
        16,
        64,
        102400,
        moe_router_topk=6,
        max_position_embeddings=4096,
        rotary_base=1e4,
        norm_epsilon=1e-6,
        moe_ffn_hidden_size=1408,
        moe_shared_expert_intermediate_size=2816,
        moe_layer_freq=(0,) + (1,) * 27,
        moe_router_pre_softmax=True,
    ),  # fmt: skip
    "small": MixtralArch(4, 256, 512, 8, 4, 8, 32000, seq_length=256, max_position_embeddings=4096),
    "tiny": MixtralArch(2, 64, 128, 4, 2, 4, 32000, seq_length=64, max_position_embeddings=1024),
    "tiny-deepseek": MixtralArch(
        4,
        64,
        176,
        4,
        4,
        16,
        32000,
        moe_router_topk=4,
        seq_length=64,
        max_position_embeddings=1024,
        rotary_base=1e4,
        norm_epsilon=1e-6,
        moe_ffn_hidden_size=64,
        moe_shared_expert_intermediate_size=128,
        moe_layer_freq=(0, 1, 1, 1),
        moe_router_pre_softmax=True,
    ),  # fmt: skip
}


def param_counts(arch: MixtralArch) -> dict[str, int]:
    """Parameter counts: ``total``, ``active`` (per token: top-k routed experts, the shared
    experts and every dense layer), and parts.

    Per layer: attention ``H*(H + 2*G*d) + H*H`` (QKV and output projection, G KV heads of dim
    d), two RMSNorm weights ``2*H``; an MoE layer adds the router ``H*E``, per routed expert
    ``3*H*Fe`` (w1, w3, w2; Fe the expert FFN) and the shared experts ``3*H*Fs``; a dense layer
    adds ``3*H*F``. Plus input embedding and output layer ``V*H`` each (untied) and the final
    norm ``H``.
    """
    h, e, v = arch.hidden_size, arch.num_experts, arch.vocab_size
    kv = arch.num_query_groups * arch.head_dim
    attn = h * (h + 2 * kv) + h * h
    expert = 3 * h * arch.expert_ffn
    shared = 3 * h * (arch.moe_shared_expert_intermediate_size or 0)
    dense_mlp = 3 * h * arch.ffn_hidden_size
    pattern = moe_layer_pattern(
        list(arch.moe_layer_freq)
        if isinstance(arch.moe_layer_freq, tuple)
        else arch.moe_layer_freq,
        arch.num_layers,
    )
    n_moe = sum(pattern)
    n_dense = arch.num_layers - n_moe
    embeddings = 2 * v * h + h
    common = arch.num_layers * (attn + 2 * h) + n_moe * (h * e + shared) + n_dense * dense_mlp
    total = common + n_moe * e * expert + embeddings
    active = common + n_moe * arch.moe_router_topk * expert + embeddings
    return {
        "total": total,
        "active": active,
        "experts": n_moe * e * expert,
        "shared_experts": n_moe * shared,
        "dense_mlp": n_dense * dense_mlp,
        "attention": arch.num_layers * attn,
        "embeddings": embeddings,
    }


def arch_from_args(args) -> MixtralArch:
    """The architecture the parsed flags describe (for :func:`param_counts`)."""
    fields = {f: getattr(args, f) for f in MixtralArch.__dataclass_fields__ if hasattr(args, f)}
    if isinstance(fields.get("moe_layer_freq"), list):
        fields["moe_layer_freq"] = tuple(fields["moe_layer_freq"])
    return MixtralArch(**fields)


def describe(args) -> str:
    """One line for the start of a run: the stack and its parameter counts."""
    arch = arch_from_args(args)
    counts = param_counts(arch)
    pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
    shared = arch.moe_shared_expert_intermediate_size
    return (
        f"{arch.num_layers} layers ({sum(pattern)} MoE, {arch.num_layers - sum(pattern)} dense), "
        f"{arch.num_experts} experts of FFN {arch.expert_ffn}, top-{arch.moe_router_topk}"
        + (f", shared experts of {shared}" if shared else "")
        + f": {counts['total'] / 1e9:.3f}B parameters, {counts['active'] / 1e9:.3f}B active "
        f"per token (vocabulary {arch.vocab_size}, unpadded)"
    )
