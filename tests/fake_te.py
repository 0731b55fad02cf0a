"""A recording fake of the part of ``transformer_engine.pytorch`` our FP8 experts use.

``install()`` puts ``transformer_engine``, ``transformer_engine.pytorch`` and
``transformer_engine.pytorch.fp8`` into ``sys.modules`` (call it in a rank before the model is
built; ``uninstall()`` removes them). Each class takes the constructor and ``forward``
arguments of Transformer Engine 2.x (``GroupedLinear(num_gemms, in_features, out_features,
..., bias, params_dtype, parallel_mode, device)``, ``forward(inp, m_splits,
is_first_microbatch)``, ``Fp8Padding(num_gemms)`` / ``Fp8Unpadding(num_gemms)``), checks what
TE checks, computes exactly (per-group GEMMs in the input dtype) and records every call in
``CALLS``:

* ``("init", name, kwargs)``; ``("forward", (in, out), m_splits, is_first_microbatch,
  fp8_enabled, training)``; ``("set_extra_state", (in, out), state)``.

FP8 metadata (``get_extra_state``) is a dict with the number of FP8 forwards and the running
amax of the inputs per GEMM, updated only inside ``fp8_autocast(enabled=True)``, so a test can
see it change, be saved and come back.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types

import torch

CALLS: list[tuple] = []
_FP8 = {"enabled": False, "recipe": None}
ALIGN = 16  # FP8 GEMMs need groups of a multiple of 16 rows (Fp8Padding's default)


class FP8GlobalStateManager:
    @staticmethod
    def is_fp8_enabled() -> bool:
        return _FP8["enabled"]


@contextlib.contextmanager
def fp8_autocast(enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None, _graph=False):
    before = dict(_FP8)
    _FP8.update(enabled=bool(enabled), recipe=fp8_recipe)
    try:
        yield
    finally:
        _FP8.update(before)


class GroupedLinear(torch.nn.Module):
    def __init__(
        self,
        num_gemms: int,
        in_features: int,
        out_features: int,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group=None,
        tp_size: int = 1,
        get_rng_state_tracker=None,
        rng_tracker_name=None,
        init_method=None,
        bias: bool = True,
        return_bias: bool = False,
        params_dtype=None,
        parallel_mode=None,
        device="cuda",
        ub_overlap_rs: bool = False,
        ub_overlap_ag: bool = False,
        ub_name=None,
        delay_wgrad_compute: bool = False,
        save_original_input: bool = False,
    ):
        super().__init__()
        if parallel_mode not in (None, "column", "row"):
            raise ValueError(f"parallel_mode {parallel_mode!r} not supported")
        self.num_gemms, self.in_features, self.out_features = num_gemms, in_features, out_features
        self.use_bias = bias
        dtype = params_dtype or torch.get_default_dtype()
        for i in range(num_gemms):
            w = torch.empty(out_features, in_features, dtype=dtype, device=device)
            self.register_parameter(f"weight{i}", torch.nn.Parameter(w))
        self.fp8_meta = {"fp8_forwards": 0, "amax": torch.zeros(num_gemms)}
        CALLS.append(("init", type(self).__name__, dict(
            num_gemms=num_gemms, in_features=in_features, out_features=out_features, bias=bias,
            params_dtype=params_dtype, parallel_mode=parallel_mode, device=str(device),
        )))  # fmt: skip

    def forward(self, inp, m_splits, is_first_microbatch=None):
        assert isinstance(m_splits, list) and all(type(m) is int for m in m_splits), m_splits
        assert len(m_splits) == self.num_gemms, (len(m_splits), self.num_gemms)
        assert sum(m_splits) == inp.shape[0] > 0, (m_splits, inp.shape)  # TE: no empty input
        assert inp.shape[-1] == self.in_features, (inp.shape, self.in_features)
        if _FP8["enabled"]:
            assert all(m % ALIGN == 0 for m in m_splits), f"FP8 needs {ALIGN}-row groups"
        shape = (self.in_features, self.out_features)
        CALLS.append(
            ("forward", shape, list(m_splits), is_first_microbatch, _FP8["enabled"], self.training)
        )
        outs = []
        for i, x_i in enumerate(torch.split(inp, m_splits)):
            w = getattr(self, f"weight{i}")
            assert tuple(w.shape) == (self.out_features, self.in_features), w.shape
            outs.append(x_i @ w.t())
            if _FP8["enabled"] and x_i.numel():
                amax = x_i.detach().abs().max().float().cpu()
                self.fp8_meta["amax"][i] = torch.maximum(self.fp8_meta["amax"][i], amax)
        if _FP8["enabled"]:
            self.fp8_meta["fp8_forwards"] += 1
        return torch.cat(outs)

    def get_extra_state(self):
        return {
            "fp8_forwards": self.fp8_meta["fp8_forwards"],
            "amax": self.fp8_meta["amax"].clone(),
        }

    def set_extra_state(self, state):
        CALLS.append(("set_extra_state", (self.in_features, self.out_features), state))
        if state is not None:
            self.fp8_meta = {"fp8_forwards": state["fp8_forwards"], "amax": state["amax"].clone()}


def _padded(m_splits):
    return [-(-m // ALIGN) * ALIGN for m in m_splits]


class Fp8Padding(torch.nn.Module):
    def __init__(self, num_gemms: int, align_size=None):
        super().__init__()
        self.num_gemms = num_gemms

    def forward(self, inp, m_splits):
        assert len(m_splits) == self.num_gemms
        padded = _padded(m_splits)
        parts = []
        for x_i, m, p in zip(torch.split(inp, m_splits), m_splits, padded, strict=True):
            parts.append(torch.cat([x_i, x_i.new_zeros(p - m, x_i.shape[1])]))
        return torch.cat(parts), padded


class Fp8Unpadding(torch.nn.Module):
    def __init__(self, num_gemms: int, align_size=None):
        super().__init__()
        self.num_gemms = num_gemms

    def forward(self, inp, m_splits):
        padded = _padded(m_splits)
        return torch.cat([y[:m] for y, m in zip(torch.split(inp, padded), m_splits, strict=True)])


_NAMES = ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.fp8")


def install() -> None:
    root, pytorch, fp8 = (types.ModuleType(n) for n in _NAMES)
    for module in (root, pytorch, fp8):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    root.__version__ = "2.4.0"
    root.pytorch = pytorch
    pytorch.fp8 = fp8
    fp8.FP8GlobalStateManager = FP8GlobalStateManager
    for obj in (GroupedLinear, Fp8Padding, Fp8Unpadding, fp8_autocast, FP8GlobalStateManager):
        setattr(pytorch, obj.__name__, obj)
    sys.modules.update(zip(_NAMES, (root, pytorch, fp8), strict=True))
    CALLS.clear()


def uninstall() -> None:
    for name in _NAMES:
        sys.modules.pop(name, None)
