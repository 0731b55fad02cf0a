"""Checkpoint conversion: Hugging Face Mixtral <-> our Megatron-Core checkpoints, and upcycling.

    python -m megatron_ext.convert hf-to-mcore --input mixtral-hf/ --output ckpt/ [--dtype bf16]
    python -m megatron_ext.convert mcore-to-hf --input ckpt/ --output mixtral-hf/
                                   [--max-shard-size 5GB] [--hf-config original/config.json]
    python -m megatron_ext.convert upcycle --input mistral-7b-hf/ --output ckpt/ --num-experts 8
                                   [--moe-router-topk 2] [--router-init-std 0.02] [--seed 1234]

``hf-to-mcore`` and ``upcycle`` write a weights-only ``torch_dist`` checkpoint
(``ckpt/iter_0000000`` and the marker) that ``pretrain_mixtral.py --load ckpt/`` loads at ANY
TP/PP/EP/DP layout: tensors are stored under their global names and dist_checkpointing reshards
at load. ``mcore-to-hf`` reads any of our checkpoints (converted or saved by training, at any
layout) and writes safetensors shards, ``model.safetensors.index.json`` and ``config.json`` for
``transformers.MixtralForCausalLM.from_pretrained``. Every direction streams: memory is bounded
by one shard, not the model (:mod:`megatron_ext.convert.core`). See docs/checkpoints.md.

Modules: :mod:`~megatron_ext.convert.hf` (the tensor mapping), :mod:`~megatron_ext.convert.stream`
(streamed dist_checkpointing reads/writes, memory meter), :mod:`~megatron_ext.convert.core`
(the conversions), :mod:`~megatron_ext.convert.upcycle` (sparse upcycling).
"""
