"""``preprocess``: JSONL / Parquet -> Megatron indexed dataset, byte-identical to Megatron-LM.

For every ``--json-keys`` key ``K`` it writes ``{output_prefix}_{K}_document.bin/.idx``, the
files Megatron-LM's ``tools/preprocess_data.py`` (commit d98e8a6) writes for the same input,
tokenizer and flags. Per line, as there: the value under ``K`` (a string, or a list of strings
taken as sentences) is tokenized; each sentence with at least one token becomes a sequence;
with ``--append-eod`` the tokenizer's ``eod`` is appended to a non-empty document's last
sequence; the dtype is uint16 for vocabularies below 65500 ids, else int32.

Where Megatron-LM hangs or crashes (bad lines, see ``jsonl.py``), lines are skipped and counted.
Documents with no token under every key are dropped and counted (Megatron writes them as
documents of zero sequences: ``--keep-empty`` does the same).

``--input`` takes files, globs and folders of JSONL (plain, gzip, zstd) and Parquet, and ``-``
(stdin), read one after the other in the order ``inputs.expand`` gives; ``--shard I/N`` reads
this process's share of them (``inputs.shard_units``) into ``PREFIX-0000I-of-0000N_*``, and
``merge`` of the N shards in order equals one run over all inputs.

Pipeline (threads, memory independent of corpus size): a reader thread parses ~``--batch-mb``
of documents at a time; an encoder thread tokenizes a batch with ``--workers`` native threads
(SentencePiece/HF release the GIL); the main thread appends to the partial files and
checkpoints (``resume.py``) which input unit it is in and how far.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np

from .indexed_writer import StreamingWriter, optimal_dtype
from .inputs import InputError, Shard, Unit, plan, print_plan
from .jsonl import BadLine
from .progress import Progress, format_summary
from .resume import PartialRun, ResumeMismatch, finished_run, kill_point
from .stream import StdinChanged, threaded, unit_batches, unit_start
from .tokenizers import TOKENIZER_TYPES, build_tokenizer, file_digest


class UsageError(Exception):
    """A bad flag or path, reported before any work starts."""


def output_paths(prefix: str, key: str) -> tuple[str, str]:
    """The files Megatron-LM names for ``key``: ``{prefix}_{key}_document.bin``/``.idx``."""
    stem = f"{prefix}_{key}_document"
    return stem + ".bin", stem + ".idx"


def add_arguments(p) -> None:
    g = p.add_argument_group("Megatron-LM tools/preprocess_data.py flags")
    g.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="JSONL (plain, gzip, zstd) or Parquet files, globs, folders (recursive), - for stdin",
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
    o.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="only shard I of N (0 <= I < N) of the inputs; writes PREFIX-0000I-of-0000N_*",
    )
    o.add_argument(
        "--dry-run",
        action="store_true",
        help="check the flags and inputs (Parquet footers, key columns), print what this run or "
        "shard would read, and stop",
    )
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


def plan_inputs(args) -> tuple[list[Unit], Shard | None]:
    """This run's input units (``inputs.plan``), checked before any work."""
    try:
        return plan(args.input, args.shard, list(args.json_keys))
    except InputError as e:
        raise UsageError(str(e)) from None


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


def _fingerprint(args, tok, dtype, units, shard) -> dict:
    return {
        "inputs": [[os.path.abspath(u.file.path), *u.describe()[1:]] for u in units],
        "shard": [shard.index, shard.count] if shard else None,
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


def _new_stats(args) -> dict:
    return {
        "documents": 0,
        "tokens": 0,
        "lines": 0,
        "input_bytes": 0,
        "empty": 0,
        "kinds": {},  # input kind -> {"files", "bytes", "documents", "tokens"}
        "skipped": {},
        "seconds": 0.0,
        "resumes": 0,
        "append_eod": bool(args.append_eod),
        "keep_empty": bool(args.keep_empty),
    }


def run(args) -> dict:
    """Run ``preprocess``; returns the closing stats (also printed, and saved as JSON)."""
    _validate(args)
    units, shard = plan_inputs(args)
    prefix = args.output_prefix + (shard.suffix() if shard else "")
    if args.dry_run:
        keys = list(args.json_keys)
        return print_plan(units, shard, output_paths(prefix, keys[0])[0], len(keys))
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
    out_dir = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
        print(f"data-tools: created output folder {out_dir}", file=sys.stderr)
    finals = {k: output_paths(prefix, k) for k in keys}
    fingerprint = _fingerprint(args, tok, dtype, units, shard)
    outputs = [p for k in keys for p in finals[k]]
    done = finished_run(prefix, fingerprint, outputs) if shard and not args.overwrite else None
    if done is not None:  # a requeued array task whose shard had finished: nothing to redo
        print(f"data-tools: shard {args.shard} already done: {', '.join(outputs)}", file=sys.stderr)
        return dict(done, already_done=True)
    try:
        part = PartialRun(prefix, fingerprint, args.overwrite)
    except ResumeMismatch as e:
        raise UsageError(str(e)) from None
    state = part.state or {
        "phase": "encode",
        "input": unit_start(0),
        "outputs": {k: None for k in keys},
        "stats": _new_stats(args),
    }
    stats = state["stats"]
    if part.resumed:
        stats["resumes"] += 1
        inp = state["input"]
        where = f"input {inp['unit'] + 1} of {len(units)}" if len(units) > 1 else "the input"
        if inp["offset"] is not None:
            where += f" at line/row {inp['line']:,} (byte or row {inp['offset']:,})"
        print(f"data-tools: resuming {prefix} in {where}", file=sys.stderr)
    if state["phase"] == "encode":
        try:
            _encode(args, tok, dtype, keys, units, part, state, workers, t_start)
        except BadLine as e:
            part.remove()
            raise ValueError(f"--strict: {e}") from None
        except StdinChanged as e:
            raise UsageError(str(e)) from None
        kill_point("index")
        state["phase"] = "rename"
        stats["outputs"] = [p for k in keys for p in finals[k]]
        part.save(state)
    moves = [(f"{k}.bin", finals[k][0]) for k in keys] + [(f"{k}.idx", finals[k][1]) for k in keys]
    part.move_outputs(moves)
    stats = dict(stats, dtype=dtype.name, vocab_size=tok.vocab_size, workers=workers)
    part.record_done(stats)
    part.remove()
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=1, sort_keys=True)
    print(format_summary(stats), file=sys.stderr)
    return stats


def _encode(args, tok, dtype, keys, units, part, state, workers, t_start) -> None:
    """Encode the rest of the input into the partial files; ends with all indexes written."""
    stats, inp = state["stats"], state["input"]
    writers = {k: StreamingWriter(part.path(k), dtype, resume=state["outputs"][k]) for k in keys}
    seconds_before = stats["seconds"]

    def checkpoint() -> None:
        for w in writers.values():
            w.sync()
        state["outputs"] = {k: w.sizes() for k, w in writers.items()}
        stats["seconds"] = seconds_before + time.monotonic() - t_start
        part.save(state)
        kill_point("checkpoint")

    if not part.resumed:
        checkpoint()
    if inp["done"]:
        return _close(writers, part)
    total = sum(u.raw_bytes for u in units)
    done_bytes = sum(u.raw_bytes for u in units[: inp["unit"]])
    progress = Progress(args.progress, total or None, args.log_interval, done_bytes, len(units))
    progress.files_done = inp["unit"]
    stop = threading.Event()
    batches = threaded(unit_batches(units, keys, args, dict(inp)), 2, stop)
    encoded = threaded(
        (
            (i, b, None if b is None else assemble(tok, b, dtype, args.append_eod, args.keep_empty))
            for i, b in batches
        ),
        2,
        stop,
    )
    docs_run = tokens_run = 0
    last_save = time.monotonic()
    try:
        for index, batch, result in encoded:
            unit = units[index]
            kind = stats["kinds"].setdefault(
                unit.file.kind, {"files": 0, "bytes": 0, "documents": 0, "tokens": 0}
            )
            if batch is None:  # the unit is finished
                kind["files"] += 1
                inp.clear()
                inp.update(unit_start(index + 1), done=index + 1 == len(units))
                progress.files_done = index + 1
                continue
            per_key, kept, empty = result
            for k, (tokens, lens, rel_docs) in zip(keys, per_key, strict=True):
                w = writers[k]
                w.append(tokens, lens, w.n_sequences + rel_docs)
                stats["tokens"] += tokens.size
                kind["tokens"] += tokens.size
                tokens_run += tokens.size
            stats["documents"] += kept
            kind["documents"] += kept
            stats["empty"] += empty
            stats["lines"] += batch.lines
            stats["input_bytes"] += batch.raw
            kind["bytes"] += batch.raw
            docs_run += kept
            done_bytes += batch.raw
            for reason, (count, first) in batch.skipped.items():
                entry = stats["skipped"].setdefault(reason, [0, []])
                entry[0] += count
                where = [f"{unit.file.path}:{n}" for n in first] if len(units) > 1 else first
                entry[1] = (entry[1] + where)[:5]
            inp.update(unit=index, offset=batch.end_offset, line=batch.end_line, crc=batch.crc)
            kill_point("batch")
            if time.monotonic() - last_save >= args.checkpoint_interval:
                checkpoint()
                last_save = time.monotonic()
            progress.update(done_bytes, docs_run, tokens_run)
    finally:
        stop.set()
        progress.close()
    inp["done"] = True
    checkpoint()
    _close(writers, part)


def _close(writers, part) -> None:
    for k, w in writers.items():
        w.close()
        w.write_index(part.path(f"{k}.idx"))
