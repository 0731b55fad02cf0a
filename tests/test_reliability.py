"""Bad input and faults: one clear line from one rank, before anything expensive; nothing lost.

Every case of docs/reliability.md runs ``pretrain_mixtral.main`` on two CPU ranks and checks
what the user sees: the exit code, exactly ONE ``pretrain_mixtral.py: error: ...`` line over
both ranks' output naming the flag or the file, and no traceback anywhere. Cases found before
the model is built say so by not printing the model's set-up notes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext import checkpointing
from megatron_ext.checkpointing import checksums
from megatron_ext.metrics import parse_line
from megatron_ext.multirank import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
MOCK = (
    "--cpu --model tiny --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 8 --train-iters 2 --eval-iters 0 --log-interval 1 --lr 1e-3"
)


def _main(argv):
    """``pretrain_mixtral.main(argv)`` in this rank: (exit code, stderr, stdout)."""
    import contextlib
    import io
    import warnings

    warnings.simplefilter("ignore")  # library warnings are not what these tests read
    import pretrain_mixtral

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = pretrain_mixtral.main(argv)
    return code, err.getvalue(), out.getvalue()


def run(argv: str, world: int = 2, cpu: bool = True) -> list[tuple[int, str, str]]:
    return run_on_ranks(_main, world, args=(argv.split(),), timeout=600, cpu=cpu)


def one_error(argv: str, code: int = 2, world: int = 2, cpu: bool = True) -> str:
    """Run, check the presentation, return the error line (``cpu=False``: the ranks run
    without CPU mode, as a plain process on this machine would)."""
    results = run(argv, world, cpu)
    assert [r[0] for r in results] == [code] * world, results
    text = "\n".join(r[1] + r[2] for r in results)
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, text
    assert errors[0].startswith("pretrain_mixtral.py: error: ")
    return errors[0]


# ------------------------------------------------------------------------------------ flags
FLAG_CASES = {
    "--seq-length 0": "--seq-length must be positive, not 0",
    "--moe-router-topk 3 --num-experts 2": "--moe-router-topk 3 exceeds --num-experts 2",
    "--lr-warmup-iters 2": "--lr-warmup-iters 2 must be below --lr-decay-iters 2",
    "--lr -1": "--lr must be >= 0, not -1.0",
    "--num-experts 0": "--num-experts must be positive, not 0",
    "--hidden-dropout 1": "--hidden-dropout must be in [0, 1), not 1.0",
    "--min-lr 1": "--min-lr 1.0 exceeds --lr 0.001",
    "--overlap-param-gather": "--overlap-param-gather needs --use-distributed-optimizer",
    "--tensor-model-parallel-size 4": "world size 2 is not divisible by",
}


@pytest.mark.parametrize("flags", list(FLAG_CASES))
def test_bad_flag_values(flags):
    line = one_error(f"{MOCK} {flags}")
    assert FLAG_CASES[flags] in line, line


# ------------------------------------------------------------------------------------- data
def write_dataset(prefix: Path, docs: list[list[int]]) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        import torch

        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _mixtral() -> str:
    from data_tools.tokenizers import mixtral_tokenizer_path

    return mixtral_tokenizer_path()


def data_flags(prefix: str, split: str = "90,10,0") -> str:
    return (
        f"--cpu --model tiny --seq-length 32 --micro-batch-size 2 --global-batch-size 4"
        f" --train-iters 2 --eval-iters 0 --log-interval 1 --tokenizer-type Llama2Tokenizer"
        f" --tokenizer-model {_mixtral()} --data-path {prefix} --split {split}"
    )


def _docs(n: int, high: int = 31999) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [list(rng.integers(3, high, size=40)) for _ in range(n)]


def _data_case(case: str, d: Path) -> tuple[str, str]:
    """(flags, what the error must say)."""
    good = write_dataset(d / "good_text_document", _docs(50))
    if case == "no --data-path":
        return data_flags(good).replace(f"--data-path {good}", ""), "pass --data-path"
    if case == ".bin without .idx":
        os.remove(good + ".idx")
        return data_flags(good), f"{good}.idx is missing (only {good}.bin exists)"
    if case == ".idx without .bin":
        os.remove(good + ".bin")
        return data_flags(good), f"{good}.bin is missing (only {good}.idx exists)"
    if case == "--data-path names the .bin":
        return data_flags(good + ".bin"), f"pass the prefix {good} (without .bin/.idx)"
    if case == "no such prefix":
        return data_flags(str(d / "nope")), f"no {d / 'nope'}.bin or {d / 'nope'}.idx"
    if case == "empty dataset":
        return data_flags(write_dataset(d / "empty", [])), "the dataset is empty"
    if case == ".bin and .idx disagree":
        with open(good + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(good + ".bin") - 8)
        return data_flags(good), "holds 1996 tokens but"
    if case == "token ids beyond the vocabulary":
        bad = write_dataset(d / "big_ids", _docs(30) + [[40000, 5, 6]] + _docs(30))
        return data_flags(bad), "document 30 of"
    if case == "a split without documents":
        small = write_dataset(d / "small", _docs(12))
        return data_flags(small, "98,2,0"), "leaves the validation split without documents"
    if case == "tokenizer is not SentencePiece":
        junk = d / "tokenizer.model"
        junk.write_text("not a model\n")
        return data_flags(good).replace(_mixtral(), str(junk)), f"--tokenizer-model {junk}"
    raise ValueError(case)


DATA_CASES = [
    "no --data-path",
    ".bin without .idx",
    ".idx without .bin",
    "--data-path names the .bin",
    "no such prefix",
    "empty dataset",
    ".bin and .idx disagree",
    "token ids beyond the vocabulary",
    "a split without documents",
    "tokenizer is not SentencePiece",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_problems_are_found_before_the_model_is_built(case, tmp_path):
    flags, expected = _data_case(case, tmp_path)
    results = run(flags)
    line = one_error(flags)
    assert expected in line, line
    assert all("note:" not in out for _, _, out in results)  # nothing was set up yet


def _main_per_rank(argvs):
    import torch.distributed as dist

    return _main(argvs[dist.get_rank()])


def test_a_file_only_one_rank_misses_stops_every_rank_with_one_line(tmp_path):
    """A data path one node does not see (a filesystem not mounted there, say): the ranks
    agree, so rank 0 says it once and nobody waits for the rank that stopped."""
    good = write_dataset(tmp_path / "good_text_document", _docs(50))
    argvs = [data_flags(good).split(), data_flags(str(tmp_path / "elsewhere")).split()]
    results = run_on_ranks(_main_per_rank, 2, args=(argvs,), timeout=300)
    assert [r[0] for r in results] == [2, 2], results
    errors = [line for r in results for line in r[1].splitlines() if "error" in line]
    assert len(errors) == 1 and f"no {tmp_path / 'elsewhere'}.bin" in errors[0], results


def test_good_data_trains(tmp_path):
    good = write_dataset(tmp_path / "good_text_document", _docs(50))
    results = run(data_flags(good))
    assert [r[0] for r in results] == [0, 0], results


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-iteration checkpoint (one rank) to damage in copies."""
    root = tmp_path_factory.mktemp("saved")
    results = run(f"{MOCK} --save {root}", world=1)
    assert results[0][0] == 0, results
    return root


def _copy(saved: Path, tmp: Path) -> Path:
    dst = tmp / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # overwrite 64 bytes in the middle, same size
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(64)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name,how",
    [
        ("__0_0.distcp", "truncate"),
        ("__0_0.distcp", "overwrite"),
        ("common.pt", "truncate"),
        (".metadata", "truncate"),
    ],
)
def test_damaged_checkpoint_files_are_named(saved, tmp_path, name, how):
    ckpt = _copy(saved, tmp_path)
    target = ckpt / "iter_0000002" / name
    assert target.exists(), os.listdir(target.parent)
    _damage(target, how)
    line = one_error(f"{MOCK} --train-iters 4 --load {ckpt}")
    assert str(target) in line, line
    assert ("truncated" in line) if how == "truncate" else ("checksum mismatch" in line)


def test_without_a_manifest_a_damaged_file_is_still_one_line(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    os.remove(ckpt / "iter_0000002" / checksums.MANIFEST)  # an older or converted checkpoint
    _damage(ckpt / "iter_0000002" / "common.pt", "truncate")
    line = one_error(f"{MOCK} --train-iters 4 --load {ckpt}")
    assert "cannot be read (it has no checksum manifest" in line, line


def test_no_verify_checkpoint_skips_the_checksums(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    _damage(ckpt / "iter_0000002" / "__0_0.distcp", "overwrite")
    flags = f"{MOCK} --train-iters 3 --load {ckpt} --no-verify-checkpoint"
    results = run(f"{flags} --override-opt-param-scheduler", world=1)
    assert results[0][0] == 0, results  # the user's choice: it loads


def test_misspelled_load_is_an_error_unless_it_is_the_save_dir(saved, tmp_path):
    missing = tmp_path / "chekpoints"
    line = one_error(f"{MOCK} --load {missing}")
    assert f"--load {missing}: no such directory" in line
    results = run(f"{MOCK} --load {missing} --save {missing}", world=1)  # auto-resume pattern
    assert results[0][0] == 0 and "starting from scratch" in results[0][2]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a checkpoint" in one_error(f"{MOCK} --load {empty}")


@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(d)]).returncode:
            pytest.skip("cannot make a read-only directory here (no mount permission)")
        yield d
        subprocess.run(["umount", str(d)], check=False)
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


def test_save_into_a_read_only_directory_fails_at_start(read_only_dir):
    line = one_error(f"{MOCK} --save {read_only_dir / 'ckpt'}")
    assert f"--save {read_only_dir / 'ckpt'}: not writable" in line, line


def test_a_second_run_on_the_same_save_dir_is_refused(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    with open(save / ".lock", "w") as f:  # another run holds the directory
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("host other, pid 4242\n")
        f.flush()
        line = one_error(f"{MOCK} --save {save}")
    assert "another run is saving into this directory (host other, pid 4242)" in line
    assert run(f"{MOCK} --save {save}", world=1)[0][0] == 0  # released: fine again


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is emulated with a small tmpfs, which needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(d)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_a_full_disk_during_a_save_is_named_and_the_last_checkpoint_kept(small_disk):
    """7 MB: the first checkpoint (4.5 MB) fits, the second does not."""
    save = small_disk / "ckpt"
    flags = f"{MOCK} --train-iters 6 --save {save} --save-interval 1"
    line = one_error(flags, world=1)
    assert f"--save {save}: no space left on the device while writing" in line, line
    path, iteration = checkpointing.resolve(str(save))
    assert iteration == 1 and checkpointing.is_checkpoint_dir(path)
    assert "while writing the checkpoint of iteration 2" in line
    assert not list(save.glob("*.partial"))  # the failed save gave its space back


# ----------------------------------------------------------------------------------- faults
def test_fp16_dynamic_loss_scale_skips_overflowing_steps():
    """Regression: with check_for_nan_in_grad hard-coded, the first overflow (at the initial
    scale 2^32) crashed ('found NaN in local grad norm ... iteration -1'). Now, as in
    Megatron-LM, overflowing steps are skipped and the scale halves until steps go through."""
    results = run(f"{MOCK.replace('--train-iters 2', '--train-iters 30')} --fp16", world=1)
    code, err, out = results[0]
    assert code == 0, err[-3000:]
    rows = [parse_line(x) for x in out.splitlines() if x.startswith("iter ")]
    skipped = [r["skipped"] for r in rows]
    scale = [r["loss scale"] for r in rows]
    assert skipped[0] == 1 and 1 < skipped[-1] < 30  # overflowed at first, then trained
    assert skipped[-1] == skipped[-5] and scale[-1] < 2.0**32  # the last steps went through


def test_a_nan_loss_stops_with_the_iteration_and_the_last_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    flags = f"{MOCK} --train-iters 6 --lr 1e8 --clip-grad 0 --save {save} --save-interval 1"
    line = one_error(flags, code=1, world=1)
    assert "iteration " in line and "training stopped" in line and "iteration -1" not in line
    stop = int(line.split("iteration ")[1].split(":")[0])
    assert f"Last complete checkpoint: {save}/iter_{stop - 1:07d}" in line, line
    assert checkpointing.read_marker(str(save)) == stop - 1  # nothing of the bad step saved


def test_without_a_gpu_and_without_cpu_flag_one_line_says_pass_cpu():
    """No GPU and no --cpu: one line naming --cpu, from rank 0, exit 2 (it was a traceback from
    torch.cuda.set_device on every rank)."""
    line = one_error(MOCK.replace("--cpu ", ""), cpu=False)
    assert "no CUDA GPU is visible" in line and "pass --cpu" in line, line


def test_more_ranks_per_node_than_gpus_is_one_line(monkeypatch):
    """torchrun --nproc-per-node 8 on a node that shows 4 GPUs: every rank sees the same
    counts and raises the same line (was: a CUDA traceback from the ranks over 4)."""
    import torch

    from megatron_ext.engine import check_gpus
    from megatron_ext.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_gpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(UsageError, match="8 ranks on this node .* but 4 GPUs visible"):
        check_gpus()


def test_plain_python_without_torchrun_runs_as_one_rank(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_mixtral.py"), *MOCK.split()],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter      2/2" in proc.stdout
