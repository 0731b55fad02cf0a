"""Checkpoints with Megatron-Core's dist_checkpointing (``torch_dist``): save, load, reshard.

Layout on disk (Megatron-LM's names)::

    {save}/iter_0000100/                  one dist_checkpointing directory per saved iteration
    {save}/latest_checkpointed_iteration.txt   "100": written last, atomically

A save goes to ``iter_XXXXXXX.partial`` and is renamed only when every rank has finished; the
marker is then replaced atomically (write, fsync, rename). A process killed during a save
leaves the previous checkpoint and the marker untouched; the next save removes the debris.

What is saved: the model (every tensor keyed by its *global* name, so TP, PP, VPP and EP can all
change between save and load), the optimizer state in Megatron's ``fully_reshardable`` format
(DP can change too; it loads into the same kind of optimizer, distributed or not), the LR
scheduler, the iteration and consumed samples (the data order
continues), the architecture (a mismatch is reported by field, before any tensor is read), a
few hyper-parameters that do not change shapes (RoPE base, norm epsilon, ...: the HF converter
reads them), and each rank's RNG states (restored when the layout is unchanged).

A *weights-only* checkpoint (written by ``python -m megatron_ext.convert``: no optimizer,
scheduler or iteration) loads like ``--finetune``.

Test hook: ``MEGATRON_EXT_TEST_KILL_IN_SAVE=ITER:POINT`` SIGKILLs the process inside the save of
iteration ``ITER`` at ``POINT`` (``start``: partial directory made, nothing written; ``written``:
every rank has written, not yet renamed; ``renamed``: renamed, marker not yet updated). The
crash-safety tests use it; it is never set in normal runs.
"""

from megatron_ext.checkpointing.files import (
    KILL_ENV,
    MARKER,
    clear_debris,
    is_checkpoint_dir,
    iteration_dir,
    maybe_kill,
    publish,
    read_marker,
    resolve,
    write_marker,
)
from megatron_ext.checkpointing.load import (
    CheckpointError,
    LoadPlan,
    _check_unexpected,
    check_arch,
    load,
    plan_load,
)
from megatron_ext.checkpointing.save import save, writer_helper_ignores_term
from megatron_ext.checkpointing.state import (
    ARCH_FIELDS,
    HPARAM_FIELDS,
    CheckpointMismatch,
    Preemption,
    TrainState,
    arch_of,
    hparams_of,
    should_exit,
    should_save,
)

__all__ = [
    "ARCH_FIELDS",
    "HPARAM_FIELDS",
    "KILL_ENV",
    "MARKER",
    "CheckpointError",
    "CheckpointMismatch",
    "LoadPlan",
    "Preemption",
    "TrainState",
    "_check_unexpected",
    "arch_of",
    "check_arch",
    "clear_debris",
    "hparams_of",
    "is_checkpoint_dir",
    "iteration_dir",
    "load",
    "maybe_kill",
    "plan_load",
    "publish",
    "read_marker",
    "resolve",
    "save",
    "should_exit",
    "should_save",
    "write_marker",
    "writer_helper_ignores_term",
]
