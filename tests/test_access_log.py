"""The access_log plugin: one JSON line per request, with flags, off the event loop."""

from __future__ import annotations

import json

import httpx
import trio

from sluice.testing import serve

from .conftest import config

PLUGINS = ["router", "balancer", "access_log"]


async def read_lines(path, n: int) -> list[dict]:
    with trio.fail_after(5):
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= n:
                return [json.loads(line) for line in lines]
            await trio.sleep(0.05)


async def test_one_json_line_per_request_with_the_promised_fields(start_origin, tmp_path):
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    routes = [{"name": "api", "match": {"prefix": "/api"}, "cluster": "backend"}]
    cfg = config(origin.address, filters=["access_log", "router"], routes=routes,
                 filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            await client.post(proxy.url + "/api/items?x=1", content=b"12345",
                              headers={"user-agent": "test-agent", "x-request-id": "rid-1"})
            await client.get(proxy.url + "/elsewhere")
        entries = await read_lines(log, 2)
    ok, missing = entries
    assert ok["method"] == "POST" and ok["path"] == "/api/items?x=1" and ok["status"] == 200
    assert ok["bytes_in"] == 5 and ok["bytes_out"] == 5
    assert ok["client"] == "127.0.0.1" and ok["upstream"] == origin.address
    assert ok["request_id"] == "rid-1" and ok["route"] == "api" and ok["user_agent"] == "test-agent"
    assert ok["flags"] is None and ok["duration_ms"] > 0 and ok["time"].endswith("Z")
    assert missing["status"] == 404 and missing["flags"] == "NR" and missing["upstream"] is None


async def test_flags_say_why_sluice_answered_itself(tmp_path, start_origin):
    async def never(request, body):
        await trio.sleep(10)

    silent = await start_origin(never)
    log = tmp_path / "access.jsonl"
    cfg = config("127.0.0.1:9", filters=["access_log", "router"],
                 routes=[{"match": {"prefix": "/dead"}, "cluster": "backend"},
                         {"match": {"prefix": "/slow"}, "cluster": "slow"}],
                 filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    cfg["clusters"]["slow"] = {"endpoints": [silent.address], "response_timeout": 0.2}
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            await client.get(proxy.url + "/dead")
            await client.get(proxy.url + "/slow")
        entries = await read_lines(log, 2)
    assert [(e["status"], e["flags"]) for e in entries] == [(503, "UF"), (504, "UT")]


async def test_a_full_buffer_drops_lines_instead_of_blocking(start_origin, tmp_path):
    """With the writer unable to keep up, requests still flow and memory stays bounded."""
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    cfg = config(origin.address, filters=["access_log", "router"],
                 filter_settings={"access_log": {"path": str(log), "flush_interval": 60, "max_pending": 100}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for _ in range(150):
                assert (await client.get(proxy.url + "/")).status_code == 200
        access_log = proxy.app.filters["access_log"]
        with trio.fail_after(5):  # the last on_complete may run just after its response
            while access_log._dropped < 50:
                await trio.sleep(0.01)
        assert len(access_log._pending) == 100 and access_log._dropped == 50
    # At shutdown the buffered lines are written.
    assert len(log.read_text().splitlines()) == 100


async def test_an_unwritable_path_is_a_config_error(tmp_path):
    from sluice import ConfigError

    cfg = config("127.0.0.1:9", filters=["access_log", "router"],
                 filter_settings={"access_log": {"path": str(tmp_path / "missing-dir" / "log.jsonl")}})
    try:
        async with serve(cfg, plugins=PLUGINS):
            raise AssertionError("started with an unwritable access log")
    except ConfigError as exc:
        assert "filters.access_log.path: cannot write" in str(exc)


async def test_a_failing_disk_loses_lines_not_the_proxy(start_origin, tmp_path):
    """/dev/full accepts the open and fails every write with ENOSPC: a real full disk."""
    import os

    if not os.path.exists("/dev/full"):
        import pytest

        pytest.skip("no /dev/full here")
    origin = await start_origin()
    cfg = config(origin.address, filters=["access_log", "router"],
                 filter_settings={"access_log": {"path": "/dev/full", "flush_interval": 0.05}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await client.get(proxy.url + "/")).status_code == 200
                await trio.sleep(0.1)  # let a flush fail in between
            assert (await client.get(proxy.url + "/")).status_code == 200


async def test_no_line_is_lost_at_shutdown(start_origin, tmp_path):
    """Stopping while the writer thread is mid-batch must not close the file
    under it: every request answered is in the log once the proxy has exited.
    (A flush every millisecond keeps a batch in flight most of the time.)"""
    origin = await start_origin()
    for attempt in range(6):
        log = tmp_path / f"access-{attempt}.jsonl"
        cfg = config(origin.address, filters=["access_log", "router"],
                     filter_settings={"access_log": {"path": str(log), "flush_interval": 0.001}})
        async with serve(cfg, plugins=PLUGINS) as proxy:
            async with httpx.AsyncClient() as client:
                for _ in range(30):
                    assert (await client.get(proxy.url + "/")).status_code == 200
        assert len(log.read_text().splitlines()) == 30, f"attempt {attempt}"
