"""--profile (Megatron-LM's flags): a torch.profiler window over the chosen iterations and ranks,
a trace in --tensorboard-dir, and a per-phase breakdown of the step that adds up."""

import glob
import re

import pytest

from megatron_ext.arguments import parse_args
from megatron_ext.errors import UsageError
from megatron_ext.multirank import run_on_ranks
from megatron_ext.profiling import (
    ATTENTION,
    BATCH,
    FORWARD,
    FWD_BWD,
    GRAD_SYNC,
    LOGGING,
    MOE,
    OPTIMIZER,
    OUTPUT,
    STEP,
    ZERO_GRAD,
    Breakdown,
)

COMMON = (
    "--cpu --model tiny --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 4 --attention-dropout 0 --hidden-dropout 0 --eval-iters 0"
    " --log-interval 1 --seed 7 --lr 1e-3 --train-iters 5"
)


def test_the_phases_are_the_nested_ranges_taken_apart():
    # Two steps' totals (ms) as torch.profiler would sum them; every range nests in its parent.
    totals = {STEP: 200.0, FWD_BWD: 150.0, FORWARD: 60.0, BATCH: 2.0, ATTENTION: 14.0,
              MOE: 20.0, OUTPUT: 10.0, GRAD_SYNC: 8.0, ZERO_GRAD: 4.0, OPTIMIZER: 30.0,
              LOGGING: 6.0}  # fmt: skip
    table = dict(Breakdown.from_totals(totals, steps=2).phases)
    assert table["forward: other"] == pytest.approx((60 - 2 - 14 - 20 - 10) / 2)
    assert table["backward"] == pytest.approx((150 - 60 - 8) / 2)
    assert table["grad machinery (zero, DDP finalize)"] == pytest.approx((4 + 8) / 2)
    assert table["other"] == pytest.approx((200 - 150 - 4 - 30 - 6) / 2)
    assert sum(table.values()) == pytest.approx(100.0)


def _run(argv):
    import contextlib
    import io

    import pretrain_mixtral

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        history = pretrain_mixtral.run(argv)
    return list(history), out.getvalue()


def _phases(text: str, rank: int) -> dict[str, float]:
    block = text[text.index(f"on rank {rank} ") :]
    rows = re.findall(r"^  (\S.*?)\s+(-?[0-9.]+)\s+-?[0-9.]+%$", block, re.M)
    return {name: float(ms) for name, ms in rows}


def test_profile_window_on_two_ranks_leaves_training_unchanged(tmp_path):
    layout = " --expert-model-parallel-size 2 --use-distributed-optimizer"
    plain = run_on_ranks(_run, 2, args=((COMMON + layout).split(),), timeout=300)
    profiled_argv = (
        f"{COMMON}{layout} --profile --use-pytorch-profiler --profile-step-start 1"
        f" --profile-step-end 3 --profile-ranks 0 1 --tensorboard-dir {tmp_path}"
    ).split()
    profiled = run_on_ranks(_run, 2, args=(profiled_argv,), timeout=300)
    # The same training (the hooks and ranges change no numerics), and the window closed.
    assert profiled[-1][0] == plain[-1][0]
    for rank, (_, text) in enumerate(profiled):
        assert f"profile of 2 steps on rank {rank} " in text
        phases = _phases(text, rank)
        for name in ("forward: attention", "forward: MoE layers", "forward: output layer + loss",
                     "backward", "grad machinery (zero, DDP finalize)", "optimizer (clip, step)",
                     "logging (losses, load, log line)"):  # fmt: skip
            assert phases[name] > 0, (name, text)
        assert phases["forward: other"] >= 0 and phases["other"] >= 0, text
        whole = phases.pop("whole step")
        assert sum(phases.values()) == pytest.approx(whole, abs=0.1 * len(phases))
    assert "profile of" not in plain[0][1]
    assert len(glob.glob(f"{tmp_path}/*.pt.trace.json")) == 2  # one trace per profiled rank


def test_a_window_still_open_when_training_ends_is_reported():
    argv = (COMMON + " --profile --use-pytorch-profiler --profile-step-start 3"
            " --profile-step-end 50").split()  # fmt: skip
    _, text = run_on_ranks(_run, 1, args=(argv,), timeout=300)[0]
    assert "profile of 3 steps on rank 0 " in text  # the log's iterations 3, 4 and 5 of 5


@pytest.mark.parametrize(
    "flags, named",
    [
        ("--profile --profile-step-start 5 --profile-step-end 5", "--profile-step-end 5"),
        ("--profile --profile-step-start -1", "--profile-step-start -1"),
        ("--profile --profile-ranks 0 2", "--profile-ranks 2"),
    ],
)
def test_bad_profile_flags_are_named(flags, named):
    with pytest.raises(UsageError, match=re.escape(named)):
        parse_args(f"{COMMON} {flags}".split(), world_size=2)


def test_nsys_profiling_on_cpu_ranks_says_it_captures_nothing():
    args = parse_args(f"{COMMON} --profile".split(), world_size=1)
    assert any("--use-pytorch-profiler" in note for note in args.unhonoured)
