"""sluice.shared: token buckets and counters shared by forked processes (the workers)."""

from __future__ import annotations

import os
import time

import trio

from sluice.shared import LocalState, local


def _local_hammer(rate: float = 100.0, burst: float = 50.0):
    """A hammer on a fresh table (made here, before the fork, so every child shares it)."""
    state = LocalState(slots=64)

    def hammer(seconds: float) -> tuple[int, float, float]:
        allowed, start = 0, time.monotonic()
        while time.monotonic() < start + seconds:
            allowed += state.take_now("10.0.0.1", 1, rate, burst)[0]
        return allowed, start, time.monotonic()

    return hammer


def allowed_by(processes: int, seconds: float = 0.5, hammer=None) -> tuple[int, float]:
    """Total tokens granted for one key to `processes` forked children each running
    ``hammer(seconds) -> (granted, start, end)`` (default: the local table, rate 100/s, burst
    50), and the time from the first child's start to the last one's end (time.monotonic():
    CLOCK_MONOTONIC, one clock for every process; a hammer's setup is outside its window)."""
    hammer = hammer or _local_hammer()
    r, w = os.pipe()
    pids = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, "{} {} {}\n".format(*hammer(seconds)).encode())
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    os.close(w)
    with os.fdopen(r) as f:
        rows = [line.split() for line in f]
    assert len(rows) == processes, rows
    return sum(int(n) for n, _, _ in rows), max(float(e) for _, _, e in rows) - min(float(s) for _, s, _ in rows)


def test_one_bucket_is_shared_by_forked_processes():
    for processes in (1, 2):
        total, elapsed = allowed_by(processes)
        # burst + rate × time the hammers ran; not multiplied by the number of processes
        assert 50 + 100 * 0.5 - 2 <= total <= 50 + 100 * elapsed + 2, (processes, total, elapsed)


async def check_refusals(state) -> None:
    """A ``SharedState``'s refusals: how long to wait, per key, never for more than the burst."""
    assert await state.take("k", 5, 10.0, 5.0) == (True, 0.0)
    allowed, retry_after = await state.take("k", 2, 10.0, 5.0)
    assert not allowed and 0.1 < retry_after <= 0.2
    assert await state.hit("other", 10.0, 5.0)  # another key has its own bucket
    assert (await state.take("k", 6, 10.0, 5.0))[1] == float("inf")  # more than the burst: never


def test_refused_take_says_when_to_retry():
    trio.run(check_refusals, LocalState(slots=64))


def test_counters_and_windows_across_processes():
    state = LocalState(slots=64)
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(100):
                state.incr_now("requests")
        finally:
            os._exit(0)
    for _ in range(100):
        state.incr_now("requests")
    os.waitpid(pid, 0)
    assert trio.run(state.incr, "requests", 0) == 200
    assert state.incr_now("w", 3, window=3600) == 3
    assert state.incr_now("w", 1, window=3600) in (4, 1)  # 1 only if an hour boundary just passed
    assert state.incr_now("w", 1, window=1e-6) == 1  # a new window each microsecond: it starts again


def test_a_full_table_evicts_the_least_recently_used_never_fails():
    state = LocalState(slots=8)
    for i in range(100):
        assert state.take_now(f"client-{i}", 1, 1.0, 1.0) == (True, 0.0)
    assert state.evictions() == 92
    assert state.take_now("client-99", 1, 1.0, 1.0)[0] is False  # the newest entries stay


def test_local_is_one_table_for_the_instance():
    assert local() is local()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if local().incr_now("test-local") >= 1 else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert local().incr_now("test-local") == 2


def test_a_process_killed_while_holding_the_lock_does_not_freeze_the_others():
    import signal

    state = LocalState(slots=64)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes the table's lock, says so, and dies holding it
        try:
            state._lock.__enter__()
            os.write(w, b"held\n")
            time.sleep(30)
        finally:
            os._exit(0)
    assert os.read(r, 5) == b"held\n"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    start = time.monotonic()
    assert state.take_now("after", 1, 10.0, 5.0) == (True, 0.0)  # the kernel released it
    assert time.monotonic() - start < 1.0
