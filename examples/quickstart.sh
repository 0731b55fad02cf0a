#!/usr/bin/env bash
# The README's main job: train the `small` Mixtral preset on real English text on 2 CPU ranks
# with expert parallelism 2, print the loss going down, write TensorBoard logs to runs/quickstart
# and an HTML report of the run (runs/quickstart/report.html).
# Installs what it needs into .venv first (examples/venv.sh). No downloads of data or weights:
# the corpus is built from text every Python installation carries, the tokenizer is Mixtral's
# own (shipped in the mistral-common package).
set -euo pipefail
source "$(dirname "$0")/venv.sh"

ITERS="${ITERS:-40}"
# Megatron-Core warns on import that apex/TE are absent and about deprecated collectives; the
# demo hides Python warnings to keep its output readable (the tests do not).
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
mkdir -p data runs
TOKENIZER="$(python -c 'import data_tools.tokenizers as t; print(t.mixtral_tokenizer_path())')"
if [ ! -f data/sample.jsonl ]; then
    python -m data_tools sample-corpus --output data/sample.jsonl
fi
python -m data_tools preprocess --input data/sample.jsonl --output-prefix data/sample \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER" --append-eod --workers 2

torchrun --standalone --nproc-per-node 2 pretrain_mixtral.py --cpu \
    --model small --expert-model-parallel-size 2 \
    --data-path data/sample_text_document --split 98,2,0 \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER" \
    --micro-batch-size 4 --global-batch-size 8 \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 5 --lr-decay-style cosine --train-iters "$ITERS" \
    --weight-decay 0.1 --clip-grad 1.0 --attention-dropout 0 --hidden-dropout 0 \
    --init-method-std 0.02 --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 \
    --use-distributed-optimizer \
    --log-interval 5 --eval-interval 20 --eval-iters 2 \
    --tensorboard-dir runs/quickstart

# One HTML page of the run (loss, throughput, expert load), no TensorBoard server needed.
python -m megatron_ext.report runs/quickstart --out runs/quickstart/report.html
