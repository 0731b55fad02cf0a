"""FP8 experts (Transformer Engine's GroupedLinear) against a recording fake of TE, GPU rules on.

Each test runs in one rank under ``megatron_ext.gpu_rules`` (the layer takes its GPU path) with
``tests/fake_te.py`` installed as ``transformer_engine``: the fake checks TE's argument rules,
computes the GEMMs exactly and records every call.
"""

import pytest
import torch

from megatron_ext.multirank import run_on_ranks

H, F, E, TOKENS = 64, 128, 4, 40


def _config(fp8):
    import torch.nn.functional as fn
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=H, ffn_hidden_size=F, num_attention_heads=4,
        num_moe_experts=E, moe_router_topk=2, add_bias_linear=False, gated_linear_unit=True,
        activation_func=fn.silu, params_dtype=torch.float32, fp8=fp8,
    )  # fmt: skip


def _layers():
    """An FP8 layer (fake TE) and a bf16-path twin with the same weights."""
    import fake_te
    from megatron.core import parallel_state, tensor_parallel

    from megatron_ext.moe import SMoELayer

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    fake_te.install()
    torch.manual_seed(0)
    fp8_layer = SMoELayer(_config("hybrid"))
    plain_layer = SMoELayer(_config(None))
    plain_layer.load_state_dict(fp8_layer.state_dict(), strict=False)
    return fp8_layer, plain_layer, fake_te


def _forward_backward(layer, x):
    x = x.detach().requires_grad_()
    out, _ = layer(x)
    out.square().sum().backward()
    return out.detach(), x.grad, layer.experts.w13.grad, layer.experts.w2.grad


def _calls_and_numerics():
    fp8_layer, plain_layer, fake_te = _layers()
    x = torch.randn(TOKENS // 2, 2, H, device="cuda")
    with fake_te.fp8_autocast(enabled=True):
        got = _forward_backward(fp8_layer, x)
        fp8_layer.zero_grad()
        _forward_backward(fp8_layer, x)  # second micro-batch of the step
        fp8_layer.set_is_first_microbatch()  # what the pipeline schedule calls each step
        fp8_layer.zero_grad()
        _forward_backward(fp8_layer, x)
        fp8_layer.eval()
        with torch.no_grad():
            fp8_layer(x)
    want = _forward_backward(plain_layer, x)
    inits = [c[2] for c in fake_te.CALLS if c[0] == "init"]
    forwards = [c[1:] for c in fake_te.CALLS if c[0] == "forward"]
    state = fp8_layer.state_dict()
    return {
        "inits": inits,
        "forwards": forwards,
        "max_diff": [float((a - b).abs().max()) for a, b in zip(got, want, strict=True)],
        "extra_state_keys": sorted(k for k in state if k.endswith("_extra_state")),
        "te_params": [n for n, _ in fp8_layer.named_parameters() if ".te." in n],
    }


def test_grouped_linear_calls_and_numerics():
    out = run_on_ranks(_calls_and_numerics, 1, gpu_rules=True)[0]
    # Two GroupedLinear per layer, TE's own layout, no bias, no TP inside TE.
    common = dict(num_gemms=E, bias=False, params_dtype=torch.float32, parallel_mode=None)
    assert out["inits"] == [
        {**common, "in_features": H, "out_features": 2 * F, "device": "0"},
        {**common, "in_features": F, "out_features": H, "device": "0"},
    ]
    assert out["te_params"] == []  # TE's own weights are gone: w13 / w2 are the parameters
    fwd = out["forwards"]
    assert len(fwd) == 8  # fc1 + fc2, four forwards
    for shape, splits, _, fp8, _ in fwd:
        assert shape in ((H, 2 * F), (F, H)) and len(splits) == E and fp8
        assert all(m % 16 == 0 for m in splits) and sum(splits) >= TOKENS * 2
    firsts = [first for _, _, first, _, _ in fwd]
    assert firsts == [True, True, False, False, True, True, False, False]
    assert [training for *_, training in fwd] == [True] * 6 + [False] * 2  # .eval() reaches TE
    assert max(out["max_diff"]) < 1e-5, out["max_diff"]  # padding is exact
    assert out["extra_state_keys"] == [
        "experts.te.fc1._extra_state",
        "experts.te.fc2._extra_state",
    ]


def _extra_state_round_trip(path):
    from megatron.core import dist_checkpointing

    fp8_layer, _, fake_te = _layers()
    x = torch.randn(TOKENS // 2, 2, H, device="cuda")
    with fake_te.fp8_autocast(enabled=True):
        _forward_backward(fp8_layer, x)
    saved = {n: fc.get_extra_state() for n, fc in (("fc1", fp8_layer.experts.te.fc1),)}
    dist_checkpointing.save(fp8_layer.sharded_state_dict(), path)
    fresh, _, _ = _layers()
    assert fresh.experts.te.fc1.get_extra_state()["fp8_forwards"] == 0
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), path))
    loaded = fresh.experts.te.fc1.get_extra_state()
    return saved["fc1"], loaded, [c for c in fake_te.CALLS if c[0] == "set_extra_state"]


def test_fp8_metadata_is_checkpointed_and_restored(tmp_path):
    saved, loaded, calls = run_on_ranks(
        _extra_state_round_trip, 1, args=(str(tmp_path),), gpu_rules=True
    )[0]
    assert saved["fp8_forwards"] == 1 and saved["amax"].gt(0).all()
    assert loaded["fp8_forwards"] == 1 and torch.equal(loaded["amax"], saved["amax"])
    assert len(calls) == 2  # fc1 and fc2 of the fresh layer


def _zero_rows():
    fp8_layer, _, fake_te = _layers()
    experts = fp8_layer.experts
    x = torch.randn(0, H, device="cuda", requires_grad=True)
    splits = (0,) * E
    with fake_te.fp8_autocast(enabled=True):
        y = experts(x, splits, torch.zeros(E, dtype=torch.long, device="cuda"))
    y.sum().backward()
    forwards = [c for c in fake_te.CALLS if c[0] == "forward"]
    return tuple(y.shape), forwards, experts.w13.grad, experts.w2.grad


def test_a_rank_without_rows_never_calls_te_and_gets_zero_grads():
    shape, forwards, g13, g2 = run_on_ranks(_zero_rows, 1, gpu_rules=True)[0]
    assert shape == (0, H) and forwards == []
    assert g13 is not None and not g13.any() and g2 is not None and not g2.any()


def _parse(spec_name, recipe):
    import fake_te

    from megatron_ext import gpu_rules
    from megatron_ext.arguments import LayoutError, check_environment, parse_args

    fake_te.install()
    argv = (
        "--model tiny --mock-data --vocab-size 1000 --train-iters 1 --transformer-impl local "
        f"--bf16 --fp8-format hybrid --fp8-recipe {recipe}"
    ).split()
    assert gpu_rules.rules().spec.name == spec_name
    try:
        check_environment(parse_args(argv))
    except LayoutError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "spec,recipe,refused",
    [("H100_SXM", "mxfp8", True), ("B200", "mxfp8", False), ("H100_SXM", "delayed", False)],
)
def test_mxfp8_needs_blackwell(spec, recipe, refused):
    from megatron_ext import gpu_rules

    device = getattr(gpu_rules, spec)
    error = run_on_ranks(_parse, 1, args=(device.name, recipe), gpu_rules=device)[0]
    if refused:
        assert error and "--fp8-recipe mxfp8 needs a Blackwell GPU" in error and "9.0" in error
    else:
        assert error is None
