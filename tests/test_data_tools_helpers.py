"""Shared helpers of the data_tools tests (this module holds no tests).

``megatron_reference`` is the reference writer: it mirrors ``Encoder.encode`` and
``Partition.process_json_file`` of Megatron-LM's ``tools/preprocess_data.py`` (commit d98e8a6)
line for line, using Megatron-Core's own tokenizer classes and ``IndexedDatasetBuilder``.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tempdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def mixtral() -> str:
    from data_tools.tokenizers import mixtral_tokenizer_path

    return mixtral_tokenizer_path()


@functools.cache
def sample_corpus(max_mb: float = 1.0) -> str:
    """The sample corpus, built once per test session (cached by size)."""
    from data_tools import corpus

    path = os.path.join(_tempdir("dt-corpus-"), f"sample-{max_mb}.jsonl")
    corpus.build(path, max_mb=max_mb)
    return path


@functools.cache
def trained_model(model_type: str = "bpe", vocab_size: int = 1000) -> str:
    from data_tools import train_tokenizer

    prefix = os.path.join(_tempdir("dt-spm-"), f"spm-{model_type}")
    return train_tokenizer.train(
        sample_corpus(1.0), prefix, vocab_size=vocab_size, model_type=model_type, threads=2
    )


def cli(*args: str, env: dict | None = None, stdin=None, check: bool = True):
    """Run ``python -m data_tools ARGS`` in a subprocess; returns CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", *args],
        env=full_env,
        stdin=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr}")
    return proc


def preprocess_args(inp: str, prefix: str, model: str | None = None, *extra: str) -> list[str]:
    return [
        "preprocess",
        "--input",
        inp,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "Llama2Tokenizer",
        "--tokenizer-model",
        model or mixtral(),
        "--workers",
        "2",
        "--progress",
        "none",
        *extra,
    ]


def file_bytes(prefix: str, key: str = "text") -> tuple[bytes, bytes]:
    stem = f"{prefix}_{key}_document"
    return Path(stem + ".bin").read_bytes(), Path(stem + ".idx").read_bytes()


def megatron_tokenizer(model: str, library: str = "sentencepiece"):
    """Megatron-Core's tokenizer built with the arguments preprocess_data.py passes."""
    from megatron.core.tokenizers import MegatronTokenizer

    if library == "sentencepiece":
        kwargs = dict(chat_template=None, ignore_extra_whitespaces=True, legacy=False)
        kwargs["special_tokens"] = None
    else:
        kwargs = dict(chat_template=None, vocab_file=None, merges_file=None, use_fast=True)
        kwargs.update(additional_special_tokens=[], trust_remote_code=False)
        kwargs["include_special_tokens"] = True
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=model, metadata_path={"library": library}, **kwargs
    )


def megatron_reference(
    jsonl: str,
    prefix: str,
    model: str,
    keys=("text",),
    append_eod: bool = True,
    library: str = "sentencepiece",
) -> None:
    """Write PREFIX_KEY_document.bin/.idx exactly as Megatron-LM's preprocess_data.py does."""
    from megatron.core.datasets import indexed_dataset

    tok = megatron_tokenizer(model, library)
    dtype = indexed_dataset.DType.optimal_dtype(tok.vocab_size)
    builders = {
        k: indexed_dataset.IndexedDatasetBuilder(f"{prefix}_{k}_document.bin", dtype=dtype)
        for k in keys
    }
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            data = json.loads(line)
            for k in keys:
                text = data[k]
                sentences = text if isinstance(text, list) else [text]
                doc_ids, lens = [], []
                for sentence in sentences:
                    ids = tok.tokenize(sentence)
                    if len(ids) > 0:
                        doc_ids.extend(ids)
                        lens.append(len(ids))
                if len(doc_ids) > 0 and append_eod:
                    doc_ids.append(tok.eod)
                    lens[-1] += 1
                builders[k].add_document(doc_ids, lens)
    for k in keys:
        builders[k].finalize(f"{prefix}_{k}_document.idx")


def first_docs(path: str, n: int) -> str:
    """A JSONL file with the first ``n`` lines of ``path`` (next to it)."""
    out = f"{path}.first{n}.jsonl"
    if not os.path.exists(out):
        with open(path, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if i >= n:
                    break
                g.write(line)
    return out
