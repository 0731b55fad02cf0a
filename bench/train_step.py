"""A whole training step: ``pretrain_mixtral.py`` against a plain HF transformers loop.

Both sides start from the same weights (ours saved at step 0, exported with our HF converter),
read the same token batches (the HF loop builds our Megatron-Core dataset and reads its
samples in our order), in the same precision, with the same optimiser settings: AdamW (our
Megatron-Core Adam with decoupled weight decay; ``torch.optim.AdamW`` with no decay on 1-D
parameters, as Megatron), constant learning rate, gradient clipping at 1.0, router aux loss
coefficient 0.01 (HF's own ``load_balancing_loss_func``: its normalisation differs from
Megatron's by the top-k and the layer average, so the totals differ slightly; the LM loss of
the first step must agree, and the table shows it).

Each side is a separate process running N steps, timed as a whole (wall clock, and CPU time of
the whole process tree from ``getrusage(RUSAGE_CHILDREN)``). Per-step time = (run of ``--steps``
- run of ``--short``) / (steps - short): start-up, imports, model build and the first steps'
warm-up cancel out. Sides alternate (ours first, then HF first, ...) over ``--reps`` repetitions;
the table gives medians.

    OMP_WAIT_POLICY=PASSIVE python bench/train_step.py --shape issue --reps 3
    OMP_WAIT_POLICY=PASSIVE python bench/train_step.py --shape small --reps 3

Shapes: ``issue`` = 4 layers, hidden 512, FFN 1024, 8 heads / 4 KV heads, 8 experts top-2,
vocabulary 32000, 4 x 512 tokens per step; ``small`` = the ``small`` preset (4 layers, hidden
256, FFN 512) at 8 x 256 tokens; ``tiny`` (2 layers, hidden 64) is the test suite's smoke run.

With a GPU (``--device auto``, the default, or ``cuda``) both sides run bf16 on CUDA, ours with
``--transformer-impl local`` (SDPA attention, like HF; no Transformer Engine on either side).

Then (unless ``--no-breakdown``) one more run of ours under ``--profile --use-pytorch-profiler``
(``megatron_ext/profiling.py``) prints where our step's time goes: forward attention, forward MoE,
output layer + loss, backward, grad machinery, optimizer, logging.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {
    "issue": (
        "--num-layers 4 --hidden-size 512 --ffn-hidden-size 1024 --num-attention-heads 8"
        " --group-query-attention --num-query-groups 4 --num-experts 8 --moe-router-topk 2"
        " --seq-length 512 --max-position-embeddings 4096 --micro-batch-size 4"
        " --global-batch-size 4 --vocab-size 32000 --normalization RMSNorm --swiglu"
        " --disable-bias-linear --untie-embeddings-and-output-weights"
        " --position-embedding-type rope --rotary-base 1000000"
    ),
    "small": "--model small --micro-batch-size 8 --global-batch-size 8",
    "tiny": "--model tiny --micro-batch-size 2 --global-batch-size 2 --vocab-size 1024",
}
TRAINING = (
    "--cpu --mock-data --tokenizer-type NullTokenizer --attention-dropout 0 --hidden-dropout 0"
    " --eval-iters 0 --eval-interval 1000000 --log-interval 1 --seed 1234 --lr 1e-4"
    " --min-lr 1e-4 --lr-decay-style constant --lr-warmup-iters 0 --weight-decay 0.1"
    " --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0"
    " --moe-aux-loss-coeff 0.01"
)


def our_flags(shape: str, device: str = "cpu") -> list[str]:
    """Our command line; on CUDA in bf16 with the local spec (SDPA attention: HF's kernels,
    no Transformer Engine on either side)."""
    flags = f"{SHAPES[shape]} {TRAINING}".split()
    if shape != "tiny" and "--vocab-size" not in flags:
        flags += ["--vocab-size", "32000"]
    if device == "cuda":
        flags.remove("--cpu")
        flags += ["--bf16", "--transformer-impl", "local"]
    return flags


# ------------------------------------------------------------------------------ the HF side
def hf_loop(model_dir: str, flags: list[str], steps: int) -> list[float]:
    """A plain loop a user would write: HF model, torch AdamW, clip, the same batches."""
    import torch
    from transformers import MixtralForCausalLM

    from megatron_ext import data
    from megatron_ext.arguments import parse_args

    args = parse_args(flags + ["--train-iters", str(steps)], 1)
    train_ds = data.build_datasets(args, data.build_tokenizer(args))[0]
    torch.manual_seed(args.seed)
    device, dtype = ("cuda", torch.bfloat16) if args.bf16 else ("cpu", torch.float32)
    model = MixtralForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    model.config.router_aux_loss_coef = args.moe_aux_loss_coeff
    model.train()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay,
          "weight_decay": 0.0}],
        lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
    )  # fmt: skip
    mb, losses = args.micro_batch_size, []
    for step in range(steps):
        samples = [train_ds[(step * mb + i) % len(train_ds)] for i in range(mb)]
        batch = {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
        out = model(batch["tokens"], output_router_logits=True)
        logits = out.logits.float()
        ce = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), batch["labels"].view(-1), reduction="none"
        )
        mask = batch["loss_mask"].view(-1).float()
        lm = (ce * mask).sum() / mask.sum()
        loss = lm + args.moe_aux_loss_coeff * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        losses.append(lm.item())
        print(f"hf iter {step + 1} lm loss {lm.item():.6f}", flush=True)
    return losses


# ------------------------------------------------------------------------------- the runs
def _timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def _commands(side: str, steps: int, work: str, flags: list[str]) -> list[str]:
    py = sys.executable
    if side == "ours":
        return [py, "pretrain_mixtral.py", *flags, "--train-iters", str(steps),
                "--load", f"{work}/ref", "--finetune"]  # fmt: skip
    return [py, os.path.abspath(__file__), "--hf-loop", f"{work}/ref_hf", "--steps", str(steps),
            "--flags", json.dumps(flags)]  # fmt: skip


def _losses(side: str, stdout: str) -> list[float]:
    if side == "ours":
        pattern = r"iter +\d+/\d+ .*?lm loss ([0-9.e+-]+)"
    else:
        pattern = r"hf iter \d+ lm loss ([0-9.e+-]+)"
    return [float(x) for x in re.findall(pattern, stdout)]


def prepare(work: str, flags: list[str], env: dict) -> None:
    """Our step-0 weights, saved and exported to HF."""
    py = sys.executable
    save = [py, "pretrain_mixtral.py", *flags, "--train-iters", "1", "--lr", "0", "--min-lr",
            "0", "--save", f"{work}/ref"]  # fmt: skip
    _timed(save, env)
    _timed([py, "-m", "megatron_ext.convert", "mcore-to-hf", "--input", f"{work}/ref",
            "--output", f"{work}/ref_hf"], env)  # fmt: skip


def compare(shape: str, steps: int, short: int, reps: int, device: str = "cpu") -> dict:
    flags = our_flags(shape, device)
    env = dict(os.environ)
    results = {"ours": [], "hf": []}
    first_losses = {}
    with tempfile.TemporaryDirectory() as work:
        prepare(work, flags, env)
        for rep in range(reps):
            order = ["ours", "hf"] if rep % 2 == 0 else ["hf", "ours"]
            for side in order:
                long_w, long_c, out = _timed(_commands(side, steps, work, flags), env)
                short_w, short_c, _ = _timed(_commands(side, short, work, flags), env)
                n = steps - short
                results[side].append(((long_w - short_w) / n, (long_c - short_c) / n))
                first_losses.setdefault(side, _losses(side, out)[:3])
    tokens = int(_flag(flags, "--global-batch-size")) * int(_seq(flags))
    return {"results": results, "first_losses": first_losses, "tokens": tokens}


def _flag(flags, name):
    return flags[flags.index(name) + 1]


def _seq(flags):
    if "--seq-length" in flags:
        return _flag(flags, "--seq-length")
    from megatron_ext.model.presets import PRESETS

    return PRESETS[_flag(flags, "--model")].seq_length


BREAKDOWN_STEPS = (3, 6)  # profiled iterations (0-based, end excluded), after the warm-up


def breakdown(shape: str, device: str = "cpu") -> str:
    """Our step under torch.profiler: the per-phase table ``pretrain_mixtral.py`` prints."""
    flags, env = our_flags(shape, device), dict(os.environ)
    start, end = BREAKDOWN_STEPS
    cmd = [sys.executable, "pretrain_mixtral.py", *flags, "--train-iters", str(end + 1),
           "--profile", "--use-pytorch-profiler", "--profile-step-start", str(start),
           "--profile-step-end", str(end)]  # fmt: skip
    return table_of(_timed(cmd, env)[2])


def table_of(stdout: str) -> str:
    lines = stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("profile of"))
    last = next(i for i in range(first, len(lines)) if "whole step" in lines[i])
    return "\n".join(lines[first : last + 1])


def report(shape: str, out: dict) -> str:
    rows = []
    med = {
        side: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
        for side, r in out["results"].items()
    }
    for side, (wall, cpu) in med.items():
        rows.append(
            f"| {side} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | {out['tokens'] / wall:,.0f} "
            f"| {med['hf'][0] / wall:.2f} | {med['hf'][1] / cpu:.2f} |"
        )
    losses = out["first_losses"]
    return "\n".join(
        [
            f"shape {shape}: {out['tokens']} tokens per step, repetitions "
            f"{len(out['results']['ours'])} (per-step medians)",
            "",
            "| side | wall (ms/step) | CPU (ms/step) | tokens/s (wall) | vs HF (wall) "
            "| vs HF (CPU) |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"first LM losses: ours {losses.get('ours')}, HF {losses.get('hf')}",
        ]
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="issue")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--short", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-breakdown", action="store_true", help="skip the profiled run of ours")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cuda: both sides in bf16 on the GPU (auto: cuda when one is there)",
    )
    p.add_argument("--hf-loop", metavar="HF_DIR", help=argparse.SUPPRESS)
    p.add_argument("--flags", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hf_loop:
        hf_loop(a.hf_loop, json.loads(a.flags), a.steps)
        return 0
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = compare(a.shape, a.steps, a.short, a.reps, device)
    print(f"device: {device} ({'bf16' if device == 'cuda' else 'fp32'})", flush=True)
    print(report(a.shape, out), flush=True)
    if not a.no_breakdown:
        print("\n" + breakdown(a.shape, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
