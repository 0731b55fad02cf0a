"""The output layer's reused logits buffer (CPU ranks): the same forward and gradients as a
plain linear layer and PyTorch's cross-entropy, and the second step writes into the first
step's buffer instead of a fresh allocation."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.multirank import run_on_ranks


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 16, generator=g)  # [s, b, H]
    w = torch.randn(40, 16, generator=g) * 0.5  # [V, H]
    target = torch.randint(0, 40, (6, 2), generator=g)
    return x, w, target


def _reference(x, w, target, main_grad=None):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = F.linear(x, w)
    loss = F.cross_entropy(logits.view(-1, 40), target.view(-1), reduction="none").view(6, 2)
    (loss * 0.5).sum().backward()
    return loss.detach(), x.grad, w.grad


def _pooled_steps(fuse: bool):
    from megatron.core import parallel_state

    from megatron_ext.model.cross_entropy import vocab_parallel_cross_entropy
    from megatron_ext.model.output_layer import _LogitsPool, _PooledLinear

    parallel_state.initialize_model_parallel()
    group = parallel_state.get_tensor_model_parallel_group()
    x0, w0, target = _case()
    w = torch.nn.Parameter(w0.clone())
    if fuse:
        w.main_grad, w.grad_added_to_main_grad = torch.zeros_like(w), False
    pool, out = _LogitsPool(), []
    for _ in range(2):  # two steps: the second must reuse the first one's buffer
        x = x0.clone().requires_grad_()
        logits = _PooledLinear.apply(x, w, None, fuse, pool)
        ptr = logits.data_ptr()
        loss = vocab_parallel_cross_entropy(logits, target, group)
        (loss * 0.5).sum().backward()
        grad_w = w.main_grad.clone() if fuse else w.grad.clone()
        out.append((loss.detach(), x.grad, grad_w, ptr, len(pool.free)))
        w.grad = None
        if fuse:
            w.main_grad.zero_()
    return out


@pytest.mark.parametrize("fuse", [False, True])
def test_pooled_output_layer_equals_a_plain_linear_and_reuses_its_buffer(fuse):
    want_loss, want_dx, want_dw = _reference(*_case())
    steps = run_on_ranks(_pooled_steps, 1, args=(fuse,), timeout=120)[0]
    for loss, dx, dw, _, free_after in steps:
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=1e-6)
        assert free_after == 1  # the consumed logits went back to the pool
    assert steps[1][3] == steps[0][3]  # step 2 wrote into step 1's buffer
