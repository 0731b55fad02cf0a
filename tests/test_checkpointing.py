"""Checkpoints end to end on CPU ranks (pretrain_mixtral.py, fp32, deterministic).

* exact resume: N steps, save, the process killed (inside the next save, at each of its
  stages), resume for N steps == 2N steps in one go, bit for bit (dropout on: RNG restored);
* crash safety: the kill leaves the previous checkpoint and the marker pointing at it;
* preemption: SIGTERM to a rank of a running job -> it finishes the step, saves, exits 0, and
  the resume continues exactly;
* resharding: saved at one layout, training continues at another with the same losses;
* --no-load-optim, --no-load-rng, --finetune, --exit-duration-in-mins; architecture mismatch
  errors that name the fields.
"""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from ckpt_helpers import COMMON, train

from megatron_ext import checkpointing
from megatron_ext.multirank import MultiRankError, free_port, run_on_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 2
DROPOUT = "--hidden-dropout 0.1 --attention-dropout 0.1"
# Two ranks: EP2 over DP2 with the distributed optimizer; dropout on, so that an exact resume
# also needs the RNG states.
TWO_RANKS = f"{COMMON} {DROPOUT} --expert-model-parallel-size 2 --use-distributed-optimizer"


def flags(*parts: str) -> list[str]:
    return " ".join(parts).split()


def run(world: int, *parts: str, env=None) -> list[float]:
    return run_on_ranks(train, world, args=(flags(*parts), env), timeout=600)[-1]


# ----------------------------------------------------------------------- marker, resolve
def test_marker_round_trip_and_garbage(tmp_path):
    root = str(tmp_path)
    assert checkpointing.read_marker(root) is None
    checkpointing.write_marker(root, 12)
    assert checkpointing.read_marker(root) == 12
    assert os.listdir(root) == [checkpointing.MARKER]  # no temporary file left behind
    (tmp_path / checkpointing.MARKER).write_text("release\n")
    with pytest.raises(ValueError, match="expected an iteration number"):
        checkpointing.read_marker(root)


def test_resolve_names_a_missing_marked_checkpoint(tmp_path):
    root = str(tmp_path)
    assert checkpointing.resolve(root) == (None, None)
    checkpointing.write_marker(root, 3)
    with pytest.raises(FileNotFoundError, match="iteration 3"):
        checkpointing.resolve(root)
    one = tmp_path / "iter_0000003"
    one.mkdir()
    (one / "metadata.json").write_text("{}")
    assert checkpointing.resolve(root) == (str(one), 3)
    assert checkpointing.resolve(str(one)) == (str(one), 3)  # a checkpoint directory itself


def test_only_optional_state_may_be_missing():
    check = checkpointing._check_unexpected
    check({"decoder.layers.self_attention.linear_qkv._extra_state"}, "ckpt", False)
    check({"decoder.layers.mlp.router.expert_bias"}, "ckpt", True)  # converted checkpoints
    with pytest.raises(checkpointing.CheckpointMismatch, match="no tensors for: .*expert_bias"):
        check({"decoder.layers.mlp.router.expert_bias"}, "ckpt", False)
    with pytest.raises(checkpointing.CheckpointMismatch, match="output_layer.weight"):
        check({"output_layer.weight", "x._extra_state"}, "ckpt", True)


# ------------------------------------------------------------- exact resume, kill in save
@pytest.fixture(scope="module")
def two_rank_reference():
    return run(2, TWO_RANKS, f"--train-iters {2 * N}")


# Where the kill lands -> ranks: two (EP2 x DP2, distributed optimizer) or one.
KILL_POINTS = {"start": 1, "written": 2, "renamed": 1}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_during_save_keeps_previous_and_resumes_exactly(point, request, tmp_path):
    world = KILL_POINTS[point]
    if world == 2:
        base, reference = TWO_RANKS, request.getfixturevalue("two_rank_reference")
    else:
        base, reference = f"{COMMON} {DROPOUT}", request.getfixturevalue("one_rank")[0]
    save = str(tmp_path / "ckpt")
    every = f"--train-iters {2 * N} --save {save} --save-interval {N}"
    with pytest.raises(MultiRankError, match="exited with code -9"):
        run(world, base, every, env={checkpointing.KILL_ENV: f"{2 * N}:{point}"})
    assert checkpointing.read_marker(save) == N
    assert checkpointing.is_checkpoint_dir(checkpointing.iteration_dir(save, N))
    killed = checkpointing.iteration_dir(save, 2 * N)
    if point == "renamed":  # complete on disk but never marked: ignored, then replaced
        assert os.path.isdir(killed) and not os.path.exists(killed + ".partial")
    else:
        assert os.path.isdir(killed + ".partial") and not os.path.exists(killed)

    resumed = run(world, base, every, f"--load {save}")
    assert resumed == reference[N:]  # bit for bit
    assert checkpointing.read_marker(save) == 2 * N
    assert checkpointing.is_checkpoint_dir(killed)
    assert not glob.glob(os.path.join(save, "*.partial"))


# ------------------------------------------------------------------------------ SIGTERM
def _wait_for(path: str, pattern: str, procs, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            found = re.search(pattern, f.read())
        if found:
            return found
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    with open(path) as f:
        raise AssertionError(f"{pattern!r} not seen in time; log:\n{f.read()[-3000:]}")


def _launch_two_ranks(argv: list[str], tmp_path) -> tuple[list, list[str]]:
    """pretrain_mixtral.py as two processes, as srun launches them (one per rank); each
    writes its output to tmp_path/rank{r}.log."""
    port, procs, logs = free_port(), [], []
    for rank in range(2):
        env = dict(
            os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        )  # fmt: skip
        logs.append(str(tmp_path / f"rank{rank}.log"))
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.join(REPO, "pretrain_mixtral.py"), *argv],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(tmp_path),
                )  # fmt: skip
            )
    return procs, logs


def test_sigterm_finishes_step_saves_exits_0_and_resumes_exactly(tmp_path):
    save = str(tmp_path / "ckpt")
    procs, logs = _launch_two_ranks(flags(TWO_RANKS, f"--train-iters 1000 --save {save}"), tmp_path)
    _wait_for(logs[1], r"iter\s+3/1000", procs, timeout=300)
    procs[0].send_signal(signal.SIGTERM)  # one rank is enough: the ranks agree on stopping
    codes = [p.wait(timeout=300) for p in procs]
    with open(logs[1]) as f:
        log = f.read()
    assert codes == [0, 0], log[-3000:]
    stop = int(re.search(r"stopping after iteration (\d+): SIGTERM received", log).group(1))
    assert checkpointing.read_marker(save) == stop
    assert checkpointing.is_checkpoint_dir(checkpointing.iteration_dir(save, stop))

    reference = run(2, TWO_RANKS, f"--train-iters 1000 --exit-interval {stop + 2}")
    logged = [float(v) for v in re.findall(r"lm loss ([0-9.]+)", log)]
    assert logged == pytest.approx(reference[:stop], abs=1e-4)  # the log prints 4 decimals
    resumed = run(2, TWO_RANKS, f"--train-iters 1000 --load {save} --exit-interval {stop + 2}")
    assert resumed == reference[stop:]


def test_term_to_every_process_after_a_save_still_saves(tmp_path):
    """Slurm signals every process of a job step (preemption, scontrol requeue, scancel),
    Megatron's checkpoint-writer helper included. That helper is made at the first save; when
    TERM killed it, the save on TERM failed with BrokenPipeError and left iter_N.partial."""
    from slurm_cluster import _descendants

    save = str(tmp_path / "ckpt")
    argv = flags(TWO_RANKS, f"--train-iters 1000 --save {save} --save-interval 2")
    procs, logs = _launch_two_ranks(argv, tmp_path)
    _wait_for(logs[0], r"saved checkpoint .*iter_0000002", procs, timeout=300)
    _wait_for(logs[1], r"iter\s+3/1000", procs, timeout=300)
    everyone = [p.pid for p in procs] + [d for p in procs for d in _descendants(p.pid)]
    assert len(everyone) > 2  # the writer's helper processes exist by now
    for pid in everyone:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    codes = [p.wait(timeout=300) for p in procs]
    with open(logs[1]) as f:
        log = f.read()
    assert codes == [0, 0], log[-3000:] + open(logs[0]).read()[-3000:]
    stop = int(re.search(r"stopping after iteration (\d+): SIGTERM received", log).group(1))
    assert checkpointing.read_marker(save) == stop
    assert checkpointing.is_checkpoint_dir(checkpointing.iteration_dir(save, stop))
    assert not glob.glob(os.path.join(save, "*.partial"))


# ---------------------------------------------------------------------------- resharding
PP2_EP2 = "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2"
DISTOPT = "--use-distributed-optimizer"


def _reshards(tmp_path, world: int, saved_at: str, continued_at: list[tuple[int, str]]):
    """2N steps at ``saved_at`` (checkpoint at N); from it, N steps at each of
    ``continued_at`` ((world, flags)) give the same losses as the uninterrupted run."""
    save = str(tmp_path / "ckpt")
    reference = run(
        world, COMMON, saved_at, f"--train-iters {2 * N} --save {save} --save-interval {N}"
    )
    resume = f"--train-iters {2 * N} --load {checkpointing.iteration_dir(save, N)}"
    for w, flags in continued_at:
        assert run(w, COMMON, resume, flags) == pytest.approx(reference[N:], rel=1e-5), flags


def test_reshard_pp2_dp2_ep2_to_tp2_and_one_rank(tmp_path):
    """PP2 x DP2 x EP2 -> TP2 x DP1 and one rank (the distributed optimizer throughout)."""
    _reshards(
        tmp_path,
        4,
        f"{PP2_EP2} {DISTOPT}",
        [(2, f"{DISTOPT} --tensor-model-parallel-size 2"), (1, DISTOPT)],
    )


@pytest.mark.slow
def test_reshard_tp2_pp2_ep2_to_one_rank_and_ep4(tmp_path):
    _reshards(
        tmp_path,
        8,
        f"{PP2_EP2} --tensor-model-parallel-size 2 {DISTOPT}",
        [(1, DISTOPT), (4, f"--expert-model-parallel-size 4 {DISTOPT}")],
    )


def test_reshard_folded_tp2_etp1_ep4_to_tp1_ep2_and_one_rank(tmp_path):
    """Saved with MoE parallel folding (TP2 x expert-TP1 x EP4, the EP groups across the TP
    groups), continued at TP1 x EP2 x DP2 and at one rank: the same losses."""
    _reshards(
        tmp_path,
        4,
        "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"
        f" --expert-model-parallel-size 4 --sequence-parallel {DISTOPT}",
        [(2, f"--expert-model-parallel-size 2 {DISTOPT}"), (1, DISTOPT)],
    )


# ------------------------------------------------------------------- flags, one rank each
@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """Four steps at one rank with dropout, checkpoints at 2 and 4; (losses, save dir)."""
    save = str(tmp_path_factory.mktemp("one_rank"))
    losses = run(1, COMMON, DROPOUT, f"--train-iters {2 * N} --save {save} --save-interval {N}")
    return losses, save


def _resume(one_rank, *extra: str) -> list[float]:
    at_n = checkpointing.iteration_dir(one_rank[1], N)
    return run(1, COMMON, DROPOUT, f"--train-iters {2 * N} --load {at_n}", *extra)


def test_resume_at_one_rank_is_exact(one_rank):
    assert _resume(one_rank) == one_rank[0][N:]


def test_no_load_optim_keeps_weights_and_position_but_not_adam_state(one_rank):
    losses = _resume(one_rank, "--no-load-optim")
    assert losses[0] == one_rank[0][N]  # same weights, same batch, same dropout masks
    assert losses[1] != one_rank[0][N + 1]  # fresh Adam moments


def test_no_load_rng_changes_the_dropout_masks(one_rank):
    losses = _resume(one_rank, "--no-load-rng")
    assert len(losses) == N and losses[0] != one_rank[0][N]


def test_finetune_restarts_iteration_and_data(one_rank):
    losses = _resume(one_rank, "--finetune")
    assert len(losses) == 2 * N  # iteration 0 again
    assert losses[0] < one_rank[0][0]  # trained weights on the first batch


def test_exit_duration_saves_and_stops(tmp_path):
    save = str(tmp_path / "ckpt")
    losses = run(1, COMMON, f"--train-iters 50 --save {save} --exit-duration-in-mins 1e-6")
    assert len(losses) == 1 and checkpointing.read_marker(save) == 1


def test_architecture_mismatch_names_the_fields(one_rank):
    at_n = checkpointing.iteration_dir(one_rank[1], N)
    other = "--num-layers 4 --hidden-size 128 --num-experts 8 --vocab-size 2000"
    with pytest.raises(MultiRankError) as err:
        run(1, COMMON, other, f"--train-iters {2 * N} --load {at_n}")
    text = str(err.value)
    assert "CheckpointMismatch" in text and "4 field(s) differ" in text
    for expected in (
        "num_layers: checkpoint 2, now 4",
        "hidden_size: checkpoint 64, now 128",
        "num_experts: checkpoint 4, now 8",
        "vocab_size: checkpoint 1000, now 2000",
    ):
        assert expected in text
    assert "size mismatch" not in text and "Global shape mismatch" not in text


def test_optimizer_kind_mismatch_is_explained(one_rank):
    with pytest.raises(MultiRankError, match="saved by the local optimizer") as err:
        _resume(one_rank, "--use-distributed-optimizer")
    assert "--no-load-optim" in str(err.value)
