"""JSONL input: opening (plain, gzip, zstd, ``-`` for stdin), validation, batching.

Compression is recognised by the file's first bytes, whatever its name (``.gz``; ``.zst`` /
``.zstd``, several concatenated frames read as one stream). Damaged compressed data (a
truncated gzip member, a corrupt zstd frame) stops the run with one error naming the file and
how far it was read; the lines before it have been processed.

Lines are split at ``\\n`` (a ``\\r\\n`` ending is fine: JSON ignores the ``\\r``). Line numbers
are 1-based and count every physical line of the (decompressed) input. A UTF-8 byte-order mark
at the start of the input is ignored.

A line is *skipped*, and counted under its reason, when it

=================  ==========================================================================
``invalid_utf8``   is not valid UTF-8
``blank_line``     is empty or only whitespace
``not_json``       is not one JSON value
``not_object``     is JSON but not an object
``missing_key``    lacks one of ``--json-keys``
``not_string``     holds a value that is neither a string nor a list of strings under a key
``invalid_text``   holds a string with a lone surrogate (``"\\ud800"``), which has no UTF-8 form
``null_value``     (Parquet rows, ``parquet.py``) holds a null under a key
=================  ==========================================================================

A list of strings is taken, as Megatron-LM does, as a document already split into sentences:
each sentence becomes one sequence of the document.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass, field

REASONS = (
    "invalid_utf8",
    "blank_line",
    "not_json",
    "not_object",
    "missing_key",
    "not_string",
    "invalid_text",
    "null_value",
)
FIRST_LINES_KEPT = 5  # line numbers remembered per skip reason
BLOCK = 4 << 20
_BOM = b"\xef\xbb\xbf"


class BadLine(Exception):
    """A skipped line under ``--strict``: names the file, the line and the reason."""

    def __init__(self, path: str, line: int, reason: str, detail: str = ""):
        self.path, self.line, self.reason = path, line, reason
        where = "<stdin>" if path == "-" else path
        super().__init__(f"{where}:{line}: {reason}" + (f" ({detail})" if detail else ""))


class CorruptInput(ValueError):
    """Compressed input that cannot be decompressed any further."""


_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


def _decompressor(raw, magic: bytes):
    """(stream, kind, errors it raises on damaged data) for a file starting with ``magic``."""
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb"), "gzip", (EOFError, OSError, zlib.error)
    if magic.startswith(_ZSTD_MAGIC):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return reader, "zstd", (zstandard.ZstdError, EOFError, OSError)
    return raw, None, (OSError,)


class InputSource:
    """Binary reader over a JSONL file (plain, gzip or zstd) or stdin.

    ``offset`` counts decompressed bytes returned so far; ``position()`` is the raw (possibly
    compressed) position used for progress, and ``total`` the raw size when known.

    ``lo``/``hi`` (plain files only, ``inputs.Unit``): read only the lines whose first byte is
    in ``[lo, hi)``: from the first line start at or after ``lo`` to the end of the line that
    holds byte ``hi - 1``. ``offset`` is then the position in the file, and ``start_line()``
    the number of lines before the first one read.
    """

    def __init__(self, path: str, lo: int = 0, hi: int | None = None):
        self.path = path
        self.offset = 0
        self.end = None
        if path == "-":
            self.raw = sys.stdin.buffer
            self.stream = self.raw
            self.total = None
            self.seekable = False
            self.kind, self.errors = None, (OSError,)
            return
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input: no such file: {path}")
        self.raw = open(path, "rb")
        with open(path, "rb") as probe:
            magic = probe.read(4)
        self.stream, self.kind, self.errors = _decompressor(self.raw, magic)
        self.total = os.path.getsize(path)
        self.seekable = True
        if lo or hi is not None:
            assert self.kind is None, "byte ranges of compressed input"
            self.offset = self._line_end(lo - 1) if lo else 0
            self.end = max(self.offset, self._line_end(hi - 1) if hi else self.total)
            self.raw.seek(self.offset)

    def _line_end(self, at: int) -> int:
        """The position after the first newline at or after byte ``at`` (or the file size)."""
        self.raw.seek(at)
        while block := self.raw.read(1 << 16):
            i = block.find(b"\n")
            if i >= 0:
                return at + i + 1
            at += len(block)
        return self.total

    def start_line(self) -> int:
        """Lines (newlines) before ``offset``: the line number the next line follows."""
        count, pos = 0, 0
        with open(self.path, "rb") as f:
            while pos < self.offset:
                block = f.read(min(BLOCK, self.offset - pos))
                count += block.count(b"\n")
                pos += len(block)
        return count

    def position(self) -> int:
        return self.raw.tell() if self.seekable else self.offset

    def read(self, n: int) -> bytes:
        if self.end is not None:
            n = min(n, self.end - self.offset)
            if n <= 0:
                return b""
        try:
            data = self.stream.read(n)
        except self.errors as e:
            if self.kind is None:
                raise
            raise CorruptInput(
                f"{self.path}: damaged {self.kind} data at or after byte {self.offset:,} of "
                f"its text ({type(e).__name__}: {e})"
            ) from None
        self.offset += len(data)
        return data

    def skip_to(self, offset: int) -> int:
        """Move to decompressed ``offset``; returns crc32 of the bytes skipped (stdin only)."""
        if self.seekable:  # gzip and zstd readers seek forward by decompressing
            self.stream.seek(offset)
            self.offset = offset
            return -1
        crc = 0
        while self.offset < offset:
            data = self.read(min(BLOCK, offset - self.offset))
            if not data:
                raise ValueError(f"stdin ended at byte {self.offset}, before the checkpoint")
            crc = zlib.crc32(data, crc)
        return crc

    def close(self) -> None:
        if self.path != "-":
            self.stream.close()
            self.raw.close()


@dataclass
class Batch:
    """Valid documents of consecutive lines, and what was skipped among those lines.

    ``values[k]`` holds, per kept line, the value under ``keys[k]`` (a string or a list of
    strings). ``end_offset``/``end_line``/``crc`` describe the input right after the batch:
    decompressed bytes consumed, last line number, crc32 of every byte consumed so far.
    """

    values: list[list] = field(default_factory=list)
    n_docs: int = 0
    n_chars: int = 0
    end_offset: int = 0
    end_line: int = 0
    crc: int = 0
    position: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> [count, [first line numbers]]
    lines: int = 0  # lines (rows) and raw bytes read since the previous batch (preprocess)
    raw: int = 0


_MISSING = object()
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_decode_json = json.JSONDecoder().decode  # json.loads with its defaults, minus a call layer


def _has_lone_surrogate(value) -> bool:
    values = [value] if isinstance(value, str) else value
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def check_line(raw: bytes, keys: list[str]) -> tuple[str | None, list, str]:
    """Validate one line: (reason or None, values per key, detail for error messages)."""
    if not raw or raw.isspace():
        return "blank_line", [], ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "invalid_utf8", [], f"byte {e.start}"
    try:
        obj = _decode_json(text)
    except (ValueError, RecursionError) as e:
        return "not_json", [], str(e)[:80]
    if type(obj) is not dict:
        return "not_object", [], type(obj).__name__
    values = []
    for key in keys:
        value = obj.get(key, _MISSING)
        if value is _MISSING:
            return "missing_key", [], f"no key {key!r}"
        if type(value) is not str and not (
            type(value) is list and all(type(v) is str for v in value)
        ):
            return "not_string", [], f"{key!r} holds {type(value).__name__}"
        values.append(value)
    # json only produces lone surrogates from \\ud800..\\udfff escapes: test those lines only
    if _SURROGATE_ESCAPE.search(raw):
        for key, value in zip(keys, values, strict=True):
            if _has_lone_surrogate(value):
                return "invalid_text", [], f"{key!r} holds a lone surrogate"
    return None, values, ""


def read_batches(
    source: InputSource,
    keys: list[str],
    batch_chars: int,
    start_line: int = 0,
    start_crc: int = 0,
    strict: bool = False,
    max_docs: int = 8192,
):
    """Yield ``Batch`` objects of about ``batch_chars`` characters of text.

    Starts at the source's current offset (line ``start_line`` done, crc ``start_crc`` so
    far). With ``strict`` the first bad line raises ``BadLine``.
    """
    line_no = start_line
    crc = start_crc
    offset = source.offset
    parts: list[bytes] = []
    batch = Batch(values=[[] for _ in keys])
    first = source.offset == 0
    single = keys[0] if len(keys) == 1 else None

    def finish(batch: Batch) -> Batch:
        batch.end_offset, batch.end_line, batch.crc = offset, line_no, crc
        batch.position = source.position()
        return batch

    def handle(raw: bytes) -> None:
        nonlocal batch
        reason, values, detail = check_line(raw, keys)
        if reason is not None:
            if strict:
                raise BadLine(source.path, line_no, reason, detail)
            entry = batch.skipped.setdefault(reason, [0, []])
            entry[0] += 1
            if len(entry[1]) < FIRST_LINES_KEPT:
                entry[1].append(line_no)
            return
        for column, value in zip(batch.values, values, strict=True):
            column.append(value)
            batch.n_chars += len(value) if type(value) is str else sum(map(len, value))
        batch.n_docs += 1

    while True:
        block = source.read(BLOCK)
        if not block:
            if parts:
                raw = b"".join(parts)
                parts = []
                line_no += 1
                crc = zlib.crc32(raw, crc)
                offset += len(raw)
                handle(raw)
            yield finish(batch)
            return
        if first:
            first = False
            if block.startswith(_BOM):
                crc = zlib.crc32(_BOM, crc)
                offset += len(_BOM)
                block = block[len(_BOM) :]
        if b"\n" not in block:
            parts.append(block)
            continue
        if parts:
            parts.append(block)
            block = b"".join(parts)
            parts = []
        lines = block.split(b"\n")
        tail = lines.pop()
        done = 0  # bytes of ``block`` accounted in crc/offset
        pos = 0
        for raw in lines:
            line_no += 1
            pos += len(raw) + 1
            # fast path, one key holding a string: check_line's verdict in fewer steps
            try:
                obj = _decode_json(raw.decode("utf-8")) if single is not None else None
            except (ValueError, RecursionError):
                obj = None
            if (
                type(obj) is dict
                and type(value := obj.get(single)) is str
                and not _SURROGATE_ESCAPE.search(raw)
            ):
                batch.values[0].append(value)
                batch.n_chars += len(value)
                batch.n_docs += 1
            else:
                handle(raw)
            if batch.n_chars >= batch_chars or batch.n_docs >= max_docs:
                crc = zlib.crc32(memoryview(block)[done:pos], crc)
                offset += pos - done
                done = pos
                yield finish(batch)
                batch = Batch(values=[[] for _ in keys])
        crc = zlib.crc32(memoryview(block)[done:pos], crc)
        offset += pos - done
        if tail:
            parts.append(tail)
