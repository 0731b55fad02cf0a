"""``sample-corpus``: a reproducible real-text JSONL corpus from the Python standard library.

Needs nothing but the running Python (no downloads, no packages): every machine of ours has it.
Sources, one document each:

* ``pydoc:<module>``  pydoc's plain-text page of each public stdlib module and submodule
  (tests, GUI and side-effect modules excluded), rendered in a subprocess (``-S``: no
  site-packages) with a fixed minimal environment (``LC_ALL=C.UTF-8``, ``PATH=/usr/bin:/bin``,
  ``HOME=/nonexistent``, ``PYTHONHASHSEED=0``, ``TZ=UTC``) in an empty folder, with install
  paths and object addresses replaced by fixed strings;
* ``topic:<name>``    the help topics of ``pydoc_data.topics`` (language reference prose);
* ``file:<path>``     ``.txt``/``.rst`` files of the stdlib folder;
* ``code:<path>``     stdlib ``.py`` sources, used only after all the prose above.

Recipe: prose sources in a seeded shuffled order, then code in a seeded shuffled order; take
documents of at least 200 characters, not seen before (SHA-1 of the text), until the next would
pass ``--max-mb`` (MB = 10^6 bytes of output); shuffle the chosen ones (seeded); write
``{"text": ..., "source": ...}`` per line (``ensure_ascii=False``, keys sorted). Same machine and
Python -> same bytes; other machines with the same Python version give nearly the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

MIN_CHARS = 200
SKIP_TOP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "pydoc_data",
    "ensurepip",
    "lib2to3",
}
SKIP_PARTS = {"test", "tests", "idle_test", "__main__", "__pycache__", "site-packages"}
WORKER_ENV = {
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "PATH": "/usr/bin:/bin",
    "HOME": "/nonexistent",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "PAGER": "cat",
    "MANPAGER": "cat",
    "TERM": "dumb",
    "TZ": "UTC",
}


def add_arguments(p) -> None:
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-mb", type=float, default=4.0, help="size cap in MB (10^6 bytes)")
    p.add_argument("--seed", type=int, default=1234)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_names() -> list[str]:
    """Public stdlib modules and submodules, sorted."""
    root = stdlib_dir()
    names = set()
    for top in sys.stdlib_module_names:
        if top.startswith("_") or top in SKIP_TOP:
            continue
        names.add(top)
        pkg = root / top
        if not (pkg / "__init__.py").is_file():
            continue
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            if any(part.startswith("_") or part in SKIP_PARTS for part in rel):
                continue
            names.add(".".join(rel))
    return sorted(names)


def _files(suffixes: tuple[str, ...]) -> list[Path]:
    root = stdlib_dir()
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if path.suffix not in suffixes or not path.is_file():
            continue
        if rel[0] in SKIP_TOP or any(p in SKIP_PARTS for p in rel):
            continue
        out.append(path)
    return sorted(out)


def _render_modules(names: list[str]):
    """Yield (source, text) for modules, rendered lazily by the pydoc worker subprocess."""
    worker = (Path(__file__).parent / "_pydoc_worker.py").read_text()
    with tempfile.TemporaryDirectory() as empty:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", worker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=empty,
            env=WORKER_ENV,
        )
        try:
            proc.stdin.write("\n".join(names).encode())
            proc.stdin.close()
            for line in proc.stdout:
                record = json.loads(line)
                yield f"pydoc:{record['name']}", record.get("text")
        finally:
            proc.kill()
            proc.wait()


def _prose_sources(seed: int):
    """(kind, key) of every prose document, in seeded shuffled order."""
    from pydoc_data.topics import topics

    items = [("pydoc", n) for n in module_names()]
    items += [("topic", n) for n in sorted(topics)]
    items += [("file", str(p)) for p in _files((".txt", ".rst"))]
    random.Random(seed).shuffle(items)
    return items


def _documents(seed: int):
    """Yield (source, text): prose in shuffled order, then code in shuffled order."""
    from pydoc_data.topics import topics

    root = stdlib_dir()
    items = _prose_sources(seed)
    modules = iter(_render_modules([key for kind, key in items if kind == "pydoc"]))
    for kind, key in items:
        if kind == "pydoc":
            yield next(modules, (None, None))
        elif kind == "topic":
            yield f"topic:{key}", topics[key]
        else:
            path = Path(key)
            yield f"file:{path.relative_to(root)}", path.read_text(errors="replace")
    code = _files((".py",))
    random.Random(seed + 1).shuffle(code)
    for path in code:
        try:
            yield f"code:{path.relative_to(root)}", path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def build(output: str, max_mb: float = 4.0, seed: int = 1234) -> dict:
    """Write the corpus to ``output``; returns {"documents", "bytes", "sources"}."""
    limit = int(max_mb * 1e6)
    seen: set[bytes] = set()
    chosen: list[str] = []
    size = 0
    kinds: dict[str, int] = {}
    docs = _documents(seed)
    try:
        for source, text in docs:
            if text is None or len(text) < MIN_CHARS:
                continue
            try:
                digest = hashlib.sha1(text.encode("utf-8")).digest()
            except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form
                continue
            if digest in seen:
                continue
            line = json.dumps({"source": source, "text": text}, ensure_ascii=False, sort_keys=True)
            n = len(line.encode("utf-8")) + 1
            if size + n > limit:
                break
            seen.add(digest)
            chosen.append(line)
            size += n
            kind = source.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    finally:
        docs.close()  # stops the pydoc worker
    random.Random(seed + 2).shuffle(chosen)
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in chosen:
            f.write(line + "\n")
    os.replace(tmp, output)
    return {"documents": len(chosen), "bytes": size, "sources": kinds}


def run(args) -> dict:
    stats = build(args.output, args.max_mb, args.seed)
    sources = ", ".join(f"{k} {v}" for k, v in stats["sources"].items())
    print(
        f"data-tools sample-corpus: wrote {args.output}: {stats['documents']:,} documents, "
        f"{stats['bytes'] / 1e6:.2f} MB ({sources})",
        file=sys.stderr,
    )
    return stats
