"""Streaming reads and writes of ``torch_dist`` checkpoints, one slice of the model at a time.

:class:`StreamingWriter` writes ONE dist_checkpointing directory in parts: every part is an
ordinary ``dist_checkpointing.save`` of some pieces (``ShardedTensor``s that name their place
in the global tensors) into a scratch directory; its data files are moved next to the others
and its index (``.metadata``: per global key the stored chunks, per chunk the file and byte
range) is merged into one. A global tensor may be assembled from pieces of many parts (e.g. the
stacked ``decoder.layers.*`` tensors span every input shard). Only the current part's tensors
are held, so memory is bounded by the largest part, not by the model.

:func:`read_pieces` loads chosen pieces (any slice of any global tensor) from a checkpoint with
``dist_checkpointing.load``: only the stored chunks that overlap them are read.

:class:`MemoryMeter` measures what the converters hold: the bytes of all tensor storages alive
in the process (found through the garbage collector, sampled at the high points of each
step), and on Linux the peak resident set growth.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import json
import os
import pickle
import shutil
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron_ext import checkpointing, cpu_mode


@contextlib.contextmanager
def single_process_group():
    """A world of one gloo rank (dist_checkpointing needs a process group), unless one exists;
    without CUDA, CPU mode too (dist_checkpointing synchronises the CUDA device)."""
    cpu = not torch.cuda.is_available() and not cpu_mode.is_enabled()
    if cpu:
        cpu_mode.enable()
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()
        if cpu:
            cpu_mode.disable()


def piece(key: str, data: torch.Tensor, *rank_offsets, prepend: int = 0, **kw) -> ShardedTensor:
    """A slice of global tensor ``key``: ``rank_offsets`` as in ``from_rank_offsets``.

    The ``prepend`` leading axes (layer, expert) become real axes of size 1 of a view of
    ``data`` (exactly the chunks Megatron's own prepended-axis tensors store), and the piece is
    marked as not on a regular grid (``axis_fragmentations=None``): a world of one rank then
    writes or reads only the pieces it has, not the whole grid."""
    full = data.view((1,) * prepend + tuple(data.shape))
    regular = ShardedTensor.from_rank_offsets(key, full, *rank_offsets, replica_id=0, **kw)
    return replace(regular, axis_fragmentations=None)


def empty_object(key: str, index: int, count: int) -> ShardedObject:
    """One element of a per-layer ShardedObject (e.g. ``_extra_state``) holding ``None``."""
    return ShardedObject(key, None, (count,), (index,), replica_id=0)


class MemoryMeter:
    """Peak bytes of live tensor storages (sampled) and peak RSS growth (Linux)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.peak_tensor_bytes = 0
        self.baseline = self._tensor_bytes() if enabled else 0
        self._rss0 = self._reset_rss_peak() if enabled else None

    @staticmethod
    def _tensor_bytes() -> int:
        seen, total = set(), 0
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
                try:
                    storage = obj.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                ptr = storage.data_ptr()
                if ptr and ptr not in seen:
                    seen.add(ptr)
                    total += storage.nbytes()
        return total

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _reset_rss_peak(self) -> int | None:
        try:  # "5" resets the peak RSS (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return None
        return self._status("VmRSS")

    def sample(self) -> None:
        if self.enabled:
            held = self._tensor_bytes() - self.baseline
            self.peak_tensor_bytes = max(self.peak_tensor_bytes, held)

    @property
    def peak_rss_growth(self) -> int | None:
        hwm = self._status("VmHWM") if self.enabled else None
        return None if hwm is None or self._rss0 is None else hwm - self._rss0

    def report(self) -> str:
        rss = self.peak_rss_growth
        text = f"peak tensor bytes held {self.peak_tensor_bytes / 2**20:.1f} MiB"
        return text + (f", peak RSS growth {rss / 2**20:.1f} MiB" if rss is not None else "")


class StreamingWriter:
    """Write one ``torch_dist`` checkpoint directory part by part (see the module docstring).

    ``common`` is the checkpoint's non-sharded state (``common.pt``: arch, hparams, ...). The
    directory is complete (``metadata.json`` present) only after :meth:`finish`."""

    def __init__(self, directory: str, common: dict):
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.makedirs(directory)
        self.directory, self.common, self.parts = directory, common, 0
        self.metadata: Metadata | None = None

    def write(self, pieces: list) -> None:
        """Save ``pieces`` (ShardedTensor / ShardedObject) as the next part."""
        if not pieces:
            return
        scratch = os.path.join(self.directory, f".part{self.parts}")
        os.makedirs(scratch)
        state = {f"__piece{i}": p for i, p in enumerate(pieces)}
        state.update(self.common)
        dist_checkpointing.save(state, scratch, validate_access_integrity=False)
        meta = FileSystemReader(scratch).read_metadata()
        renames = {}
        for path in sorted(glob.glob(os.path.join(scratch, "*.distcp"))):
            name = os.path.basename(path)
            renames[name] = f"__{self.parts}_{len(renames)}.distcp"
            os.replace(path, os.path.join(self.directory, renames[name]))
        for name in ("common.pt", "metadata.json"):
            os.replace(os.path.join(scratch, name), os.path.join(self.directory, name + ".last"))
        shutil.rmtree(scratch)
        self._merge(meta, renames)
        self.parts += 1

    def _merge(self, meta: Metadata, renames: dict) -> None:
        storage = {
            index: replace(info, relative_path=renames[info.relative_path])
            for index, info in meta.storage_data.items()
        }
        if self.metadata is None:
            self.metadata = Metadata(
                state_dict_metadata=dict(meta.state_dict_metadata),
                planner_data=None,
                storage_data=storage,
            )
            return
        merged = self.metadata.state_dict_metadata
        for key, item in meta.state_dict_metadata.items():
            if key not in merged:
                merged[key] = item
            elif isinstance(item, BytesStorageMetadata):
                raise ValueError(f"object {key} written twice")
            else:
                have = merged[key]
                if have.size != item.size or have.properties.dtype != item.properties.dtype:
                    raise ValueError(
                        f"{key}: parts disagree on the global tensor ({have.size} "
                        f"{have.properties.dtype} vs {item.size} {item.properties.dtype})"
                    )
                have.chunks.extend(item.chunks)
        self.metadata.storage_data.update(storage)

    def finish(self) -> None:
        """Write the merged index, then ``common.pt`` and ``metadata.json`` (the latter last)."""
        if self.metadata is None:
            raise ValueError("nothing was written")
        with open(os.path.join(self.directory, ".metadata"), "wb") as f:
            pickle.dump(self.metadata, f)
            f.flush()
            os.fsync(f.fileno())
        for name in ("common.pt", "metadata.json"):
            os.replace(
                os.path.join(self.directory, name + ".last"), os.path.join(self.directory, name)
            )


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` (a larger single tensor gets its own) and
    ``model.safetensors.index.json``, as ``save_pretrained`` writes them."""

    def __init__(self, directory: str, max_bytes: int, meter=None):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.max_bytes, self.meter = directory, max_bytes, meter
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.total, self.files, self.weight_map = 0, 0, [], {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        if tensor.untyped_storage().nbytes() != nbytes or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # safetensors refuses shared storage
        self.pending[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        if self.meter is not None:
            self.meter.sample()
        name = f"model-{len(self.files) + 1:05d}.safetensors.tmp"
        save_file(self.pending, os.path.join(self.directory, name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        count = len(self.files)
        umask = os.umask(0)
        os.umask(umask)
        for i, (tmp, names) in enumerate(self.files):
            final = (
                "model.safetensors"
                if count == 1
                else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            )
            os.replace(os.path.join(self.directory, tmp), os.path.join(self.directory, final))
            # safetensors writes through a private temporary file (mode 0600): give the shard
            # the mode any other file gets here, readable by the group that shares the model.
            os.chmod(os.path.join(self.directory, final), 0o666 & ~umask)
            self.weight_map.update({n: final for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)


def stored_tensors(path: str) -> dict:
    """Global key -> ``ShardedTensor`` (no data: global shape and dtype) stored in ``path``."""
    return dist_checkpointing.load_tensors_metadata(path)


def read_pieces(path: str, requests: dict[str, ShardedTensor]) -> dict[str, torch.Tensor]:
    """Load the requested pieces (their ``data`` is filled in place and returned)."""
    if not requests:
        return {}
    loaded = dist_checkpointing.load(dict(requests), path, validate_access_integrity=False)
    return {name: loaded[name] for name in requests}


def publish(root: str, directory: str, iteration: int) -> None:
    """Rename a finished ``directory`` to ``root/iter_XXXXXXX`` and point the marker at it."""
    final = checkpointing.iteration_dir(root, iteration)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(directory, final)
    checkpointing.write_marker(root, iteration)
