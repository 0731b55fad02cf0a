"""Start-up checks of what a run reads and writes, before anything expensive is built.

``check_inputs(args, vocab_size)`` runs on every rank right after the flags and the tokenizer
(identical files give identical answers; rank 0 prints): each ``--data-path`` prefix has its
``.bin`` and ``.idx`` and they agree, is not empty, has no token id outside the vocabulary (a
bounded sample of documents is read), and no ``--split`` with a share gets zero documents
(Megatron-Core would loop forever building that split); ``--save`` is writable; ``--load``
exists unless it is also ``--save`` (the auto-resume pattern). Each failure is a
:class:`~megatron_ext.errors.UsageError` naming the flag, the file and what to do.
"""

from __future__ import annotations

import argparse
import os
import uuid

import numpy as np

from megatron_ext.errors import UsageError

SAMPLE_DOCS = 256  # documents read per file for the vocabulary check: first, last, spread


class DataError(UsageError):
    """A --data-path file (or the tokenizer) the run cannot use."""


def check_inputs(args: argparse.Namespace, vocab_size: int) -> None:
    if not args.mock_data:
        for prefix in data_prefixes(args.data_path):
            check_dataset(prefix, vocab_size, args.split)
    check_save_dir(args.save)
    check_load_path(args.load, args.save)


# ------------------------------------------------------------------------------------- data
def data_prefixes(data_path: list[str]) -> list[str]:
    """The prefixes of ``--data-path [weight] prefix ...`` (Megatron-LM's blend syntax)."""
    if not data_path:
        raise DataError("--data-path is empty: pass PREFIX [PREFIX ...] or WEIGHT PREFIX ...")
    if len(data_path) == 1:
        return list(data_path)
    try:
        float(data_path[0])
    except ValueError:
        return list(data_path)
    if len(data_path) % 2:
        raise DataError(
            f"--data-path {' '.join(data_path)}: weights and prefixes must come in pairs "
            "(WEIGHT PREFIX WEIGHT PREFIX ...)"
        )
    for weight in data_path[0::2]:
        try:
            if float(weight) < 0:
                raise ValueError
        except ValueError:
            raise DataError(f"--data-path: {weight!r} is not a weight (a number >= 0)") from None
    return list(data_path[1::2])


def _open(prefix: str):
    from data_tools.indexed_writer import IndexedReader

    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    if prefix.endswith((".bin", ".idx")) and not (os.path.exists(bin_path)):
        stem = prefix[:-4]
        if os.path.exists(stem + ".bin") or os.path.exists(stem + ".idx"):
            raise DataError(
                f"--data-path {prefix}: pass the prefix {stem} (without .bin/.idx); the run "
                "reads both files"
            )
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if len(missing) == 2:
        raise DataError(
            f"--data-path {prefix}: no {bin_path} or {idx_path} (make them with "
            "`python -m data_tools preprocess --output-prefix ...`; the prefix ends in "
            "_text_document)"
        )
    if missing:
        other = idx_path if missing[0] == bin_path else bin_path
        raise DataError(
            f"--data-path {prefix}: {missing[0]} is missing (only {other} exists); an indexed "
            "dataset needs both files"
        )
    try:
        return IndexedReader(prefix)
    except (ValueError, KeyError, OSError) as e:
        raise DataError(f"--data-path {prefix}: unreadable index: {e}") from None


def check_dataset(prefix: str, vocab_size: int, split: str) -> None:
    reader = _open(prefix)
    described = int(np.sum(reader.sequence_lengths, dtype=np.int64))
    if described != reader.n_tokens:
        raise DataError(
            f"--data-path {prefix}: {reader.bin_path} holds {reader.n_tokens} tokens but "
            f"{reader.idx_path} describes {described}: the pair is damaged or mismatched "
            "(preprocess again)"
        )
    if reader.n_documents == 0 or reader.n_tokens == 0:
        raise DataError(f"--data-path {prefix}: the dataset is empty (no documents)")
    check_vocabulary(reader, prefix, vocab_size)
    check_splits(reader, prefix, split)


def _sample(n: int) -> np.ndarray:
    if n <= SAMPLE_DOCS:
        return np.arange(n)
    third = SAMPLE_DOCS // 3
    spread = np.linspace(third, n - third - 1, SAMPLE_DOCS - 2 * third).astype(np.int64)
    return np.unique(np.concatenate([np.arange(third), spread, np.arange(n - third, n)]))


def check_vocabulary(reader, prefix: str, vocab_size: int) -> None:
    """Token ids must be below the tokenizer's vocabulary (else: an IndexError in the first
    forward, or silently meaningless ids in the padding rows)."""
    for doc in _sample(reader.n_documents):
        ids = reader.document(int(doc))
        if ids.size and int(ids.max()) >= vocab_size:
            raise DataError(
                f"--data-path {prefix}: document {int(doc)} of {reader.bin_path} has token id "
                f"{int(ids.max())}, but the tokenizer has {vocab_size} ids: the data was made "
                "with another tokenizer (check --tokenizer-model / --vocab-size)"
            )


def check_splits(reader, prefix: str, split: str) -> None:
    """Megatron-Core builds every split that has a share of ``--split``; one with no document
    makes its sample-index builder loop forever (``GPTDataset._get_num_epochs``)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ZeroDivisionError, ValueError):
        raise DataError(
            f"--split {split}: expected up to three non-negative shares, e.g. 98,2,0"
        ) from None
    n = reader.n_documents
    for name, bounds in zip(("training", "validation", "test"), matrix, strict=True):
        if bounds is None:
            continue
        begin, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
        if end <= begin:
            raise DataError(
                f"--split {split} on the {n} documents of {prefix} leaves the {name} split "
                f"without documents (Megatron-Core would hang building it): give it no share "
                "(e.g. --split 100,0,0 for training only) or use more data"
            )


# ------------------------------------------------------------------------------ checkpoints
def check_save_dir(save: str | None) -> None:
    """--save must be creatable and writable now, not at the first save after hours of
    training."""
    if not save:
        return
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write-test-{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--save {save}: not writable ({e.strerror or e})") from None


def check_load_path(load: str | None, save: str | None) -> None:
    """--load must point at a checkpoint, unless it is the run's own --save (auto-resume:
    nothing there yet means a fresh start)."""
    if not load or (save and os.path.abspath(load) == os.path.abspath(save)):
        return
    from megatron_ext.checkpointing.files import MARKER, is_checkpoint_dir

    if not os.path.exists(load):
        raise UsageError(
            f"--load {load}: no such directory (a misspelled path would train from scratch). "
            "To resume automatically, pass the same directory as --save"
        )
    if not is_checkpoint_dir(load) and not os.path.exists(os.path.join(load, MARKER)):
        raise UsageError(
            f"--load {load}: not a checkpoint (no {MARKER}, no metadata.json). Pass a --save "
            "directory or one of its iter_NNNNNNN directories"
        )
