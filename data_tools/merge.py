"""``merge``: concatenate indexed datasets into one, in the order given.

The result is byte-identical to Megatron-Core's ``IndexedDatasetBuilder.add_index`` applied to
each input in turn (what Megatron-LM's ``tools/merge_datasets.py`` does): ``.bin`` files are
concatenated; sequence lengths are concatenated; sequence pointers are recomputed over the new
``.bin``; document indices of input ``j`` are shifted by the number of sequences before it.
All inputs must share one dtype (the tokenizer's vocabulary size decides it: uint16 below 65500
ids, else int32): re-tokenize with one tokenizer otherwise. Streams; memory stays flat.
Output appears atomically: written under temporary names, then renamed (.bin, then .idx).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

from .indexed_writer import CHUNK, IndexedReader, write_index
from .preprocess import UsageError
from .resume import fsync_dir


def add_arguments(p) -> None:
    p.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes (no .bin/.idx)")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")


def _chunks(array: np.ndarray):
    for start in range(0, len(array), CHUNK):
        yield array[start : start + CHUNK]


def merge(inputs: list[str], output_prefix: str) -> dict:
    readers = []
    for prefix in inputs:
        try:
            readers.append(IndexedReader(prefix))
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--inputs: {e}") from None
    dtypes = {r.dtype.name for r in readers}
    if len(dtypes) > 1:
        listing = ", ".join(f"{r.prefix} is {r.dtype.name}" for r in readers)
        raise UsageError(
            f"cannot merge datasets of different dtypes ({listing}): tokenize all of them "
            "with the same tokenizer (uint16 below 65500 ids, int32 above)"
        )
    for r in readers:
        expected = int(r.sequence_lengths.sum(dtype=np.int64)) * r.dtype.itemsize
        if os.path.getsize(r.bin_path) != expected:
            raise UsageError(f"{r.bin_path}: size does not match its index {r.idx_path}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_bin, tmp_idx = output_prefix + ".bin.tmp", output_prefix + ".idx.tmp"
    with open(tmp_bin, "wb") as out:
        for r in readers:
            with open(r.bin_path, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)
        out.flush()
        os.fsync(out.fileno())

    def lengths():
        for r in readers:
            yield from _chunks(r.sequence_lengths)

    def documents():
        offset = 0
        for r in readers:
            for chunk in _chunks(r.document_indices[1:]):
                yield chunk + offset
            offset += r.n_sequences

    n_seq = sum(r.n_sequences for r in readers)
    n_doc = sum(r.n_documents for r in readers)
    write_index(tmp_idx, readers[0].dtype, n_seq, n_doc, lengths, documents())
    os.replace(tmp_bin, output_prefix + ".bin")
    os.replace(tmp_idx, output_prefix + ".idx")
    fsync_dir(out_dir)
    return {"documents": n_doc, "sequences": n_seq, "dtype": readers[0].dtype.name}


def run(args) -> dict:
    stats = merge(args.inputs, args.output_prefix)
    print(
        f"data-tools merge: {len(args.inputs)} datasets -> {args.output_prefix}.bin/.idx "
        f"({stats['documents']:,} documents, {stats['sequences']:,} sequences, "
        f"{stats['dtype']})",
        file=sys.stderr,
    )
    return stats
