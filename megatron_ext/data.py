"""Tokenizer, datasets and batches for pretraining.

Datasets are Megatron-Core's own: ``GPTDataset`` over ``.bin/.idx`` files (made by
``python -m data_tools preprocess``) through ``BlendedMegatronDatasetBuilder``, with
``--data-path [weight] prefix ...`` blends and ``--split``; ``MockGPTDataset`` for ``--mock-data``.

Batches follow Megatron-LM's pretraining sampler, so the data order depends only on the number of
samples consumed: step ``s`` uses global samples ``[s*G, (s+1)*G)``; micro-batch ``j`` of it
takes ``mb*DP`` consecutive samples and data-parallel rank ``r`` the ``r``-th block of ``mb``.
Resuming with ``consumed_samples`` continues the exact sequence, and every layout sees the same
global batch.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from data_tools.tokenizers import build_tokenizer as data_tools_tokenizer
from megatron_ext.preflight import DataError


class DatasetTokenizer:
    """A tokenizer as Megatron-Core's datasets want it: ``eod``, ``vocab_size``, ``pad`` and
    ``unique_identifiers`` (hashed into the dataset index cache names).

    Wraps the tokenizer ``data_tools`` preprocessed the corpus with, so training and
    preprocessing always agree on the vocabulary and the EOD id."""

    def __init__(self, vocab_size: int, eod: int | None, source: str, inner=None):
        self.vocab_size, self.eod, self.source, self.inner = vocab_size, eod, source, inner
        self.pad = -1  # no pad id: Megatron's GPTDataset pads with -1 and masks the loss there

    @property
    def unique_identifiers(self) -> dict:
        kind = type(self.inner).__name__ if self.inner is not None else "NullTokenizer"
        return {"class": kind, "source": self.source, "vocab": self.vocab_size}


def build_tokenizer(args: argparse.Namespace) -> DatasetTokenizer:
    kind, path = args.tokenizer_type, args.tokenizer_model
    if kind == "NullTokenizer" or (args.mock_data and not path):
        if args.vocab_size is None:
            raise DataError(f"--tokenizer-type {kind} / --mock-data needs --vocab-size")
        return DatasetTokenizer(args.vocab_size, args.vocab_size - 1, "null")  # EOD: last id
    if not path:
        raise DataError(f"--tokenizer-type {kind} needs --tokenizer-model")
    if not os.path.exists(path):
        raise DataError(f"--tokenizer-model {path}: no such file or directory")
    try:
        inner = data_tools_tokenizer(kind, path, split_newlines=False)
    except Exception as e:  # noqa: BLE001 (SentencePiece / HF raise many kinds)
        raise DataError(
            f"--tokenizer-model {path}: not a tokenizer --tokenizer-type {kind} can load "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    return DatasetTokenizer(inner.vocab_size, inner.eod, path, inner)


def split_sizes(args: argparse.Namespace) -> list[int]:
    """Samples needed from the train / validation / test splits over the whole run."""
    g = args.global_batch_size
    evals = args.train_iters // args.eval_interval + 1 if args.eval_iters else 0
    return [args.train_iters * g, evals * args.eval_iters * g, args.eval_iters * g]


def build_datasets(args: argparse.Namespace, tokenizer):
    """(train, valid, test) datasets, built with Megatron-Core's blended builder."""
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data else get_blend_from_list(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking is done by the attention itself
        mid_level_dataset_surplus=0.005,
    )
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, split_sizes(args), lambda: True, config).build()


def micro_batches(
    dataset, consumed_samples: int, args: argparse.Namespace
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches, forever from ``consumed_samples`` on (see module docstring).

    On a GPU the tensors are in page-locked memory (as Megatron-LM's ``pin_memory=True`` data
    loader gives them), so that ``get_batch``'s ``non_blocking`` copies are queued on the stream
    instead of waiting for it."""
    pin = torch.cuda.is_available()  # False under --cpu (CPU mode)
    mb = args.micro_batch_size
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    start = consumed_samples
    while True:
        first = start + rank * mb
        samples = [dataset[(first + i) % len(dataset)] for i in range(mb)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        yield {k: v.pin_memory() for k, v in batch.items()} if pin else batch
        start += mb * dp
