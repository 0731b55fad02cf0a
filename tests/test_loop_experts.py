"""The CPU expert loop (``moe/loop_experts.py``): experts side by side on worker threads, and the
local node that folds the dispatch's gather and the combine into the experts.

References: the same experts run one after the other on one thread, and the unfused chain
``dispatch -> _LoopExperts -> combine`` under autograd."""

import pytest
import torch

from megatron_ext.moe import combine, dispatch
from megatron_ext.moe.loop_experts import (
    THREADED_MAX_BYTES,
    _LocalExperts,
    _LoopExperts,
    for_each_expert,
    thread_groups,
)

T, K, E, H, FS = 40, 3, 6, 8, 5


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_thread_groups_cover_each_busy_expert_once_and_balance_rows():
    splits = (9, 0, 4, 4, 3, 0, 2)
    groups = thread_groups(splits, 2)
    assert sorted(e for g in groups for e in g) == [0, 2, 3, 4, 6]
    assert [sum(splits[e] for e in g) for g in groups] == [11, 11]
    assert thread_groups(splits, 3) == [[0], [2, 4], [3, 6]]
    assert thread_groups((0, 5, 0), 4) == [[1]]
    assert thread_groups((0, 0), 2) == []


def test_workers_run_one_intra_op_thread_without_autograd_and_restore_the_count(two_threads):
    seen = {}

    def probe(e, rows):
        seen[e] = (torch.get_num_threads(), torch.is_grad_enabled(), rows)

    for_each_expert(probe, (2, 0, 3, 1), on_cpu=True)
    assert seen == {
        0: (1, False, slice(0, 2)),
        2: (1, False, slice(2, 5)),
        3: (1, False, slice(5, 6)),
    }
    assert torch.get_num_threads() == 2

    def fails(e, rows):
        if e == 2:
            raise ValueError("expert 2 failed")

    with pytest.raises(ValueError, match="expert 2 failed"):
        for_each_expert(fails, (2, 0, 3, 1), on_cpu=True)
    assert torch.get_num_threads() == 2
    seen.clear()  # large experts (mean GEMM1 output 2 rows x 4 MiB): one after another, here
    for_each_expert(probe, (2, 0, 3, 1), on_cpu=True, row_bytes=THREADED_MAX_BYTES)
    assert {e: v[0] for e, v in seen.items()} == {0: 2, 2: 2, 3: 2}


def _weights(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.nn.Parameter((torch.randn(E, 2 * FS, H, generator=g) * 0.4).to(dtype))
    w2 = torch.nn.Parameter((torch.randn(E, H, FS, generator=g) * 0.4).to(dtype))
    return w13, w2


@pytest.mark.parametrize("threads", [1, 2])
def test_threaded_loop_equals_one_expert_after_another(threads):
    splits = (7, 0, 5, 9, 1, 3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(splits), H, generator=g)
    dy = torch.randn(sum(splits), H, generator=g)
    w13, w2 = _weights(0)
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            xi = x.clone().requires_grad_()
            y = _LoopExperts.apply(xi, w13, w2, splits)
            assert all(t.grad_fn is None for t in y.grad_fn.saved_tensors)  # no graph in workers
            y.backward(dy)
            results.append((y.detach(), xi.grad, w13.grad.clone(), w2.grad.clone()))
            w13.grad = w2.grad = None
    finally:
        torch.set_num_threads(before)
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def _routing(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])  # E-1 unused
    probs = torch.softmax(torch.randn(T, K, generator=g), -1)
    return ids, probs


def _unfused(x, probs, ids, w13, w2, fuse=False, recompute=False):
    x_MH, meta = dispatch(x, ids, E)
    y_MH = _LoopExperts.apply(x_MH, w13, w2, meta.tokens_per_local_expert, fuse, recompute)
    return combine(y_MH, probs, meta)


def _local(x, probs, ids, w13, w2, fuse=False, recompute=False):
    none, meta = dispatch(x, ids, E, send_rows=False)
    assert none is None
    return _LocalExperts.apply(
        x, w13, w2, probs, meta.pair_to_sorted_N.view(T, K), meta.sorted_token_N,
        meta.sorted_pair_N, meta.tokens_per_local_expert, fuse, recompute,
    )  # fmt: skip


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_local_node_equals_dispatch_loop_combine(two_threads, fuse, recompute):
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(T, H, generator=g)
    dout = torch.randn(T, H, generator=g)
    ids, p0 = _routing(5)
    w13, w2 = _weights(1)
    results = []
    for run in (_unfused, _local):
        x, probs = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        for p in (w13, w2):
            p.grad = None
            if fuse:
                p.main_grad, p.grad_added_to_main_grad = torch.ones_like(p), False
        out = run(x, probs, ids, w13, w2, fuse, recompute)
        out.backward(dout)
        grads = [p.main_grad.clone() if fuse else p.grad.clone() for p in (w13, w2)]
        results.append((out.detach(), x.grad, probs.grad, *grads))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.all(results[1][3][E - 1] == (1 if fuse else 0))  # the unused expert


def test_local_node_in_bf16_rounds_like_the_unfused_chain(two_threads):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(T, H, generator=g).bfloat16()
    ids, p0 = _routing(9)
    w13, w2 = _weights(4, torch.bfloat16)
    outs = []
    for run in (_unfused, _local):
        x, probs = x0.clone().requires_grad_(), p0.clone().requires_grad_()
        out = run(x, probs, ids, w13, w2)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        outs.append((out.detach(), x.grad, probs.grad))
    for ours, ref in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)


def test_local_node_refuses_a_second_backward():
    x = torch.randn(T, H, requires_grad=True)
    ids, probs = _routing(1)
    w13, w2 = _weights(2)
    out = _local(x, probs, ids, w13, w2)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run a backward twice"):
        out.sum().backward()
