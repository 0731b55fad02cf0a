"""CPU mode makes Megatron-Core's real code paths run on CPU ranks, with identical numbers.

Same initial weights (one checkpoint, resharded by Megatron's dist_checkpointing), same data:
- TP=2 equals TP=1, loss and gradient norm;
- PP=2 with the 1F1B schedule over 4 micro-batches equals PP=1;
- DP=2 with Megatron's distributed optimizer over 5 Adam steps equals DP=1.
And without CPU mode the same run fails, so these tests are what the mode makes pass.
"""

import gpt_tiny
import pytest
import torch

from megatron_ext import cpu_mode
from megatron_ext.multirank import MultiRankError, run_on_ranks

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref_ckpt"))
    run_on_ranks(gpt_tiny.save_reference, 1, args=(path,))
    return path


@pytest.fixture(scope="module")
def one_rank(reference_ckpt):
    return run_on_ranks(gpt_tiny.train, 1, args=(reference_ckpt,), kwargs={"steps": 5})[0]


def assert_same(history, reference):
    assert len(history) == len(reference)
    for step, (got, ref) in enumerate(zip(history, reference, strict=True)):
        (loss, gnorm), (ref_loss, ref_gnorm) = got, ref
        assert loss == pytest.approx(ref_loss, rel=RTOL), f"step {step} loss"
        assert gnorm == pytest.approx(ref_gnorm, rel=RTOL), f"step {step} grad norm"


def test_one_rank_trains(one_rank):
    losses = [loss for loss, _ in one_rank]
    assert losses[-1] < losses[0] - 0.1  # five Adam steps at lr 1e-2 on one fixed batch
    assert all(torch.isfinite(torch.tensor(losses)))


def test_tensor_parallel_2_equals_1(reference_ckpt, one_rank):
    ranks = run_on_ranks(gpt_tiny.train, 2, args=(reference_ckpt,), kwargs={"tp": 2, "steps": 2})
    for history in ranks:
        assert_same(history, one_rank[:2])


def test_pipeline_parallel_2_1f1b_equals_1(reference_ckpt, one_rank):
    # 8 sequences / micro-batch 2 = 4 micro-batches through the 1F1B schedule.
    ranks = run_on_ranks(gpt_tiny.train, 2, args=(reference_ckpt,), kwargs={"pp": 2, "steps": 2})
    for history in ranks:
        assert_same(history, one_rank[:2])


def test_data_parallel_2_distributed_optimizer_equals_1(reference_ckpt, one_rank):
    ranks = run_on_ranks(
        gpt_tiny.train, 2, args=(reference_ckpt,), kwargs={"steps": 5, "dist_opt": True}
    )
    for history in ranks:
        assert_same(history, one_rank)


def test_without_cpu_mode_megatron_fails(reference_ckpt):
    with pytest.raises(MultiRankError, match="CUDA"):
        run_on_ranks(gpt_tiny.train, 2, args=(reference_ckpt,), kwargs={"tp": 2}, cpu=False)


def test_mode_is_explicit_and_reversible():
    assert not cpu_mode.is_enabled()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    cpu_mode.enable()
    try:
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().type() == "torch.cuda.FloatTensor"
        state = torch.cuda.get_rng_state()
        a = torch.rand(3, device=torch.cuda.current_device())
        torch.cuda.set_rng_state(state)
        assert torch.equal(a, torch.rand(3))
    finally:
        cpu_mode.disable()
    assert not cpu_mode.is_enabled()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
