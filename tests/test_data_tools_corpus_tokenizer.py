"""``sample-corpus`` determinism and content; ``train-tokenizer`` gives a working model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from test_data_tools_helpers import cli, file_bytes, preprocess_args, sample_corpus


def test_sample_corpus_is_byte_identical_and_clean(tmp_path: Path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    secret = "DATA_TOOLS_TEST_SECRET_VALUE"
    cli("sample-corpus", "--output", str(a), "--max-mb", "0.5", env={"DT_SECRET": secret})
    cli("sample-corpus", "--output", str(b), "--max-mb", "0.5")
    assert a.read_bytes() == b.read_bytes()
    data = a.read_bytes()
    assert 0.3e6 < len(data) <= 0.5e6
    assert secret.encode() not in data, "the caller's environment leaked into the corpus"
    docs = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert all(set(d) == {"source", "text"} and len(d["text"]) >= 200 for d in docs)
    assert len({d["text"] for d in docs}) == len(docs)
    assert any(d["source"].startswith("pydoc:") for d in docs)
    assert b" at 0x7f0000000000" in data or b" at 0x" not in data
    # a smaller corpus is made of the same documents (a prefix in source order)
    c = tmp_path / "c.jsonl"
    cli("sample-corpus", "--output", str(c), "--max-mb", "0.2")
    small = {json.loads(line)["source"] for line in c.read_text().splitlines()}
    assert small <= {d["source"] for d in docs}


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer(tmp_path: Path, model_type: str):
    corpus = sample_corpus(1.0)
    prefix = tmp_path / "tok"
    p = cli(
        "train-tokenizer",
        "--input",
        corpus,
        "--model-prefix",
        str(prefix),
        "--vocab-size",
        "800",
        "--model-type",
        model_type,
        "--threads",
        "2",
    )
    assert "SentencePieceTokenizer" in p.stderr
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    assert sp.get_piece_size() == 800
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.eos_id() == 2 and sp.bos_id() == 1 and sp.unk_id() == 0
    text = "Byte fallback: \u00e9\u00e8 \u65e5\u672c\u8a9e \U0001f600\n  two spaces\ttab\n"
    ids = sp.encode(text)
    assert sp.decode(ids) == text and sp.unk_id() not in ids
    out = tmp_path / "o"
    args = preprocess_args(corpus, str(out), str(prefix) + ".model", "--append-eod")
    args[args.index("Llama2Tokenizer")] = "SentencePieceTokenizer"
    cli(*args)
    bin_bytes, _ = file_bytes(str(out))
    assert len(bin_bytes) > 0


def test_train_tokenizer_rejects_tiny_vocab(tmp_path: Path):
    p = cli(
        "train-tokenizer",
        "--input",
        sample_corpus(1.0),
        "--model-prefix",
        str(tmp_path / "t"),
        "--vocab-size",
        "100",
        check=False,
    )
    assert p.returncode == 2 and "--vocab-size" in p.stderr
