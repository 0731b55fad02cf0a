"""Sparse upcycling: a Mixtral-style SMoE checkpoint from a dense Llama/Mistral HF checkpoint.

Every layer's dense SwiGLU MLP (``mlp.gate_proj`` / ``up_proj`` / ``down_proj``) becomes each of
the ``--num-experts`` experts (w1 / w3 / w2); the router is freshly initialised (normal, std
``--router-init-std``, seeded per layer), everything else is copied. Because the top-k weights
of a token sum to 1 and every expert equals the dense MLP, the upcycled model computes exactly
the dense model's function at step 0 (Komatsuzaki et al., "Sparse Upcycling", 2022); training
then lets the experts diverge.

The dense checkpoint is streamed shard by shard (see :mod:`megatron_ext.convert.core`); an
MLP tensor is referenced by all E expert pieces, never copied E times in memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

import torch

from megatron_ext.convert import hf, shapes
from megatron_ext.convert.core import check_targets, write_checkpoint
from megatron_ext.convert.hf import Arch, ConversionError
from megatron_ext.convert.stream import MemoryMeter

_DENSE_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight")
_PART = {"gate": "w1", "up": "w3", "down": "w2"}


def router_weight(arch: Arch, layer: int, std: float, seed: int, dtype) -> torch.Tensor:
    """A fresh gate ``[E, H]`` for ``layer``: N(0, std) from a generator seeded per layer (the
    same result whatever order the input shards come in)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + layer)
    weight = torch.empty(arch.num_experts, arch.hidden_size).normal_(0.0, std, generator=gen)
    return weight.to(dtype)


def dense_pieces(arch: Arch, name: str, weight: torch.Tensor) -> tuple[list, list[str]]:
    """Our pieces for one dense HF tensor and the canonical names it covers."""
    found = hf.common_pieces(arch, name, weight)
    if found is not None:
        return found, [name]
    match = _DENSE_MLP.fullmatch(name)
    if match:
        layer, part = int(match.group(1)), _PART[match.group(2)]
        pieces = []
        for e in range(arch.num_experts):
            pieces += hf.expert_pieces(arch, layer, e, part, weight)
        return pieces, [name]
    if name.endswith("rotary_emb.inv_freq"):
        return [], []
    raise ConversionError(f"unexpected tensor {name!r} in the dense checkpoint")


def _parts(src, arch, dtype, seen, std, seed):
    router_dtype = None
    for path, tensors in hf.iter_shards(src, dtype):
        if router_dtype is None:  # the routers go with the first shard, in its dtype
            router_dtype = next(iter(tensors.values())).dtype
            routers = [
                hf.layer_piece(hf.ROUTER, arch, n, router_weight(arch, n, std, seed, router_dtype))
                for n in range(arch.num_layers)
            ]
            pieces = [p for group in routers for p in group]
            del routers
        else:
            pieces = []
        for name, weight in tensors.items():
            shapes.check_shape(arch, name, weight, path)
            found, covered = dense_pieces(arch, name, weight)
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
) -> Arch:
    """Write an upcycled weights-only checkpoint of the dense HF model ``src`` under ``dst``."""
    if num_experts < 1 or not 1 <= topk <= num_experts:
        raise ConversionError(
            f"need 1 <= --moe-router-topk ({topk}) <= --num-experts ({num_experts})"
        )
    cfg, dense = hf.read_config(src, moe=False)
    if cfg.get("model_type") not in ("llama", "mistral", None):
        raise ConversionError(
            f"{src} is a {cfg.get('model_type')!r} model; upcycle reads dense Llama/Mistral"
        )
    arch = replace(dense, num_experts=num_experts, moe_router_topk=topk)
    check_targets(arch, *targets)
    meter = meter or MemoryMeter(enabled=False)
    seen: set[str] = set()
    common = arch.common(f"upcycled:{os.path.abspath(src)}")
    common["upcycled"] = {"num_experts": num_experts, "router_init_std": router_std, "seed": seed}
    parts = _parts(src, arch, dtype, seen, router_std, seed)
    write_checkpoint(
        dst,
        arch,
        common,
        parts,
        meter,
        lambda: hf.check_complete(seen, hf.expected_names(arch, dense=True), src),
    )
    return arch
