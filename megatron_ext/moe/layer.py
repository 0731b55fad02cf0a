"""The SMoE layer: Mixtral's top-k dropless sparse MoE in place of TransformerLayer's MLP.

Shapes legend: S sequence (local chunk under sequence parallel), B micro-batch, H hidden,
T = S_gathered * B tokens routed by this rank, E experts, K top-k, M rows received by the local
experts.

forward(hidden_states [S, B, H]) -> (output [S, B, H], None):

1. gather the TP group's tokens (all-gather along S with sequence parallel), flatten to x_TH;
2. route identically on every TP rank (fp32 gate; the gate weight goes through a
   copy-to-TP-region op so its partial grads are summed over TP inside autograd);
3. dispatch over EP, run this rank's experts on its FFN shard, combine with the top-k weights;
4. reduce the partial outputs over TP (reduce-scatter along S with sequence parallel, else
   all-reduce);
5. attach ``moe_aux_loss_coeff * aux + moe_z_loss_coeff * z`` to the output through
   :func:`~megatron_ext.moe.router.attach_loss` with scale ``aux_loss_scale / TP`` (every TP
   rank attaches the same loss and the backward sums over TP once).

Parallel layout: with expert-TP = TP (Megatron's default) EP groups lie inside the
data-parallel dimension; every TP rank of an EP rank holds the same tokens and an FFN shard of
the same local experts. With expert-TP apart from TP (MoE parallel folding: EP x expert-TP x
expert-DP over the ranks of a pipeline stage, Megatron-Core's expert grid) step 3 runs on this
TP rank's block of the routed tokens only (with sequence parallel: its own sequence chunk), the
dispatch gathers rows over expert-TP and reduces the FFN shards' partial sums itself (see
``dispatcher.py``), and step 4 becomes: the block is the output (sequence parallel) or the
blocks are summed over TP. Routing stays on all the TP group's tokens, so the router losses,
the load counts and their ``1/TP`` scale are the same in both layouts. The aux loss is
computed per micro-batch over the tokens of this DP rank (all the TP group's tokens), the same
on every TP rank and independent of TP.

Logging: per layer, non-persistent buffers accumulate (training forward passes with grad
enabled only, so activation recomputation does not count twice) the routed token counts
(summed over the dispatch's count group: EP, or expert-TP x EP when folded), the unscaled aux
and z losses and the number of micro-batches;
:func:`collect_moe_stats` reads and resets them. Nothing here is module-level state.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.moe.balancing import (
    LOAD_BALANCING_TYPES,
    aux_loss_counts,
    load_balancing_loss,
    seq_load_balancing_loss,
    z_loss,
)
from megatron_ext.moe.capacity import (
    DROP_POLICIES,
    drop_over_capacity,
    expert_capacity,
    pad_expert_input,
    padded_index,
    unpad_expert_output,
)
from megatron_ext.moe.collectives import (
    copy_to_tp,
    folded_output,
    gather_tokens,
    group_rank,
    group_size,
    scatter_output,
    token_block,
)
from megatron_ext.moe.dispatcher import (
    DispatchGroups,
    MoEGroups,
    combine,
    dispatch,
    expert_counts,
)
from megatron_ext.moe.experts import GroupedExperts, recomputes
from megatron_ext.moe.router import TopKRouter, attach_loss
from megatron_ext.moe.routing import ROUTER_DTYPES, RouterOptions

_STAT_BUFFERS = (
    "moe_tokens_per_expert",
    "moe_aux_loss_sum",
    "moe_z_loss_sum",
    "moe_microbatches",
    "moe_pairs_routed",
    "moe_pairs_dropped",
)


def _check_config(config) -> None:
    """Refuse settings that this layer would otherwise silently ignore."""
    bad = []
    if not config.num_moe_experts:
        bad.append("num_moe_experts must be set")
    if config.moe_router_load_balancing_type not in LOAD_BALANCING_TYPES:
        bad.append(f"moe_router_load_balancing_type must be one of {LOAD_BALANCING_TYPES}")
    if config.moe_router_score_function not in ("softmax", "sigmoid"):
        bad.append("moe_router_score_function must be 'softmax' or 'sigmoid'")
    if config.moe_router_dtype not in (None, *ROUTER_DTYPES):
        bad.append(f"moe_router_dtype must be one of {tuple(ROUTER_DTYPES)}")
    # Megatron's TransformerConfig already checks group_topk without groups, experts divisible
    # by the groups and group_topk <= groups; these two it leaves to the router, which would
    # silently ignore the groups or score groups by zero experts.
    groups, group_topk, k = (
        config.moe_router_num_groups,
        config.moe_router_group_topk,
        config.moe_router_topk,
    )
    if groups and not group_topk:
        bad.append("moe_router_num_groups needs moe_router_group_topk")
    elif group_topk and k % group_topk:
        bad.append(
            f"group-limited routing needs moe_router_topk ({k}) divisible by "
            f"moe_router_group_topk ({group_topk})"
        )
    if config.moe_token_drop_policy not in DROP_POLICIES:
        bad.append(f"moe_token_drop_policy must be one of {DROP_POLICIES}")
    if config.moe_input_jitter_eps:
        bad.append("moe_input_jitter_eps is not supported")
    if config.add_bias_linear:
        bad.append("experts and gate have no bias: set add_bias_linear=False")
    if bad:
        raise ValueError("SMoELayer: " + "; ".join(bad))


def _shared_experts(config, groups: MoEGroups):
    """Megatron-Core's SharedExpertMLP (a dense SwiGLU MLP of width
    ``moe_shared_expert_intermediate_size``, column/row parallel over TP, optional sigmoid gate
    ``gate_weight [1, H]``), or None. Overlap is Megatron's dispatcher's job; here it runs in
    line, so the module is built without it (its TP communication stays inside)."""
    if not config.moe_shared_expert_intermediate_size:
        return None
    # (moe_act is ours: Megatron's config check would refuse it without its grouped GEMM)
    modules = [m for m in config.recompute_modules or () if m != "moe_act"]
    cfg = dataclasses.replace(config, moe_shared_expert_overlap=False, recompute_modules=modules)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return SharedExpertMLP(
        cfg,
        submodules,
        gate=config.moe_shared_expert_gate,
        pg_collection=SimpleNamespace(tp=groups.tp),
    )


class SMoELayer(MegatronModule):
    """Top-k dropless SMoE with expert parallelism (module docstring has the data flow).

    Children: ``router`` (:class:`TopKRouter`: ``weight [E, H]``, optional ``expert_bias``) and
    ``experts`` (:class:`GroupedExperts`: ``w13 [E/EP, 2F/ETP, H]``, ``w2 [E/EP, H, F/ETP]``,
    ETP = expert-TP).
    """

    def __init__(
        self, config, submodules=None, layer_number: int | None = None, pg_collection=None
    ):
        super().__init__(config)
        _check_config(config)
        self.groups = MoEGroups.from_parallel_state(pg_collection)
        self.dispatch_groups = DispatchGroups.of(self.groups)
        self.local_dispatch = group_size(self.groups.ep) == 1 and not self.groups.folded
        self.layer_number = layer_number
        self.num_experts, self.topk = config.num_moe_experts, config.moe_router_topk
        cpu = config.use_cpu_initialization or not torch.cuda.is_available()
        device = "cpu" if cpu else torch.cuda.current_device()
        self.router = TopKRouter(
            self.num_experts,
            config.hidden_size,
            RouterOptions.from_config(config),
            enable_expert_bias=config.moe_router_enable_expert_bias,
            global_aux_loss=config.moe_router_load_balancing_type == "global_aux_loss",
            params_dtype=config.params_dtype,
            device=device,
            # the same on every TP rank (they route the same tokens), apart per DP rank
            noise_seed=1000 * (layer_number or 0) + group_rank(self.groups.dp),
        )
        if config.perform_initialization:
            # Default RNG: identical on every rank, like Megatron's router (replicated weight).
            with torch.no_grad():
                config.init_method(self.router.weight)
        self.experts = GroupedExperts(config, self.groups, self.num_experts)
        self.shared_experts = _shared_experts(config, self.groups)
        zeros = dict(device=device)
        self.register_buffer(
            "moe_tokens_per_expert",
            torch.zeros(self.num_experts, dtype=torch.long, **zeros),
            persistent=False,
        )
        self.register_buffer("moe_aux_loss_sum", torch.zeros((), **zeros), persistent=False)
        self.register_buffer("moe_z_loss_sum", torch.zeros((), **zeros), persistent=False)
        for name in ("moe_microbatches", "moe_pairs_routed", "moe_pairs_dropped"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long, **zeros), persistent=False)
        # d(training loss)/d(aux + z terms): grad-scaler scale / number of micro-batches; set by
        # the training loop through set_aux_loss_scale() and read at backward time.
        self.register_buffer("aux_loss_scale", torch.ones((), **zeros), persistent=False)

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer with its global (1-based) layer number."""
        self.layer_number = layer_number

    def _keep_fp32_buffers(self) -> None:
        # Float16Module casts floating buffers to bf16/fp16: sums and the scale stay fp32.
        for name in ("moe_aux_loss_sum", "moe_z_loss_sum", "aux_loss_scale"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                buf.data = buf.data.float()

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused):
        """``hidden_states [S, B, H]`` -> ``(output [S, B, H], None)``.

        With ``moe`` in ``--recompute-modules`` (``--moe-layer-recompute``) only the input is
        kept and the whole layer runs again in the backward (Megatron's checkpoint: RNG states
        restored). The first run is under no-grad, so routing statistics and the router losses
        come from the recomputation only: counted once, as without recomputation."""
        if padding_mask is not None:
            raise NotImplementedError("SMoELayer does not support padding masks")
        self._keep_fp32_buffers()
        if recomputes(self.config, "moe") and self.training and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(self._forward, False, hidden_states), None
        return self._forward(hidden_states), None

    def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg, tp_group = self.config, self.groups.tp
        tp = group_size(tp_group)
        x = gather_tokens(hidden_states, tp_group, cfg.sequence_parallel)
        x_TH = x.reshape(-1, x.shape[-1])
        weight_EH = self.router.weight
        if tp > 1:  # forward identity, backward all-reduce: the gate grads are partial per TP rank
            weight_EH = copy_to_tp(weight_EH, tp_group)
        routing = self.router(x_TH, weight_EH)
        ids_TK, probs_TK, capacity = routing.topk_ids_TK, routing.probs_TK, 0
        if cfg.moe_expert_capacity_factor is not None:
            capacity = expert_capacity(
                x_TH.shape[0], self.topk, self.num_experts, cfg.moe_expert_capacity_factor
            )
            ids_TK, probs_TK = drop_over_capacity(
                ids_TK, probs_TK, self.num_experts, capacity, cfg.moe_token_drop_policy
            )
        counts_E = None  # the TP group's routed counts (the aux loss and the bias use them)
        if self.groups.folded:  # this TP rank dispatches its block of the routed tokens
            counts_E = expert_counts(torch.sort(ids_TK.reshape(-1)).values, self.num_experts)
            lo, hi = token_block(x_TH.shape[0], group_rank(tp_group), tp)
            x_TH, ids_TK, probs_TK = x_TH[lo:hi], ids_TK[lo:hi], probs_TK[lo:hi]
        # one rank's own experts, dropless, on the expert loop: one node with the permutes
        local = self.local_dispatch and not capacity and self.experts.runs_local(x_TH)
        x_MH, meta = dispatch(x_TH, ids_TK, self.num_experts, self.dispatch_groups, not local)
        if local:
            splits = meta.tokens_per_local_expert
            y_TH = self.experts(x_TH, splits, meta.tokens_per_local_expert_L, (probs_TK, meta))
        else:
            pad_to = capacity if cfg.moe_pad_expert_input_to_capacity else 0
            y_TH = combine(self._run_experts(x_MH, meta, pad_to), probs_TK, meta)
        if self.groups.folded:
            out = folded_output(
                y_TH, lo, x.shape, hidden_states.shape, tp_group, cfg.sequence_parallel
            )
        else:
            out = scatter_output(y_TH.view(x.shape), tp_group, cfg.sequence_parallel)
            counts_E = meta.tokens_per_expert_E
        if self.shared_experts is not None:
            out = out + self._shared_expert_output(hidden_states)
        return self._apply_losses(out, routing, meta, counts_E, tp, x.shape[1])

    def _shared_expert_output(self, hidden_states):
        """The shared experts' output; recomputed in the backward with ``shared_experts`` in
        ``--recompute-modules`` (as Megatron-Core's MoELayer)."""
        if recomputes(self.config, "shared_experts"):
            return tensor_parallel.checkpoint(self.shared_experts, False, hidden_states)
        return self.shared_experts(hidden_states)

    def _run_experts(self, x_MH, meta, capacity: int):
        """The local experts on their rows; with ``capacity`` (padding to capacity) every
        expert's input is first padded with zero rows to ``capacity`` per source rank."""
        splits = meta.tokens_per_local_expert
        if not capacity:
            return self.experts(x_MH, splits, meta.tokens_per_local_expert_L)
        rows = capacity * meta.num_sources
        index_M = padded_index(splits, rows, x_MH.device)
        padded = pad_expert_input(x_MH, index_M, rows * len(splits))
        splits_L = torch.full_like(meta.tokens_per_local_expert_L, rows)
        y = self.experts(padded, (rows,) * len(splits), splits_L)
        return unpad_expert_output(y, index_M)

    def _balancing_loss(self, routing, counts_E, num_sequences: int) -> torch.Tensor:
        """The unscaled load-balancing loss of ``moe_router_load_balancing_type`` (formulas in
        ``balancing.py``); the counts are those of the plain top-k of the scores (Megatron's),
        which are the dispatched ones unless a bias, groups, a capacity or noise intervened."""
        cfg, scores_TE, k = self.config, routing.scores_TE, self.topk
        kind = cfg.moe_router_load_balancing_type
        if kind == "seq_aux_loss":
            return seq_load_balancing_loss(scores_TE, k, num_sequences)
        plain = not (
            cfg.moe_router_enable_expert_bias
            or cfg.moe_router_group_topk
            or cfg.moe_expert_capacity_factor is not None
            or cfg.moe_router_force_load_balancing
        )
        counts_E = counts_E if plain else aux_loss_counts(scores_TE, k)
        if kind != "global_aux_loss":
            return load_balancing_loss(scores_TE, counts_E, k)
        dp = self.groups.dp
        if dp is not None and dp.size() > 1 and torch.is_grad_enabled():
            counts_E = counts_E.clone()
            dist.all_reduce(counts_E, group=dp)
        dp_size = 1 if dp is None else dp.size()
        if self.training and torch.is_grad_enabled():
            counts_E = self.router.average_global_counts(counts_E)
        return load_balancing_loss(scores_TE, counts_E, k, scores_TE.shape[0] * dp_size)

    def _apply_losses(self, out, routing, meta, counts_E, tp: int, num_sequences: int):
        cfg = self.config
        training = self.training and torch.is_grad_enabled()
        balancing = cfg.moe_router_load_balancing_type != "none"
        aux_coeff = cfg.moe_aux_loss_coeff if balancing else 0.0
        z_coeff = cfg.moe_z_loss_coeff or 0.0
        aux_grad, z_grad = training and aux_coeff > 0, training and z_coeff > 0
        with torch.set_grad_enabled(aux_grad):
            aux = self._balancing_loss(routing, counts_E, num_sequences)
        with torch.set_grad_enabled(z_grad):
            z = z_loss(routing.logits_TE, routing.logsumexp_T)
        if aux_grad or z_grad:
            total = (aux_coeff * aux if aux_grad else 0.0) + (z_coeff * z if z_grad else 0.0)
            if cfg.calculate_per_token_loss:  # finalize_model_grads divides by the token count
                total = total * routing.logits_TE.shape[0]
            out = attach_loss(out, total, self.aux_loss_scale, float(tp))
        if training:
            with torch.no_grad():
                self.moe_tokens_per_expert += meta.global_tokens_per_expert_E
                self.moe_aux_loss_sum += aux.detach().float()
                self.moe_z_loss_sum += z.detach().float()
                self.moe_microbatches += 1
                # (token, choice) pairs of the TP group's tokens: sent to an expert, or dropped
                # by a capacity (counts_E leaves the dropped pairs out)
                routed = counts_E.sum()
                self.moe_pairs_routed += routed
                self.moe_pairs_dropped += routing.topk_ids_TK.numel() - routed
                self.router.count_for_bias(counts_E)
        return out


def smoe_mlp_spec() -> ModuleSpec:
    """The spec to put in ``TransformerLayerSubmodules.mlp``."""
    return ModuleSpec(module=SMoELayer)


def _layers(model_or_chunks):
    chunks = model_or_chunks if isinstance(model_or_chunks, (list, tuple)) else [model_or_chunks]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, SMoELayer):
                yield module


def collect_moe_stats(model_or_chunks, reset: bool = True) -> dict:
    """Per SMoE layer, keyed by its global layer number, the stats since the last reset.

    ``{layer_number: {"tokens_per_expert": LongTensor[E] (sum over micro-batches and over the
    dispatch's count group: EP, or expert-TP x EP when folded), "aux_loss": 0-d fp32 tensor
    (unscaled load-balancing loss, mean per micro-batch), "z_loss": 0-d fp32 tensor (unscaled
    z-loss, mean per micro-batch), "num_microbatches": int, "routed" / "dropped": int (the
    (token, choice) pairs of this rank's TP group sent to an expert / dropped by a capacity)}}``.
    Tensors are detached copies on the layer's device.
    """
    stats = {}
    for layer in _layers(model_or_chunks):
        key = layer.layer_number
        if key in stats:
            raise ValueError(f"two SMoE layers share layer_number {key}")
        n = int(layer.moe_microbatches)
        stats[key] = {
            "tokens_per_expert": layer.moe_tokens_per_expert.clone(),
            "aux_loss": layer.moe_aux_loss_sum.float() / max(n, 1),
            "z_loss": layer.moe_z_loss_sum.float() / max(n, 1),
            "num_microbatches": n,
            "routed": int(layer.moe_pairs_routed),
            "dropped": int(layer.moe_pairs_dropped),
        }
        if reset:
            for name in _STAT_BUFFERS:
                getattr(layer, name).zero_()
    return stats


def set_aux_loss_scale(model_or_chunks, scale) -> None:
    """Set the gradient scale of the aux/z losses in every SMoE layer (call each step before
    the backward passes): ``grad_scaler_scale / num_microbatches`` (1.0 with bf16 and a single
    micro-batch); Megatron sets the same value on its own MoEAuxLossAutoScaler."""
    for layer in _layers(model_or_chunks):
        value = torch.as_tensor(scale, dtype=torch.float32).reshape(())
        layer.aux_loss_scale.copy_(value)
