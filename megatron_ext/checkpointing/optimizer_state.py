"""Loading optimizer state into Megatron's distributed optimizer when its inner optimizer is
PyTorch's Adam (no Apex or Transformer Engine: CPU ranks, or GPUs without either).

Megatron-Core 0.16.1 assumes the fused Adams' behaviour in two places; ``checkpointing.load``
wraps its optimizer load in these two fixes (both are no-ops for fused Adams).
"""

from __future__ import annotations

import contextlib

import torch


def ensure_optimizer_state(optimizer) -> None:
    """Give a fresh PyTorch Adam its per-parameter state (zeros, step 0) before loading.

    Megatron's distributed optimizer reads the inner optimizer's state to build the sharded
    state dict it loads into; without Apex or Transformer Engine (CPU ranks) that inner optimizer
    is ``torch.optim.Adam(W)``, whose state only exists after a first step. The values are
    placeholders, all overwritten by the load."""
    for sub in _torch_adams(optimizer):  # Apex / TE fused Adam: Megatron handles it
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        step=torch.zeros((), dtype=torch.float32),
                        exp_avg=torch.zeros_like(p),
                        exp_avg_sq=torch.zeros_like(p),
                    )


def _torch_adams(optimizer):
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(getattr(sub, "optimizer", None), torch.optim.Adam):
            yield sub


@contextlib.contextmanager
def torch_adam_step_fix(optimizer):
    """Two gaps of Megatron-Core 0.16.1's distributed optimizer when its inner optimizer is
    PyTorch's Adam (no Apex / TE, e.g. CPU ranks), loading ``fully_reshardable`` state:

    1. it copies every per-parameter state entry from what it read, ``step`` included, but
       leaves ``step`` out of what it reads (it restores the step from the param groups):
       supply the current ``step`` as its own source (a no-op copy) during the load;
    2. it gives every parameter the SAME ``step`` tensor, which Adam then increments once per
       parameter per step (wrong bias correction): give each parameter its own copy after."""
    patched = []
    for sub in _torch_adams(optimizer):
        original = getattr(sub, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param, tensors, sub=sub, original=original):
            group, order = sub.model_param_group_index_map[model_param]
            main_param = sub.optimizer.param_groups[group]["params"][order]
            step = sub.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return original(model_param, tensors)

        sub._set_main_param_and_optimizer_states = set_states
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states
    for sub in _torch_adams(optimizer):
        for state in sub.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
