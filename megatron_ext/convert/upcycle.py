"""Upcycling: an SMoE checkpoint from a dense Llama/Mistral HF checkpoint.

``--method copy`` (default; Komatsuzaki et al., "Sparse Upcycling", 2022): every layer's dense
SwiGLU MLP (``mlp.gate_proj`` / ``up_proj`` / ``down_proj``) becomes each of the
``--num-experts`` experts (w1 / w3 / w2); the router is freshly initialised (normal, std
``--router-init-std``, seeded per layer), everything else is copied. Because the top-k weights
of a token sum to 1 and every expert equals the dense MLP, the upcycled model computes exactly
the dense model's function at step 0; training then lets the experts diverge. With
``--granularity G`` each expert is one of G segments of the dense FFN (Megatron's granular
upcycling). ``--method partition`` (LLaMA-MoE) splits the FFN's neurons into disjoint experts,
optionally with a shared expert. ``experts_from_dense.py`` has the rules and why the first step
reproduces the dense model (with the printed ``--moe-router-topk-scaling-factor``).

The dense checkpoint is streamed shard by shard (see :mod:`megatron_ext.convert.core`); an
MLP tensor is referenced by all E expert pieces, never copied E times in memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

import torch

from megatron_ext.convert import experts_from_dense as xd
from megatron_ext.convert import hf, shapes
from megatron_ext.convert.core import check_targets, write_checkpoint
from megatron_ext.convert.hf import Arch, ConversionError
from megatron_ext.convert.stream import MemoryMeter, piece

SHARED_FC1 = "decoder.layers.mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "decoder.layers.mlp.shared_experts.linear_fc2.weight"

_DENSE_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight")
_PART = {"gate": "w1", "up": "w3", "down": "w2"}


def router_weight(arch: Arch, layer: int, std: float, seed: int, dtype, plan: xd.ExpertPlan):
    """A fresh gate ``[E, H]`` for ``layer`` from a generator seeded per layer (the same result
    whatever order the input shards come in): N(0, std) rows, one per copy of the FFN (zeros
    for partitioned experts)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + layer)
    return xd.router_rows(plan, arch.hidden_size, std, gen).to(dtype)


def dense_pieces(
    arch: Arch, name: str, weight: torch.Tensor, plan: xd.ExpertPlan
) -> tuple[list, list[str]]:
    """Our pieces for one dense HF tensor and the canonical names it covers."""
    found = hf.common_pieces(arch, name, weight)
    if found is not None:
        return found, [name]
    match = _DENSE_MLP.fullmatch(name)
    if match:
        layer, dense_part = int(match.group(1)), match.group(2)
        pieces = []
        for e in range(arch.num_experts):
            expert = xd.expert_weights(plan, dense_part, weight, e)
            pieces += hf.expert_pieces(arch, layer, e, _PART[dense_part], expert.contiguous())
        if plan.shared_neurons is not None:
            shared = xd.shared_weights(plan, dense_part, weight)
            pieces += shared_pieces(arch, layer, dense_part, shared)
        return pieces, [name]
    if name.endswith("rotary_emb.inv_freq"):
        return [], []
    raise ConversionError(f"unexpected tensor {name!r} in the dense checkpoint")


def shared_pieces(arch: Arch, layer: int, dense_part: str, weight: torch.Tensor) -> list:
    """The shared expert is Megatron's MLP: ``linear_fc1 = [gate; up]`` (SwiGLU halves at rows
    ``[0, Fs)`` and ``[Fs, 2Fs)``), ``linear_fc2 = down``."""
    at = (0, layer, arch.num_layers)
    if dense_part == "down":
        return [piece(SHARED_FC2, weight.contiguous(), at, prepend=1)]
    half = (1, 0 if dense_part == "gate" else 1, 2)
    return [piece(SHARED_FC1, weight.contiguous(), at, half, prepend=1)]


def _parts(src, arch, dtype, seen, std, seed, plan):
    router_dtype = None
    for path, tensors in hf.iter_shards(src, dtype):
        if router_dtype is None:  # the routers go with the first shard, in its dtype
            router_dtype = next(iter(tensors.values())).dtype
            routers = [
                hf.layer_piece(
                    hf.ROUTER, arch, n, router_weight(arch, n, std, seed, router_dtype, plan)
                )
                for n in range(arch.num_layers)
            ]
            pieces = [p for group in routers for p in group]
            del routers
        else:
            pieces = []
        for name, weight in tensors.items():
            shapes.check_shape(arch, name, weight, path)
            found, covered = dense_pieces(arch, name, weight, plan)
            pieces += found
            seen.update(covered)
        del tensors
        yield pieces
        del pieces


def upcycle(
    src: str,
    dst: str,
    num_experts: int,
    topk: int = 2,
    router_std: float = 0.02,
    seed: int = 1234,
    dtype=None,
    meter: MemoryMeter | None = None,
    targets=(1, 1, 1),
    method: str = "copy",
    granularity: int = 1,
    order: str = "random",
    shared_groups: int = 0,
) -> Arch:
    """Write an upcycled weights-only checkpoint of the dense HF model ``src`` under ``dst``."""
    if num_experts < 1 or not 1 <= topk <= num_experts:
        raise ConversionError(
            f"need 1 <= --moe-router-topk ({topk}) <= --num-experts ({num_experts})"
        )
    if method == "copy" and shared_groups:
        raise ConversionError("--num-shared-groups goes with --method partition")
    if method == "partition" and granularity != 1:
        raise ConversionError("--granularity goes with --method copy (a partition's is E)")
    cfg, dense = hf.read_config(src, moe=False)
    if cfg.get("model_type") not in ("llama", "mistral", None):
        raise ConversionError(
            f"{src} is a {cfg.get('model_type')!r} model; upcycle reads dense Llama/Mistral"
        )
    try:
        if method == "partition":
            plan = xd.plan_partition(dense.ffn_hidden_size, num_experts, shared_groups, order, seed)
        else:
            plan = xd.plan_copy(dense.ffn_hidden_size, num_experts, granularity)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    fine = plan.expert_ffn != dense.ffn_hidden_size
    shared = plan.shared_neurons.numel() if plan.shared_neurons is not None else None
    arch = replace(
        dense,
        num_experts=num_experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=plan.expert_ffn if fine else None,
        moe_shared_expert_intermediate_size=shared,
        moe_router_topk_scaling_factor=plan.scaling_factor,
    )
    check_targets(arch, *targets)
    meter = meter or MemoryMeter(enabled=False)
    seen: set[str] = set()
    common = arch.common(f"upcycled:{os.path.abspath(src)}")
    common["upcycled"] = {
        "method": method, "num_experts": num_experts, "granularity": granularity,
        "order": order, "shared_groups": shared_groups, "router_init_std": router_std,
        "seed": seed,
    }  # fmt: skip
    parts = _parts(src, arch, dtype, seen, router_std, seed, plan)
    write_checkpoint(
        dst,
        arch,
        common,
        parts,
        meter,
        lambda: hf.check_complete(seen, hf.expected_names(arch, dense=True), src),
    )
    return arch
