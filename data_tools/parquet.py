"""Parquet input (pyarrow): the ``--json-keys`` are column names.

A column may hold strings (``string``, ``large_string``, ``string_view``) or lists of strings
(sentences, as a JSON list is). Rows are read about ``--batch-mb`` of text at a time (the row
group's mean row size; at most ``ROWS_PER_READ`` rows), only the key columns, through a
buffered stream without pre-buffering: memory is bounded by those rows and a page, not by the
row group (a whole row group's column chunk is never held).

Rows are numbered from 1 in the file. A row is skipped and counted, as a bad JSON line is
(``jsonl.REASONS``), when a value is null (``null_value``), is not a string or a list of
strings (``not_string``: every row of such a column), or is not valid UTF-8
(``invalid_utf8``). A file without one of the columns, or that is not readable Parquet
(truncated, not Parquet), stops the run before any work with one line naming the file.
"""

from __future__ import annotations

import os

from .jsonl import FIRST_LINES_KEPT, BadLine, Batch, CorruptInput

ROWS_PER_READ = 256
_BUFFER = 1 << 20


def use_system_allocator() -> None:
    """Read Parquet with the C allocator, unless ``ARROW_DEFAULT_MEMORY_POOL`` says otherwise.

    pyarrow's default pool (mimalloc) hands pages back and faults them in again as batches come
    and go: on the 80 MB benchmark corpus that doubled the system CPU time and made Parquet
    input 4% slower than JSONL; with the C allocator it is as fast (docs/benchmarks.md). Called
    once by ``preprocess`` (a process-wide pyarrow setting) before the first read."""
    import pyarrow as pa

    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        pa.set_memory_pool(pa.system_memory_pool())


def open_file(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, buffer_size=_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise CorruptInput(f"{path}: not a readable Parquet file ({e})") from None


def check_columns(path: str, keys: list[str]) -> None:
    """Stop early (``CorruptInput``) when ``path`` is not readable or lacks a key column."""
    names = open_file(path).schema_arrow.names
    for key in keys:
        if key not in names:
            raise CorruptInput(
                f"{path}: no column {key!r} (--json-keys); its columns: {', '.join(names)}"
            )


def row_group_extents(path: str) -> list[tuple[int, int]]:
    """(first byte, compressed bytes) of each row group: where ``--shard`` places it."""
    meta = open_file(path).metadata
    extents = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        cols = [rg.column(c) for c in range(rg.num_columns)]
        starts = [
            c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in cols
        ]
        extents.append((min(starts, default=0), sum(c.total_compressed_size for c in cols)))
    return extents


def _column_values(column) -> tuple[list, str | None]:
    """(Python values, None) or ([], the reason every row is bad) for one Arrow column."""
    import pyarrow.types as t

    typ = column.type
    is_text = t.is_string(typ) or t.is_large_string(typ) or t.is_string_view(typ)
    is_list = (t.is_list(typ) or t.is_large_list(typ)) and (
        t.is_string(typ.value_type) or t.is_large_string(typ.value_type)
    )
    if not (is_text or is_list):
        return [], f"not_string:{typ}"
    try:
        return column.to_pylist(), None
    except UnicodeDecodeError:  # one bad value: convert one by one, marking the bad ones
        values = []
        for v in column:
            try:
                values.append(v.as_py())
            except UnicodeDecodeError:
                values.append(_BAD_UTF8)
        return values, None


_BAD_UTF8 = object()


def _row_reason(values) -> tuple[str | None, str]:
    for v in values:
        if v is None:
            return "null_value", "null"
        if v is _BAD_UTF8:
            return "invalid_utf8", ""
        if type(v) is list and not all(type(s) is str for s in v):
            return "not_string", "a list holding a non-string"
    return None, ""


def read_batches(
    path: str,
    keys: list[str],
    batch_chars: int,
    groups: range,
    start_row: int | None = None,
    strict: bool = False,
    max_docs: int = 8192,
):
    """Yield ``jsonl.Batch`` objects over row groups ``groups`` of ``path``.

    ``end_offset`` is the file's row index after the batch (0-based), ``end_line`` the last row
    number (1-based; the same number), ``position`` the compressed bytes of this unit's row
    groups read since ``start_row`` (estimated within a row group by its rows). ``start_row``:
    resume at that row index (rows before it are not read again).
    """
    pf = open_file(path)
    meta = pf.metadata
    extents = row_group_extents(path)
    base = sum(meta.row_group(g).num_rows for g in range(groups.start))
    batch, done_bytes, origin = Batch(values=[[] for _ in keys]), 0, 0.0

    def finish(b: Batch, row: int, pos: float) -> Batch:
        b.end_offset = b.end_line = row
        b.position = int(pos - origin)
        return b

    row = base
    for g in groups:
        n_rows, size = meta.row_group(g).num_rows, extents[g][1]
        if start_row is not None and start_row >= row + n_rows:
            row += n_rows
            done_bytes += size
            continue
        first = row
        if start_row is not None and start_row > row:  # resumed inside this row group
            origin = done_bytes + size * (start_row - first) / max(n_rows, 1)
        elif start_row is not None and not origin:
            origin = done_bytes
        # about batch_chars of text per read (the row group's mean row size), at most 256 rows
        per_row = meta.row_group(g).total_byte_size / max(n_rows, 1)
        rows_per_read = max(1, min(ROWS_PER_READ, int(batch_chars / max(per_row, 1))))
        for rb in pf.iter_batches(
            batch_size=rows_per_read, row_groups=[g], columns=keys, use_threads=False
        ):
            columns = [_column_values(rb.column(k)) for k in keys]
            for r in range(rb.num_rows):
                row += 1
                if start_row is not None and row <= start_row:
                    continue
                reason, detail, values = None, "", []
                for key, (vals, bad) in zip(keys, columns, strict=True):
                    if bad is not None:
                        reason, detail = "not_string", f"{key!r} is {bad.split(':', 1)[1]}"
                        break
                    values.append(vals[r])
                if reason is None:
                    reason, detail = _row_reason(values)
                if reason is not None:
                    if strict:
                        raise BadLine(path, row, reason, detail)
                    entry = batch.skipped.setdefault(reason, [0, []])
                    entry[0] += 1
                    if len(entry[1]) < FIRST_LINES_KEPT:
                        entry[1].append(row)
                else:
                    for column, value in zip(batch.values, values, strict=True):
                        column.append(value)
                        batch.n_chars += len(value) if type(value) is str else sum(map(len, value))
                    batch.n_docs += 1
                if batch.n_chars >= batch_chars or batch.n_docs >= max_docs:
                    pos = done_bytes + size * (row - first) / max(n_rows, 1)
                    yield finish(batch, row, pos)
                    batch = Batch(values=[[] for _ in keys])
        done_bytes += size
    yield finish(batch, row, done_bytes)
