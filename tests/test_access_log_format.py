"""The access log's configurable format: the whole field catalog as JSON,
Envoy-style text templates, capped and redacted bodies, and config errors
that name the key, the unknown name and the known ones."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import trio

from sluice import ConfigError
from sluice.plugins.access_log import AccessLog
from sluice.plugins.access_log_fields import CATALOG
from sluice.testing import serve

from .conftest import config, raw_request
from .origin import Reply
from .test_access_log import read_lines

PLUGINS = ["router", "balancer", "access_log"]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def logged(origin_address: str, log, listener: dict | None = None, **settings) -> dict:
    return config(origin_address, filters=["access_log", "router"], listener=listener,
                  routes=[{"name": "all", "match": {"prefix": "/"}, "cluster": "backend"}],
                  filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05, **settings}})


async def read_text(path, n: int) -> list[str]:
    with trio.fail_after(5):
        while len(lines := (path.read_text().splitlines() if path.exists() else [])) < n:
            await trio.sleep(0.05)
    return lines


async def test_the_whole_catalog_in_one_json_line(start_origin, tmp_path):
    async def answer(request, body):
        await trio.sleep(0.05)  # a measurable wait for the response head
        return Reply(201, [(b"content-type", b"application/json"), (b"x-served-by", b"origin-1")],
                     b'{"token": "s3cr3t-response", "data": "' + b"d" * 100 + b'"}')

    origin = await start_origin(answer)
    log = tmp_path / "access.jsonl"
    names = [*CATALOG, "request_headers", "response_headers"]
    cfg = logged(origin.address, log, {"trust_forwarded": True}, fields=names,
                 request_headers=["X-Tenant", "x-absent"], response_headers=["x-served-by"],
                 bodies={"max_bytes": 64, "redact": [r"card=(\d+)"]})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.post(proxy.url + "/api/x?card=4111111111111111",
                                  content=b'{"user": "ann", "password": "hunter2", "card=4111"}',
                                  headers={"x-tenant": "acme", "user-agent": "ua/1", "x-request-id": "rid-9",
                                           "traceparent": TRACEPARENT, "x-forwarded-for": "203.0.113.9"})
            assert r.status_code == 201
        [raw] = await read_text(log, 1)
    entry = json.loads(raw)
    # Every field, in the order chosen; those that only say something now and then, absent.
    assert list(entry) == [n for n in names if n not in ("upgraded", "attempts", "tried")]
    port = proxy.address[1]
    assert entry["client"] == "127.0.0.1" and isinstance(entry["client_port"], int) and entry["client_port"] != port
    assert entry["client_ip"] == "203.0.113.9"  # through a trusting listener's X-Forwarded-For
    assert (entry["local_address"], entry["local_port"]) == ("127.0.0.1", port)
    assert entry["remote_user"] is None and entry["listener"]
    assert entry["start_time"] <= entry["time"] and entry["time"].endswith("Z")
    assert entry["request_id"] == "rid-9" and entry["trace_id"] == TRACEPARENT[3:35]
    assert entry["status"] == 201 and entry["success"] is True and entry["flags"] is None
    assert (entry["method"], entry["protocol"], entry["scheme"]) == ("POST", "HTTP/1.1", "http")
    assert entry["path"] == "/api/x?card=4111111111111111"
    assert entry["url"] == f"http://{entry['host']}/api/x?card=4111111111111111"
    assert entry["user_agent"] == "ua/1" and entry["route"] == "all"
    assert entry["request_header_bytes"] > 200 and entry["response_header_bytes"] > 60
    assert entry["bytes_in"] == 51 and entry["bytes_out"] == len(r.content)
    assert entry["upstream"] == origin.address and entry["cluster"] == "backend"
    host, port = entry["upstream_local_address"].rsplit(":", 1)  # the proxy's end of its upstream connection
    assert host == "127.0.0.1" and int(port) not in (origin.port, proxy.address[1])
    assert 0 <= entry["upstream_connected_ms"] <= entry["response_ms"]
    assert entry["filter_ms"]["router.request_headers"] > 0  # [metrics] on: the chain times each phase
    assert entry["request_ms"] <= entry["response_ms"] and entry["response_ms"] >= 50
    assert entry["response_ms"] + entry["response_tx_ms"] == pytest.approx(entry["duration_ms"], abs=1)
    assert entry["request_body"] == '{"user": "ann", "password": "***", "card=***"}'
    sent = ('{"token": "s3cr3t-response", "data": "' + "d" * 100)[:64]  # the cap, then redacted
    assert entry["response_body"] == sent.replace("s3cr3t-response", "***") + "..."
    assert entry["request_headers"] == {"x-tenant": "acme", "x-absent": None}
    assert entry["response_headers"] == {"x-served-by": "origin-1"}


async def test_the_default_line_is_the_plain_filter_and_a_body_field_the_capturing_one(tmp_path):
    plain = AccessLog.from_config(AccessLog.Config(path=str(tmp_path / "a")))
    timing = AccessLog.from_config(AccessLog.Config(path=str(tmp_path / "a"), fields=["response_ms"]))
    text = AccessLog.from_config(AccessLog.Config(path=str(tmp_path / "a"), format="text",
                                                  template="%REQUEST_BODY%"))
    assert type(plain) is AccessLog  # the chain runs its on_complete only
    assert type(timing) is not AccessLog and isinstance(timing, AccessLog) and timing.name == "access_log"
    assert type(text) is type(timing)


async def test_a_text_template_in_envoy_operators(start_origin, tmp_path):
    origin = await start_origin()
    log = tmp_path / "access.log"
    template = ('%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% '
                '"%REQ(USER-AGENT):5%" %REQ(X-ABSENT)% %RESP(CONTENT-TYPE)% %UPSTREAM_HOST% '
                '%REQUEST_ID% %TRACE_ID% 100% %DURATION% %FILTER_TIME%')
    async with serve(logged(origin.address, log, format="text", template=template), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            await client.get(proxy.url + "/a?b=c", headers={"user-agent": "curl/8.0", "x-request-id": "r1",
                                                            "traceparent": TRACEPARENT})
            await client.get(proxy.url + "/none", headers={"x-request-id": "r2"})
        lines = await read_text(log, 2)
    assert re.fullmatch(r'GET /a\?b=c HTTP/1\.1 200 - "curl/" - text/plain ' + re.escape(origin.address)
                        + r" r1 4bf92f3577b34da6a3ce929d0e0e4736 100% \d+\.\d+"
                        + r" (\w+\.\w+=[\d.e-]+,)*router\.request_headers=[\d.e-]+(,\S+)?", lines[0]), lines[0]
    assert lines[1].startswith("GET /none HTTP/1.1 200 - ")


async def test_the_default_text_format_is_envoys(start_origin, tmp_path):
    origin = await start_origin()
    log = tmp_path / "access.log"
    async with serve(logged(origin.address, log, format="text"), plugins=PLUGINS) as proxy:
        await raw_request(proxy.address, b"GET /x HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        await raw_request(proxy.address, b"GET /bad HTTP/1.1\r\nhost: a\r\nbad field\r\n\r\n")
        lines = await read_text(log, 2)
    assert re.fullmatch(r'\[\S+Z\] "GET /x HTTP/1\.1" 200 - 0 2 \d+\.\d+ "127\.0\.0\.1" "-" "[0-9a-f]{32}" "h" "'
                        + re.escape(origin.address) + '"', lines[0]), lines[0]
    assert re.fullmatch(r'\[\S+Z\] "GET /bad HTTP/1\.1" 400 DPE 0 0 \S+ "-" "-" "-" "-" "-"', lines[1]), lines[1]


async def test_a_body_field_on_a_refused_request_and_a_bodiless_one_is_null(start_origin, tmp_path):
    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    cfg = logged(origin.address, log, fields=["path", "status", "request_body", "response_ms", "success"])
    async with serve(cfg, plugins=PLUGINS) as proxy:
        await raw_request(proxy.address, b"GET /quiet HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        await raw_request(proxy.address, b"GET /bad HTTP/1.1\r\nhost: a\r\nbad field\r\n\r\n")
        entries = await read_lines(log, 2)
    assert entries[0]["request_body"] is None and entries[0]["success"] is True
    assert entries[1] == {"path": "/bad", "status": 400, "request_body": None, "response_ms": None,
                          "success": False}


@pytest.mark.parametrize("settings, message", [
    ({"fields": ["time", "status", "bogus"]},
     "filters.access_log.fields[2]: unknown field 'bogus'; known: client, client_port,"),
    ({"format": "text", "template": "%START_TIME% %NOPE% %REQ(:METHOD)%"},
     "filters.access_log.template: unknown operator %NOPE%; known: %BYTES_RECEIVED%,"),
    ({"format": "text", "template": "%REQ(a b)%"}, "filters.access_log.template: %REQ(a b)% does not name"),
    ({"format": "text", "template": "[%START_TIME(%Y)%] %DURATION%"},
     "filters.access_log.template: '%START_TIME('... is not an operator"),
    ({"format": "text", "template": "%REQ(X-A %DURATION%"}, "filters.access_log.template: '%REQ('... is not"),
    ({"template": "%START_TIME%"}, "filters.access_log.template: only for format = \"text\""),
    ({"format": "text", "fields": ["time"]}, "filters.access_log.fields: only for format = \"json\""),
    ({"bodies": {"redact": ["("]}}, "filters.access_log.bodies.redact[0]: not a regular expression"),
    ({"request_headers": ["x-ok", "x bad"]}, "filters.access_log.request_headers[1]: 'x bad' is not a header"),
])
async def test_config_errors_name_the_key_and_what_is_known(settings, message):
    cfg = config("127.0.0.1:9", filters=["access_log", "router"], filter_settings={"access_log": settings})
    with pytest.raises(ConfigError) as caught:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert message in str(caught.value)


def test_every_catalog_field_is_documented_in_the_docstring_and_the_readme():
    from pathlib import Path

    import sluice.plugins.access_log as module

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Access log", 1)[1].split("\n## ", 1)[0]
    for name, field in CATALOG.items():
        assert re.search(rf"^{name}\s+{re.escape(field.operator)}", module.__doc__, re.M), name
        assert f"| `{name}` | `{field.operator}`" in section, name


async def test_an_h2_request_with_its_user_body_and_trace(start_origin, tmp_path):
    """Over HTTP/2 (one shared exchange path): the protocol, who the auth
    filter let in, the traceparent forwarded, the body captured."""
    import hashlib

    origin = await start_origin()
    log = tmp_path / "access.jsonl"
    cfg = config(origin.address, filters=["access_log", "api_key", "router"], listener={"http2": True},
                 filter_settings={
                     "access_log": {"path": str(log), "flush_interval": 0.05,
                                    "fields": ["protocol", "remote_user", "trace_id", "status", "success",
                                               "request_body", "request_ms", "response_ms"]},
                     "api_key": {"keys": {"ci-bot": hashlib.sha256(b"k-1").hexdigest()}}})
    async with serve(cfg, plugins=[*PLUGINS, "auth"]) as proxy:
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            r = await client.post(proxy.url + "/h2", content=b"client_secret=abc&x=1",
                                  headers={"x-api-key": "k-1", "traceparent": TRACEPARENT})
            denied = await client.get(proxy.url + "/h2")
            assert (r.http_version, r.status_code, denied.status_code) == ("HTTP/2", 200, 401)
        entries = await read_lines(log, 2)
    assert [request.headers for request, _ in origin.requests][0].count((b"traceparent", TRACEPARENT.encode())) == 1
    ok, refused = entries
    assert (ok["protocol"], ok["remote_user"], ok["trace_id"], ok["status"]) == ("HTTP/2", "ci-bot",
                                                                                TRACEPARENT[3:35], 200)
    assert ok["request_body"] == "client_secret=***&x=1" and 0 <= ok["request_ms"] <= ok["response_ms"]
    assert (refused["status"], refused["remote_user"], refused["success"], refused["response_ms"]) == (
        401, None, True, None)  # a filter's answer: no upstream response head


async def test_two_hops_agree_on_the_connection_between_them_and_the_trace(start_origin, tmp_path):
    """A front sluice whose upstream (h2c, then HTTP/1.1) is a back sluice: the
    front's upstream local address is the back's client address and port,
    and the trace the front started is the one the back logs."""
    origin = await start_origin()
    back_log, front_log = tmp_path / "back.jsonl", tmp_path / "front.jsonl"
    fields = ["protocol", "client", "client_port", "upstream_local_address", "trace_id"]
    back_cfg = config(origin.address, filters=["access_log", "router"], listener={"http2": True},
                      filter_settings={"access_log": {"path": str(back_log), "flush_interval": 0.05,
                                                      "fields": fields}})
    async with serve(back_cfg, plugins=PLUGINS) as back:
        for protocol in ("h2c", "h1"):
            front_cfg = config(f"127.0.0.1:{back.address[1]}", filters=["access_log", "router"],
                               cluster={"protocol": protocol},
                               filter_settings={"access_log": {"path": str(front_log), "flush_interval": 0.05,
                                                               "fields": fields}})
            async with serve(front_cfg, plugins=PLUGINS) as front:
                async with httpx.AsyncClient() as client:
                    assert (await client.get(front.url + "/two-hops")).status_code == 200
        fronts = await read_lines(front_log, 2)
        backs = await read_lines(back_log, 2)
    for front_entry, back_entry, protocol in zip(fronts, backs, ("HTTP/2", "HTTP/1.1"), strict=True):
        assert back_entry["protocol"] == protocol
        assert front_entry["upstream_local_address"] == f"{back_entry['client']}:{back_entry['client_port']}"
        assert front_entry["trace_id"] == back_entry["trace_id"] and len(back_entry["trace_id"]) == 32
