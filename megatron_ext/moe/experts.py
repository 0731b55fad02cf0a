"""The local experts of one EP rank: SwiGLU FFNs stored stacked, run as grouped GEMMs.

Shapes legend: M rows for this rank (grouped by local expert), H hidden, L local experts
(E/EP), F expert FFN size, Fs = F / ETP the FFN shard held by this expert-TP rank.

Parameters (``nn.Linear`` convention ``[out, in]``, the layout of HF Mixtral's experts):

* ``w13 [L, 2*Fs, H]``: rows ``[:Fs]`` are this rank's shard of the gate projection w1, rows
  ``[Fs:]`` its shard of the up projection w3 (column parallel over expert-TP);
* ``w2 [L, H, Fs]``: this rank's shard of the down projection (row parallel over expert-TP).

``y_MH = (silu(x w1ᵀ) * (x w3ᵀ)) w2ᵀ`` per expert; with ETP>1 the result is a partial sum over
the FFN shards that the layer reduces over TP. :func:`expert_mlp` runs all local experts as
two ``torch._grouped_mm`` around one SwiGLU on CUDA (bf16, sm90), and elsewhere (CPU)
as one autograd node looping over experts (:class:`_LoopExperts`: each expert's whole MLP at
once, cache-resident; faster than one dense MLP over the same rows). With FP8
(``config.fp8``) Transformer Engine's ``GroupedLinear`` runs the same stacked weights
(``fp8_experts.py``; tested against a recording fake of TE).

Parameters carry ``allreduce = False`` (Megatron's DDP and distributed optimizer then reduce
their grads over the expert-data-parallel group only) and the tensor-parallel attributes.
``sharded_state_dict`` emits the keys, global shapes and offsets of Megatron's SequentialMLP /
TEGroupedMLP (``<prefix>experts.linear_fc1.weight [E, 2F, H]`` with the expert axis indexed by
GLOBAL expert id and SwiGLU halves placed at ``[0, F)`` / ``[F, 2F)``;
``<prefix>experts.linear_fc2.weight [E, H, F]``), so checkpoints reshard across EP and TP sizes
and interchange with Megatron-Core's own MoE checkpoints.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_ext.moe.dispatcher import MoEGroups, group_rank, group_size
from megatron_ext.moe.fp8_experts import TEExperts
from megatron_ext.moe.grouped_wgrad import GroupedExpertsWgrad
from megatron_ext.moe.loop_experts import _LocalExperts, _LoopExperts, swiglu_grad


def recomputes(config, module: str) -> bool:
    """Whether ``--recompute-granularity selective --recompute-modules`` names ``module``."""
    return config.recompute_granularity == "selective" and module in (
        config.recompute_modules or ()
    )


def grouped_mm_eligible(dtype, capability: tuple[int, int], hidden: int, ffn_shard: int) -> bool:
    """Whether ``torch._grouped_mm``'s CUTLASS kernel runs our expert GEMMs: bf16 on Hopper
    (sm90) only, and every operand's leading stride a multiple of 16 bytes (8 bf16 elements).

    fp16/fp32 would run PyTorch's per-group fallback (a host copy of the offsets and one GEMM
    per expert, slower than our loop); on sm100 zero-size groups are known to give non-zero
    weight gradients (pytorch#172439). Strides: ``x [M, H]`` and ``w13ᵀ [L, H, 2F]`` need
    ``H % 8`` and ``2F % 8``, ``swiglu(h) [M, F]`` and ``w2ᵀ [L, F, H]`` need ``F % 8``.
    """
    return (
        dtype == torch.bfloat16
        and capability[0] == 9
        and hidden % 8 == 0
        and ffn_shard % 8 == 0
        and hasattr(torch, "_grouped_mm")
    )


def _use_torch_grouped_mm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    if not x.is_cuda or x.shape[0] == 0:
        return False
    capability = torch.cuda.get_device_capability(x.device)
    return grouped_mm_eligible(x.dtype, capability, w13.shape[-1], w2.shape[-1])


def _grouped_mm(x_MK, w_LNK, splits_L: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w_LNK[e]ᵀ`` as one ``torch._grouped_mm`` (autograd)."""
    offs = torch.cumsum(splits_L, dim=0, dtype=torch.int32)
    return torch._grouped_mm(x_MK, w_LNK.transpose(-2, -1), offs=offs)


def expert_mlp(
    x_MH, w13_LFH, w2_LHF, splits: tuple[int, ...], splits_L: torch.Tensor, fuse_wgrad=False,
    recompute_act=False,
):  # fmt: skip
    """``y_MH``: SwiGLU expert e on its ``splits[e]`` consecutive rows of ``x_MH``.

    CUDA bf16 on sm90: two ``torch._grouped_mm`` around one SwiGLU over all rows (with
    ``fuse_wgrad``, :class:`~megatron_ext.moe.grouped_wgrad.GroupedExpertsWgrad`: the same
    GEMMs, weight gradients accumulated into ``main_grad`` expert by expert); elsewhere (CPU,
    other GPUs, fp16, fp32, F or H not multiples of 8): :class:`_LoopExperts` (weight gradients
    into ``main_grad`` with ``fuse_wgrad``; ``recompute_act``: the SwiGLU recomputed in the
    backward from its input).
    """
    if _use_torch_grouped_mm(x_MH, w13_LFH, w2_LHF):
        if fuse_wgrad:  # weight gradients straight into main_grad (grouped_wgrad.py)
            return GroupedExpertsWgrad.apply(x_MH, w13_LFH, w2_LHF, tuple(splits), splits_L,
                                             recompute_act)  # fmt: skip
        h_MF2 = _grouped_mm(x_MH, w13_LFH, splits_L)
        if recompute_act:
            a_MF = tensor_parallel.checkpoint(swiglu, False, h_MF2)
        else:
            a_MF = swiglu(h_MF2)
        return _grouped_mm(a_MF, w2_LHF, splits_L)
    return _LoopExperts.apply(x_MH, w13_LFH, w2_LHF, tuple(splits), fuse_wgrad, recompute_act)


class _SwiGLU(torch.autograd.Function):
    """``a = silu(g) * u`` for ``h = [g | u]`` (last dim). Backward writes ``dh`` in place of
    autograd's cat: ``du = da * silu(g)``, ``dg = silu_backward(da * u, g)``."""

    @staticmethod
    def forward(ctx, h):
        g, u = h.chunk(2, dim=-1)
        s = F.silu(g)
        ctx.save_for_backward(h, s)
        return s * u

    @staticmethod
    def backward(ctx, da):
        h, s = ctx.saved_tensors
        return swiglu_grad(da, h, s)


def swiglu(h_MF2: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(h_MF2)


class GroupedExperts(torch.nn.Module):
    """This rank's L SwiGLU experts (see the module docstring for the layout)."""

    def __init__(self, config, groups: MoEGroups, num_experts: int):
        super().__init__()
        self.groups = groups
        ep, etp = group_size(groups.ep), group_size(groups.expt_tp)
        if num_experts % ep:
            raise ValueError(f"num_moe_experts={num_experts} is not divisible by EP={ep}")
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"expert FFN size {ffn} is not divisible by expert-TP={etp}")
        self.num_experts, self.num_local = num_experts, num_experts // ep
        self.hidden, self.ffn, self.ffn_shard = config.hidden_size, ffn, ffn // etp
        self.local_offset = group_rank(groups.ep) * self.num_local
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else None
        device = device or torch.cuda.current_device()
        kw = dict(dtype=config.params_dtype, device=device)
        self.w13 = torch.nn.Parameter(
            torch.empty(self.num_local, 2 * self.ffn_shard, self.hidden, **kw)
        )
        self.w2 = torch.nn.Parameter(torch.empty(self.num_local, self.hidden, self.ffn_shard, **kw))
        if config.perform_initialization:
            self._initialize(config)
        for param, tp_dim in ((self.w13, 1), (self.w2, 2)):
            param.allreduce = False  # expert params: grads reduced over expert-DP only
            set_tensor_model_parallel_attributes(param, True, tp_dim, 1)
        self.fuse_wgrad = config.gradient_accumulation_fusion
        self.recompute_act = recomputes(config, "moe_act")
        self.te = None  # FP8: Transformer Engine's grouped GEMMs on the same weights
        if getattr(config, "fp8", None):
            self.te = TEExperts(
                self.num_local, self.hidden, self.ffn_shard, config.params_dtype, device
            )

    @torch.no_grad()
    def _initialize(self, config) -> None:
        """Normal init via ``config.init_method`` (w1, w3) / ``output_layer_init_method`` (w2).

        ``use_cpu_initialization``: every rank draws the full weights of every expert from the
        default generator in global order and keeps its shard, so the logical model does not
        depend on the TP/EP layout. Otherwise each local shard is drawn on the device under
        Megatron's expert-parallel RNG tracker (distinct per EP x ETP rank, deterministic given
        the seed, as Megatron's own experts).
        """
        fs, tp_rank = self.ffn_shard, group_rank(self.groups.expt_tp)
        shard = slice(tp_rank * fs, (tp_rank + 1) * fs)
        if config.use_cpu_initialization:
            for g in range(self.num_experts):
                w1, w3 = (torch.empty(self.ffn, self.hidden, dtype=torch.float32) for _ in "13")
                w2 = torch.empty(self.hidden, self.ffn, dtype=torch.float32)
                config.init_method(w1)
                config.init_method(w3)
                config.output_layer_init_method(w2)
                local = g - self.local_offset
                if 0 <= local < self.num_local:
                    self.w13[local, :fs].copy_(w1[shard])
                    self.w13[local, fs:].copy_(w3[shard])
                    self.w2[local].copy_(w2[:, shard])
            return
        tracker = tensor_parallel.get_cuda_rng_tracker()
        name = tensor_parallel.random.get_expert_parallel_rng_tracker_name()
        use_tracker = (
            parallel_state.model_parallel_is_initialized() and name in tracker.get_states()
        )
        ctx = tracker.fork(name) if use_tracker else contextlib.nullcontext()
        with ctx:
            for local in range(self.num_local):
                config.init_method(self.w13[local, :fs])
                config.init_method(self.w13[local, fs:])
                config.output_layer_init_method(self.w2[local])

    def forward(
        self, x_MH, splits: tuple[int, ...], splits_L: torch.Tensor, combine_with=None
    ) -> torch.Tensor:
        """Run the local experts on rows grouped by local expert (``splits`` rows each).

        ``combine_with = (probs_TK, meta)`` (a local dispatch, ``dispatch(..., send_rows=
        False)``, where :meth:`runs_local`): ``x_MH`` is then the tokens ``x_TH`` themselves and
        the result the combined ``y_TH``: the dispatch's gather, the experts and the combine in
        one node (:class:`~megatron_ext.moe.loop_experts._LocalExperts`). Always through the
        module call: Megatron's DDP waits for the experts' overlapped parameter all-gather in a
        forward pre-hook of this module."""
        fuse = self.fuse_wgrad and hasattr(self.w13, "main_grad")  # under Megatron's DDP
        recompute = self.recompute_act and torch.is_grad_enabled()
        if combine_with is not None:
            probs_TK, meta = combine_with
            k = probs_TK.shape[1]
            return _LocalExperts.apply(
                x_MH, self.w13, self.w2, probs_TK, meta.pair_to_sorted_N.view(-1, k),
                meta.sorted_token_N, meta.sorted_pair_N, tuple(splits), fuse, recompute,
            )  # fmt: skip
        if self.te is not None:
            return self.te(x_MH, self.w13, self.w2, splits, swiglu, _LoopExperts.apply)
        return expert_mlp(x_MH, self.w13, self.w2, splits, splits_L, fuse, recompute)

    def runs_local(self, x_TH) -> bool:
        """Whether ``forward(..., combine_with=...)`` applies to these tokens: the expert loop
        runs them (neither FP8 nor the grouped GEMM)."""
        return self.te is None and not _use_torch_grouped_mm(x_TH, self.w13, self.w2)

    # ------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron SequentialMLP-compatible sharded tensors (see module docstring)."""
        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError("singleton_local_shards checkpoints are not supported")
        replica_id = (0, 0, group_rank(self.groups.expt_dp))
        out = {}
        for name, fc, build, parts in (
            ("w13", "linear_fc1", self._build_fc1, 2),
            ("w2", "linear_fc2", self._build_fc2, 1),
        ):
            out[f"{prefix}{name}"] = ShardedTensorFactory(
                f"{prefix}experts.{fc}.weight",
                getattr(self, name),
                partial(build, sharded_offsets=tuple(sharded_offsets)),
                partial(_merge_experts, parts=parts),
                replica_id,
            )
        if self.te is not None:
            out.update(self.te.sharded_state_dict(f"{prefix}te.", sharded_offsets, self.groups))
        return out

    def _expert_offsets(self, sharded_offsets, local):
        axis = len(sharded_offsets)
        return (*sharded_offsets, (axis, self.local_offset + local, self.num_experts)), axis

    def _build_fc1(self, key, data, replica_id, flattened_range, sharded_offsets):
        assert flattened_range is None, "flattened ranges are not supported"
        tp, tp_rank, fs = (
            group_size(self.groups.expt_tp),
            group_rank(self.groups.expt_tp),
            self.ffn_shard,
        )
        shards = []
        for local in range(self.num_local):
            offsets, axis = self._expert_offsets(sharded_offsets, local)
            for half, chunk in ((0, tp_rank), (1, tp + tp_rank)):  # gate | up halves of [2F, H]
                part = data[local, half * fs : (half + 1) * fs]
                shards.append(
                    ShardedTensor.from_rank_offsets(
                        key,
                        part,
                        *offsets,
                        (axis + 1, chunk, 2 * tp),
                        replica_id=replica_id,
                        prepend_axis_num=axis + 1,
                    )
                )
        return shards

    def _build_fc2(self, key, data, replica_id, flattened_range, sharded_offsets):
        assert flattened_range is None, "flattened ranges are not supported"
        tp, tp_rank = group_size(self.groups.expt_tp), group_rank(self.groups.expt_tp)
        shards = []
        for local in range(self.num_local):
            offsets, axis = self._expert_offsets(sharded_offsets, local)
            shards.append(
                ShardedTensor.from_rank_offsets(
                    key,
                    data[local],
                    *offsets,
                    (axis + 2, tp_rank, tp),
                    replica_id=replica_id,
                    prepend_axis_num=axis + 1,
                )
            )
        return shards


def _merge_experts(loaded: list[torch.Tensor], parts: int) -> torch.Tensor:
    """Inverse of the builders: ``parts`` tensors per local expert (fc1: gate, up; fc2: one)."""
    per_expert = [torch.cat(loaded[i : i + parts], dim=0) for i in range(0, len(loaded), parts)]
    return torch.stack(per_expert)
