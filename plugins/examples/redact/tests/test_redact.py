"""sluice-redact, tested with sluice's plugin author kit: fixed and chunked
bodies through a real proxy, patterns cut across chunks, a large body, and
the framing the core chooses once Content-Length is gone."""

from __future__ import annotations

import gzip
import random
import re

import httpx
import pytest
import sluice_redact
import trio

from sluice import ConfigError
from sluice.testing import Reply, contract, run_filter

EXTRA = {"redact": sluice_redact}
CHAIN = ["redact", "router"]
CARD = b"4111 1111 1111 1111"  # passes the Luhn check
TEXT = [("content-type", "text/plain; charset=utf-8")]


def reference(body: bytes) -> bytes:
    """What the whole body redacted in one go looks like (no chunk boundaries)."""
    out = re.sub(sluice_redact.PATTERNS["email"].encode(), b"[email]", body)
    return re.sub(sluice_redact.PATTERNS["card"].encode(),
                  lambda m: b"[card]" if sluice_redact.luhn(m.group()) else m.group(), out)


async def test_a_pattern_cut_across_chunks_is_found():
    run = await run_filter(sluice_redact.Redact, response=(200, TEXT + [("content-length", "44")]),
                           response_body=[b"mail ann@exa", b"mple.org, card 4111 1111 11", b"11 1111 ok"])
    assert run.response_body == b"mail [email], card [card] ok"
    assert run.response.headers.get("content-length") is None  # the core frames the new size
    assert [e for e in run.log if e["event"] == "redacted"] == [
        {"event": "redacted", "log_level": "info", "request_id": run.ctx.request_id, "filter": "redact",
         "email": 1, "card": 1}]


@pytest.mark.parametrize("body", [
    b"order 1234567812345678 shipped",  # fails Luhn: an order number, kept
    b"no secrets here",
    b"",
])
async def test_what_is_not_a_secret_is_kept(body):
    run = await run_filter(sluice_redact.Redact, response=(200, TEXT), response_body=[body] if body else None)
    assert run.response_body == body


async def test_any_chunking_gives_the_whole_body_answer():
    rng = random.Random(7)
    words = [b"lorem", b"ipsum", CARD, b"ann@example.org", b"4111-1111-1111-1112", b"x@y", b"12", b"\n"]
    body = b" ".join(rng.choice(words) for _ in range(3000))
    expected = reference(body)
    assert expected != body
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(body)), 40))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        run = await run_filter(sluice_redact.Redact, response=(200, TEXT), response_body=chunks)
        assert run.response_body == expected


async def test_a_fixed_length_body_is_reframed_through_the_proxy(origin, sluice_proxy):
    origin.script("/fixed", Reply(headers=TEXT, body=[b"to: bob@exam", b"ple.com; pay with " + CARD[:9],
                                                      CARD[9:] + b" today"], chunk_delay=0.05))
    proxy = await sluice_proxy(filters=CHAIN, extra=EXTRA)
    r = await proxy.client.get("/fixed")
    assert r.status_code == 200
    assert r.content == b"to: [email]; pay with [card] today"
    assert r.headers.get("transfer-encoding") == "chunked"  # HTTP/1.1: the core chose chunked framing
    assert "content-length" not in r.headers
    assert origin.requests[0].header("accept-encoding") is None  # asked for plain text


async def test_without_the_filter_the_secrets_pass(origin, sluice_client):
    """The control for the tests above: the default chain (no redact) relays the origin's bytes."""
    origin.script("/plain", Reply(headers=TEXT, body=b"ann@example.org " + CARD))
    r = await sluice_client.get("/plain")
    assert r.content == b"ann@example.org " + CARD
    assert r.headers["content-length"] == str(len(r.content))


async def test_a_chunked_body_and_its_trailers(origin, sluice_proxy):
    origin.script("/chunked", Reply(headers=[("content-type", "application/json")], chunked=True,
                                    body=[b'{"email": "a.b@', b'example.co.uk", "n": 1}'],
                                    trailers=[("x-checksum", "abc")], chunk_delay=0.02))
    proxy = await sluice_proxy(filters=CHAIN, extra=EXTRA)
    r = await proxy.client.get("/chunked")
    assert r.content == b'{"email": "[email]", "n": 1}'


async def test_over_http2_the_body_goes_in_data_frames(origin, sluice_proxy):
    origin.script("/h2", Reply(headers=TEXT, body=[b"to ann@exam", b"ple.org: " + CARD], chunk_delay=0.02))
    listener = {"address": "127.0.0.1:0", "filters": CHAIN, "http2": True}  # h2c, prior knowledge
    proxy = await sluice_proxy(extra=EXTRA, config={"listeners": [listener]})
    async with httpx.AsyncClient(http1=False, http2=True, base_url=proxy.url) as client:
        r = await client.get("/h2")
    assert r.http_version == "HTTP/2"
    assert r.content == b"to [email]: [card]"
    assert "content-length" not in r.headers


@pytest.mark.parametrize("headers", [
    [("content-type", "image/png")],
    [("content-type", "text/plain"), ("content-encoding", "gzip")],
    [],
])
async def test_binary_compressed_and_untyped_bodies_pass_untouched(origin, sluice_proxy, headers):
    plain = b"ann@example.org " + CARD
    body = gzip.compress(plain) if ("content-encoding", "gzip") in headers else plain
    origin.script("/raw", Reply(headers=headers, body=body))
    proxy = await sluice_proxy(filters=CHAIN, extra=EXTRA)
    r = await proxy.client.get("/raw")
    assert r.content == plain  # (httpx decompresses)
    assert r.headers["content-length"] == str(len(body))


async def test_a_large_body_streams(origin, sluice_proxy):
    unit = b"customer ann@example.org paid with " + CARD + b"; " + b"z" * 900 + b"\n"
    chunks = [unit * 64 for _ in range(64)]  # ~4 MiB, 64 chunks
    origin.script("/large", Reply(headers=TEXT, body=chunks, chunked=True))
    proxy = await sluice_proxy(filters=CHAIN, extra=EXTRA)
    with trio.fail_after(30):
        r = await proxy.client.get("/large")
    assert r.status_code == 200
    assert r.content == reference(b"".join(chunks))
    assert r.content.count(b"[card]") == 64 * 64 and b"@" not in r.content


async def test_a_route_can_opt_out(origin, sluice_proxy):
    origin.script("/*", Reply(headers=TEXT, body=b"ann@example.org"))
    config = {"routes": [{"match": {"prefix": "/raw"}, "cluster": "origin", "filters": {"redact": {"disabled": True}}},
                         {"match": {"prefix": "/"}, "cluster": "origin"}]}
    proxy = await sluice_proxy(filters=CHAIN, extra=EXTRA, config=config)
    assert (await proxy.client.get("/raw")).content == b"ann@example.org"
    assert (await proxy.client.get("/cooked")).content == b"[email]"


@pytest.mark.parametrize("settings, where", [
    ({"patterns": {"bad": "("}}, "filters.redact.patterns"),
    ({"patterns": {"empty": "x*"}}, "filters.redact.patterns"),
    ({"replacement": "{oops}"}, "filters.redact.replacement"),
    ({"max_match": 1}, "filters.redact.max_match"),
])
async def test_bad_settings_are_named_by_key_path(sluice_proxy, settings, where):
    with pytest.raises(ConfigError, match=re.escape(where)):
        await sluice_proxy(filters=CHAIN, extra=EXTRA, config={"filters": {"redact": settings}})


test_contract = contract.battery("redact", extra=EXTRA)
