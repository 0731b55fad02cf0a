"""Renders stdlib module docs with pydoc, for ``corpus.py``; runs as ``python -S -c <this>``.

Input: module names, one per line, on stdin. Output: one JSON object per line on stdout,
``{"name": ..., "text": ...}`` or ``{"name": ..., "error": ...}``. Run by ``corpus.py`` in a
fixed minimal environment and an empty working folder: pydoc prints ``os.environ`` and paths
verbatim, so those must not depend on who runs it. Machine-specific strings left (install
paths, object addresses) are replaced by fixed ones here. Imports only the standard library.
"""

import contextlib
import importlib
import io
import json
import os
import pydoc
import re
import sys
import sysconfig
import warnings

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _scrubber():
    canonical = f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}"
    pairs = []
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            pairs.append((path, canonical))
    pairs.append((sys.executable, "/usr/bin/python3"))
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        if prefix and prefix != "/usr":
            pairs.append((prefix, "/usr"))
    pairs.sort(key=lambda p: -len(p[0]))  # longest first: stdlib before its prefix
    # reprs cut short by pydoc ("/root/.pyenv/versions/3.1...") show only a path's head;
    # shortest paths first, so that such a head is taken for the prefix, not the stdlib
    heads = [
        (
            re.compile(
                "(?:" + "|".join(re.escape(old[:k]) for k in range(len(old), 5, -1)) + ")\\.\\.\\."
            ),
            new,
        )
        for old, new in reversed(pairs)
    ]

    def scrub(text: str) -> str:
        for old, new in pairs:
            text = text.replace(old, new)
        for pattern, new in heads:
            text = pattern.sub(new + "...", text)
        return _ADDRESS.sub(" at 0x7f0000000000", text)

    return scrub


def main() -> None:
    warnings.simplefilter("ignore")
    scrub = _scrubber()
    out = sys.stdout
    for name in sys.stdin.read().split():
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                module = importlib.import_module(name)
                text = pydoc.render_doc(module, renderer=pydoc.plaintext)
            record = {"name": name, "text": scrub(text)}
        except BaseException as e:  # a module that cannot be imported here is just skipped
            record = {"name": name, "error": type(e).__name__}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    os._exit(0)  # skip interpreter teardown: some imported modules dislike it


if __name__ == "__main__":
    main()
