"""Megatron-Core indexed dataset (``.bin`` + ``.idx``), written and read with numpy alone.

``.bin``: the tokens of every sequence, back to back, in the dataset dtype (little-endian).

``.idx`` (all integers little-endian), as ``megatron.core.datasets.indexed_dataset`` writes it::

    b"MMIDIDX\\x00\\x00"            9 bytes, magic
    uint64 1                       version
    uint8  dtype code              uint8=1 int8=2 int16=3 int32=4 int64=5 float64=6
                                   float32=7 uint16=8
    uint64 S                       number of sequences
    uint64 D                       len(document_indices) = number of documents + 1
    int32[S]  sequence_lengths     tokens per sequence
    int64[S]  sequence_pointers    byte offset of each sequence in .bin:
                                   pointer[i] = itemsize * sum(sequence_lengths[:i])
    int64[D]  document_indices     0, then the sequence count after each document
                                   (a document without sequences repeats the previous value)

The dtype is ``uint16`` when the tokenizer's vocabulary size is below 65500, else ``int32``
(``DType.optimal_dtype``). Multimodal ``sequence_modes`` are not written (text only).

Everything here streams: sequence lengths and document indices of a growing dataset live in
side files, and the ``.idx`` is assembled from them in fixed-size chunks, so memory does not
grow with the corpus.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
CHUNK = 1 << 20  # entries per streamed chunk
IO_BUFFER = 8 << 20


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's ``DType.optimal_dtype``: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _read_chunks(path: str, dtype, count: int | None = None) -> Iterator[np.ndarray]:
    """Stream a raw array file in chunks of ``CHUNK`` entries (``count`` entries at most)."""
    dtype = np.dtype(dtype)
    left = os.path.getsize(path) // dtype.itemsize if count is None else count
    with open(path, "rb") as f:
        while left > 0:
            n = min(CHUNK, left)
            chunk = np.fromfile(f, dtype=dtype, count=n)
            if chunk.size != n:
                raise ValueError(f"{path}: truncated (expected {n} more entries)")
            left -= n
            yield chunk


def write_index(
    idx_path: str,
    dtype,
    n_sequences: int,
    n_documents: int,
    lengths: Callable[[], Iterable[np.ndarray]],
    document_indices: Iterable[np.ndarray],
) -> None:
    """Write a ``.idx`` from streamed parts.

    ``lengths`` is called twice (lengths, then pointers) and yields int32-compatible chunks
    totalling ``n_sequences``; ``document_indices`` yields the int64 entries after the leading
    0, ``n_documents`` of them. The file is fsynced before returning.
    """
    dtype = np.dtype(dtype)
    itemsize = dtype.itemsize
    with open(idx_path, "wb", buffering=IO_BUFFER) as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", n_sequences))
        f.write(struct.pack("<Q", n_documents + 1))
        seen = 0
        for chunk in lengths():
            f.write(np.ascontiguousarray(chunk, dtype="<i4").tobytes())
            seen += len(chunk)
        if seen != n_sequences:
            raise ValueError(f"{idx_path}: {seen} sequence lengths, expected {n_sequences}")
        carry = 0
        for chunk in lengths():
            nbytes = np.asarray(chunk, dtype=np.int64) * itemsize
            ends = np.cumsum(nbytes)
            f.write((ends - nbytes + carry).astype("<i8").tobytes())
            if ends.size:
                carry += int(ends[-1])
        f.write(struct.pack("<q", 0))
        seen = 0
        for chunk in document_indices:
            f.write(np.ascontiguousarray(chunk, dtype="<i8").tobytes())
            seen += len(chunk)
        if seen != n_documents:
            raise ValueError(f"{idx_path}: {seen} document indices, expected {n_documents}")
        f.flush()
        os.fsync(f.fileno())


class StreamingWriter:
    """Appends documents to ``<stem>.bin`` with side files ``<stem>.lens`` / ``<stem>.docs``.

    ``.lens`` holds int32 sequence lengths, ``.docs`` the int64 document indices after the
    leading 0. ``sizes()`` is what a checkpoint records; ``truncate_to(sizes)`` rewinds all
    three files to such a checkpoint after a crash (they can only have grown since).
    """

    def __init__(self, stem: str, dtype, resume: dict | None = None):
        self.stem = stem
        self.dtype = np.dtype(dtype)
        self.paths = {ext: f"{stem}.{ext}" for ext in ("bin", "lens", "docs")}
        sizes = resume or {"bin_bytes": 0, "n_sequences": 0, "n_documents": 0}
        byte_sizes = {
            "bin": sizes["bin_bytes"],
            "lens": 4 * sizes["n_sequences"],
            "docs": 8 * sizes["n_documents"],
        }
        self.files = {}
        for ext, path in self.paths.items():
            if resume is None:
                open(path, "wb").close()
            elif os.path.getsize(path) < byte_sizes[ext]:
                raise ValueError(f"{path} is shorter than its checkpoint: cannot resume")
            with open(path, "r+b") as f:
                f.truncate(byte_sizes[ext])
            self.files[ext] = open(path, "ab", buffering=IO_BUFFER)
        self.bin_bytes = sizes["bin_bytes"]
        self.n_sequences = sizes["n_sequences"]
        self.n_documents = sizes["n_documents"]

    def append(self, tokens: np.ndarray, lengths: np.ndarray, doc_indices: np.ndarray) -> None:
        """Add tokens (dataset dtype), their sequence lengths and absolute document indices."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.files["bin"].write(memoryview(tokens).cast("B"))
        self.files["lens"].write(np.ascontiguousarray(lengths, dtype="<i4").tobytes())
        self.files["docs"].write(np.ascontiguousarray(doc_indices, dtype="<i8").tobytes())
        self.bin_bytes += tokens.nbytes
        self.n_sequences += len(lengths)
        self.n_documents += len(doc_indices)

    def sizes(self) -> dict:
        return {
            "bin_bytes": self.bin_bytes,
            "n_sequences": self.n_sequences,
            "n_documents": self.n_documents,
        }

    def sync(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def write_index(self, idx_path: str) -> None:
        """Assemble the ``.idx`` for the ``.bin`` written so far (call after ``close``)."""
        write_index(
            idx_path,
            self.dtype,
            self.n_sequences,
            self.n_documents,
            lambda: _read_chunks(self.paths["lens"], np.int32, self.n_sequences),
            _read_chunks(self.paths["docs"], np.int64, self.n_documents),
        )


class IndexedReader:
    """Read-only view of ``<prefix>.idx`` / ``<prefix>.bin`` through numpy memmaps."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.idx_path = prefix + ".idx"
        self.bin_path = prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file")
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != MAGIC:
            raise ValueError(f"{self.idx_path}: not a Megatron indexed dataset index")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise ValueError(f"{self.idx_path}: unsupported index version {version}")
        self.dtype = CODE_DTYPES[head[17]]
        self.n_sequences, n_doc_entries = struct.unpack("<QQ", head[18:34])
        s, d = self.n_sequences, n_doc_entries
        expected = HEADER_BYTES + 12 * s + 8 * d
        size = os.path.getsize(self.idx_path)
        if size != expected and size == expected + s:
            raise ValueError(f"{self.idx_path}: multimodal index (sequence modes) not supported")
        if size != expected:
            raise ValueError(f"{self.idx_path}: size {size} does not match its header")
        mm = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        o = HEADER_BYTES
        self.sequence_lengths = mm[o : o + 4 * s].view("<i4")
        o += 4 * s
        self.sequence_pointers = mm[o : o + 8 * s].view("<i8")
        o += 8 * s
        self.document_indices = mm[o : o + 8 * d].view("<i8")
        self.n_documents = d - 1
        bin_size = os.path.getsize(self.bin_path)
        self.n_tokens = bin_size // self.dtype.itemsize
        self._bin = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_size else None

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sequence_lengths[i])]

    def document(self, i: int) -> np.ndarray:
        """All tokens of document ``i`` (its sequences are contiguous in ``.bin``)."""
        first, last = int(self.document_indices[i]), int(self.document_indices[i + 1])
        if first == last or self._bin is None:
            return np.empty(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        n = int(self.sequence_lengths[first:last].sum())
        return self._bin[start : start + n]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64)."""
        cum = np.concatenate(([0], np.cumsum(self.sequence_lengths, dtype=np.int64)))
        return cum[self.document_indices[1:]] - cum[self.document_indices[:-1]]
