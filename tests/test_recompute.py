"""Megatron-LM's memory controls for MoE training: --moe-layer-recompute and --recompute-
granularity selective --recompute-modules. Each gives the same training (losses and gradient
norms) as no recomputation, and keeps fewer activations for the backward (measured: the bytes
autograd holds, as the planner's activation test measures them)."""

import re

import pytest
from test_plan import TINY, _activation_peak

from megatron_ext.arguments import parse_args
from megatron_ext.errors import UsageError
from megatron_ext.multirank import run_on_ranks

COMMON = (
    "--cpu --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 4 --attention-dropout 0 --hidden-dropout 0 --eval-iters 0"
    " --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --log-interval 1 --seed 7 --lr 3e-3"
    " --train-iters 3 --expert-model-parallel-size 2 --use-distributed-optimizer"
)
OPTIONS = {
    "moe-layer-recompute": "--moe-layer-recompute",
    "moe": "--recompute-granularity selective --recompute-modules moe",
    "moe_act": "--recompute-granularity selective --recompute-modules moe_act",
    "core_attn": "--recompute-granularity selective --recompute-modules core_attn",
    "shared_experts": "--recompute-granularity selective --recompute-modules shared_experts",
    "mlp (dense layers)": "--recompute-granularity selective --recompute-modules mlp moe_act",
}


def _run(argv):
    import contextlib
    import io

    import pretrain_mixtral

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        history = pretrain_mixtral.run(argv)
    # gradient norms, and the router's aux loss of the step: routing statistics counted once
    from megatron_ext.metrics import parse_line

    rows = [parse_line(x) for x in out.getvalue().splitlines() if x.startswith("iter ")]
    norms = [r["grad norm"] for r in rows] + [r["router aux_loss"] for r in rows]
    return list(history), norms


def _train(model: str, extra: str = ""):
    argv = f"{COMMON} --model {model} {extra}".split()
    return run_on_ranks(_run, 2, args=(argv,), timeout=300)[-1]


@pytest.fixture(scope="module")
def plain():
    return _train("tiny-deepseek")  # shared experts, a dense first layer, 16 fine experts


@pytest.mark.parametrize("name", list(OPTIONS))
def test_recomputation_trains_the_same(name, plain):
    losses, norms = _train("tiny-deepseek", OPTIONS[name])
    assert losses == pytest.approx(plain[0], rel=1e-6)
    assert len(norms) == 6 and all(norms)
    assert norms == pytest.approx(plain[1], rel=1e-4)  # printed to 4 decimals


@pytest.mark.parametrize(
    "name, flags",
    [
        ("moe", "--moe-layer-recompute"),
        ("moe_act", "--recompute-granularity selective --recompute-modules moe_act"),
    ],
)
def test_recomputation_keeps_fewer_activations_as_the_planner_estimates(name, flags):
    from megatron_ext.plan import activations

    base = run_on_ranks(_activation_peak, 1, args=(TINY,), timeout=300)[0][1]
    argv = TINY + flags.split()
    peak = run_on_ranks(_activation_peak, 1, args=(argv,), timeout=300)[0][1]
    assert peak < base, (name, peak, base)
    planned = activations.stage_activations(parse_args(argv, 1), 0).stored
    assert abs(planned - peak) <= 0.15 * peak, (name, planned, peak)


@pytest.mark.parametrize(
    "flags, named",
    [
        ("--moe-layer-recompute --recompute-granularity full --recompute-method uniform"
         " --recompute-num-layers 1", "--moe-layer-recompute"),
        ("--recompute-granularity selective --recompute-modules mla_up_proj", "mla_up_proj"),
        ("--moe-layer-recompute --moe-router-force-load-balancing",
         "--moe-router-force-load-balancing"),
    ],
)  # fmt: skip
def test_bad_recompute_flags_are_named(flags, named):
    with pytest.raises(UsageError, match=re.escape(named)):
        parse_args(f"{COMMON} --model tiny {flags}".split(), world_size=2)


def test_layernorm_recompute_without_transformer_engine_is_refused_at_start_up():
    from megatron_ext.arguments import check_environment

    args = parse_args(
        f"{COMMON} --model tiny --recompute-granularity selective --recompute-modules "
        "layernorm".split(),
        world_size=2,
    )
    with pytest.raises(UsageError, match="layernorm needs Transformer Engine"):
        check_environment(args)


def test_modules_without_selective_granularity_are_reported():
    args = parse_args(f"{COMMON} --model tiny --recompute-modules moe".split(), world_size=2)
    assert any("--recompute-modules" in note for note in args.unhonoured)
