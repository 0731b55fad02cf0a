"""Build the ~80 MB English benchmark corpus of docs/benchmarks.md (bench only, not for tests).

Recipe of /work/shared/corpus.md, on a Debian machine:

1. Python documentation reST sources (``apt-get install -y python3-doc``):
   ``/usr/share/doc/python3.*/html/_sources/**/*.txt``, one document per file;
2. English man pages ``/usr/share/man/man[1-8]`` (``gcloud_*`` skipped), each rendered with
   ``LC_ALL=C.UTF-8 MANWIDTH=80 man -l --nh --nj FILE | col -bx``;
3. pydoc plain-text pages of the stdlib's top-level modules (``data_tools.corpus``: fixed
   environment, no site-packages);
4. ``/usr/share/doc`` NEWS/changelog/README files (``.gz`` decompressed) as filler up to
   ``--mb``.

Documents under 200 characters and exact duplicates (SHA-1) are dropped; the rest are shuffled
with a fixed seed and written as ``{"text": ...}`` lines (``ensure_ascii=False``). Renderers
run with a fixed environment. ``--split-paragraphs`` writes the small-document variant (each
document cut at blank lines).

    python bench/build_corpus.py --output /tmp/bench/corpus80.jsonl --mb 80

The same documents as Parquet (``text`` column, zstd pages, 1,000 documents per row group) and
as zstd-compressed JSONL, for the input-format benchmark:

    python bench/build_corpus.py --convert /tmp/bench/corpus80.jsonl parquet \\
        --output /tmp/bench/corpus80.parquet
    python bench/build_corpus.py --convert /tmp/bench/corpus80.jsonl zst \\
        --output /tmp/bench/corpus80.jsonl.zst
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from data_tools import corpus  # noqa: E402

ENV = {
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "PATH": "/usr/bin:/bin",
    "HOME": "/nonexistent",
    "MANWIDTH": "80",
    "PAGER": "cat",
    "MANPAGER": "cat",
    "TERM": "dumb",
    "TZ": "UTC",
}


def python_doc_sources() -> list[tuple[str, str]]:
    files = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.txt", recursive=True))
    if not files:
        print("python3-doc not installed (apt-get install -y python3-doc)", file=sys.stderr)
    return [(f, open(f, encoding="utf-8", errors="replace").read()) for f in files]


def _render_man(path: str) -> tuple[str, str]:
    man = subprocess.run(
        ["man", "-l", "--nh", "--nj", path], env=ENV, capture_output=True, timeout=60
    )
    col = subprocess.run(["col", "-bx"], input=man.stdout, env=ENV, capture_output=True)
    return path, col.stdout.decode("utf-8", errors="replace")


def man_pages(jobs: int) -> list[tuple[str, str]]:
    files = sorted(
        f
        for f in glob.glob("/usr/share/man/man[1-8]/*")
        if not os.path.basename(f).startswith("gcloud_") and os.path.isfile(f)
    )
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(_render_man, files))


def pydoc_pages() -> list[tuple[str, str]]:
    names = [n for n in corpus.module_names() if "." not in n]
    return [(s, t) for s, t in corpus._render_modules(names) if t]


def doc_files() -> list[tuple[str, str]]:
    pattern = re.compile(r"(NEWS|changelog|README)[^/]*$", re.I)
    out = []
    for f in sorted(glob.glob("/usr/share/doc/**/*", recursive=True)):
        if not pattern.search(os.path.basename(f)) or not os.path.isfile(f):
            continue
        opener = gzip.open if f.endswith(".gz") else open
        try:
            with opener(f, "rb") as fh:
                out.append((f, fh.read().decode("utf-8", errors="replace")))
        except OSError:
            continue
    return out


def split_existing(src: str, dst: str) -> None:
    """Small-document variant of an existing corpus: each document cut at blank lines."""
    n = 0
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8", newline="\n") as g:
        for line in f:
            for piece in re.split(r"\n\s*\n", json.loads(line)["text"]):
                if piece.strip():
                    g.write(json.dumps({"text": piece}, ensure_ascii=False) + "\n")
                    n += 1
    print(f"wrote {dst}: {n} lines, {os.path.getsize(dst) / 1e6:.1f} MB", file=sys.stderr)


def convert(src: str, dst: str, kind: str, row_group_rows: int) -> None:
    """The same documents as Parquet (one ``text`` column, zstd pages, row groups of
    ``row_group_rows`` documents) or as zstd-compressed JSONL (the same bytes, level 3)."""
    if kind == "zst":
        import zstandard

        with open(src, "rb") as f, open(dst, "wb") as g:
            zstandard.ZstdCompressor(level=3).copy_stream(f, g)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open(src, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        table = pa.table({"text": pa.array(texts, pa.large_string())})
        pq.write_table(table, dst, row_group_size=row_group_rows, compression="zstd")
    print(f"wrote {dst}: {os.path.getsize(dst) / 1e6:.1f} MB ({kind})", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--mb", type=float, default=80.0, help="size cap, MB = 10^6 bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=4, help="parallel man renderers")
    p.add_argument("--split-paragraphs", action="store_true", help="small-document variant")
    p.add_argument("--split-existing", default=None, help="split this JSONL's documents instead")
    p.add_argument(
        "--convert", nargs=2, metavar=("SRC", "KIND"), help="write SRC (JSONL) as KIND: parquet|zst"
    )
    p.add_argument("--row-group-rows", type=int, default=1000, help="Parquet rows per row group")
    args = p.parse_args()
    if args.split_existing:
        split_existing(args.split_existing, args.output)
        return
    if args.convert:
        convert(args.convert[0], args.output, args.convert[1], args.row_group_rows)
        return
    limit = int(args.mb * 1e6)
    seen: set[bytes] = set()
    lines: list[str] = []
    size = 0
    counts = {}
    groups = [
        ("python-doc", python_doc_sources),
        ("man", lambda: man_pages(args.jobs)),
        ("pydoc", pydoc_pages),
        ("doc-files", doc_files),
    ]
    for name, source in groups:
        counts[name] = 0
        for _, text in source():
            if len(text) < 200:
                continue
            digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
            if digest in seen:
                continue
            pieces = [text]
            if args.split_paragraphs:
                pieces = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
            new = [json.dumps({"text": piece}, ensure_ascii=False) for piece in pieces]
            n = sum(len(line.encode("utf-8", errors="replace")) + 1 for line in new)
            if size + n > limit:
                continue  # a smaller document further on may still fit
            seen.add(digest)
            lines.extend(new)
            size += n
            counts[name] += 1
        print(f"{name}: {counts[name]} documents, total {size / 1e6:.1f} MB", file=sys.stderr)
    random.Random(args.seed).shuffle(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8", errors="replace", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    print(f"wrote {args.output}: {len(lines)} lines, {size / 1e6:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
