"""Tokenizers with the exact semantics of Megatron-LM's ``tools/preprocess_data.py``.

Megatron-LM (commit d98e8a6) builds its tokenizer with ``megatron.core.tokenizers``:

* ``Llama2Tokenizer``, ``SentencePieceTokenizer`` and ``GPTSentencePieceTokenizer`` all load
  the SentencePiece library wrapper, which (with the default
  ``--tokenizer-sentencepiece-ignore-extra-whitespaces`` and no special tokens) calls
  ``SentencePieceProcessor.encode_as_ids(text)``: no BOS, no EOS. ``eod`` is the model's
  ``eos_id()`` (2 for Mixtral) and ``vocab_size`` its piece count.
* ``HuggingFaceTokenizer`` loads ``AutoTokenizer.from_pretrained(path, use_fast=True)``, copies
  eos->sep / sep->eos and bos->cls / cls->bos where one is missing, and encodes with
  ``tokenizer(text).input_ids`` (so BOS/EOS are added when the tokenizer's post-processor adds
  them). ``eod`` is the id of ``eos_token``; ``vocab_size`` is ``len(tokenizer)``.

Every tokenizer here encodes a whole batch at once and returns flat numpy arrays:
``tokens`` (all ids of the batch, concatenated) and ``lengths`` (ids per text), so that no
per-document Python objects outlive the call. Neither torch nor megatron is imported.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import numpy as np

SENTENCEPIECE_TYPES = ("Llama2Tokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer")
HUGGINGFACE_TYPES = ("HuggingFaceTokenizer",)
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + HUGGINGFACE_TYPES

# Texts at least this long are encoded in chunks cut just before a newline (see
# SentencePieceTokenizer). SentencePiece's BPE slows down on long inputs; on Python-source and
# prose documents 256-character chunks were ~1.3x faster than whole documents.
NEWLINE_CHUNK_CHARS = 256

# Strings on which the newline-chunking shortcut must reproduce whole-text encoding exactly
# before it is enabled for a model.
_PROBES = (
    "a\nb",
    "\n",
    "\n\n\n",
    "x\n",
    "\nx",
    " \n ",
    "  a  \n  b  \n\n\tc",
    "def f(x):\n    return x  # comment\n\n\nclass A:\n    pass\n",
    "naïve café\nüber straße\n日本語のテキスト\n😀 emoji\n",
    "1234567890\n0987654321\n",
    "line one.\r\nline two.\r\n",
    "\u00a0\n\u2028\n\u3000\n",
)


def mixtral_tokenizer_path() -> str:
    """Path of the real Mixtral tokenizer shipped by ``mistral-common`` (tokenizer.model.v1)."""
    from importlib import resources

    path = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    return str(path)


_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def file_digest(path: str) -> str:
    """sha256 of a tokenizer file, or of the tokenizer files of a (HF model) directory.

    In a directory every regular file counts except model weights (by extension), which can be
    gigabytes and do not change tokenization.
    """
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix not in _WEIGHTS)
    else:
        files = [p]
    for q in files:
        h.update(str(q.relative_to(p) if p.is_dir() else q.name).encode())
        with open(q, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def sentencepiece_model_type(path: str) -> int:
    """``trainer_spec.model_type`` of a SentencePiece model: 1 unigram, 2 BPE, 3 word, 4 char.

    Reads the ModelProto protobuf by hand (field 2 = TrainerSpec, its field 3 = model_type,
    default unigram) so that protobuf is not needed.
    """
    with open(path, "rb") as f:
        buf = f.read()
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = _varint(buf, i)
            continue
        if wire == 5:
            i += 4
            continue
        if wire == 1:
            i += 8
            continue
        if wire != 2:
            raise ValueError(f"{path}: not a SentencePiece model")
        size, i = _varint(buf, i)
        if field == 2:
            spec, j = buf[i : i + size], 0
            while j < len(spec):
                tag, j = _varint(spec, j)
                if tag == (3 << 3):
                    return _varint(spec, j)[0]
                if tag & 7 == 0:
                    _, j = _varint(spec, j)
                elif tag & 7 == 2:
                    n, j = _varint(spec, j)
                    j += n
                elif tag & 7 == 5:
                    j += 4
                elif tag & 7 == 1:
                    j += 8
                else:
                    break
            return 1
        i += size
    return 1


def _flatten(ids: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (concatenated ids as ``dtype``, int64 lengths)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total)
    return tokens, lengths


class SentencePieceTokenizer:
    """SentencePiece model with Megatron's plain ``encode_as_ids`` semantics.

    Speed-up (exact, verified per model): for a BPE model none of whose pieces contains a
    newline, no merge can cross one, and merges on either side happen in the same relative
    order, so a text cut just before each newline encodes as the concatenation of its chunks'
    encodings, except that every chunk after the first gains the dummy-prefix piece ``▁`` in
    front of its leading newline, which is dropped. The model must also round-trip the probe
    strings unchanged (an identity-like normalizer that keeps extra whitespace) and reproduce
    whole-text ids on them; otherwise whole texts are encoded. Unigram models are excluded:
    Viterbi ties (e.g. ``▁▁▁▁▁``+``▁`` vs ``▁``+``▁▁▁▁▁``) are broken differently once cut.
    """

    def __init__(self, model_path: str, threads: int = 1, split_newlines: bool = True):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"--tokenizer-model: no such file: {model_path}")
        self.model_path = model_path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.threads = max(1, int(threads))
        self.vocab_size = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        self.eod = eos if eos >= 0 else None
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self._space_id = None
        self.split_newlines = split_newlines and self._newline_split_is_exact()

    def _encode_lists(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.sp.encode(texts, num_threads=self.threads)

    def _newline_split_is_exact(self) -> bool:
        if sentencepiece_model_type(self.model_path) != 2:
            return False
        sp = self.sp
        space = sp.piece_to_id("▁")
        if space == sp.unk_id() or sp.id_to_piece(space) != "▁":
            return False
        head = sp.encode("\n")
        if len(head) < 2 or head[0] != space:
            return False
        if any("\n" in sp.id_to_piece(i) for i in range(self.vocab_size)):
            return False
        for probe in _PROBES:
            if sp.decode(sp.encode(probe)) != probe:
                return False
        self._space_id = space
        whole = [np.asarray(x, dtype=np.int64) for x in self._encode_lists(list(_PROBES))]
        tokens, lengths = self._encode_chunked(list(_PROBES), np.int64, min_chunk=1)
        if tokens is None:
            return False
        split = np.split(tokens, np.cumsum(lengths)[:-1])
        return all(np.array_equal(a, b) for a, b in zip(whole, split, strict=True))

    @staticmethod
    def _chunks(text: str, min_chunk: int) -> list[str]:
        """Cut ``text`` before newlines into pieces of at least ``min_chunk`` characters."""
        find = text.find
        out = []
        start = 0
        while True:
            cut = find("\n", start + min_chunk)
            if cut < 0:
                out.append(text[start:])
                return out
            out.append(text[start:cut])
            start = cut

    def _encode_chunked(self, texts, dtype, min_chunk):
        """Encode with newline chunking; None when a dropped piece is not ``▁`` (never seen)."""
        pieces: list[str] = []
        counts = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            if len(text) > 2 * min_chunk:
                parts = self._chunks(text, min_chunk)
                pieces.extend(parts)
                counts[i] = len(parts)
            else:
                pieces.append(text)
                counts[i] = 1
        tokens, piece_lengths = _flatten(self._encode_lists(pieces), dtype)
        if len(pieces) == len(texts):
            return tokens, piece_lengths
        firsts = np.zeros(len(pieces), dtype=bool)
        first_index = np.concatenate(([0], np.cumsum(counts)[:-1]))
        firsts[first_index] = True
        starts = np.concatenate(([0], np.cumsum(piece_lengths)[:-1]))
        drop = starts[~firsts]
        if drop.size and not np.all(tokens[drop] == self._space_id):
            return None
        keep = np.ones(tokens.size, dtype=bool)
        keep[drop] = False
        lengths = np.add.reduceat(piece_lengths, first_index) - (counts - 1)
        return tokens[keep], lengths

    def encode_batch(self, texts: list[str], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
        """``texts`` -> (concatenated ids, ids per text), identical to per-text encode_as_ids."""
        if self.split_newlines:
            out = self._encode_chunked(texts, dtype, NEWLINE_CHUNK_CHARS)
            if out is not None:
                return out
        return _flatten(self._encode_lists(texts), dtype)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class HuggingFaceTokenizer:
    """``transformers.AutoTokenizer`` with Megatron's HuggingFaceTokenizer wrapper semantics."""

    def __init__(
        self,
        path: str,
        threads: int = 1,
        use_fast: bool = True,
        include_special_tokens: bool = True,
        trust_remote_code: bool = False,
        vocab_file: str | None = None,
        merge_file: str | None = None,
    ):
        # The Rust thread pool reads this once, when it first starts.
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(threads))))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        from transformers import AutoTokenizer

        if not os.path.exists(path):
            raise FileNotFoundError(f"--tokenizer-model: no such file or folder: {path}")
        kwargs = {"use_fast": use_fast, "trust_remote_code": trust_remote_code}
        if vocab_file is not None:
            kwargs["vocab_file"] = vocab_file
            if merge_file is not None:
                kwargs["merges_file"] = merge_file
        self.model_path = path
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        special = {}
        if tok.sep_token is None and tok.eos_token:
            special["sep_token"] = tok.eos_token
        elif tok.eos_token is None and tok.sep_token:
            special["eos_token"] = tok.sep_token
        if tok.bos_token is None and tok.cls_token:
            special["bos_token"] = tok.cls_token
        if tok.cls_token is None and tok.bos_token:
            special["cls_token"] = tok.bos_token
        special["additional_special_tokens"] = []
        tok.add_special_tokens(special)
        self.tok = tok
        self.include_special_tokens = include_special_tokens
        self.vocab_size = len(tok)
        self.eod = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None
        self.bos = tok.convert_tokens_to_ids(tok.bos_token) if tok.bos_token else None
        self.split_newlines = False

    def encode_batch(self, texts: list[str], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int64)
        if self.include_special_tokens:
            ids = self.tok(texts).input_ids
        else:
            ids = [self.tok.convert_tokens_to_ids(self.tok.tokenize(t)) for t in texts]
        return _flatten(ids, dtype)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.tok.convert_ids_to_tokens(int(i))


def build_tokenizer(
    tokenizer_type: str,
    model: str,
    threads: int = 1,
    split_newlines: bool = True,
    **hf_options,
):
    """Tokenizer for a Megatron ``--tokenizer-type`` name and ``--tokenizer-model`` path."""
    if tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(model, threads=threads, split_newlines=split_newlines)
    if tokenizer_type in HUGGINGFACE_TYPES:
        return HuggingFaceTokenizer(model, threads=threads, **hf_options)
    raise ValueError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
        + ", ".join(TOKENIZER_TYPES)
    )
