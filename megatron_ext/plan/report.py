"""Text output of the planner: the ranked table, rejections with reasons, one layout's memory."""

from __future__ import annotations

from collections import defaultdict

from megatron_ext.plan.hardware import Hardware
from megatron_ext.plan.memory import GIB, RankMemory
from megatron_ext.plan.search import Candidate, rule_of


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def header(model: str, world: int, hw: Hardware, seq: int, gbs: int) -> str:
    return (
        f"Mixtral {model} on {world} x {hw.name} ({hw.memory_gib:g} GiB each, "
        f"{hw.gpus_per_node} per node), sequence {seq}, global batch {gbs}, bf16, "
        "distributed optimizer, overlapped grad reduce / param gather"
    )


def ranked_table(cands: list[Candidate], top: int) -> list[str]:
    width = max([34] + [len(c.name) for c in cands[:top]])
    rows = [
        f"{'#':>3}  {'layout':{width}} {'GiB/GPU':>8} {'static':>7} {'activ.':>7} "
        f"{'step s':>7} {'TFLOP/s':>8} {'MFU':>6} {'bubble':>7}"
    ]
    for i, c in enumerate(cands[:top], 1):
        m, k = c.memory, c.cost
        bubble = k.parts["pipeline bubble"] / k.step_s
        rows.append(
            f"{i:>3}  {c.name:{width}} {gib(m.total):>8} {gib(m.static.total):>7} "
            f"{gib(m.activations.total):>7} {k.step_s:>7.2f} {k.tflops_per_gpu:>8.0f} "
            f"{k.mfu:>6.1%} {bubble:>7.1%}"
        )
    return rows


def search_report(cands: list[Candidate], top: int, show_rejected: bool) -> str:
    fitting = [c for c in cands if c.error is None and c.fits]
    too_big = [c for c in cands if c.error is None and not c.fits]
    invalid = [c for c in cands if c.error is not None]
    out = [
        f"{len(cands)} layouts considered: {len(fitting)} fit, {len(too_big)} valid but do "
        f"not fit, {len(invalid)} invalid.",
        "",
        "Layouts that fit, fastest first (static = weights + grads + optimizer states; "
        "activ. = activations at the peak + transient; GiB/GPU adds the fixed overhead):",
    ]
    out += ranked_table(fitting, top) if fitting else ["    none"]
    if fitting:
        best = fitting[0]
        flags = best.layout.flags()
        out += ["", f"Flags of #1 ({best.name}):", "    " + " ".join(flags)]
    out += ["", f"Valid but over {too_big[0].usable / GIB:g} GiB:" if too_big else ""]
    shown = too_big if show_rejected else too_big[:top]
    for c in shown:
        out.append(f"    {c.name:34} needs {gib(c.memory.total)} GiB on pipeline rank "
                   f"{c.memory.pp_rank}")  # fmt: skip
    if len(shown) < len(too_big):
        out.append(f"    ... {len(too_big) - len(shown)} more (--show-rejected lists all)")
    out += ["", "Invalid (the error pretrain_mixtral.py would give):"]
    groups: dict[str, list[Candidate]] = defaultdict(list)
    for c in invalid:
        groups[rule_of(c.error)].append(c)
    for members in sorted(groups.values(), key=len, reverse=True):
        out.append(f"  {len(members)} layouts, e.g. {members[0].name}: {members[0].error}")
        names = [c.name for c in members]
        if show_rejected:
            out += [f"      {n}: {c.error}" for n, c in zip(names, members, strict=True)]
    if not show_rejected and invalid:
        out.append("  (--show-rejected prints every rejected layout with its own message)")
    return "\n".join(out)


def memory_table(stages: list[RankMemory], usable: float) -> list[str]:
    """Per pipeline stage: static parts, activations, overhead, total, and whether it fits."""
    rows = [
        f"{'pipeline rank':>13} {'weights':>8} {'grads':>7} {'main':>6} {'Adam':>6} "
        f"{'activ.':>7} {'trans.':>7} {'other':>6} {'total GiB':>10}  fits"
    ]
    for m in stages:
        s, a = m.static, m.activations
        rows.append(
            f"{m.pp_rank:>13} {gib(s.weights):>8} {gib(s.grads):>7} {gib(s.main_params):>6} "
            f"{gib(s.optimizer_states):>6} {gib(a.stored):>7} {gib(a.transient):>7} "
            f"{gib(m.overhead):>6} {gib(m.total):>10}  {'yes' if m.total <= usable else 'NO'}"
        )
    return rows
