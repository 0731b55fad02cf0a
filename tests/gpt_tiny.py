"""A small dense Megatron-Core GPTModel trained with Megatron's own machinery (test helper).

Used by the CPU-mode tests to show that Megatron-Core's TP layers, pipeline schedules, DDP and
distributed optimizer run on CPU ranks and give the same numbers at every layout. Weights are
made once at one rank and handed to every layout through Megatron's dist_checkpointing, which
does the resharding; so all layouts start from identical weights.
"""

from __future__ import annotations

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 256, 32, 8, 2


def config(tp: int = 1, pp: int = 1) -> TransformerConfig:
    return TransformerConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )


def build(cfg: TransformerConfig) -> GPTModel:
    return GPTModel(
        cfg,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        rotary_base=1_000_000,
        share_embeddings_and_output_weights=False,
    )


def init(tp: int = 1, pp: int = 1, seed: int = 1234) -> TransformerConfig:
    parallel_state.initialize_model_parallel(tp, pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return config(tp, pp)


def save_reference(ckpt_dir: str) -> None:
    """On one rank: build the model from a fixed seed and save it with dist_checkpointing."""
    model = build(init())
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)


def load(model: GPTModel, ckpt_dir: str) -> None:
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)


def global_batch(step: int) -> torch.Tensor:
    """Token ids [GLOBAL_BATCH, SEQ + 1], the same on every rank and layout.

    The same batch every step, so that a few Adam steps visibly fit it."""
    g = torch.Generator().manual_seed(1000)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def micro_batches(step: int):
    """This DP rank's micro-batches of the step's global batch, as (tokens, labels)."""
    dp, rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    local = global_batch(step).chunk(dp)[rank]
    return [(mb[:, :-1].contiguous(), mb[:, 1:].contiguous()) for mb in local.split(MICRO_BATCH)]


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    out = model(tokens, pos, None, labels=labels)

    def loss_func(loss_BS):
        loss = loss_BS.float().mean()
        # clone: the schedule divides the returned loss by the micro-batch count in place.
        return loss, {"lm loss": loss.detach().clone()}

    return out, loss_func


def train(ckpt_dir: str, tp: int = 1, pp: int = 1, steps: int = 1, dist_opt: bool = False):
    """Train ``steps`` Adam steps at layout TP x PP x DP; return [(loss, grad_norm)] per step."""
    cfg = init(tp, pp)
    model = build(cfg)
    load(model, ckpt_dir)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt, bucket_size=None
    )
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            weight_decay=0.1,
            clip_grad=1.0,
            params_dtype=torch.float32,
            use_distributed_optimizer=dist_opt,
        ),
        [model],
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    cfg.no_sync_func = model.no_sync
    fwd_bwd = get_forward_backward_func()
    history = []
    for step in range(steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        mbs = micro_batches(step)
        losses = fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=[model],
            num_microbatches=len(mbs),
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
        )
        ok, grad_norm, _ = opt.step()
        assert ok
        history.append((_mean_loss(losses), float(grad_norm)))
    return history


def _mean_loss(losses) -> float:
    """Mean loss over micro-batches and DP ranks, broadcast from the last pipeline stage."""
    value = torch.zeros(1, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        value[0] = torch.stack([x["lm loss"] for x in losses]).double().mean()
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(
        value, last, group=parallel_state.get_pipeline_model_parallel_group()
    )
    return value.item()
