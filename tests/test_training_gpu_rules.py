"""pretrain_mixtral.py on its GPU path (no --cpu) under the GPU rules, at several layouts.

Every rank believes it has a GPU (``run_on_ranks(..., gpu_rules=True)``): the model is built
with GPU settings (device initialisation, fused bias-dropout, pipeline output deallocation,
the fused softmax choice), NCCL groups refuse host tensors and host syncs are counted. All
layouts start from one set of weights (saved by a CPU-mode rank) and must give the losses of
the CPU path at one rank (fp32), eval and checkpoints included.
"""

import warnings

import pytest
import torch
from ckpt_helpers import COMMON, train

from megatron_ext.multirank import run_on_ranks

GPU = COMMON.replace("--cpu ", "") + " --transformer-impl local"
RTOL = 1e-5


def flags(*parts: str) -> list[str]:
    return " ".join(parts).split()


def on_gpu_path(world, *parts, timeout=600):
    return run_on_ranks(
        train, world, args=(flags(GPU, *parts), None), gpu_rules=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Initial weights made by a CPU-mode rank (one step at lr 0 leaves them unchanged)."""
    path = str(tmp_path_factory.mktemp("reference"))
    run_on_ranks(train, 1, args=(flags(COMMON, f"--train-iters 1 --lr 0 --save {path}"), None))
    return path


@pytest.fixture(scope="module")
def cpu_losses(reference):
    argv = flags(COMMON, f"--train-iters 3 --load {reference} --finetune")
    return run_on_ranks(train, 1, args=(argv, None))[0]


OVERLAP = (
    "--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather"
    " --ddp-bucket-size 20000"  # several buckets per chunk: multi-bucket overlap
)
LAYOUTS = {
    "1 rank": (1, ""),
    "TP2xEP2 +SP": (
        4,
        "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 --sequence-parallel",
    ),
    "EP2 recompute moe, moe_act, core_attn": (
        2,
        "--expert-model-parallel-size 2 --moe-layer-recompute --recompute-modules core_attn"
        " moe_act",
    ),
    # folded: the expert-TP gather/reduce-scatter and the count exchange over expert-TP x EP
    "TP2xETP1xEP4 +SP overlap": (
        4,
        "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"
        f" --expert-model-parallel-size 4 --sequence-parallel {OVERLAP}",
    ),
    "TP1xETP2xEP2": (4, "--expert-tensor-parallel-size 2 --expert-model-parallel-size 2"),
    "PP2xDP2xEP2 overlap + eval": (
        4,
        f"--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 {OVERLAP}"
        " --eval-iters 1 --eval-interval 2",
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gpu_path_gives_the_cpu_losses(name, reference, cpu_losses):
    world, layout = LAYOUTS[name]
    losses = on_gpu_path(world, f"--train-iters 3 --load {reference} --finetune", layout)[-1]
    assert losses == pytest.approx(cpu_losses, rel=RTOL)


def test_save_and_resume_on_the_gpu_path_equals_an_uninterrupted_run(reference, tmp_path):
    """With --overlap-param-gather the save must hold this step's weights (not the last
    step's, as the all-gather of the updated shards only starts with the next forward)."""
    layout = f"--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 {OVERLAP}"
    layout += " --eval-iters 1 --eval-interval 2"
    save = tmp_path / "ckpt"
    whole = on_gpu_path(
        4, layout, f"--train-iters 4 --load {reference} --finetune --save {save} --save-interval 2"
    )[-1]
    resumed = on_gpu_path(4, layout, f"--train-iters 4 --load {save / 'iter_0000002'}")[-1]
    assert len(whole) == 4 and len(resumed) == 2
    assert resumed == pytest.approx(whole[2:], rel=1e-6)


def _saved_model(path):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load_plain_tensors(path)
    return {k: v for k, v in state.items() if k.startswith(("decoder.", "embedding.", "output_"))}


def test_overlap_param_gather_saves_the_current_weights(reference, tmp_path):
    dp2 = "--use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 20000"
    for name, extra in (("plain", ""), ("overlap", "--overlap-param-gather")):
        on_gpu_path(
            2, dp2, extra, f"--train-iters 2 --load {reference} --finetune --save {tmp_path / name}"
        )
    plain, overlap = (
        run_on_ranks(_saved_model, 1, args=(str(tmp_path / n / "iter_0000002"),))[0]
        for n in ("plain", "overlap")
    )
    assert plain.keys() == overlap.keys() and len(plain) == 10
    stale = [k for k in plain if not (plain[k] - overlap[k]).abs().max() <= 1e-6]
    assert not stale, stale


def _train_recording(argv):
    """Train; return the losses, the rules' grouped-GEMM counts and the warnings raised."""
    from megatron_ext import gpu_rules

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = train(argv)
    return losses, dict(gpu_rules.rules().grouped_mm), [str(w.message) for w in caught]


def test_bf16_on_the_gpu_path_trains_with_grouped_gemms():
    """bf16 on a GPU without apex's softmax kernels: no fused softmax (its import killed the
    first attention forward), the experts take the grouped GEMM."""
    argv = flags(GPU, "--bf16 --train-iters 3")
    losses, grouped, _ = run_on_ranks(_train_recording, 1, args=(argv,), gpu_rules=True)[0]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert grouped.get("fast", 0) > 0 and "fallback" not in grouped


def test_interleaved_pipeline_param_gathers_are_dispatched_once():
    """--overlap-param-gather with virtual stages: the schedule dispatches each chunk's param
    all-gathers (align_param_gather, as Megatron-LM); without it the forward hooks also
    dispatched them and Megatron warned that the gather was already in flight."""
    argv = flags(
        GPU, "--num-layers 4 --pipeline-model-parallel-size 2",
        "--num-layers-per-virtual-pipeline-stage 1 --global-batch-size 16 --train-iters 2",
        OVERLAP,
    )  # fmt: skip
    for _, _, caught in run_on_ranks(_train_recording, 4, args=(argv,), gpu_rules=True):
        assert not [m for m in caught if "already been dispatched" in m]


def _softmax_choice(with_kernels, backend):
    import importlib.machinery
    import sys
    import types

    from megatron_ext.arguments import check_environment, parse_args
    from megatron_ext.machine_checks import FUSED_SOFTMAX_KERNELS

    if with_kernels:
        for name in FUSED_SOFTMAX_KERNELS:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    args = parse_args(flags(GPU, f"--bf16 --train-iters 1 --attention-backend {backend}"))
    check_environment(args)
    return args.masked_softmax_fusion, args.notices


@pytest.mark.parametrize("with_kernels", [False, True])
@pytest.mark.parametrize("backend", ["unfused", "auto"])
def test_softmax_fusion_only_where_apex_kernels_exist(with_kernels, backend):
    """The fused softmax runs where apex's kernels exist; their absence is said only where
    Megatron's DotProductAttention runs: SDPA (the default) has no softmax of ours, and the
    first GPU run (H200, PyTorch image without apex) printed the notice needlessly."""
    fused, notices = run_on_ranks(_softmax_choice, 1, args=(with_kernels, backend),
                                  gpu_rules=True)[0]  # fmt: skip
    assert fused is with_kernels
    said = [n for n in notices if "masked softmax fusion is off" in n]
    assert len(said) == (1 if backend == "unfused" and not with_kernels else 0)


def _bias_dropout_add(p):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    torch.manual_seed(0)
    x, bias, residual = torch.randn(64, 2, 32), torch.randn(32), torch.randn(64, 2, 32)
    out = {}
    for fused in (True, False):
        xs = [t.clone().requires_grad_() for t in (x, bias, residual)]
        y = get_bias_dropout_add(True, fused)((xs[0], xs[1]), xs[2], p)
        y.square().sum().backward()
        out[fused] = (y.detach(), *(t.grad for t in xs))
    return out


@pytest.mark.slow
def test_fused_bias_dropout_add_compiles_on_cpu_and_matches():
    """bias_dropout_fusion (on for GPUs) is Megatron's torch.compile'd function: under the
    GPU rules it runs eagerly (Dynamo cannot trace the device-tensor subclass), so its
    compiled form is checked here, on plain CPU tensors with PyTorch's inductor."""
    out = run_on_ranks(_bias_dropout_add, 1, args=(0.0,), cpu=False, timeout=600)[0]
    for got, want in zip(out[True], out[False], strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    dropped = run_on_ranks(_bias_dropout_add, 1, args=(0.5,), cpu=False, timeout=600)[0][True][0]
    assert dropped.shape == (64, 2, 32)


def _fusion_config(extra: str, cpu: bool):
    from megatron_ext.arguments import parse_args
    from megatron_ext.model import transformer_config

    args = parse_args(flags(COMMON if cpu else GPU, "--train-iters 1", extra), 1)
    cfg = transformer_config(args)
    fields = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")
    return tuple(getattr(cfg, f) for f in fields), cfg.cross_entropy_fusion_impl, args.unhonoured


ALL_FUSION_FLAGS = (
    "--no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion "
    "--cross-entropy-loss-fusion --moe-permute-fusion"
)


def test_fusion_flags_keep_megatron_lm_names_and_defaults():
    """Megatron-LM's fusion switches (copied launch scripts carry them): fused SwiGLU and
    bias-dropout-add by default on GPU ranks, each ``--no-...`` turns one off, the fused
    cross-entropy is opt-in; CPU ranks never fuse and say so for a fusion they were asked for."""
    assert _fusion_config("", cpu=False)[:2] == ((True, True, False), "native")
    assert _fusion_config(ALL_FUSION_FLAGS, cpu=False)[:2] == ((False, False, True), "native")
    te = _fusion_config("--cross-entropy-loss-fusion --cross-entropy-fusion-impl te", False)
    assert te[:2] == ((True, True, True), "te")
    fused, _, notes = _fusion_config(ALL_FUSION_FLAGS, cpu=True)
    assert fused == (False, False, False)
    assert [n for n in notes if n.startswith("--cross-entropy-loss-fusion: CPU ranks")]
    assert _fusion_config("", cpu=True)[0] == (False, False, False)


def test_transformer_engine_cross_entropy_without_te_is_one_clear_error():
    from megatron_ext.arguments import LayoutError, check_environment, parse_args

    argv = flags(GPU, "--train-iters 1 --cross-entropy-loss-fusion --cross-entropy-fusion-impl te")
    with pytest.raises(LayoutError, match="--cross-entropy-fusion-impl te needs Transformer"):
        check_environment(parse_args(argv, 1))
    check_environment(parse_args(flags(GPU, "--train-iters 1 --cross-entropy-loss-fusion"), 1))


def _swiglu_fusion():
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    torch.manual_seed(0)
    h = torch.randn(64, 2, 96)
    out = {}
    for fused in (True, False):
        x = h.clone().requires_grad_()
        if fused:  # what Megatron-Core's MLP runs with bias_activation_fusion (no bias)
            y = bias_swiglu_impl(x, None)
        else:
            g, u = x.chunk(2, dim=-1)
            y = torch.nn.functional.silu(g) * u
        y.square().sum().backward()
        out[fused] = (y.detach(), x.grad)
    return out


@pytest.mark.slow
def test_fused_swiglu_compiles_on_cpu_and_matches():
    """bias_activation_fusion (on for GPUs, Megatron-LM's default) runs Megatron-Core's
    torch.compile'd SwiGLU: eagerly under the GPU rules, so its compiled form is checked here,
    on plain CPU tensors with PyTorch's inductor, against the unfused formula."""
    out = run_on_ranks(_swiglu_fusion, 1, cpu=False, timeout=600)[0]
    for got, want in zip(out[True], out[False], strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_expert_bias_resumes_exactly_in_bf16(tmp_path):
    """--moe-router-enable-expert-bias --bf16: the bias stays fp32 through Float16Module, so a
    resumed run continues with the very bias that was saved (a bf16 buffer rounded the loaded
    +-0.01 steps to 0.0100098 and the runs drifted apart). Resumed after one update, compared
    after three: an odd number of +-rate steps cannot cancel out."""
    bias = (
        "--cpu --bf16 --moe-router-load-balancing-type none --moe-router-score-function sigmoid"
        " --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-2"
    )
    base = COMMON.replace("--cpu ", "")
    whole_dir, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    argv = flags(base, bias, f"--train-iters 3 --save {whole_dir} --save-interval 1")
    whole = run_on_ranks(train, 1, args=(argv, None))[0]
    argv = flags(base, bias, f"--train-iters 3 --load {whole_dir / 'iter_0000001'}")
    argv += ["--save", str(resumed_dir)]
    resumed = run_on_ranks(train, 1, args=(argv, None))[0]
    assert resumed == pytest.approx(whole[1:], rel=1e-6)
    final = [
        run_on_ranks(_expert_bias, 1, args=(str(d / "iter_0000003"),))[0]
        for d in (whole_dir, resumed_dir)
    ]
    assert final[0].dtype == final[1].dtype == torch.float32
    assert final[0].abs().sum() > 0 and bool((final[0] == final[1]).all()), final


def _expert_bias(path):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load_plain_tensors(path)
    (bias,) = [v for k, v in state.items() if k.endswith("router.expert_bias")]
    return bias


def _batch_copies():
    from types import SimpleNamespace

    from megatron.core import parallel_state

    import pretrain_mixtral
    from megatron_ext import data, gpu_rules

    parallel_state.initialize_model_parallel()
    sample = {k: torch.arange(8) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    it = data.micro_batches([sample] * 4, 0, SimpleNamespace(micro_batch_size=2))
    rules = gpu_rules.rules()
    rules.reset_counters()
    batch = pretrain_mixtral.get_batch(it)
    return dict(rules.syncs), [gpu_rules.is_device(t) for t in batch]


def test_get_batch_queues_its_copies_without_waiting_for_the_gpu():
    """The micro-batch's host -> device copies are non_blocking (from pinned memory): a plain
    .to() waits for the stream, so every micro-batch waited for the GPU to finish the previous
    one and left it idle while the next forward launched (the first H200 profile: 32 waits per
    8-micro-batch step, in get_batch)."""
    syncs, on_device = run_on_ranks(_batch_copies, 1, gpu_rules=True)[0]
    assert on_device == [True] * 4
    assert syncs == {}, syncs
