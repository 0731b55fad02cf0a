"""``python -m megatron_ext.plan``: rank layouts, check a command line, rehearse a recipe.

    python -m megatron_ext.plan --model 8x7b --gpus 64 [--gpu-memory-gb 80] [--seq-length 4096]
        [--global-batch-size 256] [--micro-batch-sizes 1,2,4] [--top 10] [--show-rejected]
    python -m megatron_ext.plan --validate -- <flags> --world-size 64 --gpu-memory-gb 80
    python -m megatron_ext.plan --validate --recipe examples/mixtral_8x7b_64xh100.sh
    python -m megatron_ext.plan rehearse examples/mixtral_8x7b_64xh100.sh [--dry-run]

Exit codes: search 0 (1 if nothing fits); --validate 0 fits, 1 does not fit, 2 invalid layout;
rehearse 0 passed, 1 failed, 2 invalid recipe.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# Megatron-Core announces at import that Apex / Transformer Engine are missing: true on a
# laptop, and irrelevant to planning.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")

from megatron_ext.model import PRESETS  # noqa: E402
from megatron_ext.plan import report, search  # noqa: E402
from megatron_ext.plan.hardware import GPUS  # noqa: E402


def search_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_ext.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(PRESETS), default="8x7b")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GiB per GPU")
    p.add_argument("--seq-length", type=int, default=None, help="default: the preset's")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--micro-batch-sizes", default="1,2,4")
    p.add_argument("--no-recompute", action="store_true", help="skip recomputation layouts")
    p.add_argument(
        "--imbalance",
        type=float,
        default=1.0,
        help="busiest EP rank's tokens over the mean (1.0: a balanced router)",
    )
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--show-rejected", action="store_true", help="list every rejected layout")
    a = p.parse_args(argv)
    hw = GPUS[a.gpu].with_memory(a.gpu_memory_gb)
    seq = a.seq_length or PRESETS[a.model].seq_length
    cands = search.search(
        a.model,
        a.gpus,
        hw,
        seq,
        a.global_batch_size,
        micro_batches=[int(x) for x in a.micro_batch_sizes.split(",")],
        recompute=(False,) if a.no_recompute else search.RECOMPUTE_CHOICES,
        imbalance=a.imbalance,
    )
    print(report.header(a.model, a.gpus, hw, seq, a.global_batch_size))
    print(report.search_report(cands, a.top, a.show_rejected))
    return 0 if any(c.fits and c.error is None for c in cands) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rehearse"]:
        from megatron_ext.plan.rehearse import main as rehearse_main

        return rehearse_main(argv[1:])
    if "--validate" in argv:
        from megatron_ext.plan.validate import main as validate_main

        return validate_main([a for a in argv if a != "--validate"])
    return search_main(argv)


if __name__ == "__main__":
    sys.exit(main())
