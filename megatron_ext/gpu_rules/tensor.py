"""Device memory on CPU: a tensor subclass that says "cuda", and the rules every op obeys.

:class:`DeviceTensor` is an ordinary CPU tensor (real storage, so gloo, ``data_ptr`` and
``numpy`` of its plain alias work) whose Python type marks it as GPU memory: ``.device`` is
``cuda:N``, ``.is_cuda`` is True, ``.type()`` says ``torch.cuda.*``. Its ``__torch_dispatch__``
sees every ATen op, forward and backward (the autograd engine calls ops through the dispatcher,
so gradients of device tensors are device tensors too), and

* tags the op's outputs when any input is device memory (views, in-place and ``out=`` results
  keep the caller's own objects);
* refuses an op that mixes device tensors with host tensors of one or more dimensions, as CUDA
  kernels do ("Expected all tensors to be on the same device"); 0-dim host tensors are
  scalars and allowed, and the ops PyTorch marks ``device_check: NoCheck`` (copies, indexing
  with host indices) are exempt;
* counts host synchronisations: ``.item()`` and friends, ``nonzero``, ``bincount`` (2 on CUDA:
  ``self.min().item()`` and ``self.max().item()`` in ``SummaryOps.cu``), ``unique``,
  ``masked_select``, boolean indexing, ``repeat_interleave`` without ``output_size``, device to
  host copies, and ``torch._grouped_mm``'s slow fallback (``offs.cpu()``);
* checks ``torch._grouped_mm`` calls that would take the CUDA fast path (bf16 on sm90) against
  PyTorch's meta kernel with the same shapes and strides (16-byte strides, dtype, offsets);
* runs the CUDA-only kernels the code uses (``_CUDA_ONLY``: PyTorch has no CPU kernel for
  them) with CUDA's argument checks and fp32 arithmetic on the host.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten

# Ops exempt from the same-device check (native_functions.yaml: device_check: NoCheck, or
# taking host index tensors by design).
_NO_DEVICE_CHECK = {
    aten.copy_.default,
    aten._to_copy.default,
    aten.index.Tensor,
    aten.index_put_.default,
    aten._index_put_impl_.default,
    aten.index_put.default,
    aten.set_.source_Tensor,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
    aten._has_compatible_shallow_copy_type.default,
}

# Ops that wait for the device (device -> host): how many syncs each costs on CUDA.
_SYNCS = {
    aten._local_scalar_dense.default: 1,
    aten.nonzero.default: 1,
    aten.bincount.default: 2,
    aten.masked_select.default: 1,
    aten.equal.default: 1,
    aten.is_nonzero.default: 1,
    aten._unique2.default: 1,
    aten.unique_dim.default: 1,
    aten.unique_consecutive.default: 1,
}


def _addmm_dtype_out(self, mat1, mat2, out_dtype, *, beta=1, alpha=1, out):
    """``addmm.dtype_out`` as CUDA runs it (``_addmm_dtype_out_cuda``, PyTorch >= 2.10 checks):
    half-precision operands, products accumulated in fp32, ``out = beta*self + alpha*mat1@mat2``
    written in ``out_dtype`` (``out`` may be ``self``: cuBLAS's beta = 1 epilogue)."""
    half = (torch.bfloat16, torch.float16)
    if mat1.dtype != mat2.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {mat1.dtype} and "
                           f"{mat2.dtype}")  # fmt: skip
    if not (out_dtype == mat1.dtype or (out_dtype == torch.float32 and mat1.dtype in half)):
        raise RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")
    if out.dtype != out_dtype:
        raise RuntimeError("out_dtype must be the same as the dtype of the provided out tensor")
    if self.dtype not in (out_dtype, mat1.dtype):
        raise RuntimeError("self dtype must match either out_dtype or mat1 dtype")
    result = torch.mm(mat1.float(), mat2.float()).mul_(alpha)
    if beta:
        result.add_(self.float(), alpha=beta)
    return out.copy_(result)


# Kernels CUDA has and the CPU lacks, run on the host as the GPU would.
_CUDA_ONLY = {aten.addmm.dtype_out: _addmm_dtype_out}


def plain(t: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` alias of ``t`` (same storage, no tag, no autograd history)."""
    with torch._C._DisableTorchDispatch():
        return torch.Tensor._make_subclass(torch.Tensor, t, False)


def is_device(t) -> bool:
    return isinstance(t, DeviceTensor)


class DeviceTensor(torch.Tensor):
    """A CPU tensor standing for GPU memory (see the module docstring)."""

    rules = None  # the active RuleSet, installed by gpu_rules.enable()

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_subclass(cls, data, data.requires_grad)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", DeviceTensor.rules.index)

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_cpu(self) -> bool:
        return False

    def get_device(self) -> int:
        return DeviceTensor.rules.index

    def tolist(self):
        DeviceTensor.rules.sync("tolist")
        return plain(self).tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
            "tensor to host memory first. (GPU rules)"
        )

    def __format__(self, spec):
        if self.dim() == 0:
            return self.item().__format__(spec)
        return plain(self).__format__(spec)

    def __repr__(self, **kwargs):
        return f"DeviceTensor({plain(self)!r}, device='{self.device}')"

    def __reduce_ex__(self, protocol):  # pickled as the host tensor it holds
        return plain(self).detach().clone().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rules = DeviceTensor.rules
        leaves, _ = tree_flatten((args, kwargs))
        on_device = any(isinstance(x, DeviceTensor) for x in leaves)
        if on_device:
            rules.check_op(func, args, kwargs, leaves)
        # The op runs on the tensors themselves (the Python key excluded: plain CPU kernels),
        # so in-place ops, resize_ and friends included, act on the caller's objects.
        kernel = _CUDA_ONLY.get(func, func) if on_device else func
        with torch._C._DisableTorchDispatch():
            out = kernel(*args, **kwargs)
        if not on_device:
            return out
        inputs = {id(x) for x in leaves if isinstance(x, torch.Tensor)}
        return tree_map(lambda x: _rewrap(x, inputs), out)


def _rewrap(x, inputs: set[int]):
    if not isinstance(x, torch.Tensor) or isinstance(x, DeviceTensor) or id(x) in inputs:
        return x  # in-place / out= results are the caller's own objects
    return DeviceTensor(x)
