"""Many inputs and shards: files, globs and folders of JSONL / JSONL.gz / JSONL.zst / Parquet give
the bytes of one plain JSONL run over the same documents (itself byte-identical to Megatron-LM,
test_data_tools_preprocess.py), and ``--shard I/N`` + ``merge`` give them again."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_data_tools_helpers import REPO, cli, file_bytes, preprocess_args, sample_corpus

from data_tools.__main__ import main
from data_tools.inputs import InputError, InputFile, Shard, expand, shard_units

EXTRA = ("--append-eod", "--batch-mb", "0.02", "--checkpoint-interval", "0")


def _docs(n: int | None = None) -> list[dict]:
    with open(sample_corpus(1.0), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return docs if n is None else docs[:n]


def _write(path: Path, docs: list[dict], kind: str, row_group: int = 10_000) -> Path:
    if kind == "parquet":
        table = pa.table({k: [d[k] for d in docs] for k in ("text", "source")})
        pq.write_table(table, path, row_group_size=row_group)
        return path
    data = "".join(json.dumps(d) + "\n" for d in docs).encode()
    if kind == "jsonl.gz":
        data = gzip.compress(data)
    elif kind == "jsonl.zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _run(inputs: list[str], prefix: Path, *extra: str) -> int:
    args = preprocess_args(inputs[0], str(prefix), None, *EXTRA, *extra)
    i = args.index("--input") + 1
    return main(args[:i] + [str(x) for x in inputs] + args[i + 1 :])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One plain JSONL run over the sample corpus (keys text and source)."""
    d = tmp_path_factory.mktemp("ref")
    path = _write(d / "all.jsonl", _docs(), "jsonl")
    assert _run([path], d / "ref", "--json-keys", "text", "source") == 0
    return {k: file_bytes(str(d / "ref"), k) for k in ("text", "source")}


def _same(prefix: Path, reference: dict, keys=("text", "source")) -> None:
    for k in keys:
        assert file_bytes(str(prefix), k) == reference[k], k


# ------------------------------------------------------------------ expansion and shard plans
def test_expand_files_globs_and_folders_in_order(tmp_path: Path):
    for name in ("b/2.jsonl", "b/1.parquet", "b/sub/0.jsonl.zst", "b/.hidden.jsonl", "b/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"PAR1" if name.endswith("parquet") else b"{}\n")
    (tmp_path / "a.gz").write_bytes(gzip.compress(b"{}\n"))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.jsonl").write_bytes(b"{}\n")
    files = expand([str(tmp_path / "a.gz"), str(tmp_path / "b")])
    assert [(os.path.relpath(f.path, tmp_path), f.kind) for f in files] == [
        ("a.gz", "jsonl.gz"),  # a file is taken as given (kind from its bytes)
        ("b/1.parquet", "parquet"),
        ("b/2.jsonl", "jsonl"),
        ("b/sub/0.jsonl.zst", "jsonl"),  # named .zst, but its bytes are plain JSON
    ]
    globbed = expand([str(tmp_path / "**" / "*.jsonl*")])
    assert [os.path.relpath(f.path, tmp_path) for f in globbed] == [
        "b/2.jsonl",
        "b/sub/0.jsonl.zst",
    ]
    with pytest.raises(InputError, match="listed more than once"):
        expand([str(tmp_path / "b"), str(tmp_path / "b" / "2.jsonl")])
    with pytest.raises(InputError, match="matches no file"):
        expand([str(tmp_path / "*.parquet")])
    assert len(expand([str(tmp_path / ".cache")])) == 1  # named: walked, though hidden
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("{}\n")
    with pytest.raises(InputError, match="no input files in this folder"):
        expand([str(tmp_path / "docs")])
    with pytest.raises(InputError, match="no such file or folder"):
        expand([str(tmp_path / "nope")])


def test_shard_plans_cover_every_byte_once_in_order():
    files = [InputFile(f"f{i}", "jsonl", s) for i, s in enumerate([50, 10, 10, 30, 100, 5, 5])]
    for n in (1, 2, 3, 7):
        runs = [shard_units(files, Shard(i, n)) for i in range(n)]
        assert [u.file for r in runs for u in r] == files  # whole files, in order, once
        assert all(runs) and all(u.lo == 0 and u.hi is None for r in runs for u in r)
    assert [[u.file.path for u in shard_units(files, Shard(i, 3))] for i in range(3)] == [
        ["f0", "f1", "f2"], ["f3", "f4"], ["f5", "f6"],
    ]  # fmt: skip
    big = [InputFile("a", "jsonl", 70), InputFile("z", "jsonl.gz", 20), InputFile("b", "jsonl", 10)]
    runs = [[(u.file.path, u.lo, u.hi) for u in shard_units(big, Shard(i, 4))] for i in range(4)]
    assert runs == [  # S = 100: [0, 25), [25, 50), [50, 75), [75, 100)
        [("a", 0, 25)],
        [("a", 25, 50)],
        [("a", 50, None), ("z", 0, None)],  # z starts at 70: whole, in the shard of byte 70
        [("b", 0, None)],
    ]
    with pytest.raises(InputError, match="I/N"):
        Shard.parse("3/3")
    with pytest.raises(InputError, match="stdin"):
        shard_units([InputFile("-", "stdin", 0), *big], Shard(0, 2))


# ------------------------------------------------------------------ byte identity across kinds
@pytest.mark.parametrize(
    "layout",
    ["jsonl.gz", "jsonl.zst", "parquet", "parquet-row-groups", "mixed-folder", "glob"],
)
def test_every_input_kind_gives_the_same_bytes(tmp_path: Path, reference: dict, layout: str):
    docs = _docs()
    if layout in ("jsonl.gz", "jsonl.zst", "parquet"):
        inputs = [_write(tmp_path / f"all.{layout}", docs, layout)]
    elif layout == "parquet-row-groups":
        inputs = [_write(tmp_path / "all.parquet", docs, "parquet", row_group=17)]
    else:  # four files of four kinds; a folder or a glob lists them sorted by name
        (tmp_path / "in").mkdir()
        for i, kind in enumerate(["jsonl", "jsonl.gz", "parquet", "jsonl.zst"]):
            _write(tmp_path / "in" / f"part{i}.{kind}", docs[i * 60 : (i + 1) * 60], kind)
        inputs = [tmp_path / "in"] if layout == "mixed-folder" else [tmp_path / "in" / "part*"]
    assert _run(inputs, tmp_path / "o", "--json-keys", "text", "source") == 0
    _same(tmp_path / "o", reference)


# ------------------------------------------------------------------ shards + merge
def _many_files(d: Path) -> list[Path]:
    docs, kinds = _docs(), ["jsonl", "jsonl.gz", "parquet", "jsonl.zst", "jsonl"]
    n = len(docs)  # 10 files of uneven sizes, one of them empty
    cuts = [0, 3, n // 8, n // 8 + 1, n // 3, n // 3, n // 2, n // 2 + 9, 2 * n // 3, n - 5, n]
    d.mkdir()
    return [
        _write(d / f"f{i:02d}.{kinds[i % 5]}", docs[a:b], kinds[i % 5])
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))
    ]


@pytest.mark.parametrize("case", ["many-files", "one-jsonl", "one-parquet"])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_merged_equal_one_run(tmp_path: Path, reference: dict, case: str, n: int):
    if case == "many-files":
        inputs = _many_files(tmp_path / "in")
    else:
        kind = case.split("-")[1]
        inputs = [_write(tmp_path / f"all.{kind}", _docs(), kind, row_group=9)]
    prefix = tmp_path / "part"
    for i in range(n):
        assert _run(inputs, prefix, "--shard", f"{i}/{n}", "--json-keys", "text", "source") == 0
    merge = ["merge", "--shards", str(n), "--output-prefix", str(prefix)]
    assert main([*merge, "--json-keys", "text", "source"]) == 0
    _same(prefix, reference)


def test_a_finished_shard_is_not_redone_and_a_killed_one_resumes(tmp_path: Path, reference):
    inputs = [str(p) for p in _many_files(tmp_path / "in")]
    prefix = tmp_path / "part"

    def shard(i: int, env=None):
        args = preprocess_args(inputs[0], str(prefix), None, *EXTRA, "--shard", f"{i}/2")
        i_in = args.index("--input") + 1
        return cli(*args[:i_in], *inputs, *args[i_in + 1 :], env=env, check=False)

    p = shard(1, {"DATA_TOOLS_KILL_AT": "checkpoint:9"})  # past its first file
    assert p.returncode == -signal.SIGKILL, p.stderr
    p = shard(1)
    where = re.search(r"resuming .* in input (\d+) of (\d+) at line/row", p.stderr)
    assert p.returncode == 0 and where and 1 < int(where[1]) <= int(where[2]), p.stderr
    merge = ["merge", "--shards", "2", "--output-prefix", str(prefix)]
    p = cli(*merge, check=False)
    assert p.returncode == 2 and "shard(s) 0 of" in p.stderr and "did every task finish" in p.stderr
    assert shard(0).returncode == 0
    again = shard(1)  # a requeued array task whose shard had finished
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr
    parts = [f"{prefix}-{i:05d}-of-00002_text_document" for i in range(2)]
    assert main(["merge", "--inputs", *parts, "--output-prefix", str(tmp_path / "m")]) == 0
    merged = (tmp_path / "m.bin").read_bytes(), (tmp_path / "m.idx").read_bytes()
    assert merged == reference["text"]
    assert cli(*merge).returncode == 0 and file_bytes(str(prefix)) == reference["text"]
    Path(inputs[-1]).write_text(Path(inputs[-1]).read_text())  # touched: not the same input
    assert "already done" not in shard(1).stderr, "an input changed: the shard is redone"


# ------------------------------------------------------------------ bad input, progress
def test_parquet_bad_rows_are_counted_and_bad_files_named(tmp_path: Path):
    good = pa.table({"text": ["one", None, "three"], "n": [1, 2, 3]})
    pq.write_table(good, tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [["s1", "s2"], ["s3"]]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    stats = tmp_path / "stats.json"
    files = [tmp_path / f"{c}.parquet" for c in "abc"]
    assert _run(files, tmp_path / "o", "--stats-json", str(stats)) == 0
    s = json.loads(stats.read_text())
    assert s["documents"] == 4 and s["lines"] == 7
    assert s["skipped"] == {
        "null_value": [1, [f"{files[0]}:2"]],
        "not_string": [2, [f"{files[2]}:1", f"{files[2]}:2"]],
    }
    assert s["kinds"]["parquet"]["files"] == 3 and s["kinds"]["parquet"]["documents"] == 4

    def error(*inputs, extra=()):
        p = cli(*preprocess_args(str(inputs[0]), str(tmp_path / "x"), None, *extra), check=False)
        return p.returncode, p.stderr.strip().splitlines()

    code, lines = error(files[0], extra=("--json-keys", "text", "body"))
    assert code == 2 and lines == [
        f"data-tools preprocess: error: {files[0]}: no column 'body' (--json-keys); its "
        "columns: text, n"
    ]
    truncated = tmp_path / "t.parquet"
    truncated.write_bytes(files[0].read_bytes()[:-20])
    code, lines = error(truncated)
    assert code == 2 and len(lines) == 1 and f"{truncated}: not a readable Parquet file" in lines[0]
    code, lines = error(files[0], extra=("--strict",))
    assert code == 1 and lines[-1].endswith(f"--strict: {files[0]}:2: null_value (null)")
    assert not list(tmp_path.glob("x*"))  # nothing written, no partial folder left


def test_progress_counts_files_and_the_summary_each_kind(tmp_path: Path):
    inputs = _many_files(tmp_path / "in")
    args = preprocess_args(str(tmp_path / "in"), str(tmp_path / "o"), None, *EXTRA)
    args[args.index("none")] = "log"
    err = cli(*args, "--log-interval", "4").stderr
    seen = sorted({int(m) for m in re.findall(r"file (\d+)/10, ETA", err)})
    assert len(seen) >= 5 and seen[-1] >= 9, err
    for kind, n in (("jsonl", 4), ("jsonl.gz", 2), ("jsonl.zst", 2), ("parquet", 2)):
        assert re.search(rf"    {re.escape(kind)} +: {n} file\(s\), ", err), err
    assert len(inputs) == 10


def test_parquet_memory_stays_flat_with_a_large_row_group(tmp_path: Path):
    """One 120 MB row group read by ``parquet.read_batches`` in a fresh process: its peak memory
    grows by far less than the row group (a reader holding the column chunk adds ~120 MB)."""
    path = tmp_path / "big.parquet"
    write = f"""
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
rng = np.random.default_rng(0)
words = np.array([''.join(chr(97 + c) for c in rng.integers(0, 26, 7)) for _ in range(50000)])
texts = [' '.join(words[rng.integers(0, 50000, 250)]) for _ in range(60000)]  # ~2 KB each
pq.write_table(pa.table({{'text': texts}}), {str(path)!r}, row_group_size=60000)
"""
    read = f"""
import resource, sys
sys.path.insert(0, {str(REPO)!r})
from data_tools import parquet
assert parquet.open_file({str(path)!r}).metadata.num_row_groups == 1
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
docs = 0
for batch in parquet.read_batches({str(path)!r}, ['text'], 1_000_000, range(1)):
    docs += batch.n_docs
print(docs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""
    subprocess.run([sys.executable, "-c", write], check=True)
    assert path.stat().st_size > 100e6
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True)
    docs, grown_kb = map(int, out.stdout.split())
    assert docs == 60000
    assert grown_kb < 40_000, f"peak memory grew by {grown_kb / 1e3:.0f} MB"


def test_stdin_among_files(tmp_path: Path):
    """``-`` among files (stdin read in its place) gives the same bytes as the files alone."""
    docs = _docs(120)
    a = _write(tmp_path / "a.jsonl", docs[:50], "jsonl")
    b = _write(tmp_path / "b.parquet", docs[90:], "parquet")
    middle = "".join(json.dumps(d) + "\n" for d in docs[50:90])
    ref = _write(tmp_path / "all.jsonl", docs, "jsonl")
    cli(*preprocess_args(str(ref), str(tmp_path / "ref"), None, *EXTRA))
    args = preprocess_args(str(a), str(tmp_path / "o"), None, *EXTRA)
    i = args.index("--input") + 1
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", *args[:i], str(a), "-", str(b), *args[i + 1 :]],
        input=middle, capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert file_bytes(str(tmp_path / "o")) == file_bytes(str(tmp_path / "ref"))
