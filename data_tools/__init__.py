"""Data tools for Megatron-Core pretraining: ``python -m data_tools <command>`` (``data-tools``).

See docs/data_tools.md. Commands: preprocess, sample-corpus, train-tokenizer, merge, inspect.
"""
