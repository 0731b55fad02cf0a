"""Step time and MFU of a layout: a stated, deliberately simple cost model (docs/planner.md).

Notation: s sequence, b micro-batch, T = s*b tokens per micro-batch, h hidden, F expert FFN,
E experts, K top-k, V vocabulary, q = A*d query width, kv = G*d key/value width, p bytes per
activation element, t TP, pp PP, v VPP (1 without), m micro-batches per step, L_s layers per
pipeline stage, ep EP, e_t expert-TP (``--expert-tensor-parallel-size``, default t), dp DP,
edp = t*dp/(e_t*ep) expert-DP; "folded" = e_t != t (MoE parallel folding: each TP rank
dispatches its block of T_d = T/t tokens, else T_d = T).

Per micro-batch and pipeline stage, on one GPU (forward; backward = 2x forward, full
recomputation adds one more forward of the layers):

    FLOPs   = L_s * [2T(h(q + 2kv) + qh)/t  + 2Ts*q/t (causal attention)  + 2ThE (router)
                     + 6ThF*K/t * imbalance (experts: each rank runs ~T_d*K*(e_t if
                       folded) rows on its F/e_t shard: the same FLOPs either way)]
              + 2ThV/t on the last stage (output layer)
    compute = FLOPs / (peak * EFFICIENCY * f(smallest GEMM dimension)),  f(x) = x / (x + 128)
    memory  = 3 * activation bytes / HBM bandwidth (written forward, read and written backward)
    TP      = L_s * c * (t-1)/t * T*h*p / NVLink per pass; c = 4 collectives (all-gather and
              reduce-scatter around attention and around MoE), 3 when folded with sequence
              parallel (the MoE output is the rank's own block: no reduce-scatter)
    EP      = L_s * 2 all-to-alls * T_d*K*h*p*(ep-1)/ep / bandwidth per pass (dispatch, combine)
    ETP     = L_s * 2 * T_d*K*h*p*(e_t-1) / NVLink per pass when folded (the received rows
              all-gathered over expert-TP, the partial outputs reduce-scattered)

The all-to-all bandwidth is NVLink while the EP group sits in one node (its ranks are e_t
apart: e_t*ep <= GPUs per node) and the per-GPU network bandwidth for the share of peers off
the node otherwise.

Per step, with ``t_mb`` the slowest stage's micro-batch time:

    step = (m + (pp-1)/v) * t_mb                       (1F1B pipeline, bubble (pp-1)/(v*m))
         + p2p    2(pp-1) hops of T*h*p/(t if SP) bytes when interleaved (Megatron-LM overlaps
                  the rest), 2(m + pp - 1) hops without interleaving (blocking sends)
         + DP     gradient reduce-scatter (fp32) and parameter all-gather (p) of the rank's
                  buffers, dense over dp, experts over edp ranks; with --overlap-grad-reduce /
                  --overlap-param-gather only what exceeds one micro-batch's backward / forward
                  is exposed; without the distributed optimizer an fp32 all-reduce
         + optimizer  30 bytes per updated element / HBM bandwidth (Adam, fp32 state)

    MFU = training FLOPs per token (megatron_ext.metrics, the figure the training loop
          reports) * tokens per step / (step * GPUs * peak)

``EFFICIENCY`` is the one fitted constant: the fraction of peak a large bf16 GEMM-dominated
layer reaches end to end. It is set so that Megatron's published 8x7B mapping on 64 H100
(TP1 PP4 EP8 VPP8, 468 TFLOP/s, 47% MFU) comes out near its published figure; the 8x22B mapping
(about 445 TFLOP/s published) is then a check that was not fitted (docs/planner.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megatron_ext.metrics import training_flops_per_token
from megatron_ext.model.stack import chunk_first_layer, moe_layer_pattern
from megatron_ext.plan import activations
from megatron_ext.plan.hardware import Hardware
from megatron_ext.plan.memory import static_memory
from megatron_ext.plan.params import (
    BYTES,
    ddp_buffers,
    dispatched,
    expert_dp,
    expert_tp,
    padded_vocab,
    rank_params,
)

EFFICIENCY = 0.58
GEMM_KNEE = 128


def _shape(x: float) -> float:
    return x / (x + GEMM_KNEE)


@dataclass
class StepCost:
    step_s: float
    tflops_per_gpu: float
    mfu: float
    tokens_per_s_per_gpu: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds per step


def _act_bytes(args) -> int:
    return 2 if (args.bf16 or args.fp16) else 4


def _moe_layers_on_stage(args, pp_rank: int) -> int:
    """MoE layers (``--moe-layer-freq``) among the layers of pipeline rank ``pp_rank``."""
    pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
    pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
    per_chunk = args.num_layers // (pp * (vpp or 1))
    firsts = [chunk_first_layer(args.num_layers, pp, vpp, pp_rank, v) for v in range(vpp or 1)]
    return sum(sum(pattern[a : a + per_chunk]) for a in firsts)


def _stage_microbatch(args, hw: Hardware, pp_rank: int, recompute: bool, imbalance: float):
    """(forward seconds, backward seconds, parts) for one micro-batch on stage ``pp_rank``."""
    s, b, h = args.seq_length, args.micro_batch_size, args.hidden_size
    t, ep, et = args.tensor_model_parallel_size, args.expert_model_parallel_size, expert_tp(args)
    folded = et != t
    f, e, k = (
        args.moe_ffn_hidden_size or args.ffn_hidden_size,
        args.num_experts,
        args.moe_router_topk,
    )
    d = h // args.num_attention_heads
    q, kv = args.num_attention_heads * d, args.num_query_groups * d
    tokens, p = s * b, _act_bytes(args)
    sent, rows = dispatched(args, tokens)  # tokens this rank dispatches, rows its experts get
    layers = args.num_layers // args.pipeline_model_parallel_size
    peak = hw.peak_tflops * 1e12 * EFFICIENCY

    attn_gemm = 2 * tokens * (h * (q + 2 * kv) + q * h) / t
    attn_core = 2 * tokens * s * q / t
    router = 2 * tokens * h * e
    experts = 6 * tokens * h * f * k / t * imbalance
    rows_per_expert = rows * ep / e
    attention_s = attn_gemm / (peak * _shape(min(tokens, (q + 2 * kv) / t, h))) + attn_core / (
        peak * _shape(min(s, d))
    )
    moe_s = (
        attention_s
        + router / (peak * _shape(e))
        + experts / (peak * _shape(min(rows_per_expert, f / et, h)))
    )
    if args.moe_shared_expert_intermediate_size:
        fs = args.moe_shared_expert_intermediate_size
        moe_s += 6 * tokens * h * fs / t / (peak * _shape(min(tokens, fs / t, h)))
    fd = args.ffn_hidden_size
    dense_s = attention_s + 6 * tokens * h * fd / t / (peak * _shape(min(tokens, fd / t, h)))
    n_moe = _moe_layers_on_stage(args, pp_rank)
    compute_f = n_moe * moe_s + (layers - n_moe) * dense_s
    if pp_rank == args.pipeline_model_parallel_size - 1:
        vocab = padded_vocab(args) / t
        compute_f += 2 * tokens * h * vocab / (peak * _shape(min(tokens, vocab, h)))
    # the activations the forward writes (and the backward reads), kept or not
    act = activations.layer_bytes(activations.without_selective(args))
    memory_f = layers * act / (hw.hbm_gbps * 1e9)

    tp_f = 0.0
    if t > 1:
        passes = 3 if folded and args.sequence_parallel else 4
        tp_f = layers * passes * (t - 1) / t * tokens * h * p / (hw.nvlink_gbps * 1e9)
    ep_f = 0.0
    if folded and et > 1:  # the expert-TP all-gather and reduce-scatter (one node)
        ep_f += n_moe * 2 * sent * k * h * p * (et - 1) / (hw.nvlink_gbps * 1e9) * imbalance
    if ep > 1:
        volume = sent * k * h * p * (ep - 1) / ep
        on_node = min(ep, max(1, hw.gpus_per_node // et))
        off = (ep - on_node) / (ep - 1)
        per_a2a = max(
            volume * (1 - off) / (hw.nvlink_gbps * 1e9), volume * off / (hw.network_gbps * 1e9)
        )
        ep_f += n_moe * 2 * per_a2a * imbalance
    fwd = compute_f + memory_f + tp_f + ep_f
    bwd = 2 * compute_f + 2 * memory_f + tp_f + ep_f
    if recompute:
        bwd += fwd
    parts = {
        "compute": compute_f * (4 if recompute else 3),
        "memory-bound": memory_f * (4 if recompute else 3),
        "TP comm": tp_f * (3 if recompute else 2),
        "EP all-to-all": ep_f * (3 if recompute else 2),
    }
    # Selective recomputation re-runs, in the backward: "moe" the MoE part of each MoE layer
    # (router, experts, shared experts, one dispatch and combine); "moe_act" the SwiGLU
    # (memory-bound: read the GEMM-1 output, write silu and the product).
    mods = activations.selective_modules(args) if not recompute else set()
    extra = {}
    if "moe" in mods:
        extra = {"compute": n_moe * (moe_s - attention_s), "EP all-to-all": ep_f / 2}
    elif "moe_act" in mods:
        swiglu_bytes = rows * imbalance * 4 * f / et * p
        extra = {"memory-bound": n_moe * swiglu_bytes / (hw.hbm_gbps * 1e9)}
    for part, seconds in extra.items():
        parts[part] += seconds
        bwd += seconds
    return fwd, bwd, parts


def _dp_seconds(args, hw: Hardware, pp_rank: int, window_f: float, window_b: float):
    """Exposed data-parallel communication seconds for stage ``pp_rank``."""
    dp, edp = args.data_parallel_size, expert_dp(args)
    t = args.tensor_model_parallel_size
    bw = (hw.nvlink_gbps if t * dp <= hw.gpus_per_node else hw.network_gbps) * 1e9
    rs = ag = 0.0
    for index, chunk in enumerate(rank_params(args, pp_rank)):
        for buf in ddp_buffers(args, chunk, pp_rank, index):
            n = edp if buf.expert else dp
            if n == 1:
                continue
            frac = (n - 1) / n
            if args.use_distributed_optimizer:
                rs += frac * buf.numel * BYTES[buf.grad_dtype] / bw
                ag += frac * buf.numel * BYTES[buf.param_dtype] / bw
            else:
                rs += 2 * frac * buf.numel * BYTES[buf.grad_dtype] / bw
    exposed = max(0.0, rs - window_b) if args.overlap_grad_reduce else rs
    exposed += max(0.0, ag - window_f) if args.overlap_param_gather else ag
    return exposed


def step_cost(
    args: argparse.Namespace, hw: Hardware, recompute: bool = False, imbalance: float = 1.0
) -> StepCost:
    """Seconds per step, TFLOP/s per GPU and MFU of the layout in ``args`` (module docstring)."""
    pp, m = args.pipeline_model_parallel_size, args.num_microbatches
    vpp = args.virtual_pipeline_model_parallel_size or 1
    stages = sorted({0, pp - 1})
    per_stage = {r: _stage_microbatch(args, hw, r, recompute, imbalance) for r in stages}
    slowest = max(stages, key=lambda r: per_stage[r][0] + per_stage[r][1])
    fwd, bwd, parts = per_stage[slowest]
    t_mb = fwd + bwd
    parts = {k: v * m for k, v in parts.items()}
    parts["pipeline bubble"] = (pp - 1) / vpp * t_mb

    t, s, b, h = (
        args.tensor_model_parallel_size,
        args.seq_length,
        args.micro_batch_size,
        args.hidden_size,
    )
    hop_bytes = s * b * h * _act_bytes(args) / (t if args.sequence_parallel else 1)
    dp_span = t * args.data_parallel_size
    bw = (hw.nvlink_gbps if dp_span < hw.gpus_per_node else hw.network_gbps) * 1e9
    hops = 2 * (pp - 1) if vpp > 1 else 2 * (m + pp - 1)
    parts["PP p2p"] = hops * hop_bytes / bw if pp > 1 else 0.0
    # Gradient sync overlaps with the last micro-batch's backward, the parameter all-gather
    # with the first micro-batch's forward (all chunks of the stage).
    parts["DP comm (exposed)"] = max(_dp_seconds(args, hw, r, fwd, bwd) for r in stages)
    opt_elements = max(static_memory(args, r, 0).optimizer_elements for r in stages)
    parts["optimizer step"] = 30 * opt_elements / (hw.hbm_gbps * 1e9)

    step = sum(parts.values())
    tokens = args.global_batch_size * args.seq_length
    flops = training_flops_per_token(args) * tokens
    gpus = args.world_size
    tflops = flops / step / gpus / 1e12
    return StepCost(step, tflops, tflops / hw.peak_tflops, tokens / step / gpus, parts)
