"""``inspect``: what an indexed dataset holds.

Prints dtype, documents, sequences, tokens, document-length statistics (min, mean, median,
max, in tokens), a histogram of document lengths in powers-of-two buckets, and the first
``--docs`` documents: decoded back to text with ``--tokenizer-model`` (EOD shown as the
tokenizer's piece, e.g. ``</s>``), else as token ids.
"""

from __future__ import annotations

import sys

import numpy as np

from .indexed_writer import IndexedReader
from .preprocess import UsageError
from .tokenizers import TOKENIZER_TYPES, build_tokenizer


def add_arguments(p) -> None:
    p.add_argument("prefix", help="dataset prefix, e.g. data/sample_text_document")
    p.add_argument("--docs", type=int, default=3, help="documents to show (default 3)")
    p.add_argument("--max-chars", type=int, default=600, help="characters shown per document")
    p.add_argument("--tokenizer-type", default="Llama2Tokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None, help="decode documents with this model")


def histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Rows ``[lo, hi) count bar`` for power-of-two buckets of ``lengths``."""
    if lengths.size == 0:
        return []
    buckets = np.zeros(64, dtype=np.int64)
    exps = np.zeros(lengths.size, dtype=np.int64)
    nz = lengths > 0
    exps[nz] = np.floor(np.log2(lengths[nz])).astype(np.int64) + 1
    np.add.at(buckets, exps, 1)
    used = np.nonzero(buckets)[0]
    rows = []
    top = buckets.max()
    for e in range(used.min(), used.max() + 1):
        lo, hi = (0, 1) if e == 0 else (1 << (e - 1), 1 << e)
        bar = "#" * int(round(width * buckets[e] / top))
        rows.append(f"  [{lo:>9,}, {hi:>9,}) {buckets[e]:>10,} {bar}")
    return rows


def describe(prefix: str, docs: int = 3, tokenizer=None, max_chars: int = 600) -> str:
    try:
        r = IndexedReader(prefix)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    lengths = r.document_lengths()
    out = [
        f"{prefix}: dtype {r.dtype.name}, {r.n_documents:,} documents, "
        f"{r.n_sequences:,} sequences, {r.n_tokens:,} tokens",
    ]
    if lengths.size:
        out.append(
            f"document length (tokens): min {lengths.min():,}, mean {lengths.mean():,.1f}, "
            f"median {int(np.median(lengths)):,}, max {lengths.max():,}"
        )
        out.append("length histogram (tokens):")
        out.extend(histogram(lengths))
    for i in range(min(docs, r.n_documents)):
        ids = r.document(i)
        out.append(f"--- document {i} ({ids.size:,} tokens) ---")
        if tokenizer is None:
            out.append(" ".join(map(str, ids[:200].tolist())) + (" ..." if ids.size > 200 else ""))
            continue
        eod = getattr(tokenizer, "eod", None)
        tail = ""
        if ids.size and eod is not None and int(ids[-1]) == eod:
            ids, tail = ids[:-1], tokenizer.id_to_piece(eod)
        text = tokenizer.decode(ids)
        if len(text) > max_chars:
            text = text[:max_chars] + f" [... {len(text) - max_chars:,} more characters]"
        out.append(text + (f"\n[{tail}]" if tail else ""))
    return "\n".join(out)


def run(args) -> str:
    tok = None
    if args.tokenizer_model:
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, split_newlines=False)
    text = describe(args.prefix, args.docs, tok, args.max_chars)
    sys.stdout.write(text + "\n")
    return text
