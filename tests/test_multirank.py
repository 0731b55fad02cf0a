"""The multi-rank harness: results by rank, failures named with their rank, hangs time out."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_ext.multirank import MultiRankError, run_on_ranks


def _sum_of_ranks(scale):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item() * scale, dist.get_world_size()


def _fails_on_rank_2():
    if dist.get_rank() == 2:
        raise ValueError("boom on purpose")
    dist.barrier()


def _rank_1_hangs():
    if dist.get_rank() == 1:
        time.sleep(600)
    dist.barrier()


def _returns_a_tensor_that_needs_grad():
    return torch.ones(2, requires_grad=True) * 2


def _many_tensors():
    return {f"t{i}": torch.full((4,), float(i + dist.get_rank())) for i in range(200)}


def test_tensor_results_arrive_after_their_rank_has_exited():
    """Regression (flaky CI): tensors shared by file descriptor could not be fetched once the
    rank had exited (FileNotFoundError / ConnectionResetError); 8 ranks x 200 tensors made it
    fail every time. Results now travel as plain bytes."""
    for _ in range(3):
        results = run_on_ranks(_many_tensors, 8, timeout=120)
        for rank, out in enumerate(results):
            assert len(out) == 200
            assert all(
                torch.equal(t, torch.full((4,), float(i + rank)))
                for i, t in enumerate(out.values())
            )


def test_unpicklable_result_is_reported_not_waited_for():
    start = time.monotonic()
    with pytest.raises(MultiRankError, match="cannot be sent back"):
        run_on_ranks(_returns_a_tensor_that_needs_grad, 2, timeout=120)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("world", [2, 4, 8])
def test_results_come_back_by_rank(world):
    results = run_on_ranks(_sum_of_ranks, world, args=(2.0,))
    expected = sum(range(world)) * 2.0
    assert results == [(r, expected, world) for r in range(world)]


def test_failure_names_the_rank_that_failed_first():
    with pytest.raises(MultiRankError) as err:
        run_on_ranks(_fails_on_rank_2, 4, timeout=60)
    text = str(err.value)
    assert "rank 2 failed first" in text
    assert "ValueError: boom on purpose" in text


def test_hang_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(MultiRankError, match=r"timed out after 5s .*rank\(s\) \[0, 1\]"):
        run_on_ranks(_rank_1_hangs, 2, timeout=5)
    assert time.monotonic() - start < 30


def _listener(family, port=0):
    import socket

    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if family == socket.AF_INET6 else "", port))
    s.listen()
    return s


def test_a_port_held_on_ipv6_only_is_not_called_free():
    """c10d's store listens on IPv6 first: a port held there alone failed every rank 0 that an
    IPv4-only probe had called free (EADDRINUSE in a fresh-clone run, 8 tests at one port)."""
    import socket

    from megatron_ext import multirank

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    held = _listener(socket.AF_INET6)
    try:
        port = held.getsockname()[1]
        assert not multirank._free_on_ipv6(port)
        assert multirank.free_port() != port
    finally:
        held.close()
    assert multirank._free_on_ipv6(port)


def test_a_rendezvous_port_taken_before_rank_0_listens_is_chosen_again(monkeypatch):
    """The port is taken between the choice and rank 0's listen (another suite, a left-over
    helper): the ranks start again on another port instead of failing the test."""
    import socket

    from megatron_ext import multirank

    held = [_listener(socket.AF_INET)]
    port = held[0].getsockname()[1]
    if socket.has_ipv6:
        held.append(_listener(socket.AF_INET6, port))
    chosen = []
    real = multirank.free_port

    def first_the_taken_one(avoid=()):
        chosen.append(port if not chosen else real(avoid))
        return chosen[-1]

    monkeypatch.setattr(multirank, "free_port", first_the_taken_one)
    try:
        out = run_on_ranks(_sum_of_ranks, 2, args=(1.0,), timeout=60)
    finally:
        for s in held:
            s.close()
    assert out == [(0, 1.0, 2), (1, 1.0, 2)]
    assert chosen[0] == port and len(chosen) == 2 and chosen[1] != port
