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

Parallel layout: expert-TP = TP (Megatron's default), so EP groups lie inside the data-parallel
dimension; every TP rank of an EP rank holds the same tokens and an FFN shard of the same
local experts. The aux loss is computed per micro-batch over the tokens of this DP rank (all
the TP group's tokens), the same on every TP rank and independent of TP.

Logging: per layer, non-persistent buffers accumulate (training forward passes with grad
enabled only, so activation recomputation does not count twice) the routed token counts
(summed over the EP group), the unscaled aux and z losses and the number of micro-batches;
:func:`collect_moe_stats` reads and resets them. Nothing here is module-level state.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.moe.dispatcher import (
    MoEGroups,
    combine,
    copy_to_tp,
    dispatch,
    gather_tokens,
    group_size,
    scatter_output,
)
from megatron_ext.moe.experts import GroupedExperts
from megatron_ext.moe.router import TopKRouter, attach_loss, load_balancing_loss, z_loss

_STAT_BUFFERS = ("moe_tokens_per_expert", "moe_aux_loss_sum", "moe_z_loss_sum", "moe_microbatches")


def _check_config(config) -> None:
    """Refuse settings that this layer would otherwise silently ignore."""
    bad = []
    if not config.num_moe_experts:
        bad.append("num_moe_experts must be set")
    if config.moe_expert_capacity_factor is not None:
        bad.append("moe_expert_capacity_factor: the layer is dropless")
    if config.moe_router_load_balancing_type not in ("aux_loss", "none"):
        bad.append("moe_router_load_balancing_type must be 'aux_loss' or 'none'")
    if config.moe_router_score_function not in ("softmax", "sigmoid"):
        bad.append("moe_router_score_function must be 'softmax' or 'sigmoid'")
    for name in (
        "moe_router_num_groups",
        "moe_router_group_topk",
        "moe_router_topk_scaling_factor",
        "moe_shared_expert_intermediate_size",
        "moe_input_jitter_eps",
    ):
        if getattr(config, name, None):
            bad.append(f"{name} is not supported")
    if config.add_bias_linear:
        bad.append("experts and gate have no bias: set add_bias_linear=False")
    etp = config.expert_tensor_parallel_size
    if etp is not None and etp != config.tensor_model_parallel_size:
        bad.append("expert_tensor_parallel_size must equal tensor_model_parallel_size")
    if bad:
        raise ValueError("SMoELayer: " + "; ".join(bad))


class SMoELayer(MegatronModule):
    """Top-k dropless SMoE with expert parallelism (module docstring has the data flow).

    Children: ``router`` (:class:`TopKRouter`: ``weight [E, H]``, optional ``expert_bias``) and
    ``experts`` (:class:`GroupedExperts`: ``w13 [E/EP, 2F/TP, H]``, ``w2 [E/EP, H, F/TP]``).
    """

    def __init__(
        self, config, submodules=None, layer_number: int | None = None, pg_collection=None
    ):
        super().__init__(config)
        _check_config(config)
        self.groups = MoEGroups.from_parallel_state(pg_collection)
        tp, etp = group_size(self.groups.tp), group_size(self.groups.expt_tp)
        if tp != etp:
            raise ValueError(f"SMoELayer needs expert-TP ({etp}) == TP ({tp})")
        self.layer_number = layer_number
        self.num_experts, self.topk = config.num_moe_experts, config.moe_router_topk
        cpu = config.use_cpu_initialization or not torch.cuda.is_available()
        device = "cpu" if cpu else torch.cuda.current_device()
        self.router = TopKRouter(
            self.num_experts,
            config.hidden_size,
            self.topk,
            score_function=config.moe_router_score_function,
            pre_softmax=config.moe_router_pre_softmax,
            enable_expert_bias=config.moe_router_enable_expert_bias,
            params_dtype=config.params_dtype,
            device=device,
        )
        if config.perform_initialization:
            # Default RNG: identical on every rank, like Megatron's router (replicated weight).
            with torch.no_grad():
                config.init_method(self.router.weight)
        self.experts = GroupedExperts(config, self.groups, self.num_experts)
        zeros = dict(device=device)
        self.register_buffer(
            "moe_tokens_per_expert",
            torch.zeros(self.num_experts, dtype=torch.long, **zeros),
            persistent=False,
        )
        self.register_buffer("moe_aux_loss_sum", torch.zeros((), **zeros), persistent=False)
        self.register_buffer("moe_z_loss_sum", torch.zeros((), **zeros), persistent=False)
        self.register_buffer(
            "moe_microbatches", torch.zeros((), dtype=torch.long, **zeros), persistent=False
        )
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
        """``hidden_states [S, B, H]`` -> ``(output [S, B, H], None)``."""
        if padding_mask is not None:
            raise NotImplementedError("SMoELayer does not support padding masks")
        self._keep_fp32_buffers()
        cfg, tp_group = self.config, self.groups.tp
        tp = group_size(tp_group)
        x = gather_tokens(hidden_states, tp_group, cfg.sequence_parallel)
        x_TH = x.reshape(-1, x.shape[-1])
        weight_EH = self.router.weight
        if tp > 1:  # forward identity, backward all-reduce: the gate grads are partial per TP rank
            weight_EH = copy_to_tp(weight_EH, tp_group)
        routing = self.router(x_TH, weight_EH)
        x_MH, meta = dispatch(x_TH, routing.topk_ids_TK, self.num_experts, self.groups.ep)
        y_MH = self.experts(x_MH, meta.tokens_per_local_expert, meta.tokens_per_local_expert_L)
        y_TH = combine(y_MH, routing.probs_TK, meta)
        out = scatter_output(y_TH.view(x.shape), tp_group, cfg.sequence_parallel)
        return self._apply_losses(out, routing, meta, tp), None

    def _apply_losses(self, out, routing, meta, tp: int):
        cfg = self.config
        training = self.training and torch.is_grad_enabled()
        aux_coeff = (
            cfg.moe_aux_loss_coeff if cfg.moe_router_load_balancing_type == "aux_loss" else 0
        )
        z_coeff = cfg.moe_z_loss_coeff or 0.0
        aux_grad, z_grad = training and aux_coeff > 0, training and z_coeff > 0
        with torch.set_grad_enabled(aux_grad):
            aux = load_balancing_loss(routing.scores_TE, meta.tokens_per_expert_E, self.topk)
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
                self.router.count_for_bias(meta.tokens_per_expert_E)
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
    EP group), "aux_loss": 0-d fp32 tensor (unscaled load-balancing loss, mean per
    micro-batch), "z_loss": 0-d fp32 tensor (unscaled z-loss, mean per micro-batch),
    "num_microbatches": int}}``. Tensors are detached copies on the layer's device.
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
