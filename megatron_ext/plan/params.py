"""The parameters one rank holds, and how Megatron's DDP and distributed optimizer lay them out.

Nothing is built: the shapes follow from the flags. Per pipeline rank and model chunk (one per
virtual stage), in the order of ``GPTModel.named_parameters()`` with the local layer spec:

    embedding.word_embeddings.weight      [Vp/TP, H]          first chunk of pipeline rank 0
    per layer: input_layernorm.weight     [H]
               self_attention.linear_proj [H, A*d/TP]
               self_attention.linear_qkv  [(A + 2G)*d/TP, H]
               pre_mlp_layernorm.weight   [H]
               mlp.router.weight          [E, H]              (dense: reduced over DP)
               mlp.experts.w13            [E/EP, 2F/ETP, H]   (expert: reduced over expert-DP)
               mlp.experts.w2             [E/EP, H, F/ETP]    (F: --moe-ffn-hidden-size)
               mlp.shared_experts.linear_fc1 [2Fs/TP, H], linear_fc2 [H, Fs/TP] (+ gate_weight
                                          [1, H]) with --moe-shared-expert-intermediate-size Fs
    dense layers of a mixed stack (--moe-layer-freq): mlp.linear_fc1 [2F/TP, H], linear_fc2
               [H, F/TP] in place of the router and experts (F: --ffn-hidden-size)
    decoder.final_layernorm.weight        [H]                 last chunk of the last rank
    output_layer.weight                   [Vp/TP, H]

with ``Vp`` the vocabulary padded to a multiple of 128 x TP, ETP the expert-TP size
(``--expert-tensor-parallel-size``, default TP) and expert-DP = TP x DP / (ETP x EP).
(Transformer Engine fuses the first norm into ``linear_qkv``: same elements, another order,
which only moves bucket borders.)

DDP (``megatron.core.distributed``) puts each chunk's dense and expert parameters in separate
buffers, grouped by dtype. With the distributed optimizer every parameter starts at a multiple
of 64 elements and every bucket ends at a multiple of lcm(data-parallel size, 128); buckets close
once they reach ``bucket_size`` elements (only with --overlap-grad-reduce, only for the first
chunk of pipeline rank 0). Each bucket is cut into DP equal shards; a rank's optimizer keeps
fp32 state for the parameter elements inside its shard, padding excluded.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from megatron_ext.model.stack import chunk_first_layer, moe_layer_pattern

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "fp32" | "bf16" | "fp16"
    expert: bool = False  # reduced over the expert-data-parallel group (expert_dp ranks)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def padded_vocab(args: argparse.Namespace) -> int:
    """Megatron-LM's padding: ``ceil(V / (divisible_by * TP)) * divisible_by * TP``."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-args.vocab_size // multiple) * multiple


def expert_tp(args: argparse.Namespace) -> int:
    """``--expert-tensor-parallel-size`` (Megatron-LM's default: TP)."""
    return getattr(args, "expert_tensor_parallel_size", None) or args.tensor_model_parallel_size


def expert_dp(args: argparse.Namespace) -> int:
    """Expert-data-parallel ranks: a stage's TP x DP ranks regrouped as ETP x EP x expert-DP."""
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    return tp * args.data_parallel_size // (expert_tp(args) * ep)


def dispatched(args: argparse.Namespace, tokens: int) -> tuple[int, int]:
    """Per micro-batch of ``tokens``: (T_d, rows) = the tokens one rank dispatches (all of them,
    or with MoE parallel folding, expert-TP apart from TP, its TP block T/TP) and the (token,
    choice) rows reaching its experts on average (T_d x K, all-gathered over expert-TP when
    folded), before any imbalance."""
    t, et, k = args.tensor_model_parallel_size, expert_tp(args), args.moe_router_topk
    if et == t:
        return tokens, tokens * k
    sent = tokens // t
    return sent, sent * k * et


def param_dtype(args: argparse.Namespace) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _norm_dtype(args: argparse.Namespace) -> str:
    # With --bf16/--fp16 engine.py wraps each chunk in Megatron's Float16Module, which casts
    # every parameter (norms included) to the half type; the optimizer keeps fp32 main copies.
    return param_dtype(args)


def layers_per_chunk(args: argparse.Namespace) -> int:
    return args.num_layers // (
        args.pipeline_model_parallel_size * (args.virtual_pipeline_model_parallel_size or 1)
    )


def layer_params(args: argparse.Namespace, index: int, moe: bool = True) -> list[Param]:
    """One transformer layer's parameters on one rank (``index``: local layer number; ``moe``:
    an MoE layer, else a dense one of a mixed stack)."""
    tp, ep, etp = args.tensor_model_parallel_size, args.expert_model_parallel_size, expert_tp(args)
    h, e = args.hidden_size, args.num_experts
    f = args.moe_ffn_hidden_size or args.ffn_hidden_size
    d = h // args.num_attention_heads
    q, kv = args.num_attention_heads * d, args.num_query_groups * d
    dt, nt = param_dtype(args), _norm_dtype(args)
    p = f"decoder.layers.{index}."
    out = [
        Param(p + "input_layernorm.weight", (h,), nt),
        Param(p + "self_attention.linear_proj.weight", (h, q // tp), dt),
        Param(p + "self_attention.linear_qkv.weight", ((q + 2 * kv) // tp, h), dt),
        Param(p + "pre_mlp_layernorm.weight", (h,), nt),
    ]
    if not moe:
        fd = args.ffn_hidden_size
        return out + [
            Param(p + "mlp.linear_fc1.weight", (2 * fd // tp, h), dt),
            Param(p + "mlp.linear_fc2.weight", (h, fd // tp), dt),
        ]
    out += [
        Param(p + "mlp.router.weight", (e, h), dt),
        Param(p + "mlp.experts.w13", (e // ep, 2 * f // etp, h), dt, expert=True),
        Param(p + "mlp.experts.w2", (e // ep, h, f // etp), dt, expert=True),
    ]
    shared = args.moe_shared_expert_intermediate_size
    if shared:  # named_parameters lists SharedExpertMLP's gate (a direct parameter) first
        if args.moe_shared_expert_gate:
            out.append(Param(p + "mlp.shared_experts.gate_weight", (1, h), dt))
        out += [
            Param(p + "mlp.shared_experts.linear_fc1.weight", (2 * shared // tp, h), dt),
            Param(p + "mlp.shared_experts.linear_fc2.weight", (h, shared // tp), dt),
        ]
    return out


def chunk_params(args: argparse.Namespace, pp_rank: int, vp_stage: int) -> list[Param]:
    """The parameters of model chunk ``vp_stage`` on pipeline rank ``pp_rank``, in order."""
    pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size or 1
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == pp - 1 and vp_stage == vpp - 1
    vocab_rows = padded_vocab(args) // args.tensor_model_parallel_size
    h, dt = args.hidden_size, param_dtype(args)
    pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
    offset = chunk_first_layer(args.num_layers, pp, vpp, pp_rank, vp_stage)
    out = []
    if first:
        out.append(Param("embedding.word_embeddings.weight", (vocab_rows, h), dt))
    for i in range(layers_per_chunk(args)):
        out += layer_params(args, i, pattern[offset + i])
    if last:
        out.append(Param("decoder.final_layernorm.weight", (h,), _norm_dtype(args)))
        out.append(Param("output_layer.weight", (vocab_rows, h), dt))
    return out


def rank_params(args: argparse.Namespace, pp_rank: int) -> list[list[Param]]:
    """Every chunk's parameters on pipeline rank ``pp_rank`` (one list per virtual stage)."""
    vpp = args.virtual_pipeline_model_parallel_size or 1
    return [chunk_params(args, pp_rank, v) for v in range(vpp)]


# ------------------------------------------------------------------------- DDP buffer layout
@dataclass
class Bucket:
    start: int
    end: int  # padded end; (end - start) is a multiple of the DP size with the dist. optimizer
    params: list[tuple[Param, int, int]]  # (param, start, end) in buffer coordinates


@dataclass
class Buffer:
    param_dtype: str
    grad_dtype: str
    expert: bool
    numel: int
    buckets: list[Bucket]


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def buffer_layout(
    params: list[Param], dp: int, distributed_optimizer: bool, bucket_size: int | None
) -> list[Bucket]:
    """Megatron's ``_ParamAndGradBuffer`` index arithmetic for one buffer (params in module
    order; the buffer is filled in reverse, to follow the backward pass)."""
    pad_param = 64 if distributed_optimizer else 1
    pad_bucket = math.lcm(dp, 128) if distributed_optimizer else 1
    buckets, current = [], []
    bucket_start = start = 0
    for param in reversed(params):
        start = _pad(start, pad_param)
        end = start + param.numel
        current.append((param, start, end))
        if bucket_size is not None and end - bucket_start >= bucket_size:
            bucket_end = _pad(end, pad_bucket)
            buckets.append(Bucket(bucket_start, bucket_end, current))
            bucket_start = start = bucket_end
            current = []
        else:
            start = end
    if current:
        buckets.append(Bucket(bucket_start, _pad(current[-1][2], pad_bucket), current))
    return buckets


def ddp_buffers(
    args: argparse.Namespace, chunk: list[Param], pp_rank: int, chunk_index: int
) -> list[Buffer]:
    """The buffers Megatron's DDP allocates for one chunk (engine.py's DDP config)."""
    dp, edp = args.data_parallel_size, expert_dp(args)
    bucket_size = None
    if args.overlap_grad_reduce and pp_rank == 0 and chunk_index == 0:
        # engine.py: 40M on GPUs; on CPU it passes None and DDP picks max(40M, 1M x DP).
        bucket_size = max(40_000_000, 1_000_000 * dp) if args.cpu else 40_000_000
    buffers = []
    for expert, group in ((False, dp), (True, edp)):
        by_dtype: dict[str, list[Param]] = {}
        for p in chunk:
            if p.expert == expert:
                by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            buckets = buffer_layout(params, group, args.use_distributed_optimizer, bucket_size)
            # grad_reduce_in_fp32=True in engine.py: every gradient buffer is fp32.
            buffers.append(Buffer(dtype, "fp32", expert, buckets[-1].end, buckets))
    return buffers


def shard_elements(buffer: Buffer, shard_rank: int, group_size: int) -> int:
    """Parameter elements (padding excluded) in rank ``shard_rank``'s shard of every bucket."""
    total = 0
    for b in buffer.buckets:
        size = (b.end - b.start) // group_size
        lo = b.start + shard_rank * size
        hi = lo + size
        for _, s, e in b.params:
            total += max(0, min(e, hi) - max(s, lo))
    return total
