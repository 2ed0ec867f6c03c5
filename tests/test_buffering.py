"""Filters that ask for a whole body: they see it in one call, may rewrite it,
and the proxy frames the result exactly; past the buffer limit the request
gets 413 and the response 502, and nothing half-made reaches anyone."""

from __future__ import annotations

import json

import httpx

from sluice import CONTINUE, Filter, LocalReply
from sluice.testing import serve

from .conftest import InProcess, config
from .origin import Reply

PLUGINS = ["router", "balancer"]


class RedactRequest(Filter):
    """Replaces a JSON body's "password" with "***" (needs the whole body)."""

    name = "redact"
    seen: list[int] = []

    async def on_request_headers(self, ctx, request):
        ctx.buffer_request_body()
        return CONTINUE

    async def on_request_body(self, ctx, chunk, end):
        self.seen.append(len(chunk))
        document = json.loads(chunk)
        if "password" not in document:
            return LocalReply(422, "no password field\n")
        document["password"] = "***"
        return json.dumps(document).encode()


class WrapResponse(Filter):
    """Wraps the whole response body in brackets (changes its length)."""

    name = "wrap"

    async def on_response_headers(self, ctx, response):
        ctx.buffer_response_body()
        return CONTINUE

    async def on_response_body(self, ctx, chunk, end):
        return b"[" + chunk + b"]"


async def test_a_buffered_request_body_is_rewritten_and_reframed(start_origin):
    origin = await start_origin()
    RedactRequest.seen = []
    async with serve(config(origin.address, filters=["redact", "router"]), plugins=PLUGINS,
                     extra={"t": InProcess(RedactRequest)}) as proxy:
        async def chunked():
            yield b'{"user": "ann", '
            yield b'"password": "hunter2"}'

        async with httpx.AsyncClient() as client:
            r = await client.post(proxy.url + "/login", content=chunked())  # sent chunked
            refused = await client.post(proxy.url + "/login", content=b'{"user": "bob"}')
    assert r.status_code == 200
    assert RedactRequest.seen == [38, 15]  # one call per request, the whole body each time
    request, body = origin.requests[0]
    assert json.loads(body) == {"user": "ann", "password": "***"}
    headers = dict(request.headers)
    assert headers[b"content-length"] == str(len(body)).encode() and b"transfer-encoding" not in headers
    assert refused.status_code == 422 and len(origin.requests) == 1


async def test_a_buffered_request_over_the_limit_is_413(start_origin):
    origin = await start_origin()
    cfg = config(origin.address, filters=["redact", "router"],
                 listener={"limits": {"max_buffered_body_bytes": 1000}})

    async def big():
        for _ in range(5):
            yield b"x" * 400

    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(RedactRequest)}) as proxy:
        async with httpx.AsyncClient() as client:
            declared = await client.post(proxy.url + "/", content=b"x" * 2000)
            streamed = await client.post(proxy.url + "/", content=big())
    assert declared.status_code == streamed.status_code == 413
    assert origin.requests == []  # nothing half-made went upstream


async def test_a_buffered_response_body_is_rewritten_and_reframed(start_origin):
    async def chunky(request, body):
        async def parts():
            yield b"one "
            yield b"two"

        return Reply(200, [(b"content-type", b"text/plain")], parts())  # chunked upstream

    origin = await start_origin(chunky)
    async with serve(config(origin.address, filters=["wrap", "router"]), plugins=PLUGINS,
                     extra={"t": InProcess(WrapResponse)}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
            head = await client.head(proxy.url + "/")
    assert r.text == "[one two]"
    assert r.headers["content-length"] == "9" and "transfer-encoding" not in r.headers
    assert head.status_code == 200 and head.content == b""


async def test_a_buffered_response_over_the_limit_is_502(start_origin):
    async def large(request, body):
        return Reply(200, [], b"y" * 5000)

    origin = await start_origin(large)
    cfg = config(origin.address, filters=["wrap", "router"],
                 listener={"limits": {"max_buffered_body_bytes": 1000}})
    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(WrapResponse)}) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 502
    assert b"yyy" not in r.content  # no partial body reached the client
