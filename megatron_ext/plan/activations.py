"""Activation memory: what autograd keeps for the backward pass, times the micro-batches in flight.

Per layer and micro-batch on one rank (bytes). T = s*b tokens, T_sp = T/t with
--sequence-parallel (else T), p bytes per activation element (2 bf16/fp16, 4 fp32), h hidden,
q = A*d, kv = G*d, a = A/t local heads, F expert FFN, K top-k, E experts, e_t expert-TP,
T_d the tokens this rank dispatches (T; with MoE parallel folding, e_t != t, its block T/t),
M = T_d*K*(e_t if folded else 1)*imbalance rows reaching this rank's experts (dropless: on
average every EP rank gets T_d*K rows, all-gathered over expert-TP when folded):

    attention  norm          local (torch RMSNorm): 2*T_sp*h*p + 4*T_sp (input, normalised,
                             rstd); Transformer Engine (fused into linear_qkv): T_sp*h*p + 4*T_sp
               linear_qkv    T_sp*h*p (its input; gathered again in the backward under SP)
               RoPE          4*s*d*4 (cos and sin, for q and k)
               core          local unfused (--attention-backend unfused): q, and k, v repeated
                             to A heads: 3*T*q/t*p, plus the fp32 softmax b*a*s^2*4 (+ its
                             cast b*a*s^2*p when p < 4); flash (TE, or the local default
                             SDPAttention): q, k, v, output: T*(2q + 2kv)/t*p + lse b*a*s*4
               linear_proj   T*q/t*p (local; with flash it is the saved output, counted above)
    MoE        norm          local: 2*T_sp*h*p + 4*T_sp;  TE: T_sp*h*p + 4*T_sp
               router        T*h*4 (fp32 input of the gate), 3*T*E*4 with p < 4 (2 in
                             fp32: logits, scores, their cast), T*K*(8 + 4) (ids, weights)
               dispatch      3*T_d*K*8 (permutation indices), + 2*M*8 with several local
                             experts after an exchange (EP > 1 or a folded expert-TP > 1:
                             regrouping by expert)
               experts       M*h*p (input), M*2F/e_t*p (w1|w3 output, for SwiGLU),
                             2*M*F/e_t*p (SwiGLU output and its weighted copy, for w2)
               combine       T_d*K*h*p (expert outputs, to weight by the router)
               shared        T*(h + 3*Fs/t)*p with --moe-shared-expert-intermediate-size Fs
                             (Megatron's MLP: fc1 input, fc1 output, SwiGLU output)

Dense layers of a mixed stack (--moe-layer-freq) are counted as MoE layers: an over-estimate
by the router and dispatch terms for DeepSeek-MoE's one dense layer.

(The MoE terms mirror what ``megatron_ext/moe`` saves; tests/test_plan.py measures them.)
    dropout    1 byte per element masked when --attention-dropout / --hidden-dropout > 0
               (hidden: 2*T_sp*h per layer; attention: b*a*s^2 on the unfused path)

Selective recomputation (``--recompute-granularity selective``, ``--recompute-modules``, Megatron-
Core's default ``core_attn``; ``--moe-layer-recompute`` = ``moe``), what each module stops
keeping (its input stays, already counted as the previous part's output):

    moe             router, dispatch indices, expert activations, combine, shared experts
    moe_act         the SwiGLU's saved intermediates: expert activations M*(h + 2F/e_t)*p
    shared_experts  the shared experts' term
    core_attn       flash: the softmax statistics b*a*s*4 (q, k, v stay as the checkpoint's
                    inputs, the output as linear_proj's); unfused: the softmax and its
                    dropout mask
    layernorm, mlp  not modelled (layernorm frees the norm outputs on Transformer Engine only;
                    mlp concerns the dense layers, counted as MoE layers above)

What moe, shared_experts and core_attn stop keeping is rebuilt by their recomputation during the
backward: one layer's worth, after the output layer's backward has released the head's
activations (last stage), while every other layer's are still held; the peak is the larger of
the two moments. moe_act's recomputation stays inside the experts' backward, expert by expert.

Plus, once per micro-batch: first stage token ids T*8 (+ a T-byte mask with TP > 1); last stage
final norm, the output layer's input T_sp*h*p and the fp32 softmax of the cross-entropy
T*Vp/t*4 (+ labels and mask T*9).
Every pipeline stage keeps each in-flight micro-batch's output T_sp*h*p until its backward
(so does Megatron-Core with ``--cpu``; on GPUs builder.py sets ``deallocate_pipeline_outputs``
and that term is a small over-estimate). The unfused attention's causal
mask (s^2 bools) is cached once per process.

In flight (Megatron-Core's schedules, rank r of pp): interleaved, ``min(2(pp-r-1) +
(v-1)*pp + 1, m*v)`` chunk forwards of L/(pp*v) layers; 1F1B, ``min(pp-r, m)`` micro-batches
of L/pp layers; no pipeline, one. Full recomputation keeps only each layer's input T_sp*h*p
and rebuilds one layer's activations during its backward.

A transient working set is added on top: one layer's activations (the backward of the layer
being processed allocates gradients of that size), and on the last stage the gradient of the
logits (T*Vp/t*4).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megatron_ext.layout import recompute_modules
from megatron_ext.plan.params import dispatched, expert_tp, padded_vocab


def _p(args) -> int:
    return 2 if (args.bf16 or args.fp16) else 4


def _sdpa(args) -> bool:
    from megatron_ext.model.builder import uses_sdpa

    return uses_sdpa(args) if hasattr(args, "attention_backend") else False


def _dims(args):
    s, b, t = args.seq_length, args.micro_batch_size, args.tensor_model_parallel_size
    tokens = s * b
    t_sp = tokens // t if args.sequence_parallel else tokens
    d = args.hidden_size // args.num_attention_heads
    return s, b, t, tokens, t_sp, d


def layer_terms(args: argparse.Namespace, imbalance: float = 1.0) -> dict[str, float]:
    """Bytes one transformer layer saves for backward, per micro-batch, by part."""
    s, b, t, tokens, t_sp, d = _dims(args)
    p, h, f = _p(args), args.hidden_size, args.moe_ffn_hidden_size or args.ffn_hidden_size
    e, k, ep = args.num_experts, args.moe_router_topk, args.expert_model_parallel_size
    q, kv = args.num_attention_heads * d, args.num_query_groups * d
    heads = args.num_attention_heads // t
    te = args.transformer_impl == "transformer_engine"
    et = expert_tp(args)
    sent, rows = dispatched(args, tokens)
    rows *= imbalance
    norm = (1 if te else 2) * t_sp * h * p + 4 * t_sp
    terms = {
        "attention norm": norm,
        "linear_qkv input": t_sp * h * p,
        "rope": 4 * s * d * 4,
    }
    if te or _sdpa(args):  # TE's flash attention, or SDPAttention (PyTorch's fused kernels)
        terms["core attention (flash)"] = tokens * (2 * q + 2 * kv) // t * p + b * heads * s * 4
    else:
        softmax = b * heads * s * s * (4 + (p if p < 4 else 0))
        terms["core attention (unfused)"] = 3 * tokens * q // t * p + softmax
        terms["linear_proj input"] = tokens * q // t * p
        if args.attention_dropout > 0:
            terms["attention dropout mask"] = b * heads * s * s
    if args.hidden_dropout > 0:
        terms["hidden dropout masks"] = 2 * t_sp * h
    terms["MoE norm"] = norm
    terms["router"] = tokens * h * 4 + (3 if p < 4 else 2) * tokens * e * 4 + tokens * k * 12
    exchanged = ep > 1 or (et != t and et > 1)  # rows regrouped by expert after an exchange
    terms["dispatch indices"] = 3 * sent * k * 8 + (
        2 * rows * 8 if e // ep > 1 and exchanged else 0
    )
    terms["expert activations"] = rows * (h + 4 * f // et) * p
    terms["combine"] = sent * k * h * p
    shared = args.moe_shared_expert_intermediate_size
    if shared:  # Megatron's MLP: fc1 input (gathered), fc1 output, SwiGLU output
        terms["shared experts"] = tokens * (h + 3 * shared // t) * p
    _selective_recompute(terms, args, rows * (h + 2 * f // et) * p, b * heads * s * 4)
    return terms


def rebuilt_bytes(args: argparse.Namespace, imbalance: float = 1.0) -> float:
    """One layer's activations that selective recomputation rebuilds in the backward (what
    moe, shared_experts and core_attn dropped from :func:`layer_terms`)."""
    mods = selective_modules(args)
    if not mods & {"moe", "shared_experts", "core_attn"}:
        return 0.0
    # moe_act's saving is not rebuilt: compare with moe_act alone, not with no recomputation
    only_act = argparse.Namespace(
        **{**vars(args), "recompute_modules": ["moe_act"] if "moe_act" in mods else []}
    )
    return layer_bytes(only_act, imbalance) - layer_bytes(args, imbalance)


def without_selective(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` without selective recomputation (what the forward pass itself produces)."""
    if selective_modules(args):
        return argparse.Namespace(**{**vars(args), "recompute_granularity": None})
    return args


def selective_modules(args: argparse.Namespace) -> set[str]:
    """The recomputed modules of ``--recompute-granularity selective`` (else none)."""
    if getattr(args, "recompute_granularity", None) != "selective":
        return set()
    return set(recompute_modules(args))


def _selective_recompute(terms, args, experts_act_only, attn_stats) -> None:
    """Drop from ``terms`` what the selectively recomputed modules stop keeping (docstring)."""
    mods = selective_modules(args)
    if "moe" in mods:
        for part in ("router", "dispatch indices", "expert activations", "combine",
                     "shared experts"):  # fmt: skip
            terms.pop(part, None)
    if "moe_act" in mods and "expert activations" in terms:
        terms["expert activations"] = experts_act_only
    if "shared_experts" in mods:
        terms.pop("shared experts", None)
    if "core_attn" in mods:
        if "core attention (flash)" in terms:  # its output stays: linear_proj's input
            terms["core attention (flash)"] -= attn_stats
        elif "core attention (unfused)" in terms:
            terms["core attention (unfused)"] = terms["linear_proj input"] * 3
            terms.pop("attention dropout mask", None)


def layer_bytes(args: argparse.Namespace, imbalance: float = 1.0) -> float:
    return sum(layer_terms(args, imbalance).values())


def embedding_bytes(args: argparse.Namespace) -> float:
    """Token ids (int64), and with TP > 1 the vocab-parallel embedding's input mask."""
    _, _, t, tokens, _, _ = _dims(args)
    return tokens * 8 + (tokens if t > 1 else 0)


def head_bytes(args: argparse.Namespace) -> float:
    """Final norm, output layer input and the fp32 cross-entropy softmax (last stage)."""
    _, _, t, tokens, t_sp, _ = _dims(args)
    p, h = _p(args), args.hidden_size
    te = args.transformer_impl == "transformer_engine"
    norm = (1 if te else 2) * t_sp * h * p + 4 * t_sp
    return norm + t_sp * h * p + tokens * padded_vocab(args) // t * 4 + tokens * 9


def in_flight(args: argparse.Namespace, pp_rank: int) -> int:
    """Chunk forwards whose activations are alive at the peak on pipeline rank ``pp_rank``."""
    pp, m = args.pipeline_model_parallel_size, args.num_microbatches
    vpp = args.virtual_pipeline_model_parallel_size
    if pp == 1:
        return 1
    if vpp:
        warmup = 2 * (pp - pp_rank - 1) + (vpp - 1) * pp
        return min(warmup + 1, m * vpp)
    return min(pp - pp_rank, m)


@dataclass
class ActivationMemory:
    stored: float  # saved for backward at the peak (all in-flight micro-batches)
    transient: float  # working set of the backward on top
    in_flight: int  # chunk forwards alive at the peak
    per_layer: float  # one layer, one micro-batch, no recomputation
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.stored + self.transient


def microbatch_bytes(args: argparse.Namespace, pp_rank: int, chunk: int | None = None) -> float:
    """Bytes one micro-batch saves on this rank's chunks (all chunks, or chunk ``chunk``)."""
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size or 1
    per_chunk = args.num_layers // (pp * vpp)
    chunks = range(vpp) if chunk is None else [chunk]
    total = 0.0
    for c in chunks:
        total += per_chunk * layer_bytes(args)
        if pp_rank == 0 and c == 0:
            total += embedding_bytes(args)
        if pp_rank == pp - 1 and c == vpp - 1:
            total += head_bytes(args)
    return total


def stage_activations(
    args: argparse.Namespace, pp_rank: int, recompute: bool = False, imbalance: float = 1.0
) -> ActivationMemory:
    """Peak activation bytes on pipeline rank ``pp_rank`` (module docstring)."""
    _, _, t, tokens, t_sp, _ = _dims(args)
    pp, p, h = args.pipeline_model_parallel_size, _p(args), args.hidden_size
    vpp = args.virtual_pipeline_model_parallel_size or 1
    per_chunk = args.num_layers // (pp * vpp)
    terms = layer_terms(args, imbalance)
    per_layer = sum(terms.values())
    n = in_flight(args, pp_rank)
    kept = t_sp * h * p if recompute else per_layer
    stored = n * per_chunk * kept
    if pp > 1:
        stored += n * t_sp * h * p  # pipeline outputs kept until their backward
    if pp_rank == 0:
        stored += min(n, args.num_microbatches) * embedding_bytes(args)
    if args.transformer_impl != "transformer_engine" and not _sdpa(args):
        stored += args.seq_length**2  # the unfused path's causal mask (bool), cached once
    transient = per_layer * (2 if recompute else 1)
    head = head_bytes(args) if pp_rank == pp - 1 else 0.0
    if pp_rank == pp - 1:
        transient = max(transient, tokens * padded_vocab(args) // t * 4)
    # Selective recomputation rebuilds one layer in the backward, after the head's backward
    # released the head's activations: the peak is at the end of the forward or then.
    rebuilt = 0.0 if recompute else rebuilt_bytes(args, imbalance)
    stored += max(head, rebuilt)  # the output chunk runs one micro-batch at a time
    return ActivationMemory(stored, transient, n, per_layer, terms)
