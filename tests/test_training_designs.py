"""DeepSeek-MoE designs through pretrain_mixtral.py: the same losses at every layout, mixed
dense/MoE stacks split across pipeline stages, and a `tiny-deepseek` run on real text.

`tiny-deepseek`: 4 layers, layer 0 dense (FFN 176), layers 1-3 MoE with 16 fine-grained experts
of FFN 64, top-4, a shared expert of 128. The flags below add the shared expert's sigmoid gate,
group-limited routing (4 groups, best 2), a top-k scaling factor and the sequence-level aux loss.
As in test_training.py every layout starts from one rank's weights (loaded with --finetune,
resharded by dist_checkpointing) and trains three Adam steps on the same batches.
"""

import pytest
from test_real_text import check_learns_real_text, dataset  # noqa: F401  (fixture: the corpus)
from test_training import save_reference, train_layout

from megatron_ext.multirank import run_on_ranks

RTOL = 1e-5
COMMON = (
    "--cpu --model tiny-deepseek --mock-data --vocab-size 1000 --seq-length 32"
    " --micro-batch-size 2 --global-batch-size 8 --attention-dropout 0 --hidden-dropout 0"
    " --eval-iters 0 --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --log-interval 1"
    " --seed 7 --moe-shared-expert-gate --moe-router-num-groups 4 --moe-router-group-topk 2"
    " --moe-router-topk-scaling-factor 1.5 --moe-router-load-balancing-type seq_aux_loss"
)


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    return save_reference(str(tmp_path_factory.mktemp("reference")), COMMON)


def _train(reference, world, layout):
    return train_layout(reference, world, layout, COMMON)


@pytest.fixture(scope="module")
def one_rank(reference_weights):
    losses = _train(reference_weights, 1, "")
    assert len(losses) == 3 and losses[-1] < losses[0]
    return losses


LAYOUTS = {
    "TP2xEP2+SP": (
        4,
        "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 --sequence-parallel",
    ),
    # Stage 0: the dense layer 0 and MoE layer 1; stage 1: MoE layers 2 and 3.
    "PP2xDP2xEP2": (
        4,
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2"
        " --use-distributed-optimizer",
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_rank(name, reference_weights, one_rank):
    world, layout = LAYOUTS[name]
    assert _train(reference_weights, world, layout) == pytest.approx(one_rank, rel=RTOL)


def _layer_kinds(path):
    """Which layers of a saved checkpoint have a dense MLP and which a router."""
    from megatron.core import dist_checkpointing

    keys = [k for k in dist_checkpointing.load_plain_tensors(path) if k.startswith("decoder.")]
    dense = sorted(k for k in keys if k.endswith("mlp.linear_fc1.weight"))
    routers = sorted(k for k in keys if k.endswith("mlp.router.weight"))
    shared = sorted(k for k in keys if "shared_experts" in k)
    return dense, routers, shared


def test_mixed_stack_checkpoint_names_each_layer(reference_weights):
    dense, routers, shared = run_on_ranks(
        _layer_kinds, 1, args=(f"{reference_weights}/iter_0000001",)
    )[0]
    assert dense == ["decoder.layers.0.mlp.linear_fc1.weight"]
    assert routers == [f"decoder.layers.{i}.mlp.router.weight" for i in (1, 2, 3)]
    assert {k.split(".mlp.")[1] for k in shared} == {
        "shared_experts.gate_weight",
        "shared_experts.linear_fc1.weight",
        "shared_experts.linear_fc2.weight",
    }


def test_tiny_deepseek_on_real_text_learns(dataset):  # noqa: F811
    check_learns_real_text(dataset, "tiny-deepseek")  # the bound of `tiny`: 6.5 nats
