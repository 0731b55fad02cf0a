"""``preprocess`` end to end: byte identity with Megatron-LM's semantics, round trip, inputs.

The reference is ``megatron_reference`` (Megatron-Core's tokenizer classes and
IndexedDatasetBuilder, driven exactly as tools/preprocess_data.py drives them). uint16 is
covered by the real Mixtral tokenizer (32000 ids); int32 by a HuggingFace WordLevel tokenizer
built here with 70000 ids (real words of the sample corpus plus filler entries), since no
tokenizer that large ships with our packages and SentencePiece cannot learn 65500+ pieces from a
few MB.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_data_tools_helpers import (
    cli,
    file_bytes,
    first_docs,
    megatron_reference,
    mixtral,
    preprocess_args,
    sample_corpus,
    trained_model,
)

from data_tools.indexed_writer import IndexedReader
from data_tools.tokenizers import build_tokenizer


def test_identical_to_megatron_mixtral(tmp_path: Path):
    corpus = sample_corpus(1.0)
    cli(*preprocess_args(corpus, str(tmp_path / "ours"), None, "--append-eod", "--keep-newlines"))
    megatron_reference(corpus, str(tmp_path / "ref"), mixtral())
    assert file_bytes(str(tmp_path / "ours")) == file_bytes(str(tmp_path / "ref"))
    r = IndexedReader(str(tmp_path / "ours_text_document"))
    assert r.dtype == np.uint16 and r.n_documents > 50


def test_identical_without_eod_and_without_newline_split(tmp_path: Path):
    corpus = first_docs(sample_corpus(1.0), 20)
    cli(*preprocess_args(corpus, str(tmp_path / "a"), None, "--no-newline-split"))
    cli(*preprocess_args(corpus, str(tmp_path / "b"), None, "--batch-mb", "0.01"))
    megatron_reference(corpus, str(tmp_path / "ref"), mixtral(), append_eod=False)
    ref = file_bytes(str(tmp_path / "ref"))
    assert file_bytes(str(tmp_path / "a")) == ref
    assert file_bytes(str(tmp_path / "b")) == ref


def _hf_tokenizer(folder: Path, corpus: str, size: int = 70000) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    counts: dict[str, int] = {}
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            for w in re.findall(r"\w+|[^\w\s]", json.loads(line)["text"]):
                counts[w] = counts.get(w, 0) + 1
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    fillers = size - len(vocab) - len(counts)
    for i in range(max(0, fillers)):  # real words get the ids above 65535
        vocab[f"<filler{i}>"] = len(vocab)
    for w in sorted(counts, key=lambda w: (-counts[w], w)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))
    return str(folder)


def test_identical_huggingface_int32(tmp_path: Path):
    corpus = first_docs(sample_corpus(1.0), 30)
    model = _hf_tokenizer(tmp_path / "hf", corpus)
    args = preprocess_args(corpus, str(tmp_path / "ours"), model, "--append-eod")
    args[args.index("Llama2Tokenizer")] = "HuggingFaceTokenizer"
    cli(*args)
    megatron_reference(corpus, str(tmp_path / "ref"), model, library="huggingface")
    assert file_bytes(str(tmp_path / "ours")) == file_bytes(str(tmp_path / "ref"))
    r = IndexedReader(str(tmp_path / "ours_text_document"))
    assert r.dtype == np.int32
    assert int(r.document(0).max()) > 65535  # ids that uint16 could not hold


def test_several_keys_sentence_lists_and_empty_documents(tmp_path: Path):
    """Megatron's rarer paths: lists of sentences, several keys, --keep-empty."""
    rows = [
        {"text": "First document.\nWith two lines.", "title": "One"},
        {"text": ["A pre-split", "", " sentence list."], "title": ""},
        {"text": "", "title": "Only a title"},
        {"text": [], "title": "Empty list"},
        {"text": "Last one.", "title": "Four"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ("text", "title")
    extra = ("--append-eod", "--keep-empty", "--json-keys", *keys)
    cli(*preprocess_args(str(src), str(tmp_path / "ours"), None, *extra))
    megatron_reference(str(src), str(tmp_path / "ref"), mixtral(), keys=keys)
    for key in keys:
        assert file_bytes(str(tmp_path / "ours"), key) == file_bytes(str(tmp_path / "ref"), key)
    # without --keep-empty nothing is dropped here either: every line has a non-empty key
    cli(*preprocess_args(str(src), str(tmp_path / "d"), None, "--json-keys", *keys))
    assert IndexedReader(str(tmp_path / "d_text_document")).n_documents == 5


def test_empty_list_beside_a_sentence_list_shifts_nothing(tmp_path: Path):
    """Regression: a 2-sentence document and an empty list in one batch made as many sequences
    as documents, per-sequence token counts were read as per-document ones, the empty document
    was kept and .bin got one EOD more than .idx described (every later document shifted)."""
    rows = [{"text": ["s1", "s2"]}, {"text": []}, {"text": "hello"}, {"text": "world"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli(*preprocess_args(str(src), str(tmp_path / "keep"), None, "--append-eod", "--keep-empty"))
    megatron_reference(str(src), str(tmp_path / "ref"), mixtral())
    assert file_bytes(str(tmp_path / "keep"), "text") == file_bytes(str(tmp_path / "ref"), "text")
    cli(*preprocess_args(str(src), str(tmp_path / "o"), None, "--append-eod"))
    r = IndexedReader(str(tmp_path / "o_text_document"))
    tok = build_tokenizer("Llama2Tokenizer", mixtral())
    assert r.n_documents == 3  # the empty list is dropped, as documented
    assert r.n_tokens == sum(len(r.document(i)) for i in range(3))
    assert r.n_tokens * 2 == (tmp_path / "o_text_document.bin").stat().st_size
    docs = [r.document(i) for i in range(3)]
    assert all(int(d[-1]) == tok.eod for d in docs)
    assert [tok.decode(d[:-1]) for d in docs[1:]] == ["hello", "world"]


def test_round_trip_and_eod(tmp_path: Path):
    corpus = sample_corpus(1.0)
    stats = tmp_path / "stats.json"
    cli(
        *preprocess_args(
            corpus, str(tmp_path / "o"), None, "--append-eod", "--stats-json", str(stats)
        )
    )
    tok = build_tokenizer("Llama2Tokenizer", mixtral())
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    r = IndexedReader(str(tmp_path / "o_text_document"))
    assert r.n_documents == len(texts)
    for i, text in enumerate(texts):
        ids = r.document(i)
        assert int(ids[-1]) == tok.eod == 2
        assert tok.decode(ids[:-1]) == text
    s = json.loads(stats.read_text())
    assert s["documents"] == len(texts) and s["tokens"] == r.n_tokens and s["skipped"] == {}


def test_newline_split_is_exact_on_corpus():
    texts = [json.loads(line)["text"] for line in open(sample_corpus(1.0), encoding="utf-8")]
    texts += ["\n", "\n\n a \n", "x" * 600 + "\n" + " " * 300 + "\ny", "tab\t\n\ttab\r\n"]
    for model in (mixtral(), trained_model("bpe"), trained_model("unigram")):
        fast = build_tokenizer("SentencePieceTokenizer", model, threads=2)
        plain = build_tokenizer("SentencePieceTokenizer", model, split_newlines=False)
        # unigram Viterbi ties break differently on chunks: the shortcut must stay off there
        assert fast.split_newlines == ("unigram" not in model), model
        a, la = fast.encode_batch(texts)
        b, lb = plain.encode_batch(texts)
        assert np.array_equal(a, b) and np.array_equal(la, lb)


def test_gzip_and_stdin_inputs(tmp_path: Path):
    corpus = first_docs(sample_corpus(1.0), 10)
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(Path(corpus).read_bytes()))
    cli(*preprocess_args(corpus, str(tmp_path / "plain"), None, "--append-eod"))
    cli(*preprocess_args(str(gz), str(tmp_path / "gz"), None, "--append-eod"))
    with open(corpus, "rb") as f:
        cli(*preprocess_args("-", str(tmp_path / "stdin"), None, "--append-eod"), stdin=f)
    ref = file_bytes(str(tmp_path / "plain"))
    assert file_bytes(str(tmp_path / "gz")) == ref
    assert file_bytes(str(tmp_path / "stdin")) == ref


def test_zstd_input_of_several_frames_gives_the_same_bytes(tmp_path: Path):
    """``.jsonl.zst`` (SlimPajama, RedPajama): recognised by its magic bytes, several
    concatenated frames read as one stream; the output equals the plain JSONL run's."""
    import zstandard

    corpus = first_docs(sample_corpus(1.0), 10)
    data = Path(corpus).read_bytes()
    cut = data.index(b"\n", len(data) // 3) + 1  # frames need not end at a line boundary
    frames = [zstandard.ZstdCompressor(level=3).compress(part) for part in (data[:cut], data[cut:])]
    zst = tmp_path / "in.jsonl.zst"
    zst.write_bytes(b"".join(frames))
    cli(*preprocess_args(corpus, str(tmp_path / "plain"), None, "--append-eod"))
    cli(*preprocess_args(str(zst), str(tmp_path / "zst"), None, "--append-eod"))
    assert file_bytes(str(tmp_path / "zst")) == file_bytes(str(tmp_path / "plain"))


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_damaged_compressed_input_is_one_error_naming_the_file(tmp_path: Path, kind: str):
    """A truncated gzip member or a corrupt zstd frame: one line naming the file and the
    decompression error, exit 1, no traceback, no hang."""
    import zstandard

    data = b"".join(b'{"text": "line %d of a damaged file"}\n' % i for i in range(20000))
    packed = gzip.compress(data) if kind == "gzip" else zstandard.ZstdCompressor().compress(data)
    bad = tmp_path / f"in.jsonl.{'gz' if kind == 'gzip' else 'zst'}"
    tail = b"" if kind == "gzip" else bytes(range(256)) * 8  # truncated / overwritten
    bad.write_bytes(packed[: len(packed) // 2] + tail)
    p = cli(*preprocess_args(str(bad), str(tmp_path / "o")), check=False)
    assert p.returncode == 1, p.stderr
    (line,) = [x for x in p.stderr.splitlines() if "error" in x]
    assert line.startswith(f"data-tools preprocess: error: {bad}: damaged {kind} data at or after")
    assert "Traceback" not in p.stderr


def test_gpt_dataset_reads_output(tmp_path: Path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from test_data_tools_helpers import megatron_tokenizer

    corpus = first_docs(sample_corpus(1.0), 20)
    cli(*preprocess_args(corpus, str(tmp_path / "o"), None, "--append-eod"))
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=128,
        blend=([str(tmp_path / "o_text_document")], None),
        split="100,0,0",
        tokenizer=megatron_tokenizer(mixtral()),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [16, None, None], lambda: True, config
    ).build()
    sample = train[0]
    assert sample["tokens"].shape[0] == 128
    assert int(sample["tokens"].max()) < 32000


def test_rejected_flags_and_missing_files(tmp_path: Path):
    corpus = first_docs(sample_corpus(1.0), 3)
    p = cli(*preprocess_args(corpus, str(tmp_path / "o"), None, "--split-sentences"), check=False)
    assert p.returncode == 2 and "--split-sentences is not supported" in p.stderr
    p = cli(*preprocess_args(corpus, str(tmp_path / "o"), None, "--partitions", "2"), check=False)
    assert p.returncode == 2 and "--partitions" in p.stderr
    p = cli(*preprocess_args(str(tmp_path / "nope.jsonl"), str(tmp_path / "o")), check=False)
    assert p.returncode == 2 and "--input: no such file" in p.stderr
    p = cli(*preprocess_args(corpus, str(tmp_path / "o"), str(tmp_path / "x.model")), check=False)
    assert p.returncode == 2 and "--tokenizer-model" in p.stderr
    assert not list(tmp_path.glob("o*"))


def test_missing_output_folder_is_created(tmp_path: Path):
    corpus = first_docs(sample_corpus(1.0), 3)
    p = cli(*preprocess_args(corpus, str(tmp_path / "new" / "dir" / "o")))
    assert "created output folder" in p.stderr
    assert (tmp_path / "new" / "dir" / "o_text_document.idx").is_file()


@pytest.mark.parametrize("mode", ["log", "bar"])
def test_progress_output(tmp_path: Path, mode: str):
    corpus = sample_corpus(1.0)
    extra = ("--log-interval", "10", "--batch-mb", "0.05")
    args = preprocess_args(corpus, str(tmp_path / "o"), None, *extra)
    args[args.index("none")] = mode
    err = cli(*args).stderr
    if mode == "log":
        pattern = (
            r"Processed \d+ documents \(.* docs/s, .* MB/s, .* tokens/s, file 1/1, "
            r"ETA \d\d:\d\d"
        )
        assert len(re.findall(pattern, err)) >= 3, err
    else:
        assert "B/s" in err
    assert "documents written" in err and "skipped lines     : 0" in err
