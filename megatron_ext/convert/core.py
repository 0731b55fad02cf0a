"""The conversions: HF Mixtral -> our checkpoint, our checkpoint -> HF Mixtral.

Memory bound (documented in docs/checkpoints.md, tested in tests/test_convert.py):

* ``hf-to-mcore`` holds one input safetensors shard at a time (plus, with ``--dtype``, its
  converted copy, and the transient copies dist_checkpointing makes while writing it): about
  2x the largest input shard, independent of the model size.
* ``mcore-to-hf`` reads the checkpoint in batches of at most ``--max-shard-size`` bytes (one
  tensor at least) and holds at most one output shard waiting to be written: about 2x
  ``--max-shard-size`` (or the largest single tensor, if larger).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace

import torch
from megatron.core import dist_checkpointing

from megatron_ext import checkpointing
from megatron_ext.convert import hf, shapes
from megatron_ext.convert.hf import Arch, ConversionError
from megatron_ext.convert.hf_config import mixtral_config
from megatron_ext.convert.stream import (
    MemoryMeter,
    ShardWriter,
    StreamingWriter,
    piece,
    publish,
    read_pieces,
    single_process_group,
    stored_tensors,
)


def check_targets(arch: Arch, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """The target layout must divide the model (the checkpoint itself is layout-free)."""
    problems = []
    if arch.num_query_groups % tp or arch.num_attention_heads % tp:
        problems.append(
            f"TP {tp} must divide heads {arch.num_attention_heads} and KV groups "
            f"{arch.num_query_groups}"
        )
    for width in (
        arch.ffn_hidden_size, arch.moe_ffn_hidden_size, arch.moe_shared_expert_intermediate_size
    ):  # fmt: skip
        if width and width % tp:
            problems.append(f"TP {tp} must divide the FFN size {width}")
    if arch.num_layers % pp:
        problems.append(f"PP {pp} must divide the {arch.num_layers} layers")
    if arch.num_experts and arch.num_experts % ep:
        problems.append(f"EP {ep} must divide the {arch.num_experts} experts")
    if problems:
        raise ConversionError("target layout: " + "; ".join(problems))


def write_checkpoint(root: str, arch: Arch, common: dict, parts, meter: MemoryMeter, check) -> str:
    """Stream ``parts`` (an iterable of piece lists) into ``root/iter_0000000`` (weights only)
    and point ``root``'s marker at it; the directory appears only when complete and ``check()``
    (called after the last part) has passed."""
    os.makedirs(root, exist_ok=True)
    partial = checkpointing.iteration_dir(root, 0) + ".partial"
    try:
        with single_process_group():
            writer = StreamingWriter(partial, common)
            writer.write(hf.extra_state_pieces(arch))
            for pieces in parts:
                meter.sample()
                writer.write(pieces)
                del pieces
            check()
            writer.finish()
    except BaseException:  # a refused input (or a kill) leaves no half-written directory
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(root, partial, 0)
    return checkpointing.iteration_dir(root, 0)


def _mixtral_parts(src: str, arch: Arch, dtype, seen: set):
    for path, tensors in hf.iter_shards(src, dtype):
        pieces = []
        for name, weight in tensors.items():
            shapes.check_shape(arch, name, weight, path)
            found, covered = hf.mixtral_pieces(arch, name, weight)
            pieces += found
            seen.update(covered)
        del tensors
        yield pieces
        del pieces


def hf_to_mcore(src: str, dst: str, dtype=None, meter=None, targets=(1, 1, 1)) -> Arch:
    """Convert the HF Mixtral (or Qwen2-MoE) in ``src`` to a weights-only checkpoint under
    ``dst``."""
    from megatron_ext.convert import qwen2_moe

    if qwen2_moe.is_qwen2_moe(src):
        return _convert(src, dst, dtype, meter, targets, qwen2_moe)
    cfg, arch = hf.read_config(src, moe=True)
    if cfg.get("model_type", "mixtral") != "mixtral":
        raise ConversionError(
            f"{src} is a {cfg.get('model_type')!r} model; hf-to-mcore reads Mixtral (for a dense "
            "Llama/Mistral use `upcycle`)"
        )
    return _convert(src, dst, dtype, meter, targets, None, arch)


def _convert(src, dst, dtype, meter, targets, fmt, arch=None) -> Arch:
    """Stream ``src`` (Mixtral when ``fmt`` is None, else the format module ``fmt``)."""
    if fmt is not None:
        _, arch = fmt.read_config(src)
    check_targets(arch, *targets)
    meter = meter or MemoryMeter(enabled=False)
    seen: set[str] = set()
    if fmt is None:
        parts, expected = _mixtral_parts(src, arch, dtype, seen), hf.expected_names(arch)
    else:
        parts, expected = fmt.parts(src, arch, dtype, seen), fmt.expected_names(arch)
    common = arch.common(f"hf:{os.path.abspath(src)}")
    write_checkpoint(
        dst, arch, common, parts, meter, lambda: hf.check_complete(seen, expected, src)
    )
    return arch


# ------------------------------------------------------------------------------ mcore -> HF
def hf_format_of(common: dict) -> str:
    """``qwen2_moe`` for a checkpoint with shared experts, else ``mixtral``."""
    shared = common.get("arch", {}).get("moe_shared_expert_intermediate_size")
    return "qwen2_moe" if shared else "mixtral"


def arch_from_checkpoint(common: dict, overrides: dict | None = None, fmt: str = "mixtral") -> Arch:
    saved, hp = common.get("arch", {}), dict(common.get("hparams") or {})
    hp.update({k: v for k, v in (overrides or {}).items() if v is not None})
    wrong = {
        f: saved.get(f)
        for f, want in (
            ("normalization", "RMSNorm"),
            ("swiglu", True),
            ("position_embedding_type", "rope"),
        )
        if saved.get(f) != want
    }
    if not saved.get("num_experts"):
        wrong["num_experts"] = saved.get("num_experts")
    if wrong:
        raise ConversionError(f"not a Mixtral-style checkpoint: {wrong}")
    beyond = [
        text
        for text, present in (
            (
                "shared experts (--moe-shared-expert-intermediate-size)",
                fmt == "mixtral" and saved.get("moe_shared_expert_intermediate_size"),
            ),
            ("dense layers (--moe-layer-freq)", saved.get("moe_layer_freq", 1) != 1),
        )  # fmt: skip
        if present
    ]
    if beyond:
        hint = "; with shared experts, --hf-format qwen2_moe" if fmt == "mixtral" else ""
        raise ConversionError(
            f"the {fmt} format has no " + " and no ".join(beyond) + ": this checkpoint "
            f"cannot be written as {fmt}{hint}"
        )
    fields = {f: saved[f] for f in Arch.__dataclass_fields__ if f in saved}
    if fmt == "mixtral" and saved.get("moe_ffn_hidden_size"):  # the experts' width
        fields["ffn_hidden_size"] = saved["moe_ffn_hidden_size"]
    for f in ("rotary_base", "norm_epsilon", "max_position_embeddings", "window_size",
              "moe_router_pre_softmax"):  # fmt: skip
        if hp.get(f) is not None:
            fields[f] = hp[f]
    return Arch(**fields)


def _mixtral_mlp(arch: Arch, n: int, req, one):
    """The MLP tensors of layer ``n`` with their HF Mixtral names."""
    L, E, H, F = arch.num_layers, arch.num_experts, arch.hidden_size, arch.ffn_hidden_size
    at, p = (0, n, L), f"model.layers.{n}."
    yield req(hf.ROUTER, (E, H), at, prepend=1), one(p + "block_sparse_moe.gate.weight")
    for e in range(E):
        ex = (at, (1, e, E))
        w = p + f"block_sparse_moe.experts.{e}.w"
        yield req(hf.FC1, (F, H), *ex, (2, 0, 2), prepend=2), one(w + "1.weight")
        yield req(hf.FC1, (F, H), *ex, (2, 1, 2), prepend=2), one(w + "3.weight")
        yield req(hf.FC2, (H, F), *ex, prepend=2), one(w + "2.weight")


def _requests(arch: Arch, stored: dict, mlp=_mixtral_mlp):
    """``((request, shape), unpack)`` items in HF order; ``unpack(tensor of shape) -> [(hf_name,
    tensor)]``; ``mlp(arch, layer, req, one)`` yields the MLP's items of one layer."""
    L, H = arch.num_layers, arch.hidden_size
    d, ng, nh = arch.head_dim, arch.num_query_groups, arch.num_attention_heads

    def req(key, shape, *offsets, prepend=0, mismatch=False):
        """A piece to load; no memory until dist_checkpointing allocates it during the load."""
        if key not in stored:
            raise ConversionError(f"the checkpoint has no tensor {key}")
        meta = torch.empty(shape, dtype=stored[key].dtype, device="meta")
        request = piece(key, meta, *offsets, prepend=prepend, allow_shape_mismatch=mismatch)
        return replace(request, data=None), shape

    def one(name):
        return lambda t: [(name, t)]

    def qkv(n):
        def unpack(t):
            t = t.view(ng, nh // ng + 2, d, H)
            p = f"model.layers.{n}.self_attn."
            return [
                (p + "q_proj.weight", t[:, : nh // ng].reshape(nh * d, H)),
                (p + "k_proj.weight", t[:, nh // ng].reshape(ng * d, H)),
                (p + "v_proj.weight", t[:, nh // ng + 1].reshape(ng * d, H)),
            ]

        return unpack

    yield req(hf.EMB, (arch.vocab_size, H), mismatch=True), one("model.embed_tokens.weight")
    for n in range(L):
        at = (0, n, L)
        p = f"model.layers.{n}."
        yield req(hf.QKV_NORM, (H,), at, prepend=1), one(p + "input_layernorm.weight")
        yield req(hf.QKV, (arch.qkv_rows, H), at, prepend=1), qkv(n)
        yield req(hf.PROJ, (H, nh * d), at, prepend=1), one(p + "self_attn.o_proj.weight")
        yield req(hf.MLP_NORM, (H,), at, prepend=1), one(p + "post_attention_layernorm.weight")
        yield from mlp(arch, n, req, one)
    yield req(hf.FINAL_NORM, (H,)), one("model.norm.weight")
    if arch.untie_embeddings_and_output_weights:
        yield req(hf.OUT, (arch.vocab_size, H), mismatch=True), one("lm_head.weight")


def _batches(items, max_bytes: int):
    batch, size = [], 0
    for request, unpack in items:
        nbytes = math.prod(request[0].local_shape) * request[0].dtype.itemsize
        if batch and size + nbytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append((request, unpack))
        size += nbytes
    if batch:
        yield batch


def mcore_to_hf(
    src: str,
    dst: str,
    max_shard_bytes: int = 5 * 2**30,
    dtype=None,
    meter=None,
    template: dict | None = None,
    overrides: dict | None = None,
    hf_format: str | None = None,
) -> Arch:
    """Write the model of checkpoint ``src`` (a ``--save`` directory or one ``iter_*``) as HF
    safetensors shards plus ``config.json`` into ``dst``: ``MixtralForCausalLM``, or
    ``Qwen2MoeForCausalLM`` (``hf_format`` "qwen2_moe"; the default for checkpoints with
    shared experts)."""
    from megatron_ext.convert import qwen2_moe

    path, _ = checkpointing.resolve(src)
    if path is None:
        raise ConversionError(f"{src}: no checkpoint ({checkpointing.MARKER} missing)")
    meter = meter or MemoryMeter(enabled=False)
    writer = ShardWriter(dst, max_shard_bytes, meter)
    with single_process_group():
        common = dist_checkpointing.load_common_state_dict(path)
        fmt = hf_format or hf_format_of(common)
        arch = arch_from_checkpoint(common, overrides, fmt)
        stored = stored_tensors(path)
        out_dtype = dtype or stored[hf.EMB].dtype
        mlp = qwen2_moe.mlp_requests if fmt == "qwen2_moe" else _mixtral_mlp
        config = (qwen2_moe.hf_config if fmt == "qwen2_moe" else mixtral_config)(
            arch, out_dtype, template
        )  # before any file is written: refuses what the format cannot hold
        for batch in _batches(_requests(arch, stored, mlp), max_shard_bytes):
            loaded = read_pieces(path, {str(i): r for i, ((r, _), _) in enumerate(batch)})
            meter.sample()
            for i, ((_, shape), unpack) in enumerate(batch):
                for name, tensor in unpack(loaded[str(i)].view(shape)):
                    writer.add(name, tensor.to(out_dtype))
            del loaded, batch
    writer.finish()
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return arch
