"""``python -m data_tools <command>`` (console script ``data-tools``).

Commands: ``preprocess`` (JSONL -> Megatron .bin/.idx), ``train-tokenizer`` (SentencePiece),
``merge`` (concatenate indexed datasets), ``inspect`` (counts, histogram, decoded documents),
``sample-corpus`` (reproducible real-text JSONL from the Python standard library).
Exit status: 0 done, 1 error (message on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from . import corpus, inspect, merge, preprocess, train_tokenizer

    p = argparse.ArgumentParser(prog="data-tools", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        "preprocess": (preprocess, "tokenize JSONL into PREFIX_KEY_document.bin/.idx"),
        "train-tokenizer": (train_tokenizer, "train a SentencePiece model from JSONL"),
        "merge": (merge, "merge indexed datasets of the same dtype into one"),
        "inspect": (inspect, "counts, length histogram and first documents of a dataset"),
        "sample-corpus": (corpus, "write the reproducible sample corpus (JSONL)"),
    }
    for name, (module, help_text) in commands.items():
        sp = sub.add_parser(name, help=help_text, description=module.__doc__)
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)
    return p


def main(argv: list[str] | None = None) -> int:
    from .preprocess import UsageError

    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except UsageError as e:
        print(f"data-tools {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"data-tools {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"data-tools {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
