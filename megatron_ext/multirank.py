"""Run a function on N gloo ranks in child processes (the multi-rank test harness).

    results = run_on_ranks(body, world_size=4, args=(tp, ep), timeout=300)

``body(*args)`` runs in every rank with ``torch.distributed`` initialised over gloo (a free
localhost port is chosen), ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set and, by default, CPU mode
on. ``gpu_rules=True`` (or a ``gpu_rules.DeviceSpec``) runs each rank under the GPU rules instead
(``megatron_ext.gpu_rules``): every rank believes it has its own GPU, the default group is an
NCCL group that refuses host tensors, and the body should take the GPU code path (no ``--cpu``).

Return values come back as a list indexed by rank. If any rank raises, every rank is stopped
and a ``MultiRankError`` names the failing rank(s) with their tracebacks; a run that outlasts
``timeout`` seconds (a hang in a collective, say) is killed and reported the same way.

Children come from a fork server that has already imported torch and Megatron-Core, so a rank
starts in well under a second instead of re-importing everything; ``body`` must be importable by
name (a module-level function).

Results cross the process boundary as plain bytes (pickled in the rank, ``pickle.loads``
here): a tensor's data travels inside the message. Not through ``multiprocessing``'s own pickler,
which torch extends to share tensor storage by file descriptor: the parent then fetches each
descriptor from the rank after the message arrives, and a rank that has already exited leaves
``FileNotFoundError`` / ``ConnectionResetError`` behind (a flaky suite, seen in CI).
"""

from __future__ import annotations

import errno
import io
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable, Container, Sequence

_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron_ext.cpu_mode",
    "megatron_ext.gpu_rules",
]


class MultiRankError(RuntimeError):
    """One or more ranks failed or timed out."""


def free_port(avoid: Container[int] = ()) -> int:
    """A TCP port that was free a moment ago on every address a rank's store may listen on:
    the IPv4 wildcard and, where the host has IPv6, the IPv6 one (c10d's TCPStore tries IPv6
    first; a listener there is invisible to an IPv4-only probe)."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in avoid and _free_on_ipv6(port):
            return port
    raise RuntimeError("no free TCP port found for the ranks' rendezvous")


def _free_on_ipv6(port: int) -> bool:
    if not socket.has_ipv6:
        return True
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::", port))
    except OSError as e:
        return e.errno != errno.EADDRINUSE  # other errors: no usable IPv6 here
    return True


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class _PlainPickler(pickle.Pickler):
    """``pickle`` with one rule of the old transport kept: a tensor that requires grad is refused
    (autograd does not cross processes; the caller must detach)."""

    def reducer_override(self, obj):
        import torch

        if isinstance(obj, torch.Tensor) and obj.requires_grad:
            raise TypeError("a tensor that requires grad cannot leave its process (detach it)")
        return NotImplemented


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    _PlainPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _child(fn, rank, world_size, port, args, kwargs, cpu, rules, threads, results):
    os.setpgrp()  # own process group: the parent can kill whatever this rank starts
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        backend = "gloo"
        if rules:
            from megatron_ext import gpu_rules

            gpu_rules.enable(*(() if rules is True else (rules,)))
            backend = "nccl"  # gloo underneath, with NCCL's rules (gpu_rules.collectives)
        elif cpu:
            from megatron_ext import cpu_mode

            cpu_mode.enable()
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e):
                raise
            results.put((rank, "port taken", traceback.format_exc()))  # before fn ran
            return
        out = fn(*args, **kwargs)
        try:  # plain data, never shared storage (see the module docstring)
            payload = _to_bytes(out)
        except Exception as e:
            raise TypeError(
                f"{fn.__name__} returned a value that cannot be sent back: {e!r} (return CPU "
                "tensors without grad, numbers, lists or dicts)"
            ) from e
        results.put((rank, "ok", payload))
    except BaseException:  # report everything, including assertion errors and SystemExit
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def _kill_group(pgid: int | None) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_PORT_TRIES = 3


def _attempt(ctx, job, port: int, timeout: float):
    """Start the ranks on ``port``, collect ``(outs, errors)``, stop every process."""
    results = ctx.Queue()
    fn, world_size, args, kwargs, cpu, gpu_rules, threads = job
    procs = [
        ctx.Process(
            target=_child,
            args=(
                fn,
                r,
                world_size,
                port,
                args,
                kwargs,
                cpu,
                gpu_rules,
                threads,
                results,
            ),
            daemon=False,  # ranks may start processes of their own (dist_checkpointing does)
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    errors: dict[int, tuple[str, str]] = {}  # rank -> (kind, traceback)
    deadline = time.monotonic() + timeout
    try:
        while len(outs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                for r in dead:
                    if r not in outs and r not in errors:
                        errors[r] = ("error", f"process exited with code {procs[r].exitcode}")
                if errors:
                    deadline = min(deadline, time.monotonic() + 5.0)  # let peers report, then stop
                continue
            if status == "ok":
                outs[rank] = pickle.loads(payload)
            else:
                errors[rank] = (status, payload)
            if errors:
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors or len(outs) < world_size else 10)
            if p.is_alive():
                p.kill()
                p.join()
            _kill_group(p.pid)  # helpers a rank started (dist_checkpointing's writer manager)
    return outs, errors


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 300.0,
    cpu: bool = True,
    gpu_rules=False,
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return each rank's result.

    The rendezvous port is chosen free, but another process can take it before rank 0 listens
    on it (two suites on one machine, a helper a killed run left behind): then rank 0 says so
    before ``fn`` ran anywhere, and the ranks start again on another port (up to
    ``_PORT_TRIES`` times)."""
    ctx = _context()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    job = (fn, world_size, tuple(args), kwargs or {}, cpu, gpu_rules, threads)
    taken: list[int] = []
    while True:
        port = free_port(avoid=taken)
        outs, errors = _attempt(ctx, job, port, timeout)
        if not any(kind == "port taken" for kind, _ in errors.values()):
            break
        taken.append(port)
        if len(taken) == _PORT_TRIES:
            break
    errors = {r: tb for r, (_, tb) in errors.items()}
    if errors:
        first = next(iter(errors))  # dicts keep arrival order: the rank that failed first
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
        raise MultiRankError(
            f"{fn.__name__} failed on rank(s) {sorted(errors)} of {world_size}; rank {first} "
            f"failed first (the others may only have lost their peer)\n{detail}"
        )
    missing = [r for r in range(world_size) if r not in outs]
    if missing:
        raise MultiRankError(
            f"{fn.__name__} timed out after {timeout:.0f}s on {world_size} ranks; "
            f"rank(s) {missing} never finished (a hang in a collective?)"
        )
    return [outs[r] for r in range(world_size)]
