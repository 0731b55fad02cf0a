"""``python -m megatron_ext.convert {hf-to-mcore, mcore-to-hf, upcycle} ...`` (see __init__)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from megatron_ext.convert.hf import DTYPES
from megatron_ext.convert.stream import MemoryMeter
from megatron_ext.errors import UsageError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """``"5GB"`` (10^9, as ``save_pretrained``), ``"512MiB"`` (2^20) or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 512MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _common(p: argparse.ArgumentParser, targets: bool = True) -> None:
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
    p.add_argument(
        "--report-memory",
        action="store_true",
        help="measure and print the peak tensor bytes held and the peak RSS growth",
    )
    if targets:
        g = p.add_argument_group("target layout (checked only: the checkpoint loads at any)")
        g.add_argument("--target-tensor-parallel-size", type=int, default=1)
        g.add_argument("--target-pipeline-parallel-size", type=int, default=1)
        g.add_argument("--target-expert-parallel-size", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    import megatron_ext.convert as package

    p = argparse.ArgumentParser(
        prog="python -m megatron_ext.convert",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "hf-to-mcore", help="HF Mixtral / Qwen2-MoE safetensors -> our torch_dist checkpoint"
    )
    _common(a)
    b = sub.add_parser("mcore-to-hf", help="our checkpoint -> HF Mixtral / Qwen2-MoE safetensors")
    _common(b, targets=False)
    b.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    b.add_argument("--hf-config", help="a config.json whose other fields (token ids...) to keep")
    b.add_argument("--rotary-base", type=float, help="if the checkpoint does not record it")
    b.add_argument("--norm-epsilon", type=float, help="if the checkpoint does not record it")
    b.add_argument(
        "--hf-format",
        choices=["mixtral", "qwen2_moe"],
        help="MixtralForCausalLM or Qwen2MoeForCausalLM (default: qwen2_moe for a checkpoint "
        "with shared experts, else mixtral)",
    )
    c = sub.add_parser("upcycle", help="dense Llama/Mistral HF -> SMoE checkpoint")
    _common(c)
    c.add_argument("--num-experts", type=int, required=True)
    c.add_argument("--moe-router-topk", type=int, default=2)
    c.add_argument("--router-init-std", type=float, default=0.02)
    c.add_argument("--seed", type=int, default=1234)
    c.add_argument(
        "--method",
        choices=["copy", "partition"],
        default="copy",
        help="copy: every expert is the dense FFN (or a --granularity segment of it); "
        "partition: the FFN's neurons split into disjoint experts (LLaMA-MoE)",
    )
    c.add_argument("--granularity", type=int, default=1, help="copy: experts of FFN/G")
    c.add_argument(
        "--partition-order",
        choices=["random", "contiguous"],
        default="random",
        help="partition: neurons grouped at random (--seed) or in order",
    )
    c.add_argument(
        "--num-shared-groups",
        type=int,
        default=0,
        help="partition: S more neuron groups form one shared expert",
    )
    return p


def _targets(args) -> tuple[int, int, int]:
    return (
        args.target_tensor_parallel_size,
        args.target_pipeline_parallel_size,
        args.target_expert_parallel_size,
    )


def run(args: argparse.Namespace) -> None:
    from megatron_ext.convert import core, upcycle

    dtype = DTYPES[args.dtype] if args.dtype else None
    meter = MemoryMeter(enabled=args.report_memory)
    start = time.time()
    if args.command == "hf-to-mcore":
        arch = core.hf_to_mcore(args.input, args.output, dtype, meter, _targets(args))
    elif args.command == "upcycle":
        arch = upcycle.upcycle(
            args.input,
            args.output,
            args.num_experts,
            args.moe_router_topk,
            args.router_init_std,
            args.seed,
            dtype,
            meter,
            _targets(args),
            method=args.method,
            granularity=args.granularity,
            order=args.partition_order,
            shared_groups=args.num_shared_groups,
        )
    else:
        template = None
        if args.hf_config:
            with open(args.hf_config) as f:
                template = json.load(f)
        overrides = {"rotary_base": args.rotary_base, "norm_epsilon": args.norm_epsilon}
        arch = core.mcore_to_hf(
            args.input,
            args.output,
            args.max_shard_size,
            dtype,
            meter,
            template,
            overrides,
            args.hf_format,
        )
    print(f"{args.command}: wrote {args.output} in {time.time() - start:.1f}s", flush=True)
    if args.command != "mcore-to-hf":
        print(
            f"train from it: pretrain_mixtral.py --load {args.output} --finetune {arch.flags()}"
            f" (and a tokenizer of {arch.vocab_size} tokens)"
        )
    if args.report_memory:
        print(meter.report(), flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, FileNotFoundError) as e:  # conversion, checkpoint and file problems
        print(f"python -m megatron_ext.convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
