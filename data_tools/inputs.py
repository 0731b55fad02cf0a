"""What ``preprocess --input`` reads: files, globs and folders expanded to a sorted file list,
each file's kind, and the share of it that ``--shard I/N`` gives one process.

Expansion (deterministic: the same arguments give the same list on every node):

* a file is taken as given, whatever its name; ``-`` is stdin (once, and not with shards);
* a folder is walked recursively for names ending in one of :data:`SUFFIXES` (names starting
  with ``.`` are skipped, folders too), sorted by path;
* anything else is a glob (``*``, ``?``, ``[...]``, ``**`` recursive), its matches sorted;
  a folder it matches is walked as above;
* arguments keep their order; a file reached twice is an error, as is a glob or folder that
  yields nothing.

The kind comes from the first bytes: Parquet (``PAR1``), gzip, zstd, else JSONL.

Sharding: the files' raw bytes, end to end, are the input space ``[0, S)``. With at least N
files, shard I gets whole files: N contiguous runs of about S/N bytes each (never empty). With
fewer, shard I gets the byte range ``[S*I/N, S*(I+1)/N)`` of that space: of a plain JSONL file
the lines starting in it (cut at line boundaries, see :class:`Unit`), of a Parquet file the row
groups starting in it, and a compressed JSONL file whole if its first byte is in it (a gzip or
zstd stream cannot be entered in the middle). Either way the shards, in order, hold every
document once and in order, so ``merge`` of their outputs equals one run over all inputs.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".jsonl.zstd", ".json.zst")
SUFFIXES += (".json.zstd", ".parquet")
KINDS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "stdin")
_MAGIC = ((b"PAR1", "parquet"), (b"\x1f\x8b", "jsonl.gz"), (b"\x28\xb5\x2f\xfd", "jsonl.zst"))


class InputError(ValueError):
    """A bad ``--input`` or ``--shard``: one line naming the argument."""


@dataclass(frozen=True)
class InputFile:
    path: str  # "-" for stdin
    kind: str  # one of KINDS
    size: int  # raw bytes (0 for stdin)
    mtime_ns: int = 0


@dataclass(frozen=True)
class Unit:
    """A share of one input file for one shard.

    ``jsonl`` (plain): raw bytes ``[lo, hi)``: the lines whose first byte lies in it (the line
    running across ``hi`` belongs here, the one starting at ``hi`` to the next unit); ``hi`` is
    None to the end. ``parquet``: row groups ``[lo, hi)`` (None: all). Compressed JSONL and
    stdin: the whole stream (``lo = 0``, ``hi = None``).
    """

    file: InputFile
    lo: int = 0
    hi: int | None = None

    @property
    def raw_bytes(self) -> int:
        """Raw bytes this unit covers, for progress (Parquet: its share of the file)."""
        return self.file.size if self.hi is None else self.hi - self.lo

    def describe(self) -> list:
        f = self.file
        return [f.path, f.kind, f.size, f.mtime_ns, self.lo, self.hi]


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @staticmethod
    def parse(text: str) -> Shard:
        m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise InputError(
                f"--shard {text!r}: expected I/N with 0 <= I < N (I counts from 0, like "
                "SLURM_ARRAY_TASK_ID)"
            )
        return Shard(int(m.group(1)), int(m.group(2)))

    def suffix(self) -> str:
        """Appended to ``--output-prefix``: ``-00003-of-00007`` (sorts in shard order)."""
        return f"-{self.index:05d}-of-{self.count:05d}"


def detect_kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return "jsonl"


def _walk(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(root, n) for n in files if not n.startswith(".") and n.endswith(SUFFIXES)
        ]
    return sorted(found)


def expand(specs: list[str]) -> list[InputFile]:
    """The input files named by ``--input`` arguments, in order (module docstring)."""
    paths: list[str] = []
    for spec in specs:
        if spec == "-" or os.path.isfile(spec):
            got = [spec]
        elif os.path.isdir(spec):
            got = _walk(spec)
            if not got:
                raise InputError(
                    f"--input {spec}: no input files in this folder (names ending in "
                    f"{', '.join(SUFFIXES)})"
                )
        elif glob.has_magic(spec):
            got = []
            for match in sorted(glob.glob(spec, recursive=True)):
                got += _walk(match) if os.path.isdir(match) else [match]
            if not got:
                raise InputError(f"--input {spec}: the pattern matches no file")
        else:
            raise InputError(f"--input: no such file or folder: {spec}")
        paths += got
    seen: dict[str, str] = {}
    for p in paths:
        key = p if p == "-" else os.path.realpath(p)
        if key in seen:
            what = "stdin (-)" if p == "-" else p
            raise InputError(f"--input: {what} is listed more than once")
        seen[key] = p
    files = []
    for p in paths:
        if p == "-":
            files.append(InputFile("-", "stdin", 0))
            continue
        st = os.stat(p)
        files.append(InputFile(p, detect_kind(p), st.st_size, st.st_mtime_ns))
    return files


def shard_units(files: list[InputFile], shard: Shard | None, row_groups=None) -> list[Unit]:
    """This shard's units, in input order. ``row_groups(file)`` gives a Parquet file's row
    groups as (raw start offset, raw bytes) pairs (``parquet.row_group_extents``)."""
    if shard is None or shard.count == 1:
        return [Unit(f) for f in files]
    if any(f.kind == "stdin" for f in files):
        raise InputError("--shard: stdin (-) cannot be split across shards; give files")
    total = sum(f.size for f in files)
    n, i = shard.count, shard.index
    if len(files) >= n:
        return [Unit(f) for f in _file_runs(files, n)[i]]
    lo, hi = total * i // n, total * (i + 1) // n
    units, start = [], 0
    for f in files:
        end = start + f.size
        if f.kind == "jsonl":
            a, b = max(lo, start) - start, min(hi, end) - start
            if a < b or (f.size == 0 and lo <= start < hi):
                units.append(Unit(f, a, None if b >= f.size else b))
        elif f.kind == "parquet":
            groups = [g for g, (off, _) in enumerate(row_groups(f)) if lo <= start + off < hi]
            if groups:
                units.append(Unit(f, groups[0], groups[-1] + 1))
        elif lo <= start < hi:
            units.append(Unit(f))
        start = end
    return units


def _file_runs(files: list[InputFile], n: int) -> list[list[InputFile]]:
    """``files`` cut into ``n`` non-empty contiguous runs of about equal bytes: run r ends at
    the first file whose end reaches ``S*(r+1)/n``, kept so that every run has a file."""
    total, cuts, acc, j = sum(f.size for f in files), [], 0, 0
    ends = []
    for f in files:
        acc += f.size
        ends.append(acc)
    for r in range(1, n):
        target = total * r / n
        j = max(j + 1, next((k + 1 for k, e in enumerate(ends) if e >= target), len(files)))
        j = min(j, len(files) - (n - r))
        cuts.append(j)
    bounds = [0, *cuts, len(files)]
    return [files[bounds[r] : bounds[r + 1]] for r in range(n)]


def plan(specs: list[str], shard_text: str | None, keys: list[str]):
    """``(units, shard)`` of a run: ``--input`` expanded, every Parquet file's footer and key
    columns checked (``InputError`` naming the file otherwise), this shard's units."""
    from . import parquet
    from .jsonl import CorruptInput

    shard = Shard.parse(shard_text) if shard_text else None
    files = expand(specs)
    try:
        if any(f.kind == "parquet" for f in files):
            parquet.use_system_allocator()
        for f in files:
            if f.kind == "parquet":
                parquet.check_columns(f.path, keys)
        units = shard_units(files, shard, lambda f: parquet.row_group_extents(f.path))
    except CorruptInput as e:
        raise InputError(str(e)) from None
    return units, shard


def print_plan(units: list[Unit], shard: Shard | None, first_output: str, keys: int) -> dict:
    """``preprocess --dry-run``: what this run or shard reads, on stderr."""
    which = f"shard {shard.index}/{shard.count}" if shard else "the run"
    total = sum(u.raw_bytes for u in units)
    more = f", {keys - 1} more key(s))" if keys > 1 else ")"
    print(
        f"data-tools preprocess: dry run: {which} reads {len(units)} input(s), "
        f"{total / 1e6:,.1f} MB, into {first_output} (and .idx{more}",
        file=sys.stderr,
    )
    for u in units:
        part = "" if u.lo == 0 and u.hi is None else f" {u.lo}-{'end' if u.hi is None else u.hi}"
        unit = " (row groups)" if part and u.file.kind == "parquet" else " (bytes)" if part else ""
        print(f"  {u.file.path} [{u.file.kind}]{part}{unit}", file=sys.stderr)
    return {"units": len(units), "bytes": total, "dry_run": True}
