"""One run per ``--save`` directory: rank 0 holds an exclusive lock on ``{save}/.lock``.

Two runs saving into one directory overwrite each other's checkpoints and marker (and crash
each other's saves). The lock is ``flock`` on a file in the directory, taken at start-up before
the model is built and held while the process lives (the kernel releases it when the process
ends, killed or not, so a requeued job takes it again). The file says who holds it. On a
filesystem without ``flock`` the run goes on, with a note. All ranks agree on the outcome.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time

from megatron_ext.errors import agree

LOCK = ".lock"


class SaveDirLock:
    """Holds the lock while referenced; ``release()`` (or the end of the process) drops it."""

    def __init__(self, fd: int | None = None, note: str | None = None):
        self.fd, self.note = fd, note

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    where = f"host {socket.gethostname()}, pid {os.getpid()}"
    return where + (f", Slurm job {job}" if job else "") + f", since {time.strftime('%F %T')}"


def _try_lock(save: str) -> tuple[SaveDirLock, str | None]:
    path = os.path.join(save, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path) as f:
            holder = f.read().strip() or "unknown"
        os.close(fd)
        return SaveDirLock(), (
            f"--save {save}: another run is saving into this directory ({holder}); two runs "
            "would overwrite each other's checkpoints. Stop it, or give this run its own --save"
        )
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.close(fd)
        return SaveDirLock(note=f"--save {save}: no file locks on this filesystem ({e.strerror}); "
                           "make sure no other run saves here"), None  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, (_holder() + "\n").encode())
    return SaveDirLock(fd), None


def lock_save_dir(save: str | None, rank: int) -> SaveDirLock:
    """Rank 0 takes the lock; every rank raises the same ``UsageError`` if it is held."""
    lock, problem = (SaveDirLock(), None)
    if save and rank == 0:
        lock, problem = _try_lock(save)
    agree(problem)
    return lock
