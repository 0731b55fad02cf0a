"""Crash-safe, resumable output for ``preprocess``.

While a run is under way (``P`` is ``--output-prefix``) everything lives in a side folder::

    P.data-tools-partial/
        lock          held (flock) by the running process: two runs cannot share a prefix
        state.json    the last checkpoint (written as state.json.tmp, fsynced, renamed)
        <key>.bin     tokens written so far           -> P_<key>_document.bin
        <key>.lens    int32 sequence lengths          (side file, streamed into the .idx)
        <key>.docs    int64 document indices          (side file, streamed into the .idx)
        <key>.idx     the index, once all input is encoded -> P_<key>_document.idx

``state.json``::

    {"format": 1, "fingerprint": {...}, "phase": "encode" | "rename",
     "input": {"offset": decompressed bytes consumed, "line": last line number,
               "crc": crc32 of the consumed bytes, "done": all input consumed},
     "outputs": {key: {"bin_bytes", "n_sequences", "n_documents"}}, "stats": {...}}

A checkpoint is taken only after the data files are flushed and fsynced, so after a crash the
files are at least as long as the checkpoint says: a restart truncates them to it and seeks the
input to ``offset``; what follows is recomputed and comes out byte for byte the same. In phase
``rename`` the finished files are moved to their final names with ``os.replace``: first any
older ``.idx`` under a final name is removed, then every ``.bin``, then every ``.idx``, so a
visible ``.idx`` always has its own complete ``.bin``; then the folder is removed. A restart in
that phase only completes the moves.

The fingerprint (input identity, tokenizer digest, keys, flags that change the bytes) must
match to resume; otherwise the run stops and names what differs (``--overwrite`` starts over).

Test hook: ``DATA_TOOLS_KILL_AT=<point>[:<n>]`` makes the process SIGKILL itself the ``n``-th
time (default 1) it reaches ``point``: ``batch`` (batch written, not checkpointed),
``checkpoint`` (after a checkpoint), ``index`` (indexes written, before phase rename),
``rename`` (after each move), ``finalized`` (all moved, folder not yet removed).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal

FORMAT = 1
KILL_ENV = "DATA_TOOLS_KILL_AT"
_hits: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process here when ``DATA_TOOLS_KILL_AT`` names this point (tests)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumeMismatch(Exception):
    pass


def done_path(prefix: str) -> str:
    return prefix + ".data-tools-done.json"


def finished_run(prefix: str, fingerprint: dict, outputs: list[str]) -> dict | None:
    """The stats of a finished run of these settings whose outputs are all in place (and no
    partial run under way), else None."""
    if os.path.exists(PartialRun.folder(prefix)) or not all(map(os.path.exists, outputs)):
        return None
    try:
        with open(done_path(prefix)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    return done.get("stats") if done.get("fingerprint") == fingerprint else None


class PartialRun:
    """The side folder of one ``preprocess`` run: lock, checkpoints, final moves."""

    @staticmethod
    def folder(prefix: str) -> str:
        return prefix + ".data-tools-partial"

    def __init__(self, prefix: str, fingerprint: dict, overwrite: bool = False):
        self.prefix = prefix
        self.dir = self.folder(prefix)
        self.state_path = os.path.join(self.dir, "state.json")
        self.fingerprint = fingerprint
        self.state: dict | None = None
        self.resumed = False
        os.makedirs(self.dir, exist_ok=True)
        self._lock = open(os.path.join(self.dir, "lock"), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResumeMismatch(
                f"another data-tools run is writing {prefix!r} (lock held on {self.dir}/lock)"
            ) from None
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                state = json.load(f)
            diff = self._differences(state.get("fingerprint", {}))
            if diff and not overwrite:
                raise ResumeMismatch(
                    f"{self.dir} holds an interrupted run with other settings "
                    f"({'; '.join(diff)}). Rerun the original command to resume it, or add "
                    "--overwrite to discard it and start over."
                )
            if not diff:
                self.state = state
                self.resumed = True
        if self.state is None:
            self._wipe()

    def _differences(self, old: dict) -> list[str]:
        keys = sorted(set(old) | set(self.fingerprint))
        return [
            f"{k}: was {old.get(k)!r}, now {self.fingerprint.get(k)!r}"
            for k in keys
            if old.get(k) != self.fingerprint.get(k)
        ]

    def _wipe(self) -> None:
        for name in os.listdir(self.dir):
            if name != "lock":
                path = os.path.join(self.dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def save(self, state: dict) -> None:
        """Atomically replace the checkpoint (caller has fsynced the data files)."""
        state = dict(state, format=FORMAT, fingerprint=self.fingerprint)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        fsync_dir(self.dir)
        self.state = state

    def move_outputs(self, moves: list[tuple[str, str]]) -> None:
        """Move (temp name, final name) pairs; ones already moved by a killed run are skipped."""
        out_dirs = set()
        # an older .idx under a final name must not pair with the new .bin moved in before it
        for src, dst in moves:
            if dst.endswith(".idx") and os.path.exists(self.path(src)) and os.path.exists(dst):
                os.remove(dst)
        for src, dst in moves:
            src = self.path(src)
            if os.path.exists(src):
                os.replace(src, dst)
                out_dirs.add(os.path.dirname(os.path.abspath(dst)))
                kill_point("rename")
            elif not os.path.exists(dst):
                raise FileNotFoundError(f"{src} is missing and {dst} was never written")
        for d in out_dirs:
            fsync_dir(d)

    def record_done(self, stats: dict) -> None:
        """``P.data-tools-done.json``: the finished run's fingerprint and summary, by which a
        requeued ``--shard`` task knows its outputs are complete and current."""
        tmp = done_path(self.prefix) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "stats": stats}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, done_path(self.prefix))

    def remove(self) -> None:
        kill_point("finalized")
        self._lock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
