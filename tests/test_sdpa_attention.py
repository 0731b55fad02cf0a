"""SDPAttention (PyTorch's fused attention kernels) equals Megatron-Core's DotProductAttention,
the local spec's own core: outputs and gradients, causal, grouped-query, sliding window,
explicit mask; and the flag that selects it."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.model.sdpa_attention import SDPAttention, sliding_window_mask
from megatron_ext.multirank import free_port


@pytest.fixture(scope="module")
def one_rank():
    """One gloo rank in CPU mode (Megatron's unfused core allocates on "cuda")."""
    from megatron_ext import cpu_mode

    cpu_mode.enable()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)  # fmt: skip
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # Megatron's core forks its RNG tracker
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    cpu_mode.disable()


def _pair(heads=8, groups=8, window=None):
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=heads,
                            num_query_groups=groups, window_size=window, attention_dropout=0.0,
                            masked_softmax_fusion=False, use_cpu_initialization=True)  # fmt: skip
    kw = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(cfg, **kw), SDPAttention(cfg, **kw)


@pytest.mark.parametrize(
    "heads,groups,window,explicit",
    [(8, 8, None, False), (8, 2, None, False), (8, 4, (5, 0), False), (4, 4, None, True)],
    ids=["causal", "gqa", "sliding-window", "explicit-mask"],
)
def test_sdpa_core_equals_megatron_core(one_rank, heads, groups, window, explicit):
    s, b, d = 24, 3, 64 // heads
    ref, ours = _pair(heads, groups, window)
    g = torch.Generator().manual_seed(heads + groups)
    q = torch.randn(s, b, heads, d, generator=g)
    k, v = (torch.randn(s, b, groups, d, generator=g) for _ in range(2))
    dy = torch.randn(s, b, heads * d, generator=g)
    mask = None
    if explicit:  # Megatron's convention: True = masked out (causal plus a padded prefix)
        mask = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s).clone()
        mask[1, :, :, :4] = True
        mask[1, :, :4, 0] = False  # every row keeps at least one key
    outs, grads = [], []
    for core in (ref, ours):
        qkv = [t.clone().requires_grad_(True) for t in (q, k, v)]
        y = core(*qkv, mask)
        (y * dy).sum().backward()
        outs.append(y)
        grads.append([t.grad for t in qkv])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, r in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sq,skv,window", [(6, 6, (2, 0)), (4, 7, (3, 1))])
def test_sliding_window_mask_is_megatrons_rule(one_rank, sq, skv, window):
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    masked = get_sliding_window_causal_mask(sq, skv, window)  # True = masked out
    assert torch.equal(sliding_window_mask(sq, skv, window, "cpu"), ~masked.cpu())


def test_the_flag_selects_the_core():
    from megatron_ext.arguments import parse_args
    from megatron_ext.model.builder import uses_sdpa

    base = "--cpu --mock-data --train-iters 1 --model tiny".split()
    assert uses_sdpa(parse_args(base, 1))
    assert not uses_sdpa(parse_args(base + ["--attention-backend", "unfused"], 1))
    te = parse_args(base + ["--transformer-impl", "transformer_engine"], 1)
    assert not uses_sdpa(te)
