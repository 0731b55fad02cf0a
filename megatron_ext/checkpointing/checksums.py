"""Checksums of every checkpoint file: written with each save, verified by each load.

A save writes ``checksums.json`` into the checkpoint directory before it is published:
``{"algorithm": "xxh3_64", "files": {name: {"bytes": size, "xxh3_64": hex}}}`` for every file
dist_checkpointing wrote (``*.distcp``, ``.metadata``, ``common.pt``, ``metadata.json``). The
files are hashed right after the write (from the page cache, about 10 GB/s), split over the
ranks (rank r hashes the r-th, (r+W)-th, ... file of the sorted list), and rank 0 writes the
manifest. A load verifies the same way before any tensor is read, so a truncated or overwritten
file is named (``UsageError``) instead of failing deep inside PyTorch's reader, or loading
silently wrong values. ``--no-verify-checkpoint`` skips the check; checkpoints without a
manifest (older ones, converted ones) load unverified, with a note.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist
import xxhash

from megatron_ext.errors import UsageError, agree

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_64"
_CHUNK = 8 << 20


def file_digest(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    return sorted(
        name
        for name in os.listdir(directory)
        if name != MANIFEST and os.path.isfile(os.path.join(directory, name))
    )


def _mine(names: list[str]) -> list[str]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return names[rank::world]


def _gather(local: dict) -> dict:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def write_manifest(directory: str) -> None:
    """Hash the checkpoint's files (all ranks share the work); rank 0 writes the manifest."""
    local = {}
    for name in _mine(_files(directory)):
        path = os.path.join(directory, name)
        local[name] = {"bytes": os.path.getsize(path), ALGORITHM: file_digest(path)}
    files = _gather(local)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump({"algorithm": ALGORITHM, "files": files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())


def verify(directory: str) -> bool:
    """Check every file against the manifest (all ranks share the work, all agree on the
    verdict); False if there is no manifest. Raises ``UsageError`` naming the first bad file."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: unreadable checksum manifest ({e})") from None
    problem = None
    for name in _mine(sorted(files)):
        want, file = files[name], os.path.join(directory, name)
        if not os.path.exists(file):
            problem = f"{file}: missing (the checkpoint is incomplete)"
        elif os.path.getsize(file) != want["bytes"]:
            size = os.path.getsize(file)
            problem = f"{file}: {size} bytes, {want['bytes']} when saved (truncated or replaced)"
        elif file_digest(file) != want[ALGORITHM]:
            problem = f"{file}: contents changed since the save (checksum mismatch)"
        if problem:
            break
    if problem:
        problem += (
            f"; this checkpoint cannot be trusted: load an earlier one (--load {directory}/.. "
            "lists iter_* directories) or pass --no-verify-checkpoint to load it anyway"
        )
    agree(problem)
    return True
