"""``merge`` against IndexedDatasetBuilder.add_index; ``inspect`` output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_data_tools_helpers import cli, first_docs, mixtral, preprocess_args, sample_corpus

from data_tools.indexed_writer import StreamingWriter


def _split_corpus(tmp_path: Path) -> list[Path]:
    lines = Path(sample_corpus(1.0)).read_text(encoding="utf-8").splitlines(keepends=True)
    parts = [lines[:10], lines[10:11], lines[11:30]]
    paths = []
    for i, part in enumerate(parts):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("".join(part), encoding="utf-8")
        paths.append(path)
    return paths


def test_merge_matches_builder_add_index(tmp_path: Path):
    from megatron.core.datasets import indexed_dataset as mi

    prefixes = []
    for i, part in enumerate(_split_corpus(tmp_path)):
        cli(*preprocess_args(str(part), str(tmp_path / f"p{i}"), None, "--append-eod"))
        prefixes.append(str(tmp_path / f"p{i}_text_document"))
    p = cli("merge", "--inputs", *prefixes, "--output-prefix", str(tmp_path / "merged"))
    assert "3 datasets" in p.stderr

    ref = mi.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in prefixes:
        ref.add_index(prefix)
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"merged.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()

    # merging the parts equals tokenizing their concatenation in one go
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(p.read_text() for p in _split_corpus(tmp_path)))
    cli(*preprocess_args(str(whole), str(tmp_path / "w"), None, "--append-eod"))
    for ext in ("bin", "idx"):
        got = (tmp_path / f"merged.{ext}").read_bytes()
        assert got == (tmp_path / f"w_text_document.{ext}").read_bytes()


def test_merge_refuses_mixed_dtypes(tmp_path: Path):
    for name, dtype in (("a", np.uint16), ("b", np.int32)):
        w = StreamingWriter(str(tmp_path / name), dtype)
        w.append(np.arange(5), np.array([5]), np.array([1]))
        w.close()
        w.write_index(str(tmp_path / f"{name}.idx"))
    p = cli(
        "merge",
        "--inputs",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--output-prefix",
        str(tmp_path / "m"),
        check=False,
    )
    assert p.returncode == 2
    assert "different dtypes" in p.stderr and "uint16" in p.stderr and "int32" in p.stderr
    assert not list(tmp_path.glob("m.*"))


def test_inspect_counts_histogram_and_text(tmp_path: Path):
    corpus = first_docs(sample_corpus(1.0), 12)
    cli(*preprocess_args(corpus, str(tmp_path / "o"), None, "--append-eod"))
    prefix = str(tmp_path / "o_text_document")
    out = cli("inspect", prefix, "--tokenizer-model", mixtral(), "--docs", "2").stdout
    assert "dtype uint16, 12 documents, 12 sequences" in out
    assert "length histogram (tokens):" in out and "#" in out
    first = json.loads(Path(corpus).read_text(encoding="utf-8").splitlines()[0])["text"]
    assert first[:300] in out
    assert "--- document 1" in out and "[</s>]" in out
    raw = cli("inspect", prefix, "--docs", "1").stdout
    assert "--- document 0" in raw and raw.split("---\n")[1].split()[0].isdigit()
    p = cli("inspect", str(tmp_path / "missing"), check=False)
    assert p.returncode == 2 and "no such file" in p.stderr
