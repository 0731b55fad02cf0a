"""``train-tokenizer``: a Mixtral-like SentencePiece model from JSONL documents.

Writes ``MODEL_PREFIX.model`` and ``MODEL_PREFIX.vocab``. Settings follow Mixtral's
``tokenizer.model.v1``: ``<unk>``=0, ``<s>``=1, ``</s>``=2 (EOS, Megatron's EOD), no pad,
byte fallback (any text encodes, nothing maps to ``<unk>``), identity normalization, extra
whitespace kept, dummy ``▁`` prefix, digits split, whitespace-only pieces allowed; BPE (default)
or unigram. Training sentences are the non-empty lines of each document, so no piece contains
a newline (a newline encodes as the byte piece ``<0x0A>``, as in Mixtral) and ``decode(encode(
text)) == text`` for any text. Sampling of sentences is seeded (``--seed``).
"""

from __future__ import annotations

import os
import sys

from .jsonl import InputSource, read_batches
from .preprocess import UsageError


def add_arguments(p) -> None:
    p.add_argument("--input", required=True, help="JSONL file (.gz ok, - for stdin)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled")
    p.add_argument("--character-coverage", type=float, default=0.99995)
    p.add_argument("--threads", type=int, default=None, help="default: CPUs")
    p.add_argument("--seed", type=int, default=0)


def _sentences(path: str, keys: list[str], skipped: dict):
    source = InputSource(path)
    try:
        for batch in read_batches(source, keys, batch_chars=1 << 20):
            for reason, (count, _) in batch.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + count
            for column in batch.values:
                for value in column:
                    for text in [value] if isinstance(value, str) else value:
                        for line in text.split("\n"):
                            if line.strip():
                                yield line
    finally:
        source.close()


def train(
    input_path: str,
    model_prefix: str,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    json_keys: tuple[str, ...] = ("text",),
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.99995,
    threads: int | None = None,
    seed: int = 0,
) -> str:
    """Train and return the path of the ``.model`` file."""
    import sentencepiece as spm

    if input_path != "-" and not os.path.isfile(input_path):
        raise UsageError(f"--input: no such file: {input_path}")
    if vocab_size < 300:
        raise UsageError("--vocab-size must be at least 300 (256 byte pieces + specials + text)")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(seed)
    skipped: dict = {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(input_path, list(json_keys), skipped),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        num_threads=threads or len(os.sched_getaffinity(0)),
        minloglevel=2,
    )
    if skipped:
        print(f"data-tools train-tokenizer: skipped lines {skipped}", file=sys.stderr)
    return model_prefix + ".model"


def run(args) -> str:
    path = train(
        args.input,
        args.model_prefix,
        args.vocab_size,
        args.model_type,
        tuple(args.json_keys),
        args.max_sentences,
        args.character_coverage,
        args.threads,
        args.seed,
    )
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    print(
        f"data-tools train-tokenizer: wrote {path} ({sp.get_piece_size()} pieces, "
        f"{args.model_type}); use --tokenizer-type SentencePieceTokenizer "
        f"--tokenizer-model {path}",
        file=sys.stderr,
    )
    return path
