"""Expected failures: what a user can fix, reported as one line from one rank.

``UsageError`` covers bad flags, missing or unreadable files, unusable data, checkpoints that do
not fit the run, and an unusable machine; ``pretrain_mixtral.main`` prints it once (rank 0) as
``pretrain_mixtral.py: error: ...`` and exits 2. Everything raising one must raise it on every
rank with the same message (checks that only some ranks can make agree first, see
:func:`agree`). ``TrainingStopped`` is a fault found while training (a NaN loss, say): the same
presentation, exit 1.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input or an unusable environment; the message names the flag or the file."""

    exit_code = 2


class LayoutError(UsageError, ValueError):
    """An invalid combination of flags, found before any model is built."""


def require_flags(cond: bool, message: str) -> None:
    """Raise ``LayoutError(message)`` unless ``cond``: the flag checks' one-line refusal."""
    if not cond:
        raise LayoutError(message)


class TrainingStopped(UsageError):
    """Training cannot go on (non-finite loss or gradients); the message says where to resume."""

    exit_code = 1


def agree(message: str | None, group=None) -> None:
    """Raise the same ``UsageError`` on every rank if any rank has a ``message``.

    For checks only some ranks make (a lock rank 0 takes, the files a rank verified): all ranks
    call this with their own finding (None: fine), and the first rank's message wins."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if message:
            raise UsageError(message)
        return
    found = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, message, group=group)
    first = next((m for m in found if m), None)
    if first:
        raise UsageError(first)


def agreed(check, *args):
    """``check(*args)`` on every rank; a ``UsageError`` any rank raises is raised on all of them
    (the first rank's message), so no rank waits forever for one that stopped."""
    problem, result = None, None
    try:
        result = check(*args)
    except UsageError as e:
        problem = str(e)
    agree(problem)
    return result
