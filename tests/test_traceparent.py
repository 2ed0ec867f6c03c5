"""W3C Trace Context: a valid traceparent goes upstream as sent, with its
tracestate; an absent or invalid one is started afresh (and a stale
tracestate dropped); the trace id is in the context and the access log,
next to the request id."""

from __future__ import annotations

import re

import httpx
import pytest

from sluice.messages import Headers
from sluice.proxy.forwarding import forward_request
from sluice.testing import serve

from .conftest import config, raw_request
from .test_access_log import read_lines
from .test_access_log_format import logged

PLUGINS = ["router", "balancer", "access_log"]
VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STARTED = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


def received(origin, name: bytes) -> list[bytes]:
    """The values of ``name`` in each request the origin got."""
    return [[v for n, v in request.headers if n == name] for request, _ in origin.requests]


def forwarded(*fields: tuple[bytes, bytes], connection: bytes | None = None) -> tuple[list, str]:
    headers = Headers([(b"host", b"a"), *fields] + ([(b"connection", connection)] if connection else []))
    _, trace_id = forward_request(headers, client_ip="127.0.0.1", scheme="http", trusted=False,
                                  drop_expect=False)
    return headers.raw(), trace_id


async def test_a_valid_traceparent_and_its_tracestate_reach_the_upstream_unchanged(start_origin, tmp_path):
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    async with serve(logged(origin.address, log), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/", headers={"traceparent": VALID, "tracestate": "congo=t61rcWkgMzE",
                                                            "x-request-id": "rid-7"})
            assert r.status_code == 200
        entries = await read_lines(log, 1)
    assert received(origin, b"traceparent") == [[VALID.encode()]]
    assert received(origin, b"tracestate") == [[b"congo=t61rcWkgMzE"]]
    assert entries[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert list(entries[0])[list(entries[0]).index("request_id") + 1] == "trace_id"  # next to it


async def test_an_absent_traceparent_is_started_once_per_request(start_origin, tmp_path):
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    async with serve(logged(origin.address, log), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await client.get(proxy.url + "/")).status_code == 200
        entries = await read_lines(log, 3)
    sent = [values[0].decode() for values in received(origin, b"traceparent")]
    matches = [STARTED.fullmatch(value) for value in sent]
    assert all(matches), sent
    assert [m[1] for m in matches] == [e["trace_id"] for e in entries]
    assert len({m[1] for m in matches}) == len({m[2] for m in matches}) == 3


async def test_the_upstream_of_an_http10_request_and_a_raw_one_gets_a_trace_too(start_origin):
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        answer = await raw_request(proxy.address, b"GET / HTTP/1.0\r\ntraceparent: nonsense\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") or answer.startswith(b"HTTP/1.0 200 ")
    [[value]] = received(origin, b"traceparent")
    assert STARTED.fullmatch(value.decode())


@pytest.mark.parametrize("value", [
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper case
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has no more fields
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
    "",
])
def test_an_invalid_traceparent_is_replaced_and_its_tracestate_dropped(value):
    fields, trace_id = forwarded((b"traceparent", value.encode()), (b"tracestate", b"congo=t61rcWkgMzE"))
    [sent] = [v for n, v in fields if n == b"traceparent"]
    m = STARTED.fullmatch(sent.decode())
    assert m and m[1] == trace_id
    assert not [v for n, v in fields if n == b"tracestate"]


def test_two_traceparents_are_one_too_many():
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    fields, trace_id = forwarded((b"traceparent", VALID.encode()), (b"traceparent", other.encode()))
    [sent] = [v for n, v in fields if n == b"traceparent"]
    assert trace_id not in (VALID[3:35], other[3:35]) and STARTED.fullmatch(sent.decode())


def test_a_later_version_is_forwarded_as_sent_with_its_extra_fields():
    value = b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds"
    fields, trace_id = forwarded((b"traceparent", value), (b"tracestate", b"a=1"))
    assert [v for n, v in fields if n in (b"traceparent", b"tracestate")] == [b"a=1", value]
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_traceparent_the_connection_field_names_is_hop_by_hop():
    fields, trace_id = forwarded((b"traceparent", VALID.encode()), connection=b"traceparent")
    [sent] = [v for n, v in fields if n == b"traceparent"]
    assert trace_id != VALID[3:35] and STARTED.fullmatch(sent.decode())


def test_an_unsampled_valid_traceparent_stays_unsampled():
    value = VALID[:-2] + "00"
    fields, trace_id = forwarded((b"traceparent", value.encode()))
    assert [v for n, v in fields if n == b"traceparent"] == [value.encode()]
