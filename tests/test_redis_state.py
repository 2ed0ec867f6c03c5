"""sluice.shared on a real Redis (plugins/redis_state.py): one state for processes that share
nothing else, and what a take does when Redis dies, hangs or comes back."""

# ruff: noqa: F811 (the fixtures imported below are test parameters by the same names)

from __future__ import annotations

import os
import signal
import time
from contextlib import asynccontextmanager

import pytest
import trio
from structlog.testing import capture_logs

from sluice.errors import ConfigError
from sluice.plugins.redis_state import RedisConfig, RedisState
from sluice.shared import LocalState, local, open_backend, register_backend

from .servers import free_port
from .servers.redis import own_redis, redis_prefix, redis_server, start_redis  # noqa: F401 (fixtures)
from .test_shared_state import allowed_by, check_refusals


def _state(server, prefix: str = "t:", **settings) -> RedisState:
    """A backend on ``server``; unless a test sets it, a timeout no loaded machine reaches, so
    that the answers a test checks are Redis's own, never ``on_error``'s."""
    return RedisState(RedisConfig(address=server.address, prefix=prefix, **{"timeout": 2.0, **settings}))


def _events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


async def test_refusals_say_when_to_retry_as_the_local_backend_does(redis_server, redis_prefix):
    async with _state(redis_server, redis_prefix) as state:
        await check_refusals(state)


async def test_counters_and_windows(redis_server, redis_prefix):
    async with _state(redis_server, redis_prefix) as state:
        assert [await state.incr("requests") for _ in range(3)] == [1, 2, 3]
        assert await state.incr("requests", 10) == 13
        assert await state.incr("w", 3, window=3600) == 3
        assert await state.incr("w", 1, window=3600) == 4
        assert await state.incr("short", 5, window=0.05) == 5
        deadline = time.monotonic() + 5
        while await state.incr("short", 1, window=0.05) != 1:  # the window ended: it starts again
            assert time.monotonic() < deadline, "the window never ended"
            await trio.sleep(0.02)


def test_one_bucket_across_two_processes(redis_server, redis_prefix):
    """Two processes with a client each: granted = burst + rate × elapsed (±10%), not doubled."""
    rate, burst = 200.0, 20.0

    def hammer(seconds: float) -> tuple[int, float, float]:
        async def run() -> tuple[int, float, float]:
            allowed = 0
            async with _state(redis_server, redis_prefix, on_error="closed") as state:
                start = time.monotonic()
                while time.monotonic() < start + seconds:
                    allowed += await state.hit("10.0.0.1", rate, burst)
                end = time.monotonic()
                assert not state.down
            return allowed, start, end

        return trio.run(run)

    total, elapsed = allowed_by(2, 1.0, hammer)
    expected = burst + rate * elapsed
    assert 0.9 * expected <= total <= 1.1 * expected, (total, expected, elapsed)


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_redis_killed_then_back(own_redis, on_error):
    """Killed: takes answer at once as configured, logged once; restarted: Redis decides again."""
    async with _state(own_redis, timeout=0.05, on_error=on_error, backoff_min=0.05, backoff_max=0.2) as state:
        outages, unavailable = state._outages._value.get(), state._unavailable._value.get()
        assert await state.take("k", 2, 0.001, 2.0) == (True, 0.0)
        assert not (await state.take("k", 1, 0.001, 2.0))[0]  # empty: refused by Redis
        with capture_logs() as logs:
            own_redis.kill()
            answers = []
            for _ in range(20):
                start = time.monotonic()
                answers.append((await state.take("k", 1, 0.001, 2.0))[0])
                assert time.monotonic() - start < 0.05 + 0.05
            assert state.down
            assert answers == [on_error == "open"] * 20
            assert state._outages._value.get() == outages + 1
            assert state._unavailable._value.get() == unavailable + 20  # each answered without Redis
            (down,) = _events(logs, "shared backend down")
            assert down["on_error"] == on_error and down["address"] == own_redis.address
            assert not _events(logs, "shared backend up")

            own_redis.start()  # same port, empty (no persistence)
            deadline = time.monotonic() + 10
            while state.down:
                assert time.monotonic() < deadline, "never reconnected"
                await state.take("k", 1, 0.001, 2.0)
                await trio.sleep(0.01)
            assert len(_events(logs, "shared backend up")) == 1
            assert len(_events(logs, "shared backend down")) == 1
        # Redis decides again: the bucket it now holds empties and refuses
        while (await state.take("again", 1, 0.001, 2.0))[0]:
            pass
        allowed, retry_after = await state.take("again", 1, 0.001, 2.0)
        assert not allowed and 0 < retry_after < float("inf")


async def test_a_hung_redis_never_blocks_longer_than_the_timeout(own_redis, redis_prefix):
    """SIGSTOP: the server accepts nothing and answers nothing; each take returns by its timeout."""
    timeout = 0.1
    async with _state(own_redis, redis_prefix, timeout=timeout, backoff_min=0.05, backoff_max=0.1) as state:
        assert await state.incr("n") == 1
        os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            slowest = 0.0
            end = time.monotonic() + 0.5  # several backoffs: probes, each bounded too
            while time.monotonic() < end:
                start = time.monotonic()
                assert await state.take("k", 1, 10.0, 5.0) == (True, 0.0)  # open
                slowest = max(slowest, time.monotonic() - start)
            assert state.down
            assert slowest < timeout + 0.05, slowest  # a shared machine's scheduling, not a retry's second timeout
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while state.down:
            assert time.monotonic() < deadline, "never recovered"
            await state.incr("probe")
            await trio.sleep(0.01)
        # answers stay matched to their requests after the cancelled ones
        assert await state.incr("n") == 2
        assert await state.take("fresh", 1, 10.0, 5.0) == (True, 0.0)


async def test_many_tasks_at_once_through_a_kill_and_a_hang(own_redis, redis_prefix):
    """Concurrent takes share one client: cancelled and lost requests never fail a take or
    outlast the timeout, and each outage is logged once, then its end."""
    timeout, slowest, calls = 0.1, [0.0], [0]

    async def taker(state, stop: trio.Event) -> None:
        while not stop.is_set():
            start = time.monotonic()
            await state.take("k", 1, 1e6, 1e6)
            slowest[0] = max(slowest[0], time.monotonic() - start)
            calls[0] += 1
            await trio.sleep(0)  # as a request's other awaits would

    async def recovered(state) -> None:
        with trio.fail_after(10):
            while state.down:
                await trio.sleep(0.01)

    with capture_logs() as logs:
        async with _state(own_redis, redis_prefix, timeout=timeout, backoff_min=0.02, backoff_max=0.05) as state:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(taker, state, stop)
                await trio.sleep(0.1)
                own_redis.kill()
                await trio.sleep(0.2)
                assert state.down
                await trio.to_thread.run_sync(own_redis.start)  # the loop runs on meanwhile
                await recovered(state)
                os.kill(own_redis.pid, signal.SIGSTOP)
                try:
                    await trio.sleep(0.2)
                    assert state.down
                finally:
                    os.kill(own_redis.pid, signal.SIGCONT)
                await recovered(state)
                stop.set()
            assert await state.incr("after") == 1  # answers still matched to their requests
    assert calls[0] > 100
    assert slowest[0] < timeout + 0.05, slowest
    # the kill and the hang, each logged once then its end (a loop this busy may add a late answer's)
    pairs = [e["event"] for e in logs if e["event"].startswith("shared backend")]
    assert len(pairs) >= 4 and pairs == ["shared backend down", "shared backend up"] * (len(pairs) // 2), pairs


async def test_redis_down_at_start_is_an_outage_not_an_error():
    async with RedisState(RedisConfig(address=f"127.0.0.1:{free_port()}", on_error="closed")) as state:
        start = time.monotonic()
        allowed, retry_after = await state.take("k", 1, 10.0, 5.0)
        assert not allowed and retry_after > 0 and state.down
        assert await state.incr("c") > 10**9  # closed: a count as high as it can be
        assert time.monotonic() - start < 0.5


async def test_a_password_from_the_environment(tmp_path, monkeypatch):
    server = start_redis(tmp_path, "--requirepass", "s3cret")
    try:
        monkeypatch.setenv("SLUICE_TEST_REDIS_PASSWORD", "s3cret")
        async with _state(server, password_env="SLUICE_TEST_REDIS_PASSWORD") as state:
            assert await state.incr("authed") == 1 and not state.down
        with capture_logs() as logs:
            async with _state(server, on_error="closed") as state:  # no password: refused, as an outage
                assert (await state.take("k", 1, 1.0, 1.0))[0] is False and state.down
        (down,) = _events(logs, "shared backend down")
        assert "NOAUTH" in down["error"] or "Authentication" in down["error"], down
        assert "s3cret" not in repr(logs)
    finally:
        server.stop()


async def test_open_backend_selects_by_name_and_checks_settings(redis_server, redis_prefix):
    async with open_backend() as state:
        assert state is local()  # the default is the instance's table, as before
    seen = []

    @asynccontextmanager
    async def third_party(settings):
        seen.append(settings)
        yield LocalState(slots=8)

    register_backend("test-third-party", third_party)
    async with open_backend({"backend": "test-third-party", "size": 8}) as state:
        assert isinstance(state, LocalState) and seen == [{"size": 8}]
    async with open_backend({"backend": "redis", "address": redis_server.address, "prefix": redis_prefix}) as state:
        assert isinstance(state, RedisState)  # found through the sluice.shared entry point
        assert await state.incr("via-open-backend") == 1
    bad = [
        ({"backend": "memcached"}, "shared.backend: unknown backend 'memcached' (known: local, redis"),
        ({"backend": "redis", "on_error": "maybe"}, "shared.on_error:"),
        ({"backend": "redis", "timout": 1}, "shared.timout: unknown key"),
        ({"backend": "redis", "address": "no-port"}, "shared.address:"),
        ({"size": 1}, "shared.size: unknown key"),
        ({"backend": "redis", "password_env": "SLUICE_TEST_NO_SUCH_VARIABLE"},
         "shared.password_env: environment variable SLUICE_TEST_NO_SUCH_VARIABLE is not set"),
    ]
    for settings, error in bad:
        with pytest.raises(ConfigError) as exc:
            async with open_backend(settings):
                pass
        assert error in str(exc.value), settings
