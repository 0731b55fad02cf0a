"""The reading side of ``preprocess``: every input unit's documents in order, as batches, in a
thread ahead of the encoder, from a resume point on.

``state["input"]`` of a run (``resume.py``) is ``unit_start(k)`` or, inside unit k, the
``offset`` (JSONL: decompressed byte in the file; Parquet: row index), ``line`` (last line or
row number) and ``crc`` (stdin: crc32 of the bytes read) after the last batch written.
"""

from __future__ import annotations

import queue
import threading

from . import parquet
from .jsonl import InputSource, read_batches

_END = object()


class StdinChanged(ValueError):
    """A resumed run's stdin is not the stream the interrupted run read."""


def threaded(items, depth: int, stop: threading.Event):
    """Iterate ``items`` in a daemon thread, ``depth`` results ahead of the consumer."""
    q: queue.Queue = queue.Queue(depth)

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def unit_start(index: int) -> dict:
    """Resume state at the start of unit ``index`` (``offset`` None: not entered yet)."""
    return {"unit": index, "offset": None, "line": 0, "crc": 0, "done": False}


def unit_batches(units, keys, args, inp):
    """Reader thread: ``(unit index, Batch)`` for every batch of every unit from the resume
    point on, and ``(unit index, None)`` after a unit's last batch. Each batch also carries
    ``lines`` (lines or rows read) and ``raw`` (raw bytes read) since the previous one."""
    for index in range(inp["unit"], len(units)):
        unit = units[index]
        resume = inp if index == inp["unit"] and inp["offset"] is not None else None
        if unit.file.kind == "parquet":
            meta = parquet.open_file(unit.file.path).metadata
            end = meta.num_row_groups if unit.hi is None else unit.hi
            batches = parquet.read_batches(
                unit.file.path, keys, int(args.batch_mb * 1e6), range(unit.lo, end),
                start_row=resume["offset"] if resume else None, strict=args.strict,
            )  # fmt: skip
            line = sum(meta.row_group(g).num_rows for g in range(unit.lo))
            line, pos, source = resume["line"] if resume else line, 0, None
        else:
            source = InputSource(unit.file.path, unit.lo, unit.hi)
            if resume:
                try:
                    crc = source.skip_to(resume["offset"])
                except ValueError as e:
                    raise StdinChanged(f"stdin differs from the interrupted run: {e}") from None
                if crc >= 0 and crc != resume["crc"]:
                    raise StdinChanged(
                        "stdin differs from the interrupted run (checksum of the first "
                        f"{resume['offset']:,} bytes); add --overwrite to start over"
                    )
                line, crc = resume["line"], resume["crc"]
            else:
                line, crc = (source.start_line() if unit.lo else 0), 0
            pos = source.position()
            batches = read_batches(
                source, keys, batch_chars=int(args.batch_mb * 1e6), start_line=line,
                start_crc=crc, strict=args.strict,
            )  # fmt: skip
        try:
            for batch in batches:
                batch.lines, batch.raw = batch.end_line - line, batch.position - pos
                line, pos = batch.end_line, batch.position
                yield index, batch
        finally:
            if source is not None:
                source.close()
        yield index, None
