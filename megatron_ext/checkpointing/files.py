"""Checkpoint files on disk: the marker, atomic publishing, debris of killed saves.

    {save}/iter_0000100/                        one dist_checkpointing directory per iteration
    {save}/iter_0000100.partial/                a save in progress (renamed when complete)
    {save}/latest_checkpointed_iteration.txt    "100": replaced atomically, last

Only rank 0 calls ``clear_debris`` and ``publish``; ``checkpointing.save`` orders them around
the collective write with barriers.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal

from data_tools.resume import fsync_dir  # the one fsync of a directory (data_tools has no deps)

MARKER = "latest_checkpointed_iteration.txt"
KILL_ENV = "MEGATRON_EXT_TEST_KILL_IN_SAVE"  # test hook, see checkpointing's docstring


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_marker(root: str) -> int | None:
    path = os.path.join(root, MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def write_marker(root: str, iteration: int) -> None:
    """Point ``root``'s marker at ``iteration`` atomically (write, fsync, rename, fsync dir)."""
    _atomic_write(os.path.join(root, MARKER), f"{iteration}\n")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def is_checkpoint_dir(path: str) -> bool:
    """A complete dist_checkpointing directory (``metadata.json`` is written last)."""
    return os.path.isfile(os.path.join(path, "metadata.json"))


def resolve(root: str) -> tuple[str | None, int | None]:
    """``(directory, iteration)`` of the checkpoint that ``--load root`` means, or Nones.

    ``root`` is a ``--save`` directory (its marker names the iteration) or one checkpoint
    directory itself. A marked directory that is missing but has a ``.replaced`` twin (a
    re-save of the same iteration killed between two renames) resolves to the twin."""
    if is_checkpoint_dir(root):
        name = os.path.basename(os.path.normpath(root))
        digits = name[len("iter_") :] if name.startswith("iter_") else ""
        return root, int(digits) if digits.isdigit() else None
    iteration = read_marker(root)
    if iteration is None:
        return None, None
    path = iteration_dir(root, iteration)
    if not os.path.exists(path) and os.path.exists(path + ".replaced"):
        path += ".replaced"
    if not is_checkpoint_dir(path):
        raise FileNotFoundError(
            f"{os.path.join(root, MARKER)} names iteration {iteration} but {path} is not a "
            "complete checkpoint (was it deleted or moved?)"
        )
    return path, iteration


def maybe_kill(point: str, iteration: int) -> None:
    """The crash-safety tests' hook (see the module docstring)."""
    spec = os.environ.get(KILL_ENV)
    if spec and spec == f"{iteration}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def clear_debris(root: str, final: str, iteration: int) -> None:
    """Rank 0: remove what killed saves left behind (before this save writes anything)."""
    marked = read_marker(root)
    for leftover in glob.glob(os.path.join(root, "iter_*.partial")):
        shutil.rmtree(leftover)
    for leftover in glob.glob(os.path.join(root, "iter_*.replaced")):
        if not (marked is not None and leftover == iteration_dir(root, marked) + ".replaced"):
            shutil.rmtree(leftover)
    if os.path.exists(final) and marked != iteration:
        shutil.rmtree(final)  # renamed but never marked: incomplete as far as loading goes


def publish(root: str, partial: str, final: str, iteration: int) -> None:
    """Rank 0: rename the finished ``partial`` into place, then move the marker."""
    replaced = final + ".replaced"
    if os.path.exists(final):  # a re-save of the marked iteration: keep it until swapped
        if os.path.exists(replaced):
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(partial, final)
    fsync_dir(root)
    maybe_kill("renamed", iteration)
    write_marker(root, iteration)
    if os.path.exists(replaced):
        shutil.rmtree(replaced)
