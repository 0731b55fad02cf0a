"""Rank bodies and helpers shared by test_checkpointing.py and test_convert.py.

Every function that runs on ranks is module-level so ``run_on_ranks`` can import it by name.
"""

from __future__ import annotations

import glob
import json
import os

import torch

COMMON = (
    "--cpu --model tiny --mock-data --vocab-size 1000 --seq-length 64 --micro-batch-size 2"
    " --global-batch-size 8 --attention-dropout 0 --hidden-dropout 0 --eval-iters 0"
    " --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --log-interval 1 --seed 7 --lr 3e-3"
)


def train(argv: list[str], env: dict | None = None) -> list[float]:
    """``pretrain_mixtral.run(argv)`` on this rank (``env`` set first): the per-iteration
    losses. (Ranks are forked from a server started earlier: ``os.environ`` changes made by
    the test after that do not reach them, hence ``env``.)"""
    import pretrain_mixtral

    os.environ.update(env or {})
    return pretrain_mixtral.run(argv)


def forward(argv: list[str], tokens: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """Load ``--load`` into the model built from ``argv`` (one pipeline stage), run one forward
    pass in eval mode; rank 0 returns the full logits ``[B, S, V]`` (gathered over TP) and the
    per-token losses ``[B, S]``."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_ext import checkpointing, engine
    from megatron_ext.arguments import parse_args
    from megatron_ext.model import transformer_config

    args = parse_args(argv, dist.get_world_size())
    engine.initialize(args)
    assert args.pipeline_model_parallel_size == 1
    model, optimizer, scheduler = engine.setup_model_and_optimizer(args, transformer_config(args))
    checkpointing.load(args, model, optimizer, scheduler)
    chunk = model[0]
    chunk.eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = chunk(tokens, positions, None)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        losses = chunk(tokens, positions, None, labels=labels)
    parallel_state.destroy_model_parallel()
    return {"logits": logits, "losses": losses} if dist.get_rank() == 0 else None


def read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update(load_file(path))
    return out


def shard_sizes(directory: str) -> list[int]:
    return [os.path.getsize(p) for p in glob.glob(os.path.join(directory, "*.safetensors"))]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def reshard_hf(src: str, dst: str, max_bytes: int) -> None:
    """Rewrite an HF checkpoint as safetensors shards of at most ``max_bytes`` (one tensor at
    least) with an index, like the published Mixtral checkpoints."""
    import shutil

    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = read_safetensors(src)
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(dst, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
