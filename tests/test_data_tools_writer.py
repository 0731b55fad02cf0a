"""The numpy .bin/.idx writer against Megatron-Core's own IndexedDatasetBuilder, byte for byte.

Both dtypes the builder picks are covered: uint16 (vocabularies below 65500 ids) and int32
(65500 and above), with token ids at the top of each range, documents of several sequences
and documents without any sequence (what Megatron writes for an empty text).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets import indexed_dataset as mi

from data_tools.indexed_writer import IndexedReader, StreamingWriter, optimal_dtype


def _documents(rng, vocab: int, n: int):
    docs = []
    for i in range(n):
        n_seq = 0 if i % 17 == 5 else int(rng.integers(1, 4))
        lens = [int(x) for x in rng.integers(1, 300, size=n_seq)]
        ids = rng.integers(0, vocab, size=sum(lens)).tolist()
        if ids:
            ids[-1] = vocab - 1  # the top id of the range must survive the dtype
        docs.append((ids, lens))
    return docs


@pytest.mark.parametrize("vocab", [32000, 65499, 65500, 2**31 - 1])
def test_writer_matches_megatron_builder(tmp_path: Path, vocab: int):
    rng = np.random.default_rng(vocab % 1000)
    docs = _documents(rng, vocab, 120)
    dtype = mi.DType.optimal_dtype(vocab)
    assert optimal_dtype(vocab) == np.dtype(dtype)

    ref = mi.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for ids, lens in docs:
        ref.add_document(ids, lens)
    ref.finalize(str(tmp_path / "ref.idx"))

    # ours: in several appends, with a sync and a simulated restart in the middle
    w = StreamingWriter(str(tmp_path / "ours"), optimal_dtype(vocab))
    for start in range(0, len(docs), 50):
        part = docs[start : start + 50]
        tokens = np.array([t for ids, _ in part for t in ids], dtype=np.int64)
        lens = np.array([x for _, ls in part for x in ls], dtype=np.int64)
        rel = np.cumsum([len(ls) for _, ls in part])
        w.append(tokens, lens, w.n_sequences + rel)
        if start == 50:
            sizes = w.sizes()
            w.sync()
            w.append(tokens[:7], lens[:1], rel[:1])  # lost work after the checkpoint
            w.close()
            w = StreamingWriter(str(tmp_path / "ours"), optimal_dtype(vocab), resume=sizes)
    w.close()
    w.write_index(str(tmp_path / "ours.idx"))

    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()

    ds = mi.IndexedDataset(str(tmp_path / "ours"))
    ours = IndexedReader(str(tmp_path / "ours"))
    assert len(ds) == ours.n_sequences
    assert ours.n_documents == len(docs)
    assert np.array_equal(ds.document_indices, ours.document_indices)
    for i, (ids, _) in enumerate(docs):
        assert ours.document(i).tolist() == ids
    assert ours.document_lengths().tolist() == [len(ids) for ids, _ in docs]


def test_optimal_dtype_boundaries():
    for v in (None, 0, 1000, 32000, 65499, 65500, 65536, 131072, 2**31 - 1):
        assert optimal_dtype(v) == np.dtype(mi.DType.optimal_dtype(v))


def test_empty_dataset_matches_builder(tmp_path: Path):
    ref = mi.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ref.finalize(str(tmp_path / "ref.idx"))
    w = StreamingWriter(str(tmp_path / "ours"), np.uint16)
    w.close()
    w.write_index(str(tmp_path / "ours.idx"))
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == b""
    assert IndexedReader(str(tmp_path / "ours")).n_documents == 0


def test_reader_rejects_foreign_files(tmp_path: Path):
    (tmp_path / "x.idx").write_bytes(b"not an index at all, just some bytes......")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a Megatron indexed dataset"):
        IndexedReader(str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        IndexedReader(str(tmp_path / "missing"))
