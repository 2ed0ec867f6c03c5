"""rate_limit across processes (issue 11's scenarios): real ``sluice run`` processes, real Redis.

- ``--workers 2``, local mode: one limit for the instance, not one per worker;
- two instances on one Redis, global mode: N/s holds across them (±10%); the same two in
  local mode admit about twice as much (so the global test can fail);
- Redis killed mid-run: fail-open admits and counts ``error_open``, fail-closed answers 503;
  the loss and the return are logged once; Redis back (same port): limiting resumes.

Clients send each request on a fresh connection (``connection: close``), so the kernel spreads
them over a ``--workers`` instance's processes, as it would real clients'.
"""

# ruff: noqa: F811 (the fixtures imported below are test parameters by the same names)

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .proc import Running, ThreadOrigin, children, free_port, poll
from .servers.redis import own_redis, redis_prefix, redis_server  # noqa: F401 (fixtures)

RATE, BURST, SECONDS = 40.0, 10.0, 3.0


def write_config(path: Path, origin: str, *, mode: str, redis: str | None = None, prefix: str = "sluice:",
                 on_error: str = "open", admin: bool = False, timeout: float | None = None) -> Path:
    """One instance's config: one limit per route on ``mode``'s state; the Redis backend's
    timeout is its default (250 ms) unless given. The clients saturate this machine, so a
    worker's loop reads Redis's answers late: the default must not take that for an outage."""
    shared = textwrap.dedent(f"""
        [shared]
        backend = "redis"
        address = "{redis}"
        prefix = "{prefix}"
        {f"timeout = {timeout}" if timeout else "# timeout: the default"}
        backoff_min = 0.05
        backoff_max = 0.3
    """) if redis else ""
    path.write_text(textwrap.dedent(f"""
        [server]
        drain_timeout = 2
        {'[admin]' if admin else ''}
        {'enabled = true' if admin else ''}
        {'address = "127.0.0.1:0"' if admin else ''}
        {shared}
        [[listeners]]
        address = "127.0.0.1:{free_port()}"
        filters = ["rate_limit", "router"]

        [clusters.origin]
        endpoints = ["{origin}"]

        [[routes]]
        name = "all"
        match = {{ prefix = "/" }}
        cluster = "origin"

        [filters.rate_limit]
        mode = "{mode}"
        on_error = "{on_error}"
        limits = [{{ name = "fleet", key = "route", rate = {RATE}, burst = {BURST} }}]
    """))
    return path


def get(port: int, timeout: float = 5.0) -> tuple[int, dict[str, str], float]:
    """One GET on a fresh connection: (status, headers, seconds it took)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /fleet HTTP/1.1\r\nhost: fleet\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split(" ", 2)[1]), headers, time.monotonic() - began


def hammer(ports: list[int], seconds: float, clients: int = 6) -> tuple[list[int], float]:
    """``clients`` threads per port sending GETs back to back for ``seconds``: (statuses, elapsed)."""
    statuses: list[int] = []
    errors: list[BaseException] = []
    began = time.monotonic()
    deadline = began + seconds

    def client(port: int) -> None:
        try:
            while time.monotonic() < deadline:
                statuses.append(get(port)[0])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(port,)) for port in ports for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    assert not errors, errors
    return statuses, time.monotonic() - began


def port_of(proxy: Running) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def metrics(proxy: Running) -> list:
    proxy.wait_for_output("admin listening")
    url = next(json.loads(line)["url"] for line in proxy.stderr if '"admin listening"' in line)
    text = httpx.get(f"{url}/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def decisions(samples: list, outcome: str) -> float:
    return sum(s.value for s in samples if s.name == "sluice_plugin_rate_limit_decisions_total"
               and s.labels.get("outcome") == outcome)


def events(proxy: Running, event: str) -> list[dict]:
    return [json.loads(line) for line in list(proxy.stderr) if f'"event": "{event}"' in line
            or f'"event":"{event}"' in line]


@pytest.fixture
def origin():
    with ThreadOrigin() as served:
        yield served


def test_two_workers_hold_one_limit_for_the_instance(tmp_path, origin):
    path = write_config(tmp_path / "sluice.toml", origin.address, mode="local")
    with Running("-c", str(path), "--workers", "2") as proxy:
        poll(lambda: len(proxy.urls) >= 2, what="both workers listening", proxy=proxy)
        assert len(children(proxy.pid)) == 2
        statuses, elapsed = hammer([port_of(proxy)], SECONDS, clients=8)
        refusers = {e.get("pid") for e in events(proxy, "rate limited")}
    served, expected = statuses.count(200), BURST + RATE * elapsed
    print(f"--workers 2, local: {served} admitted of {len(statuses)} in {elapsed:.2f} s; due {expected:.0f}")
    assert set(statuses) == {200, 429}
    assert len(statuses) > 2 * expected  # demand well above the limit the whole time
    assert 0.9 * expected <= served <= 1.1 * expected, (served, expected)  # not 2x: one table
    assert len(origin.served) == served
    assert len(refusers - {None}) in (0, 2), refusers  # (when the log names the pid: both workers refused)


@pytest.mark.parametrize(("mode", "factor"), [("global", 1), ("local", 2)])
def test_a_global_limit_holds_across_two_instances(tmp_path, origin, redis_server, redis_prefix, mode, factor):
    """Two instances on one Redis admit N/s between them (±10%); in local mode each has its own
    buckets and they admit about twice that: the test can tell the two apart."""
    proxies = []
    try:
        for i in range(2):
            path = write_config(tmp_path / f"sluice{i}.toml", origin.address, mode=mode,
                                redis=redis_server.address, prefix=redis_prefix)
            proxies.append(Running("-c", str(path), "--workers", "1"))
        get(port_of(proxies[0]))  # both connected to Redis before the clock starts: one token each
        get(port_of(proxies[1]))
        statuses, elapsed = hammer([port_of(p) for p in proxies], SECONDS)
    finally:
        for p in proxies:
            p.stop()
    lost = [e for p in proxies for e in events(p, "rate limit store lost") + events(p, "shared backend down")]
    assert not lost, lost  # Redis answered every take in time: no request was admitted by on_error
    served, expected = statuses.count(200) + 2, factor * (BURST + RATE * elapsed)
    print(f"2 instances, {mode}: {served} admitted of {len(statuses) + 2} in {elapsed:.2f} s; "
          f"N x duration + burst = {BURST + RATE * elapsed:.0f}")
    assert len(statuses) > 2 * expected
    assert 0.9 * expected <= served <= 1.1 * expected, (served, expected)


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_redis_killed_then_back(tmp_path, origin, own_redis, on_error):
    path = write_config(tmp_path / "sluice.toml", origin.address, mode="global", redis=own_redis.address,
                        on_error=on_error, admin=True)
    with Running("-c", str(path), "--workers", "1") as proxy:
        port = port_of(proxy)
        before, _ = hammer([port], 1.0, clients=4)
        assert set(before) == {200, 429}  # limiting on Redis

        own_redis.kill()  # SIGKILL, by PID
        firsts = [get(port) for _ in range(5)]
        during, _ = hammer([port], 1.0, clients=4)
        waits = [round(t * 1000, 1) for _, _, t in firsts]
        print(f"on_error={on_error}: the first requests after the kill took {waits} ms")
        if on_error == "open":
            assert {s for s, _, _ in firsts} | set(during) == {200}  # everything admitted
        else:
            assert {s for s, _, _ in firsts} | set(during) == {503}
            assert firsts[0][1]["retry-after"] == "1"
        assert max(t for _, _, t in firsts) < 1.0  # bounded by the timeout, not hung
        lost = events(proxy, "rate limit store lost")
        assert len(lost) == 1 and lost[0]["on_error"] == on_error, lost  # once, not per request

        def counted() -> list | None:  # (each worker flushes its counts once a second)
            samples = metrics(proxy)
            return samples if decisions(samples, f"error_{on_error}") >= len(during) + len(firsts) else None

        samples = poll(counted, what="the error decisions counted", proxy=proxy)
        assert decisions(samples, "error_open" if on_error == "closed" else "error_closed") == 0

        own_redis.start()  # the same port, empty
        poll(lambda: get(port) and events(proxy, "rate limit store back"), what="rate limit store back",
             proxy=proxy)
        after, _ = hammer([port], 1.0, clients=4)
        assert set(after) == {200, 429}, sorted(set(after))  # limiting again
        back = events(proxy, "rate limit store back")
        assert len(back) == 1 and back[0]["down_for"] > 0, back
        assert len(events(proxy, "rate limit store lost")) == 1


def test_a_hung_redis_costs_the_first_request_the_timeout_and_the_next_ones_nothing(tmp_path, origin, own_redis):
    """SIGSTOP: Redis accepts nothing and answers nothing. The request that finds it hung waits
    the timeout (the default, 250 ms), once; the backend then skips Redis during its backoff, so
    the requests after it are not slowed (fail-open: admitted)."""
    path = write_config(tmp_path / "sluice.toml", origin.address, mode="global", redis=own_redis.address)
    with Running("-c", str(path), "--workers", "1") as proxy:
        port = port_of(proxy)
        warm = [get(port)[2] for _ in range(5)]
        os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            hung = [get(port) for _ in range(5)]
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
    waits = [round(t * 1000, 1) for _, _, t in hung]
    print(f"hung Redis, timeout 250 ms (the default): warm requests {[round(t * 1000, 1) for t in warm]} ms, "
          f"then {waits} ms")
    assert [s for s, _, _ in hung] == [200] * 5
    assert 0.25 <= hung[0][2] < 1.0, waits  # the timeout, once
    assert max(t for _, _, t in hung[1:]) < hung[0][2], waits  # then nothing
    assert len(events(proxy, "rate limit store lost")) == 1
