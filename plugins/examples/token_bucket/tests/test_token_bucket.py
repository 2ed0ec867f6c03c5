"""sluice-token-bucket, tested with sluice's plugin author kit.

The buckets live in ``sluice.shared.local()``, one table per process that
outlives a test, so each test limits keys of its own (a fresh ``x-user``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest
import sluice_token_bucket
import trio

from sluice import ConfigError
from sluice.testing import contract, run_filter

EXTRA = {"token_bucket": sluice_token_bucket}
CHAIN = ["token_bucket", "router"]


def user() -> str:
    return uuid.uuid4().hex


def limited(**settings) -> dict:
    return {"filters": {"token_bucket": {"key": "header:x-user", **settings}}}


async def test_a_burst_passes_then_429_with_retry_after():
    settings = {"rate": 0.5, "burst": 2, "key": "header:x-user"}
    who = [("host", "a"), ("x-user", user())]
    runs = [await run_filter(sluice_token_bucket.TokenBucket, settings=settings, request=("GET", "/", who))
            for _ in range(3)]
    assert [r.local_reply is None for r in runs] == [True, True, False]
    assert runs[0].response.headers.get("ratelimit-limit") == "2"
    assert runs[0].response.headers.get("ratelimit-policy") == "2;w=4"
    refused = runs[2].local_reply
    assert refused.status == 429
    headers = dict(refused.headers)
    assert headers["retry-after"] == "2"  # one token at 0.5/s: 2 s
    assert headers["ratelimit-remaining"] == "0"
    assert any(e.get("event") == "rate limited" and e.get("filter") == "token_bucket" for e in runs[2].log)


async def test_a_refused_request_never_reaches_the_origin(origin, sluice_proxy):
    proxy = await sluice_proxy(filters=CHAIN, config=limited(rate=0.1, burst=2), extra=EXTRA)
    me, other = {"x-user": user()}, {"x-user": user()}
    statuses = [(await proxy.client.get(f"/n{i}", headers=me)).status_code for i in range(4)]
    assert statuses == [200, 200, 429, 429]
    assert (await proxy.client.get("/other", headers=other)).status_code == 200  # a bucket per key
    assert [r.path for r in origin.requests] == ["/n0", "/n1", "/other"]


async def test_a_route_has_its_own_limit(origin, sluice_proxy):
    config = limited(rate=0.1, burst=5) | {"routes": [
        {"match": {"prefix": "/strict"}, "cluster": "origin", "filters": {"token_bucket": {"burst": 1}}},
        {"match": {"prefix": "/"}, "cluster": "origin"},
    ]}
    proxy = await sluice_proxy(filters=CHAIN, config=config, extra=EXTRA)
    me = {"x-user": user()}
    strict = [(await proxy.client.get("/strict", headers=me)).status_code for _ in range(2)]
    loose = [(await proxy.client.get("/loose", headers=me)).status_code for _ in range(5)]
    assert strict == [200, 429]
    assert loose == [200] * 5  # the route's bucket is not the listener's


async def test_a_missing_header_is_refused_when_asked(sluice_proxy):
    proxy = await sluice_proxy(filters=CHAIN, config=limited(missing_header="reject"), extra=EXTRA)
    r = await proxy.client.get("/")
    assert r.status_code == 400
    assert r.text == "missing x-user header\n"


@pytest.mark.parametrize("settings, where", [
    ({"key": "cookie:session"}, "filters.token_bucket.key"),
    ({"rate": 0}, "filters.token_bucket.rate"),
    ({"brust": 3}, "filters.token_bucket.brust"),
])
async def test_bad_settings_are_named_by_key_path(sluice_proxy, settings, where):
    with pytest.raises(ConfigError, match=re.escape(where)):
        await sluice_proxy(filters=CHAIN, config={"filters": {"token_bucket": settings}}, extra=EXTRA)


async def test_a_bad_route_setting_is_named_by_key_path(sluice_proxy):
    config = {"routes": [{"match": {"prefix": "/"}, "cluster": "origin", "filters": {"token_bucket": {"brust": 1}}}]}
    with pytest.raises(ConfigError, match=re.escape("routes[0].filters.token_bucket.brust")):
        await sluice_proxy(filters=CHAIN, config=config, extra=EXTRA)


test_contract = contract.battery("token_bucket", settings={"rate": 1e6, "burst": 1e6}, extra=EXTRA)


# -- end to end: `sluice run --workers N`, one limit for the instance, whatever N ---------------

RATE, BURST, SECONDS, CLIENTS = 20.0, 10.0, 2.0, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _get(port: int) -> tuple[int, str]:
    """One request on a fresh connection: (status, the pid of the worker that answered)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /e2e HTTP/1.1\r\nhost: e2e\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    pid = re.search(rb"\r\nx-sluice-worker: (\d+)\r\n", data, re.IGNORECASE)
    return status, pid.group(1).decode() if pid else ""


@pytest.mark.parametrize("workers", [1, 2])
async def test_workers_share_one_limit(origin, tmp_path, workers):
    port = _free_port()
    config = tmp_path / "sluice.toml"
    config.write_text(textwrap.dedent(f"""
        [[listeners]]
        address = "127.0.0.1:{port}"
        filters = ["token_bucket", "router"]

        [clusters.origin]
        endpoints = ["{origin.address}"]

        [[routes]]
        match = {{ prefix = "/" }}
        cluster = "origin"

        [filters.token_bucket]
        rate = {RATE}
        burst = {BURST}
        key = "route"
        worker_header = true
    """))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sluice", "run", "-c", str(config), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log = bytearray()
    listening = trio.Event()

    async def read_log() -> None:  # always drained: the workers log every refusal
        while chunk := await proc.stderr.receive_some(65536):
            log.extend(chunk)
            if log.count(b" listening on ") >= workers:
                listening.set()

    results: list[tuple[int, str]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            with trio.move_on_after(30):  # each worker says "pid N listening on ..."
                await listening.wait()
            assert listening.is_set(), f"sluice did not start: {log.decode(errors='replace')}"
            start = trio.current_time()
            deadline = start + SECONDS

            async def client() -> None:
                while trio.current_time() < deadline:
                    with trio.fail_after(10):
                        results.append(await _get(port))

            async with trio.open_nursery() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(client)
            elapsed = trio.current_time() - start
            proc.terminate()
            with trio.move_on_after(15):
                await proc.wait()
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    served = [s for s, _ in results if s == 200]
    expected = BURST + RATE * elapsed
    pids = {pid for _, pid in results}
    assert {s for s, _ in results} == {200, 429}, results
    assert len(pids) == workers and "" not in pids, pids  # every worker answered
    assert len(results) > 3 * expected  # demand well above the limit the whole time
    # One bucket for the instance: burst + rate x elapsed, not twice that.
    assert 0.85 * expected <= len(served) <= expected + 1, (len(served), expected, len(results))
    assert len(origin.requests) == len(served)
