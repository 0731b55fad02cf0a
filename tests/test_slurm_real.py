"""The Slurm scripts under a real Slurm: munged, slurmctld and slurmd on this machine.

A 2-rank CPU recipe (``examples/cpu_tiny_2ranks.sh``) goes through ``sbatch slurm/launch.sh``
as a user's job would, and the tests signal it the ways a cluster does:

* ``scancel -b -s TERM`` (what ``--signal=B:TERM@N`` does before a time limit) and then
  ``scontrol requeue`` (what preemption with requeue does): each time the tasks finish their
  step, save that iteration, exit 0; the job is requeued, resumes from the checkpoint, and its
  losses are those of an uninterrupted run; at the end the job is COMPLETED with 2 restarts,
  its log, TensorBoard files and final checkpoint in place;
* a user's ``scancel``: the job ends CANCELLED and is not requeued;
* ``kill -9`` of one training process: the job fails at once (not requeued) and the last
  complete checkpoint stays loadable;
* the GPU sbatch scripts are refused by a cluster without GPU gres unless overridden
  (``--gpus-per-node=0``, as docs/cluster.md says).

The tier needs Debian's Slurm and root (``bash tests/install_slurm.sh``; CI's tests/run.sh runs
it); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, available

from megatron_ext import checkpointing
from megatron_ext.multirank import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "examples/cpu_tiny_2ranks.sh"
FLAGS = (
    "--cpu --model tiny --vocab-size 1000 --seq-length 64 --mock-data --micro-batch-size 2"
    " --global-batch-size 8 --lr 3e-3 --seed 7 --eval-iters 0 --attention-dropout 0"
    " --hidden-dropout 0 --moe-aux-loss-coeff 1e-2 --expert-model-parallel-size 2"
    " --use-distributed-optimizer --log-interval 1"
)  # the recipe's flags, for the uninterrupted reference run

REASON = available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"real-Slurm tier: {REASON}")


@pytest.fixture(scope="module")
def slurm():
    cluster = LocalSlurm(memory_mb=8000)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def submit(slurm, run_dir: Path, name: str, iters: int, save_interval: int) -> int:
    run_dir.mkdir(parents=True)  # Slurm opens --output before the script runs
    env = {
        **slurm.env,
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
        "TRAIN_ITERS": str(iters),
        "SAVE_INTERVAL": str(save_interval),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = slurm.run(
        "sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2",
        "--requeue", "--signal=B:TERM@60", f"--output={run_dir}/batch.out", "--open-mode=append",
        "slurm/launch.sh", RECIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    return int(out.stdout.strip().split(";")[0])


def task_log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.log")))


def wait_until(what: str, check, run_dir: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    batch = (run_dir / "batch.out").read_text() if (run_dir / "batch.out").exists() else ""
    raise AssertionError(
        f"not seen in {timeout:.0f}s: {what}\n{batch}\n{task_log(run_dir)[-4000:]}"
    )


def iteration_seen(run_dir: Path, n: int, after: int = 0):
    def check():
        done = [int(i) for i in re.findall(r"iter +(\d+)/", task_log(run_dir))]
        return any(i >= n for i in done[after:])

    return check


def job_state(slurm, job: int, states: tuple[str, ...]):
    def check():
        info = slurm.job(job)
        return info if info.get("JobState") in states else None

    return check


def losses(log: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for it, loss in re.findall(r"iter +(\d+)/\d+ .*?\| lm loss ([\d.]+)", log):
        assert int(it) not in out, f"iteration {it} ran twice"
        out[int(it)] = float(loss)
    return out


def _train(argv):
    import pretrain_mixtral

    return pretrain_mixtral.run(argv)


def test_term_and_requeue_save_resume_and_finish_like_an_uninterrupted_run(slurm, tmp_path):
    # Long enough (150 iterations, about 30 s of training here) that the second signal, sent
    # once the resumed run has trained 3 more iterations (it landed at ~17), always lands while
    # that run still trains; a save (at 10) precedes the first signal (at 12+).
    run_dir, iters = tmp_path / "run", 150
    job = submit(slurm, run_dir, "cycle", iters, save_interval=10)
    # 1. The time-limit signal: TERM to the batch shell only (#SBATCH --signal=B:TERM@N).
    wait_until("iteration 12", iteration_seen(run_dir, 12), run_dir)
    slurm.run("scancel", "--batch", "--signal=TERM", str(job))
    wait_until(
        "restart 1", lambda: "(restart 1) starts" in (run_dir / "batch.out").read_text(), run_dir
    )
    first_stop = int(re.findall(r"stopping after iteration (\d+): SIGTERM", task_log(run_dir))[0])
    # 2. A requeue by Slurm (scontrol requeue; preemption with requeue signals the same way).
    seen = len(re.findall(r"iter +\d+/", task_log(run_dir)))
    wait_until("3 more iterations", iteration_seen(run_dir, first_stop + 3, after=seen), run_dir)
    slurm.run("scontrol", "requeue", str(job))
    info = wait_until("COMPLETED", job_state(slurm, job, ("COMPLETED", "FAILED")), run_dir, 300)
    batch, log = (run_dir / "batch.out").read_text(), task_log(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", batch
    stops = [int(s) for s in re.findall(r"stopping after iteration (\d+): SIGTERM", log)]
    assert len(stops) == 2 and stops[0] == first_stop, log[-3000:]
    for stop in stops:  # each TERM: that iteration saved, and the next run resumed from it
        assert f"saved checkpoint {run_dir}/checkpoints/iter_{stop:07d}" in log
        assert f"loaded checkpoint {run_dir}/checkpoints/iter_{stop:07d}" in log
    assert "requeueing job" in batch and "Slurm is requeueing job" in batch
    assert batch.count("the tasks finished with code 0") == 3, batch
    assert "BrokenPipeError" not in log and not list((run_dir / "checkpoints").glob("*.partial"))
    assert checkpointing.read_marker(str(run_dir / "checkpoints")) == iters
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    got = losses(log)
    assert sorted(got) == list(range(1, iters + 1))
    reference = run_on_ranks(_train, 2, args=(f"{FLAGS} --train-iters {iters}".split(),))[-1]
    assert [got[i] for i in range(1, iters + 1)] == pytest.approx(reference, abs=1e-4)


def test_user_scancel_cancels_and_does_not_requeue(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "cancel", 100000, save_interval=1000)
    wait_until("iteration 5", iteration_seen(run_dir, 5), run_dir)
    slurm.run("scancel", str(job))
    info = wait_until("CANCELLED", job_state(slurm, job, ("CANCELLED",)), run_dir)
    time.sleep(15)  # longer than a requeued job's start delay here
    info = slurm.job(job)
    batch = (run_dir / "batch.out").read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", batch
    assert "not requeueing" in batch and "(restart 1)" not in batch


def test_a_killed_training_process_fails_the_job_and_keeps_the_last_checkpoint(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, "kill9", 100000, save_interval=3)
    wait_until("iteration 7", iteration_seen(run_dir, 7), run_dir)
    victims = _training_processes(job)
    assert len(victims) == 2, victims
    os.kill(victims[1], signal.SIGKILL)
    info = wait_until(
        "FAILED", job_state(slurm, job, ("FAILED", "COMPLETED", "CANCELLED")), run_dir
    )
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert "not requeueing" not in (run_dir / "batch.out").read_text()  # no TERM was involved
    ckpt = str(run_dir / "checkpoints")
    path, iteration = checkpointing.resolve(ckpt)
    assert iteration is not None and iteration % 3 == 0 and checkpointing.is_checkpoint_dir(path)
    # A save the kill interrupted may have left its .partial (never marked; the next save
    # clears it): only ever of a later iteration than the marked one.
    for debris in Path(ckpt).glob("*.partial"):
        assert int(debris.name[len("iter_") : -len(".partial")]) > iteration


def _training_processes(job: int) -> list[int]:
    """Pids of this job's pretrain_mixtral.py processes (their environment names the job)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_trainer = any(a.endswith(b"pretrain_mixtral.py") for a in cmdline)
        if is_trainer and f"SLURM_JOB_ID={job}".encode() in environ:
            out.append(int(entry))
    return sorted(out)


def test_gpu_sbatch_scripts_need_the_gres_override_here(slurm):
    script = str(ROOT / "slurm/mixtral_8x7b.sbatch")
    refused = slurm.run("sbatch", "--test-only", script, check=False, cwd=ROOT)
    assert refused.returncode != 0 and "generic resource" in refused.stderr.lower(), refused.stderr
    accepted = slurm.run(
        "sbatch", "--test-only", "--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2",
        "--exclusive", script, check=False, cwd=ROOT,
    )  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr


def test_preprocess_array_then_merge_equals_one_run_and_survives_a_requeue(slurm, tmp_path):
    """``slurm/preprocess_array.sbatch``: 3 array tasks (one shard each) and the merge after
    them write the bytes of one preprocess run over the same inputs; requeueing the finished
    array redoes nothing (each task: "already done") and the merged files stay the same."""
    import json as json_

    from test_data_tools_helpers import sample_corpus

    from data_tools.__main__ import main as data_tools
    from data_tools.tokenizers import mixtral_tokenizer_path

    docs = Path(sample_corpus(1.0)).read_text().splitlines(keepends=True)
    (tmp_path / "in").mkdir()
    for i in range(5):  # five files, documents dealt round-robin
        (tmp_path / "in" / f"part{i}.jsonl").write_text("".join(docs[i::5]))
    pre = ["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "out" / "c"),
           "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", mixtral_tokenizer_path(),
           "--append-eod", "--workers", "1", "--progress", "log"]  # fmt: skip
    env = {**slurm.env, "PYTHON": sys.executable}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = slurm.run(
        "bash", "slurm/preprocess_array.sbatch", "--shards", "3",
        f"--output={tmp_path}/%x-%A_%a.out", "--", *pre, cwd=ROOT, env=env,
    )  # fmt: skip
    array_job, merge_job = map(int, out.stdout.split()[-2:])
    logs = lambda: "".join(p.read_text() for p in sorted(tmp_path.glob("preprocess-*.out")))
    info = wait_until(
        "merge COMPLETED", job_state(slurm, merge_job, ("COMPLETED", "FAILED", "CANCELLED")),
        tmp_path, 180,
    )  # fmt: skip
    assert info["JobState"] == "COMPLETED", logs()
    one = ["preprocess", *pre[:2], "--output-prefix", str(tmp_path / "one"), *pre[4:]]
    assert data_tools(one) == 0
    merged = [(tmp_path / "out" / f"c_text_document.{e}").read_bytes() for e in ("bin", "idx")]
    assert merged == [(tmp_path / f"one_text_document.{e}").read_bytes() for e in ("bin", "idx")]
    shards = sorted((tmp_path / "out").glob("c-0000?-of-00003_text_document.bin"))
    assert len(shards) == 3 and "data-tools merge: 3 datasets" in logs()
    done = json_.loads((tmp_path / "out" / "c-00001-of-00003.data-tools-done.json").read_text())
    assert done["fingerprint"]["shard"] == [1, 3]
    slurm.run("scontrol", "requeue", str(array_job))
    wait_until("3 tasks already done", lambda: logs().count("already done") == 3, tmp_path, 120)
    assert logs().count("(restart 1)") == 3
    again = [(tmp_path / "out" / f"c_text_document.{e}").read_bytes() for e in ("bin", "idx")]
    assert again == merged
