"""The GPU-rules layer refuses what a GPU and NCCL refuse, and lets the rest through unchanged.

Every body runs in its own rank process (``run_on_ranks(..., gpu_rules=True)``), so the rules'
patches never touch the pytest process.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_ext.multirank import MultiRankError, run_on_ranks


def _tagging():
    from megatron_ext import gpu_rules

    out = {}
    x = torch.randn(4, 3, device="cuda")
    out["created"] = (type(x).__name__, str(x.device), x.is_cuda, x.type())
    host = torch.ones(4, 3)
    out["host"] = (str(host.device), host.type())
    w = torch.nn.Parameter(torch.randn(3, device="cuda"))
    (x * w).sum().backward()
    out["grad"] = gpu_rules.is_device(w.grad)
    out["derived"] = [
        gpu_rules.is_device(t)
        for t in (x[1:], x.t(), x.new_zeros(2), torch.zeros_like(x), x.float(), x @ x.t())
    ]
    before = gpu_rules.plain(x).clone()
    y = x.cpu()
    y.add_(1)  # a host copy: the device tensor is untouched
    out["cpu_copy"] = (gpu_rules.is_device(y), bool(torch.equal(gpu_rules.plain(x), before)))
    z = host.cuda()
    z.add_(1)  # a device copy
    out["cuda_copy"] = (gpu_rules.is_device(z), float(host.sum()))
    linear = torch.nn.Linear(3, 2, bias=False)
    linear.weight.tensor_model_parallel = True
    linear.cuda()
    out["module"] = (
        gpu_rules.is_device(linear.weight),
        isinstance(linear.weight, torch.nn.Parameter),
        getattr(linear.weight, "tensor_model_parallel", None),
    )
    try:
        x + host
    except gpu_rules.GpuRuleError as e:
        out["mixed"] = str(e)
    out["scalar_ok"] = gpu_rules.is_device(x * torch.tensor(2.0))
    out["index_ok"] = gpu_rules.is_device(x[torch.tensor([0, 2])])  # host indices are allowed
    rules = gpu_rules.rules()
    rules.reset_counters()
    x.sum().item()
    x[x > 0]  # boolean mask: nonzero() on the device
    torch.bincount(torch.tensor([1, 2], device="cuda"))
    float(x.max())
    out["syncs"] = dict(rules.syncs)
    rules.reset_counters()
    host.to("cuda", non_blocking=True)  # queued: nothing waits
    host.pin_memory().cuda(non_blocking=True)
    out["queued_copies"] = dict(rules.syncs)
    host.to("cuda")  # cudaMemcpyAsync + cudaStreamSynchronize
    host.cuda()
    out["waiting_copies"] = dict(rules.syncs)
    return out


def test_tensors_placed_on_cuda_behave_as_device_memory():
    out = run_on_ranks(_tagging, 1, gpu_rules=True)[0]
    assert out["created"] == ("DeviceTensor", "cuda:0", True, "torch.cuda.FloatTensor")
    assert out["host"] == ("cpu", "torch.FloatTensor")
    assert out["grad"] and all(out["derived"])
    assert out["cpu_copy"] == (False, True)
    assert out["cuda_copy"] == (True, 12.0)
    assert out["module"] == (True, True, True)
    assert "Expected all tensors to be on the same device" in out["mixed"]
    assert out["scalar_ok"] and out["index_ok"]
    h2d = "host->device copy without non_blocking"
    # torch.tensor(data, device="cuda") copies its data over and waits for it
    assert out["syncs"] == {"_local_scalar_dense": 2, "index": 1, "bincount": 2, h2d: 1}
    assert out["queued_copies"] == {}
    assert out["waiting_copies"] == {h2d: 2}


def _collectives():
    from megatron_ext import gpu_rules

    out = {}
    t = torch.full((2,), float(dist.get_rank() + 1), device="cuda")
    dist.all_reduce(t)
    out["device_sum"] = gpu_rules.plain(t).tolist()
    try:
        dist.all_reduce(torch.zeros(2))
    except gpu_rules.GpuRuleError as e:
        out["refused"] = str(e)
    gloo = dist.new_group([0, 1], backend="gloo")
    h = torch.ones(2)
    dist.all_reduce(h, group=gloo)  # gloo groups take host tensors
    out["gloo_sum"] = h.tolist()
    objects = [None, None]
    dist.all_gather_object(objects, {"rank": dist.get_rank()})  # bytes go through cuda:N
    out["objects"] = objects
    gathered = torch.empty(4, device="cuda")
    dist.all_gather_into_tensor(gathered, t)
    out["gathered"] = gpu_rules.is_device(gathered) and gpu_rules.plain(gathered).tolist()
    return out


def test_nccl_groups_refuse_host_tensors_and_gloo_groups_take_them():
    out = run_on_ranks(_collectives, 2, gpu_rules=True)
    for rank in out:
        assert rank["device_sum"] == [3.0, 3.0]
        assert rank["refused"].startswith("No backend type associated with device type cpu")
        assert "all_reduce" in rank["refused"]
        assert rank["gloo_sum"] == [2.0, 2.0]
        assert rank["objects"] == [{"rank": 0}, {"rank": 1}]
        assert rank["gathered"] == [3.0, 3.0, 3.0, 3.0]


def _grouped_mm(ffn):
    from megatron_ext import gpu_rules

    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, ffn, 64, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor([8, 16, 24, 32], device="cuda", dtype=torch.int32)
    h = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # [32, ffn]
    w2 = torch.randn(4, 64, ffn, device="cuda", dtype=torch.bfloat16)
    torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    return dict(gpu_rules.rules().grouped_mm)


def test_grouped_mm_is_checked_against_cuda_stride_rules():
    assert run_on_ranks(_grouped_mm, 1, args=(128,), gpu_rules=True)[0] == {"fast": 2}
    with pytest.raises(MultiRankError, match="multiple of 16 bytes"):
        run_on_ranks(_grouped_mm, 1, args=(132,), gpu_rules=True)  # 132 bf16 = 264 bytes


def _without_cpu_tensor_rules_nothing_is_refused():
    dist.all_reduce(torch.zeros(2))  # plain CPU mode: gloo takes it (and hides the GPU rule)
    return True


def test_plain_cpu_mode_hides_what_the_rules_catch():
    assert run_on_ranks(_without_cpu_tensor_rules_nothing_is_refused, 1)[0]
    with pytest.raises(MultiRankError, match="No backend type associated with device type cpu"):
        run_on_ranks(_without_cpu_tensor_rules_nothing_is_refused, 1, gpu_rules=True)


def _sdpa_with_dropout():
    import torch.nn.functional as F

    from megatron_ext.gpu_rules import is_device

    q = torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    kv = torch.randn(2, 2, 16, 8, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = F.scaled_dot_product_attention(q, kv, kv, dropout_p=0.1, is_causal=True,
                                         enable_gqa=True)  # fmt: skip
    out.float().sum().backward()
    return is_device(out), is_device(q.grad), is_device(kv.grad)


def test_sdpa_allocates_like_its_inputs_under_the_rules():
    """SDPA's math path (dropout, bf16) builds its causal and dropout masks with the query's
    options: device memory on a GPU, so not a host tensor reaching a device op."""
    assert run_on_ranks(_sdpa_with_dropout, 1, gpu_rules=True)[0] == (True, True, True)


def _one_hot_of_device_indices():
    import torch.nn.functional as F

    from megatron_ext.gpu_rules import is_device

    idx = torch.tensor([[0, 3], [2, 1]], device="cuda")
    out = F.one_hot(idx, num_classes=5)  # HF's Qwen2-MoE / DeepSeek-V3 expert masks
    return is_device(out), out.sum(-1).tolist(), out.argmax(-1).tolist()


def test_one_hot_allocates_like_its_input_under_the_rules():
    """``one_hot`` of a tensor subclass compares against ``arange(num_classes, input.options())``:
    device memory on a GPU, so the rules must not call it a host tensor reaching a device op
    (they did: HF's MoE blocks failed the GPU check's rehearsal)."""
    got = run_on_ranks(_one_hot_of_device_indices, 1, gpu_rules=True)[0]
    assert got == (True, [[1, 1], [1, 1]], [[0, 3], [2, 1]])
