"""Resume: SIGKILL at named points (DATA_TOOLS_KILL_AT), rerun, same bytes as one clean run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from test_data_tools_helpers import cli, file_bytes, preprocess_args, sample_corpus

KEYS = ("text", "source")
# small batches and a checkpoint after every batch: many kill points in a 1 MB corpus
EXTRA = ("--append-eod", "--batch-mb", "0.02", "--checkpoint-interval", "0")


def _args(prefix: Path, *more: str) -> list[str]:
    return preprocess_args(
        sample_corpus(1.0), str(prefix), None, *EXTRA, "--json-keys", *KEYS, *more
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    prefix = tmp_path_factory.mktemp("clean") / "o"
    cli(*_args(prefix))
    return {k: file_bytes(str(prefix), k) for k in KEYS}


def _outputs(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + "_*_document.*"))


@pytest.mark.parametrize(
    "point",
    [
        "batch:1",
        "batch:9",
        "checkpoint:1",
        "checkpoint:5",
        "index",
        "rename:1",
        "rename:3",
        "finalized",
    ],
)
def test_kill_and_resume(tmp_path: Path, clean: dict, point: str):
    prefix = tmp_path / "o"
    p = cli(*_args(prefix), env={"DATA_TOOLS_KILL_AT": point}, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    partial = Path(str(prefix) + ".data-tools-partial")
    assert partial.is_dir()
    if not point.startswith(("rename", "finalized")):
        assert _outputs(prefix) == [], "outputs must not appear before they are complete"
    p = cli(*_args(prefix))
    assert "resuming" in p.stderr
    assert {k: file_bytes(str(prefix), k) for k in KEYS} == clean
    assert not partial.exists()


def test_old_index_never_pairs_with_new_bin(tmp_path: Path, clean: dict):
    prefix = tmp_path / "o"
    old = tmp_path / "old.jsonl"
    old.write_text('{"text": "an older dataset", "source": "x"}\n')
    cli(*preprocess_args(str(old), str(prefix), None, *EXTRA, "--json-keys", *KEYS))
    p = cli(*_args(prefix), env={"DATA_TOOLS_KILL_AT": "rename:1"}, check=False)
    assert p.returncode == -signal.SIGKILL
    assert Path(f"{prefix}_text_document.bin").read_bytes() == clean["text"][0]
    assert not Path(f"{prefix}_text_document.idx").exists()
    cli(*_args(prefix))
    assert {k: file_bytes(str(prefix), k) for k in KEYS} == clean


def test_killed_twice_then_resumed(tmp_path: Path, clean: dict):
    prefix = tmp_path / "o"
    for point in ("checkpoint:3", "batch:4"):
        p = cli(*_args(prefix), env={"DATA_TOOLS_KILL_AT": point}, check=False)
        assert p.returncode == -signal.SIGKILL
    stats = tmp_path / "s.json"
    cli(*_args(prefix, "--stats-json", str(stats)))
    assert {k: file_bytes(str(prefix), k) for k in KEYS} == clean
    assert json.loads(stats.read_text())["resumes"] == 2


def test_resume_refuses_other_flags(tmp_path: Path, clean: dict):
    prefix = tmp_path / "o"
    cli(*_args(prefix), env={"DATA_TOOLS_KILL_AT": "checkpoint:4"}, check=False)
    args = _args(prefix)
    args.remove("--append-eod")
    p = cli(*args, check=False)
    assert p.returncode == 2
    assert "append_eod: was True, now False" in p.stderr and "--overwrite" in p.stderr
    cli(*args, "--overwrite")  # discards the partial run
    cli(*_args(prefix))
    assert {k: file_bytes(str(prefix), k) for k in KEYS} == clean


def test_resume_from_stdin(tmp_path: Path):
    corpus = sample_corpus(1.0)
    prefix, ref = tmp_path / "o", tmp_path / "ref"
    base = preprocess_args("-", str(prefix), None, *EXTRA)
    with open(corpus, "rb") as f:
        cli(*preprocess_args(corpus, str(ref), None, *EXTRA))
        p = cli(*base, env={"DATA_TOOLS_KILL_AT": "checkpoint:6"}, stdin=f, check=False)
    assert p.returncode == -signal.SIGKILL
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "something else entirely"}\n' * 2000)
    with open(other, "rb") as f:
        p = cli(*base, stdin=f, check=False)
    assert p.returncode == 2 and "stdin differs" in p.stderr
    with open(corpus, "rb") as f:
        cli(*base, stdin=f)
    assert file_bytes(str(prefix)) == file_bytes(str(ref))


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_kill_and_resume_compressed_input(tmp_path: Path, clean: dict, kind: str):
    """A resume inside a compressed input seeks its decompressed offset (gzip and zstd
    readers seek forward by decompressing): same bytes as the clean plain-JSONL run."""
    import gzip

    import zstandard

    data = Path(sample_corpus(1.0)).read_bytes()
    src = tmp_path / f"in.jsonl.{'gz' if kind == 'gzip' else 'zst'}"
    src.write_bytes(gzip.compress(data) if kind == "gzip" else zstandard.compress(data))
    prefix = tmp_path / "o"
    args = preprocess_args(str(src), str(prefix), None, *EXTRA, "--json-keys", *KEYS)
    p = cli(*args, env={"DATA_TOOLS_KILL_AT": "checkpoint:5"}, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    p = cli(*args)
    assert "resuming" in p.stderr
    assert {k: file_bytes(str(prefix), k) for k in KEYS} == clean
