"""Progress on stderr and the closing summary of ``preprocess``.

Modes: ``bar`` (tqdm: MB/s over the input bytes of all files, ETA when their size is known,
files done/total, docs/s and tokens/s as postfix), ``log`` (one line every ``--log-interval``
documents, as Megatron-LM prints, with the same figures), ``none``; ``auto`` is ``bar`` on a
terminal, else ``log``. MB = 10^6 bytes; input bytes are raw bytes (compressed bytes for
``.gz``/``.zst``/Parquet). The closing summary has a line per input kind.
"""

from __future__ import annotations

import sys
import time


def _eta(done: float, total: float | None, elapsed: float) -> str:
    if not total or done <= 0:
        return "?"
    left = max(0.0, elapsed * (total - done) / done)
    return time.strftime("%H:%M:%S", time.gmtime(left))


class Progress:
    def __init__(
        self, mode: str, total: int | None, log_interval: int, start_pos: int = 0, files: int = 1
    ):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total = total
        self.log_interval = max(1, log_interval)
        self.t0 = time.monotonic()
        self.start_pos = start_pos
        self.docs = self.tokens = 0
        self.files, self.files_done = files, 0  # input units (files, or shares of them)
        self._next_log = self.log_interval
        self._last_post = 0.0
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=start_pos,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, position: int, docs: int, tokens: int) -> None:
        """``position``: raw input bytes consumed; ``docs``/``tokens``: totals this run."""
        self.docs, self.tokens = docs, tokens
        elapsed = max(1e-9, time.monotonic() - self.t0)
        if self.bar is not None:
            self.bar.update(position - self.bar.n)
            if elapsed - self._last_post >= 0.5:
                self._last_post = elapsed
                self.bar.set_postfix_str(
                    f"file {self._file()}, {docs / elapsed:,.0f} docs/s, "
                    f"{tokens / elapsed / 1e6:.2f}M tok/s",
                    refresh=False,
                )
        elif self.mode == "log" and docs >= self._next_log:
            while self._next_log <= docs:
                self._next_log += self.log_interval
            mbs = (position - self.start_pos) / elapsed / 1e6
            left = None if self.total is None else self.total - self.start_pos
            eta = _eta(position - self.start_pos, left, elapsed)
            print(
                f"Processed {docs} documents ({docs / elapsed:.1f} docs/s, {mbs:.2f} MB/s, "
                f"{tokens / elapsed:,.0f} tokens/s, file {self._file()}, ETA {eta})",
                file=sys.stderr,
                flush=True,
            )

    def _file(self) -> str:
        """``3/120``: the file being read (files done + 1) of all."""
        return f"{min(self.files_done + 1, self.files)}/{self.files}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(stats: dict) -> str:
    """Human summary of a finished run from the ``stats`` dict kept in the checkpoint."""
    secs = stats.get("seconds", 0.0)
    mb = stats["input_bytes"] / 1e6
    lines = [
        "data-tools preprocess: done",
        f"  documents written : {stats['documents']:,}",
        f"  tokens written    : {stats['tokens']:,}"
        + (" (EOD appended to each document)" if stats.get("append_eod") else ""),
        f"  input             : {stats['lines']:,} lines, {mb:,.1f} MB",
        *(
            f"    {kind:<14}: {k['files']:,} file(s), {k['bytes'] / 1e6:,.1f} MB, "
            f"{k['documents']:,} documents, {k['tokens']:,} tokens"
            for kind, k in sorted(stats.get("kinds", {}).items())
        ),
        f"  time              : {secs:.1f} s ({mb / max(secs, 1e-9):.2f} MB/s, "
        f"{stats['tokens'] / max(secs, 1e-9):,.0f} tokens/s)"
        + (f", resumed {stats['resumes']} time(s)" if stats.get("resumes") else ""),
        f"  empty documents   : {stats['empty']:,} dropped"
        if not stats.get("keep_empty")
        else f"  empty documents   : {stats['empty']:,} kept",
    ]
    skipped = stats.get("skipped", {})
    total = sum(v[0] for v in skipped.values())
    lines.append(f"  skipped lines     : {total:,}")
    for reason, (count, first) in sorted(skipped.items()):
        more = ", ..." if count > len(first) else ""
        where = ("line " if len(first) == 1 else "lines ") + ", ".join(map(str, first))
        lines.append(f"    {reason:<14}: {count:,} ({where}{more})")
    for path in stats.get("outputs", []):
        lines.append(f"  wrote {path}")
    return "\n".join(lines)
