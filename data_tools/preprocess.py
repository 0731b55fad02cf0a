"""``preprocess``: JSONL -> Megatron indexed dataset, byte-identical to Megatron-LM.

For every ``--json-keys`` key ``K`` it writes ``{output_prefix}_{K}_document.bin/.idx``, the
files Megatron-LM's ``tools/preprocess_data.py`` (commit d98e8a6) writes for the same input,
tokenizer and flags. Per line, as there: the value under ``K`` (a string, or a list of strings
taken as sentences) is tokenized; each sentence with at least one token becomes a sequence;
with ``--append-eod`` the tokenizer's ``eod`` is appended to a non-empty document's last
sequence; the dtype is uint16 for vocabularies below 65500 ids, else int32.

Where Megatron-LM hangs or crashes (bad lines, see ``jsonl.py``), lines are skipped and counted.
Documents with no token under every key are dropped and counted (Megatron writes them as
documents of zero sequences: ``--keep-empty`` does the same).

Pipeline (threads, memory independent of corpus size): a reader thread parses ~``--batch-mb``
of documents at a time; an encoder thread tokenizes a batch with ``--workers`` native threads
(SentencePiece/HF release the GIL); the main thread appends to the partial files and
checkpoints (``resume.py``).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

import numpy as np

from .indexed_writer import StreamingWriter, optimal_dtype
from .jsonl import BadLine, InputSource, read_batches
from .progress import Progress, format_summary
from .resume import PartialRun, ResumeMismatch, kill_point
from .tokenizers import TOKENIZER_TYPES, build_tokenizer, file_digest

_END = object()


class UsageError(Exception):
    """A bad flag or path, reported before any work starts."""


def output_paths(prefix: str, key: str) -> tuple[str, str]:
    """The files Megatron-LM names for ``key``: ``{prefix}_{key}_document.bin``/``.idx``."""
    stem = f"{prefix}_{key}_document"
    return stem + ".bin", stem + ".idx"


def add_arguments(p) -> None:
    g = p.add_argument_group("Megatron-LM tools/preprocess_data.py flags")
    g.add_argument(
        "--input", required=True, help="JSONL file (plain, gzip or zstd), or - for stdin"
    )
    g.add_argument("--output-prefix", required=True, help="outputs: PREFIX_KEY_document.bin/.idx")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", required=True, help=".model file or HF folder")
    g.add_argument("--vocab-file", default=None, help="HuggingFaceTokenizer only")
    g.add_argument("--merge-file", default=None, help="HuggingFaceTokenizer only")
    g.add_argument("--tokenizer-hf-no-use-fast", action="store_true")
    g.add_argument("--tokenizer-hf-no-include-special-tokens", action="store_true")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--append-eod", action="store_true", help="append EOD to each document")
    g.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: CPUs)")
    g.add_argument(
        "--keep-newlines",
        action="store_true",
        help="accepted; without --split-sentences Megatron never alters the text (no effect)",
    )
    g.add_argument("--log-interval", type=int, default=1000, help="documents between log lines")
    g.add_argument("--partitions", type=int, default=1, help="only 1 (see docs)")
    g.add_argument("--keep-sequential-samples", action="store_true", help="no effect")
    g.add_argument("--lang", default="english", help="no effect without --split-sentences")
    g.add_argument("--split-sentences", action="store_true", help="not supported (rejected)")
    g.add_argument("--find-optimal-num-workers", action="store_true", help="not supported")
    o = p.add_argument_group("data-tools flags")
    o.add_argument("--strict", action="store_true", help="stop at the first bad line")
    o.add_argument("--keep-empty", action="store_true", help="keep empty documents (Megatron)")
    o.add_argument("--overwrite", action="store_true", help="discard an incompatible partial run")
    o.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto")
    o.add_argument("--stats-json", default=None, help="write the closing summary as JSON here")
    o.add_argument("--batch-mb", type=float, default=1.0, help="text per tokenizer call")
    o.add_argument("--checkpoint-interval", type=float, default=30.0, help="seconds")
    o.add_argument(
        "--no-newline-split", action="store_true", help="encode whole texts (slower, same ids)"
    )


def _validate(args) -> None:
    if args.split_sentences:
        raise UsageError(
            "--split-sentences is not supported: it needs NLTK punkt data downloaded at run "
            "time. Documents are tokenized whole, as Megatron-LM does without it."
        )
    if args.find_optimal_num_workers:
        raise UsageError("--find-optimal-num-workers is not supported: set --workers")
    if args.partitions != 1:
        raise UsageError(
            "--partitions must be 1: one stream already uses all --workers threads, and "
            "Megatron-LM's partitions > 1 also reorder documents round-robin"
        )
    if args.input != "-" and not os.path.isfile(args.input):
        raise UsageError(f"--input: no such file: {args.input}")
    if not os.path.exists(args.tokenizer_model):
        raise UsageError(f"--tokenizer-model: no such file or folder: {args.tokenizer_model}")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UsageError(f"--json-keys: repeated key in {args.json_keys}")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.batch_mb <= 0:
        raise UsageError("--batch-mb must be positive")
    if args.tokenizer_type not in ("HuggingFaceTokenizer",):
        for flag in ("vocab_file", "merge_file"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies to HuggingFaceTokenizer only")


def _threaded(items, depth: int, stop: threading.Event):
    """Iterate ``items`` in a daemon thread, ``depth`` results ahead of the consumer."""
    q: queue.Queue = queue.Queue(depth)

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def assemble(tok, batch, dtype, append_eod: bool, keep_empty: bool):
    """Tokenize one batch. Returns (per key: tokens, sequence lengths, document indices
    relative to the batch start), documents kept, empty documents seen."""
    n = batch.n_docs
    encoded = []
    nonempty = np.zeros(n, dtype=bool)
    for column in batch.values:
        one_per_doc = all(type(v) is str for v in column)
        if one_per_doc:
            seqs, seq_doc = column, np.arange(n)
        else:
            seqs, counts = [], []
            for v in column:
                if type(v) is str:
                    seqs.append(v)
                    counts.append(1)
                else:
                    seqs.extend(v)
                    counts.append(len(v))
            seq_doc = np.repeat(np.arange(n), counts)
        tokens, seq_lens = tok.encode_batch(seqs, dtype)
        # (Not len(seqs) == n: a 2-sentence document beside an empty list has as many
        # sequences as documents, and per-sequence counts shifted every later document.)
        if one_per_doc:
            doc_tok = seq_lens
        else:
            doc_tok = np.bincount(seq_doc, weights=seq_lens, minlength=n).astype(np.int64)
        nonempty |= doc_tok > 0
        encoded.append((tokens, seq_lens, seq_doc, doc_tok))
    keep_doc = np.ones(n, dtype=bool) if keep_empty else nonempty
    out = []
    for tokens, seq_lens, seq_doc, doc_tok in encoded:
        kept = seq_lens > 0  # Megatron skips sentences without tokens
        lens, sdoc = seq_lens[kept], seq_doc[kept]
        if append_eod and lens.size:
            last = np.ones(lens.size, dtype=bool)
            last[:-1] = sdoc[:-1] != sdoc[1:]
            lens = lens + last
            tokens = np.insert(tokens, np.cumsum(doc_tok)[doc_tok > 0], tok.eod)
        per_doc = np.bincount(sdoc, minlength=n)[keep_doc]
        out.append((tokens, lens, np.cumsum(per_doc)))
    return out, int(keep_doc.sum()), int(n - nonempty.sum())


def _fingerprint(args, tok, dtype) -> dict:
    fp = {
        "input": "-" if args.input == "-" else os.path.abspath(args.input),
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_sha256": file_digest(args.tokenizer_model),
        "json_keys": list(args.json_keys),
        "append_eod": bool(args.append_eod),
        "keep_empty": bool(args.keep_empty),
        "dtype": dtype.name,
        "hf_options": [
            args.vocab_file,
            args.merge_file,
            args.tokenizer_hf_no_use_fast,
            args.tokenizer_hf_no_include_special_tokens,
        ],
    }
    if args.input != "-":
        st = os.stat(args.input)
        fp["input_size"], fp["input_mtime_ns"] = st.st_size, st.st_mtime_ns
    return fp


def _new_stats(args) -> dict:
    return {
        "documents": 0,
        "tokens": 0,
        "lines": 0,
        "input_bytes": 0,
        "empty": 0,
        "skipped": {},
        "seconds": 0.0,
        "resumes": 0,
        "append_eod": bool(args.append_eod),
        "keep_empty": bool(args.keep_empty),
    }


def run(args) -> dict:
    """Run ``preprocess``; returns the closing stats (also printed, and saved as JSON)."""
    _validate(args)
    t_start = time.monotonic()
    workers = args.workers or len(os.sched_getaffinity(0))
    tok = build_tokenizer(
        args.tokenizer_type,
        args.tokenizer_model,
        threads=workers,
        split_newlines=not args.no_newline_split,
        **(
            {
                "use_fast": not args.tokenizer_hf_no_use_fast,
                "include_special_tokens": not args.tokenizer_hf_no_include_special_tokens,
                "trust_remote_code": args.trust_remote_code,
                "vocab_file": args.vocab_file,
                "merge_file": args.merge_file,
            }
            if args.tokenizer_type == "HuggingFaceTokenizer"
            else {}
        ),
    )
    if args.append_eod and tok.eod is None:
        raise UsageError(f"--append-eod: tokenizer {args.tokenizer_model} has no EOS/EOD token")
    dtype = optimal_dtype(tok.vocab_size)
    keys = list(args.json_keys)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
        print(f"data-tools: created output folder {out_dir}", file=sys.stderr)
    try:
        part = PartialRun(args.output_prefix, _fingerprint(args, tok, dtype), args.overwrite)
    except ResumeMismatch as e:
        raise UsageError(str(e)) from None
    state = part.state or {
        "phase": "encode",
        "input": {"offset": 0, "line": 0, "crc": 0, "done": False},
        "outputs": {k: None for k in keys},
        "stats": _new_stats(args),
    }
    stats = state["stats"]
    if part.resumed:
        stats["resumes"] += 1
        print(
            f"data-tools: resuming {args.output_prefix} at input line {state['input']['line']}"
            f" (byte {state['input']['offset']:,})",
            file=sys.stderr,
        )
    finals = {k: output_paths(args.output_prefix, k) for k in keys}
    if state["phase"] == "encode":
        try:
            _encode(args, tok, dtype, keys, part, state, workers, t_start)
        except BadLine as e:
            part.remove()
            raise ValueError(f"--strict: {e}") from None
        kill_point("index")
        state["phase"] = "rename"
        stats["outputs"] = [p for k in keys for p in finals[k]]
        part.save(state)
    moves = [(f"{k}.bin", finals[k][0]) for k in keys] + [(f"{k}.idx", finals[k][1]) for k in keys]
    part.move_outputs(moves)
    part.remove()
    stats = dict(stats, dtype=dtype.name, vocab_size=tok.vocab_size, workers=workers)
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
    print(format_summary(stats), file=sys.stderr)
    return stats


def _encode(args, tok, dtype, keys, part, state, workers, t_start) -> None:
    """Encode the rest of the input into the partial files; ends with all indexes written."""
    stats, inp = state["stats"], state["input"]
    writers = {k: StreamingWriter(part.path(k), dtype, resume=state["outputs"][k]) for k in keys}
    seconds_before = stats["seconds"]

    def checkpoint(done: bool, batch=None) -> None:
        for w in writers.values():
            w.sync()
        if batch is not None:
            inp.update(offset=batch.end_offset, line=batch.end_line, crc=batch.crc)
        inp["done"] = done
        state["outputs"] = {k: w.sizes() for k, w in writers.items()}
        stats["seconds"] = seconds_before + time.monotonic() - t_start
        stats["input_bytes"], stats["lines"] = inp["offset"], inp["line"]
        part.save(state)
        kill_point("checkpoint")

    if not part.resumed:
        checkpoint(False)
    if not inp["done"]:
        source = InputSource(args.input)
        try:
            crc = source.skip_to(inp["offset"])
        except ValueError as e:
            raise UsageError(f"stdin differs from the interrupted run: {e}") from None
        if crc >= 0 and crc != inp["crc"]:
            raise UsageError(
                "stdin differs from the interrupted run (checksum of the first "
                f"{inp['offset']:,} bytes); add --overwrite to start over"
            )
        progress = Progress(args.progress, source.total, args.log_interval, source.position())
        stop = threading.Event()
        batches = _threaded(
            read_batches(
                source,
                keys,
                batch_chars=int(args.batch_mb * 1e6),
                start_line=inp["line"],
                start_crc=inp["crc"],
                strict=args.strict,
            ),
            2,
            stop,
        )
        encoded = _threaded(
            ((b, assemble(tok, b, dtype, args.append_eod, args.keep_empty)) for b in batches),
            2,
            stop,
        )
        docs_run = tokens_run = 0
        last_save = time.monotonic()
        try:
            for batch, (per_key, kept, empty) in encoded:
                for k, (tokens, lens, rel_docs) in zip(keys, per_key, strict=True):
                    w = writers[k]
                    w.append(tokens, lens, w.n_sequences + rel_docs)
                    stats["tokens"] += tokens.size
                    tokens_run += tokens.size
                stats["documents"] += kept
                stats["empty"] += empty
                docs_run += kept
                for reason, (count, first) in batch.skipped.items():
                    entry = stats["skipped"].setdefault(reason, [0, []])
                    entry[0] += count
                    entry[1] = (entry[1] + first)[:5]
                inp.update(offset=batch.end_offset, line=batch.end_line, crc=batch.crc)
                kill_point("batch")
                if time.monotonic() - last_save >= args.checkpoint_interval:
                    checkpoint(False, batch)
                    last_save = time.monotonic()
                progress.update(batch.position, docs_run, tokens_run)
        finally:
            stop.set()
            progress.close()
            source.close()
        checkpoint(True)
    for k, w in writers.items():
        w.close()
        w.write_index(part.path(f"{k}.idx"))
