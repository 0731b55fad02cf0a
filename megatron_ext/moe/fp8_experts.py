"""FP8 experts: Transformer Engine's ``GroupedLinear`` running our stacked expert weights.

Shapes legend as in ``experts.py``: M rows for this rank (grouped by local expert), H hidden,
L local experts, Fs the FFN shard of this expert-TP rank.

:class:`TEExperts` holds two ``GroupedLinear`` (``fc1``: H -> 2Fs, ``fc2``: Fs -> H) and the
FP8 row padding modules as registered submodules, so that

* their FP8 metadata (TE's ``_extra_state``: scaling factors, amax history) is in the state
  dict and in the checkpoint (:meth:`TEExperts.sharded_state_dict`), and resumes with it;
* ``model.train()`` / ``model.eval()`` reach them.

TE's own weights are removed: each call binds views of ``GroupedExperts.w13`` / ``w2`` (the
parameters DDP, the optimizer and the checkpoint know) as ``weight{i}``.

``is_first_microbatch`` is passed on: True on the first micro-batch of a global batch (the
pipeline schedule calls Megatron's ``set_is_first_microbatch``, which sets the attribute of the
same name on every module that has one), False after it, so TE casts the weights to FP8 once
per step instead of once per micro-batch. The FP8 autocast itself is Megatron's: its
``TransformerBlock`` enters ``fp8_autocast`` around the layers when ``config.fp8`` is set.

A rank whose experts receive no rows never calls TE (older TE versions crashed or hung on
empty grouped GEMMs, TE PR 3019): the loop path gives the empty output and zero weight
gradients, which DDP's bucket accounting needs from every parameter.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_ext.moe.dispatcher import group_rank, group_size


def transformer_engine_pytorch():
    try:  # Transformer Engine is optional (CUDA only)
        import transformer_engine.pytorch as te
    except ImportError:
        return None
    return te


class TEExperts(torch.nn.Module):
    """The TE modules of one rank's L experts (see the module docstring)."""

    def __init__(self, num_local: int, hidden: int, ffn_shard: int, params_dtype, device):
        super().__init__()
        te = transformer_engine_pytorch()
        if te is None:
            raise RuntimeError("config.fp8 needs Transformer Engine (pip install .[gpu])")
        kw = dict(bias=False, params_dtype=params_dtype, device=device, parallel_mode=None)
        self.num_local = num_local
        self.fc1 = te.GroupedLinear(num_local, hidden, 2 * ffn_shard, **kw)
        self.fc2 = te.GroupedLinear(num_local, ffn_shard, hidden, **kw)
        for fc in (self.fc1, self.fc2):  # replaced by views of w13 / w2 on every call
            for i in range(num_local):
                del fc._parameters[f"weight{i}"]
        self.pad = te.Fp8Padding(num_local)  # FP8 GEMMs need 16-row aligned groups
        self.unpad = te.Fp8Unpadding(num_local)
        self.is_first_microbatch = True  # set by Megatron's set_is_first_microbatch()

    def forward(self, x_MH, w13_LFH, w2_LHF, splits: tuple[int, ...], swiglu, loop):
        if x_MH.shape[0] == 0:
            return loop(x_MH, w13_LFH, w2_LHF, tuple(splits))
        for fc, w in ((self.fc1, w13_LFH), (self.fc2, w2_LHF)):
            for i, w_i in enumerate(w.unbind(0)):
                setattr(fc, f"weight{i}", w_i)
        first, self.is_first_microbatch = self.is_first_microbatch, False
        x_pad, padded = self.pad(x_MH, list(splits))
        h = swiglu(self.fc1(x_pad, padded, is_first_microbatch=first))
        return self.unpad(self.fc2(h, padded, is_first_microbatch=first), list(splits))

    def sharded_state_dict(self, prefix: str, sharded_offsets, groups) -> dict:
        """The FP8 metadata of fc1 / fc2: one object per (layer, EP rank, expert-TP rank),
        kept by expert-DP rank 0 (the other expert-DP ranks hold the same)."""
        ep, etp = groups.ep, groups.expt_tp
        shape = tuple(size for _, _, size in sharded_offsets) + (group_size(ep), group_size(etp))
        offset = tuple(off for _, off, _ in sharded_offsets) + (group_rank(ep), group_rank(etp))
        replica = (0, 0, group_rank(groups.expt_dp))
        return {
            f"{prefix}{name}._extra_state": ShardedObject(
                f"{prefix}{name}._extra_state",
                getattr(self, name).get_extra_state(),
                shape,
                offset,
                replica_id=replica,
            )
            for name in ("fc1", "fc2")
        }
