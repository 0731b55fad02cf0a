"""bench/train_step.py compares like with like: from the same weights and batches, our
training step and its plain HF transformers loop give the same LM losses step after step."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
pytest.importorskip("transformers")


def test_ours_and_the_hf_loop_see_the_same_model_and_batches(tmp_path):
    import train_step

    flags = train_step.our_flags("tiny")
    env = dict(os.environ)
    train_step.prepare(str(tmp_path), flags, env)
    losses = {}
    for side in ("ours", "hf"):
        _, _, out = train_step._timed(train_step._commands(side, 3, str(tmp_path), flags), env)
        losses[side] = train_step._losses(side, out)
    assert len(losses["ours"]) == len(losses["hf"]) == 3
    # Step 1: the same weights and tokens give the same LM loss; steps 2-3: the same AdamW
    # updates (the router aux losses differ only by their normalisation, coefficient 0.01).
    assert losses["ours"] == pytest.approx(losses["hf"], rel=2e-4)
    assert losses["ours"][2] != losses["ours"][0]  # it trained


def test_the_bench_prints_our_per_phase_breakdown():
    import train_step

    table = train_step.breakdown("tiny")
    assert table.startswith("profile of 3 steps on rank 0")
    for phase in ("forward: attention", "forward: MoE layers", "backward", "optimizer"):
        assert phase in table
    assert "whole step" in table.splitlines()[-1]


def test_on_a_gpu_both_sides_run_bf16_with_the_local_spec():
    import train_step

    from megatron_ext.arguments import parse_args

    flags = train_step.our_flags("issue", "cuda")
    assert "--cpu" not in flags and "--bf16" in flags
    args = parse_args(flags + ["--train-iters", "2"], 1)  # what the HF loop reads too
    assert args.bf16 and args.transformer_impl == "local"
    assert train_step.our_flags("issue") == train_step.our_flags("issue", "cpu")
