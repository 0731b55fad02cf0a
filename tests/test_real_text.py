"""Training the `tiny` preset on real English text lowers the validation loss below a threshold.

The corpus is the project's reproducible sample corpus (Python's own documentation, rendered
locally), tokenized with Mixtral's real tokenizer through our data_tools, read by Megatron-Core's
GPTDataset. A model that learned nothing sits at ln(32000) = 10.37 nats; predicting the unigram
distribution of this corpus would already be far below that. The threshold, 6.5 nats, needs
the model to learn the corpus's token statistics; 40 steps reached 5.35 when it was written.
"""

import subprocess
import sys

import pytest

from data_tools import corpus
from data_tools.tokenizers import mixtral_tokenizer_path
from megatron_ext.multirank import run_on_ranks

THRESHOLD = 6.5


def _run(argv):
    import pretrain_mixtral

    return pretrain_mixtral.run(argv)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    corpus.build(str(root / "sample.jsonl"), max_mb=1.0)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "preprocess",
            "--input",
            str(root / "sample.jsonl"),
            "--output-prefix",
            str(root / "sample"),
            "--tokenizer-type",
            "Llama2Tokenizer",
            "--tokenizer-model",
            mixtral_tokenizer_path(),
            "--append-eod",
            "--workers",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    return str(root / "sample_text_document")


def check_learns_real_text(dataset, model: str, threshold: float = THRESHOLD) -> None:
    """40 steps of ``--model`` on 2 CPU ranks (EP 2): validation at iterations 20 and 40, the
    second lower and below ``threshold``, training starting at chance."""
    argv = (
        f"--cpu --model {model} --expert-model-parallel-size 2 --data-path {dataset}"
        f" --split 95,5,0 --tokenizer-type Llama2Tokenizer"
        f" --tokenizer-model {mixtral_tokenizer_path()} --seq-length 128 --micro-batch-size 4"
        " --global-batch-size 16 --train-iters 40 --lr 1e-2 --min-lr 1e-3 --lr-warmup-iters 4"
        " --lr-decay-style cosine --clip-grad 1.0 --attention-dropout 0 --hidden-dropout 0"
        " --moe-aux-loss-coeff 1e-2 --log-interval 10 --eval-interval 20 --eval-iters 2"
    ).split()
    history = run_on_ranks(_run, 2, args=(argv,), timeout=600)[-1]
    (first_it, first), (last_it, last) = history.validation[0], history.validation[-1]
    assert (first_it, last_it) == (20, 40)
    assert history[0] > 10.0  # starts at chance over 32000 tokens
    assert last < first
    assert last < threshold, f"validation loss {last:.3f} after 40 steps"


def test_tiny_on_real_text_learns(dataset):
    check_learns_real_text(dataset, "tiny")
