"""pretrain_mixtral.py gives the same losses at every parallel layout (CPU ranks, fp32).

All layouts start from one set of weights (saved at one rank, loaded with --finetune through
Megatron's dist_checkpointing, which reshards) and read the same global batches (Megatron's
MockGPTDataset, deterministic), then train three Adam steps. Losses must agree to 1e-5.
"""

import pytest

from megatron_ext.multirank import run_on_ranks

RTOL = 1e-5
COMMON = (
    "--cpu --model tiny --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 8 --attention-dropout 0 --hidden-dropout 0 --eval-iters 0"
    " --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --log-interval 1 --seed 7"
)


def _run(argv):
    import pretrain_mixtral

    return pretrain_mixtral.run(argv)


def save_reference(path: str, common: str = COMMON) -> str:
    """Initial weights made at one rank (one step at lr 0 leaves them unchanged)."""
    argv = f"{common} --train-iters 1 --lr 0 --min-lr 0 --save {path}".split()
    run_on_ranks(_run, 1, args=(argv,), timeout=300)
    return path


def train_layout(reference: str, world: int, layout: str, common: str = COMMON) -> list:
    """Three Adam steps from ``reference`` at ``layout``: the losses (last pipeline stage)."""
    argv = f"{common} --train-iters 3 --lr 3e-3 --load {reference} --finetune {layout}".split()
    histories = run_on_ranks(_run, world, args=(argv,), timeout=600)
    return histories[-1]  # the last rank holds the loss (last pipeline stage)


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    return save_reference(str(tmp_path_factory.mktemp("reference")))


def _train(reference, world, layout):
    return train_layout(reference, world, layout)


@pytest.fixture(scope="module")
def one_rank(reference_weights):
    return _train(reference_weights, 1, "")


LAYOUTS = {
    "TP2": (2, "--tensor-model-parallel-size 2"),
    "PP2": (2, "--pipeline-model-parallel-size 2"),
    "DP2": (2, "--use-distributed-optimizer"),
    "EP2xDP2": (2, "--expert-model-parallel-size 2 --use-distributed-optimizer"),
    "TP2xEP2": (
        4,
        "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 --sequence-parallel",
    ),
    "PP2xDP2xEP2": (
        4,
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2"
        " --use-distributed-optimizer",
    ),
    # MoE parallel folding: the EP groups cross the TP groups
    "TP2xETP1xEP2": (
        2,
        "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"
        " --expert-model-parallel-size 2",
    ),
    "TP2xETP1xEP2-SP": (
        2,
        "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"
        " --expert-model-parallel-size 2 --sequence-parallel",
    ),
    "TP2xETP1xEP4": (
        4,
        "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"
        " --expert-model-parallel-size 4 --sequence-parallel --use-distributed-optimizer",
    ),
    "PP2xTP2xETP1xEP2": (
        4,
        "--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2"
        " --expert-tensor-parallel-size 1 --expert-model-parallel-size 2 --sequence-parallel",
    ),
    "TP1xETP2xDP2": (2, "--expert-tensor-parallel-size 2 --use-distributed-optimizer"),
}


def test_one_rank_learns(one_rank):
    assert len(one_rank) == 3
    assert one_rank[-1] < one_rank[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_rank(name, reference_weights, one_rank):
    world, layout = LAYOUTS[name]
    losses = _train(reference_weights, world, layout)
    assert losses == pytest.approx(one_rank, rel=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"
        " --expert-tensor-parallel-size 2 --expert-model-parallel-size 2"
        " --use-distributed-optimizer --sequence-parallel",
        # folded, expert-DP 2: the expert grads and optimizer shards over the expert-DP group
        "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"
        " --expert-model-parallel-size 4 --use-distributed-optimizer --sequence-parallel",
    ],
    ids=["TP2xPP2xDP2xETP2xEP2", "TP2xDP4xETP1xEP4xEDP2"],
)
def test_8_ranks_match_one_rank(layout, reference_weights, one_rank):
    losses = _train(reference_weights, 8, layout)
    assert losses == pytest.approx(one_rank, rel=RTOL)


def test_aux_loss_free_balancing_trains_and_moves_the_expert_bias(tmp_path):
    """--moe-router-enable-expert-bias (sigmoid scores, no aux loss): the bias is updated from
    the load each step and saved with the model."""
    argv = (
        f"{COMMON} --train-iters 3 --lr 3e-3 --moe-router-load-balancing-type none"
        " --moe-router-score-function sigmoid --moe-router-enable-expert-bias"
        f" --moe-router-bias-update-rate 1e-2 --expert-model-parallel-size 2 --save {tmp_path}"
    ).split()
    losses = run_on_ranks(_run, 2, args=(argv,), timeout=600)[-1]
    assert len(losses) == 3 and all(x == x for x in losses)
    biases = run_on_ranks(_expert_biases, 1, args=(str(tmp_path / "iter_0000003"),))[0]
    (bias_LE,) = biases.values()  # Megatron stacks per-layer tensors: [layers, experts]
    assert tuple(bias_LE.shape) == (2, 4)  # `tiny`: 2 layers, 4 experts
    assert (bias_LE.abs().sum(dim=1) > 0).all(), bias_LE


def _expert_biases(path):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load_plain_tensors(path)
    return {k: v for k, v in state.items() if k.endswith("router.expert_bias")}


def test_fallback_adamw_runs_pytorchs_fused_kernel_with_the_same_updates():
    """Without apex/TE Megatron-Core builds torch's AdamW (single-tensor loop on CPU);
    engine.use_fused_torch_adam switches it to the fused kernel: same updates to rounding."""
    from types import SimpleNamespace

    import torch

    from megatron_ext.engine import use_fused_torch_adam

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        return params, opt

    ref, ref_opt = make()
    fused, fused_opt = make()
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=fused_opt)] * 2)
    assert use_fused_torch_adam(chained) == 2
    assert all(g["fused"] and not g["foreach"] for g in fused_opt.param_groups)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ref, fused, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ref_opt.step()
        fused_opt.step()
    for a, b in zip(ref, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ref[0], make()[0][0])  # the weights moved


def test_grad_clipping_scales_in_place_like_megatrons_fallback():
    import torch
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_scale

    from megatron_ext import fallback_kernels

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    want = [x.clone() for x in grads]
    local_multi_tensor_scale(0, None, [want, want], 0.25)
    ptrs = [x.data_ptr() for x in grads]
    fallback_kernels.multi_tensor_scale(0, None, [grads, grads], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(grads, want, strict=True))
    assert [x.data_ptr() for x in grads] == ptrs  # in place
    src, dst = [torch.ones(3)], [torch.zeros(3)]
    fallback_kernels.multi_tensor_scale(0, None, [src, dst], 2.0)
    assert torch.equal(dst[0], torch.full((3,), 2.0))
    before = clip_grads.multi_tensor_scale_impl
    try:
        assert fallback_kernels.use_in_place_grad_scaling()
        assert clip_grads.multi_tensor_scale_impl is fallback_kernels.multi_tensor_scale
    finally:
        clip_grads.multi_tensor_scale_impl = before


def test_capacity_and_padding_with_folding_match_one_rank(reference_weights, one_rank):
    """With a capacity (drops decided on the TP group's tokens) and padding to it, the folded
    dispatch (each TP rank sends its block; experts padded per source rank) drops and pads
    the same pairs as one rank."""
    cap = "--moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity"
    one = _train(reference_weights, 1, cap)
    assert one != pytest.approx(one_rank, rel=RTOL)  # pairs were dropped
    folded = _train(
        reference_weights,
        2,
        f"{cap} --tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"
        " --expert-model-parallel-size 2 --sequence-parallel",
    )
    assert folded == pytest.approx(one, rel=RTOL)
