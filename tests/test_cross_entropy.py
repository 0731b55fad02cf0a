"""The blocked vocab-parallel cross-entropy (CPU ranks) equals Megatron-Core's function and
PyTorch's F.cross_entropy: losses and gradients, at TP 1 and TP 2, across block edges."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.model import cross_entropy
from megatron_ext.multirank import run_on_ranks


def _case(s=7, b=3, v=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=g) * 4
    logits[0, 0, 5] = 80.0  # a dominant logit: the max subtraction matters
    target = torch.randint(0, v, (s, b), generator=g)
    grad = torch.rand(s, b, generator=g)
    return logits, target, grad


def _reference(logits, target, grad):
    x = logits.clone().requires_grad_()
    loss = F.cross_entropy(x.view(-1, x.shape[-1]), target.view(-1), reduction="none")
    loss.backward(grad.view(-1))
    return loss.view(target.shape), x.grad


def _ours(logits, target, grad, group=None):
    x = logits.clone().requires_grad_()
    loss = cross_entropy.vocab_parallel_cross_entropy(x * 1.0, target, group)  # a non-leaf
    loss.backward(grad)
    return loss, x.grad


def _one_rank(block_rows):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    from megatron_ext.model import cross_entropy as ce

    parallel_state.initialize_model_parallel()
    logits, target, grad = _case()
    ce.BLOCK_BYTES = block_rows * 4 * logits.shape[-1]
    loss, dx = _ours(logits, target, grad)
    x = logits.clone().requires_grad_()
    meg = megatron_ce(x * 1.0, target)
    meg.backward(grad)
    return loss.detach(), dx, meg.detach(), x.grad


@pytest.mark.parametrize("block_rows", [1, 4, 5, 1000])  # 21 rows: remainders, one block
def test_one_rank_equals_pytorch_and_megatron(block_rows):
    want_loss, want_grad = _reference(*_case())
    loss, dx, meg, meg_dx = run_on_ranks(_one_rank, 1, args=(block_rows,), timeout=120)[0]
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, want_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, meg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, meg_dx, rtol=1e-6, atol=1e-7)


def _tp_rank(block_rows):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext.model import cross_entropy as ce

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    logits, target, grad = _case(v=96)
    ce.BLOCK_BYTES = block_rows * 4 * 48
    rank = dist.get_rank()
    shard = logits[..., rank * 48 : (rank + 1) * 48]
    loss, dx = _ours(shard, target, grad, parallel_state.get_tensor_model_parallel_group())
    return loss.detach(), dx


@pytest.mark.parametrize("block_rows", [2, 1000])
def test_two_tp_ranks_equal_the_full_vocabulary(block_rows):
    logits, target, grad = _case(v=96)
    want_loss, want_grad = _reference(logits, target, grad)
    results = run_on_ranks(_tp_rank, 2, args=(block_rows,), timeout=120)
    for rank, (loss, dx) in enumerate(results):
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, want_grad[..., rank * 48 : (rank + 1) * 48],
                                   rtol=1e-6, atol=1e-7)  # fmt: skip
