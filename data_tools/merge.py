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
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--inputs", nargs="+", help="dataset prefixes (no .bin/.idx)")
    what.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="the N outputs of `preprocess --shard I/N --output-prefix P`: merges "
        "P-0000I-of-0000N_KEY_document, I = 0..N-1, into P_KEY_document for each --json-keys key",
    )
    p.add_argument(
        "--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx (--shards: P)"
    )
    p.add_argument("--json-keys", nargs="+", default=["text"], help="with --shards")


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


def shard_inputs(prefix: str, count: int, key: str) -> list[str]:
    """The datasets of ``preprocess --shard I/count`` for ``key``, in shard order; a missing
    or unfinished shard stops the merge, naming them all."""
    from .inputs import Shard
    from .preprocess import output_paths
    from .resume import PartialRun

    if count < 1:
        raise UsageError(f"--shards must be at least 1, not {count}")
    names, missing = [], []
    for i in range(count):
        part = prefix + Shard(i, count).suffix()
        names.append(output_paths(part, key)[0][: -len(".bin")])
        if os.path.exists(PartialRun.folder(part)) or not all(
            map(os.path.exists, output_paths(part, key))
        ):
            missing.append(str(i))
    if missing:
        raise UsageError(
            f"--shards {count}: shard(s) {', '.join(missing)} of {prefix} are missing or "
            f"unfinished ({names[int(missing[0])]}.bin/.idx): did every task finish?"
        )
    return names


def run(args) -> dict:
    jobs = [(args.inputs, args.output_prefix)] if args.inputs else []
    if args.shards is not None:
        from .preprocess import output_paths

        jobs = [
            (
                shard_inputs(args.output_prefix, args.shards, key),
                output_paths(args.output_prefix, key)[0][: -len(".bin")],
            )
            for key in args.json_keys
        ]
    for inputs, output in jobs:
        stats = merge(inputs, output)
        print(
            f"data-tools merge: {len(inputs)} datasets -> {output}.bin/.idx "
            f"({stats['documents']:,} documents, {stats['sequences']:,} sequences, "
            f"{stats['dtype']})",
            file=sys.stderr,
        )
    return stats
