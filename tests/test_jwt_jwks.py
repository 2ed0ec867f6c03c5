"""The jwt filter's keys at runtime: a JWKS served by a real HTTP server and fetched through a
configured sluice cluster (rotation, the refetch rate limit under a burst of unknown kids, the key
server down at start and mid-run), and a local JWKS file reloaded when it changes."""

from __future__ import annotations

import json
import socket

import pytest
import trio
import trustme
from structlog.testing import capture_logs

import sluice.plugins.jwt as jwt_plugin
from sluice.testing import Origin, Reply, serve

from .jwt_support import EC, ISSUER, RSA, RSA2, jwks, sign, write_jwks

EXTRA = {"jwt": jwt_plugin}
PATH = "/.well-known/jwks.json"


class KeyServer:
    """A JWKS endpoint whose keys a test changes; ``fetches`` counts the GETs it answered."""

    def __init__(self, *keys) -> None:
        self.keys = list(keys)
        self.status = 200
        self.body: bytes | None = None  # set: answered instead of the keys
        self.origin = Origin()
        self.origin.script(PATH, self._answer)

    def _answer(self, request) -> Reply:
        body = json.dumps(jwks(*self.keys)).encode() if self.status == 200 else b"down"
        body = self.body if self.body is not None else body
        return Reply(status=self.status, headers=[("content-type", "application/json")], body=body)

    @property
    def fetches(self) -> int:
        return sum(1 for r in self.origin.requests if r.path == PATH)


@pytest.fixture
async def key_server(nursery):
    server = KeyServer(RSA)
    await nursery.start(server.origin.serve)
    yield server
    server.origin.close()


def remote(address: str, **over) -> dict:
    """A config whose provider fetches its JWKS through cluster ``idp`` (at ``address``)."""
    provider = {"issuer": ISSUER, "audiences": ["api"], "jwks_uri": f"http://idp.test{PATH}", "cluster": "idp",
                **over}
    return {"clusters": {"idp": {"endpoints": [address]}}, "filters": {"jwt": {"providers": {"main": provider}}}}


async def status(proxy, token: str) -> int:
    return (await proxy.client.get("/", headers={"authorization": f"Bearer {token}"})).status_code


async def until(predicate, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (async) until true; fail past ``timeout``."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.02)


async def test_rotation_a_new_kid_is_fetched_and_a_removed_key_stops_working(origin, sluice_proxy, key_server):
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                               config=remote(key_server.origin.address, cache_ttl=0.5, refetch_interval=60))
    old, new = sign(RSA), sign(RSA2)
    assert await status(proxy, old) == 200  # the first request waits for the first fetch if it is not done
    seen = key_server.origin.requests[0]
    assert seen.header("host") == "idp.test" and seen.path == PATH  # the JWKS URI's host, through the cluster
    key_server.keys = [RSA, RSA2]  # the issuer publishes a new key and signs with it
    fetched = key_server.fetches
    assert await status(proxy, new) == 200  # unknown kid: fetched again at once
    assert key_server.fetches == fetched + 1
    key_server.keys = [RSA2]  # the old key is withdrawn: tokens signed by it fail from the next refresh
    await until(lambda: _is(proxy, old, 401))
    assert await status(proxy, new) == 200


async def _is(proxy, token, code) -> bool:
    return await status(proxy, token) == code


async def test_a_burst_of_unknown_kids_fetches_once_per_refetch_interval(origin, sluice_proxy, key_server):
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                               config=remote(key_server.origin.address, refetch_interval=60))
    limited = jwt_plugin._FETCHES().labels("main", "rate_limited")
    assert await status(proxy, sign(RSA)) == 200
    assert key_server.fetches == 1
    before = limited._value.get()
    codes: list[int] = []

    async def one(i: int) -> None:
        codes.append(await status(proxy, sign(RSA, kid=f"forged-{i}")))

    for _ in range(2):  # two bursts of 25: the first fetches once (together), the second not at all
        async with trio.open_nursery() as n:
            for i in range(25):
                n.start_soon(one, i)
    assert codes == [401] * 50
    assert key_server.fetches == 2
    assert limited._value.get() - before >= 25  # the second burst (at least) was held by the rate limit


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_no_key_server_at_start_is_a_401_keys_unavailable_logged_once(origin, sluice_proxy):
    with capture_logs() as logs:
        proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                                   config=remote(_closed_port(), refetch_interval=0.05, fetch_timeout=1))
        responses = []
        for _ in range(4):
            responses.append(await proxy.client.get("/", headers={"authorization": f"Bearer {sign(RSA)}"}))
            await trio.sleep(0.06)  # past refetch_interval: each request may try again
    assert [r.status_code for r in responses] == [401] * 4
    assert 'error_description="keys_unavailable: ' in responses[0].headers["www-authenticate"]
    failed = [e for e in logs if e["event"] == "jwks fetch failed"]
    assert len(failed) == 1 and failed[0]["provider"] == "main"  # once per outage, however many tries
    assert len(origin.requests) == 0


async def test_a_key_server_failing_mid_run_keeps_the_last_keys(origin, sluice_proxy, key_server):
    failed = jwt_plugin._FETCHES().labels("main", "failed")
    with capture_logs() as logs:
        proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                                   config=remote(key_server.origin.address, cache_ttl=0.1))
        assert await status(proxy, sign(RSA)) == 200
        before = failed._value.get()
        key_server.status = 500
        fetched = key_server.fetches

        async def failed_twice() -> bool:
            return key_server.fetches >= fetched + 2

        await until(failed_twice)  # retried (1 s backoff after the first failure)
        assert await status(proxy, sign(RSA)) == 200  # stale while error
        key_server.status = 200
        await until(lambda: _logged(logs, "jwks fetch recovered"), timeout=5)
    assert failed._value.get() - before >= 2
    assert [e["event"] for e in logs if e["event"] in ("jwks fetch failed", "jwks fetch recovered")] == [
        "jwks fetch failed", "jwks fetch recovered"]  # once per outage, however many tries failed


async def _logged(logs, event: str) -> bool:
    return any(e["event"] == event for e in logs)


async def test_a_jwks_file_is_reloaded_when_it_changes_and_a_broken_one_keeps_the_last(
        origin, sluice_proxy, tmp_path):
    path = tmp_path / "jwks.json"
    write_jwks(path, RSA)
    provider = {"issuer": ISSUER, "jwks_file": str(path), "file_poll": 0.05}
    with capture_logs() as logs:
        proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                                   config={"filters": {"jwt": {"providers": {"file": provider}}}})
        assert await status(proxy, sign(EC)) == 401
        write_jwks(path, RSA, EC)
        await until(lambda: _is(proxy, sign(EC), 200))
        path.write_text("{ half written")
        await until(lambda: _logged(logs, "jwks file invalid"))
        assert await status(proxy, sign(EC)) == 200  # the last good set serves on
        write_jwks(path, EC)
        await until(lambda: _is(proxy, sign(RSA), 401))
    assert [e["event"] for e in logs if e["event"].startswith("jwks file")] == [
        "jwks file reloaded", "jwks file invalid", "jwks file reloaded"]


async def test_the_jwks_is_fetched_over_the_clusters_tls(origin, sluice_proxy, key_server, tmp_path):
    """The key server behind a TLS front (a second sluice, trustme's certificate): the provider's
    cluster verifies it with its CA and server name, as any TLS upstream; an untrusted one is refused."""
    ca = trustme.CA()
    leaf = ca.issue_cert("idp.test")
    cert, key, ca_pem = tmp_path / "idp.crt", tmp_path / "idp.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    front = {"server": {"drain_timeout": 1},
             "listeners": [{"address": "127.0.0.1:0", "filters": ["router"],
                            "tls": {"cert": str(cert), "key": str(key)}}],
             "clusters": {"keys": {"endpoints": [key_server.origin.address]}},
             "routes": [{"match": {"prefix": "/"}, "cluster": "keys"}]}
    async with serve(front) as tls_front:
        address = f"127.0.0.1:{tls_front.address[1]}"
        config = remote(address, refetch_interval=0.05)
        config["clusters"]["idp"]["tls"] = {"ca": str(ca_pem), "server_name": "idp.test"}
        proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=config)
        assert await status(proxy, sign(RSA)) == 200
        assert key_server.fetches == 1
        with capture_logs() as logs:
            config["clusters"]["idp"]["tls"] = {"server_name": "idp.test"}  # the system's CAs: not trustme's
            untrusting = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=config)
            assert await status(untrusting, sign(RSA)) == 401
        failed = [e for e in logs if e["event"] == "jwks fetch failed"]
        assert len(failed) == 1 and "certificate verify failed" in failed[0]["error"].lower()
        assert key_server.fetches == 1  # the untrusting proxy never got past the handshake


async def test_a_reload_builds_the_provider_anew_and_stops_the_old_ones_fetches(origin, sluice_proxy, key_server):
    from sluice.control.config import parse
    from sluice.control.reload import reload
    from sluice.testing.plugin import default_config, merged

    def config(**over) -> dict:
        return merged(default_config(origin, ["jwt", "router"]), remote(key_server.origin.address, **over))

    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=remote(
        key_server.origin.address, cache_ttl=0.1))
    assert await status(proxy, sign(RSA)) == 200
    await until(lambda: _more_than(key_server, 2))  # the old provider refreshes every 0.1 s
    proxy.app.reload_source = lambda: parse(config(cache_ttl=300))
    assert await reload(proxy.app)
    assert await status(proxy, sign(RSA)) == 200  # the new filter fetched its own set at open
    settled = key_server.fetches
    await trio.sleep(0.5)  # five of the old refresh periods: none may come
    assert key_server.fetches == settled


async def _more_than(server: KeyServer, n: int) -> bool:
    return server.fetches > n


@pytest.mark.parametrize("garbage", [b"<html>sign in</html>", b"[" * 100_000, b'{"keys": [{"kty": "RSA"}]}',
                                     b'{"keys": "none"}', b"x" * (2 << 20)],
                         ids=["html", "nested", "bad-key", "not-a-list", "over-1-MiB"])
async def test_a_key_server_answering_garbage_is_an_outage_not_a_crash(origin, sluice_proxy, key_server, garbage):
    key_server.body = garbage
    with capture_logs() as logs:
        proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA, config=remote(key_server.origin.address))
        r = await proxy.client.get("/", headers={"authorization": f"Bearer {sign(RSA)}"})
    assert r.status_code == 401 and "keys_unavailable" in r.headers["www-authenticate"]
    assert [e["event"] for e in logs if e["event"] == "jwks fetch failed"] == ["jwks fetch failed"]


async def _fetched(logs, kids: list[str]) -> bool:
    return any(e["event"] == "jwks fetched" and e["kids"] == kids for e in logs)


async def test_a_withdrawn_key_refuses_its_cached_tokens_at_once(origin, sluice_proxy, key_server, tmp_path):
    """The cache is bound to the key set: the first request after a JWKS refresh (or a file reload)
    that drops a key is refused, though the token was verified and cached before."""
    with capture_logs() as logs:
        proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                                   config=remote(key_server.origin.address, cache_ttl=0.3, refetch_interval=60))
        old = sign(RSA)
        assert await status(proxy, old) == 200 and await status(proxy, old) == 200  # verified, then a hit
        key_server.keys = [RSA2]
        await until(lambda: _fetched(logs, ["rsa-2"]))
        assert await status(proxy, old) == 401
    path = tmp_path / "jwks.json"
    write_jwks(path, RSA, EC)
    provider = {"issuer": ISSUER, "jwks_file": str(path), "file_poll": 0.05}
    with capture_logs() as logs:
        proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                                   config={"filters": {"jwt": {"providers": {"file": provider}}}})
        token = sign(EC)
        assert await status(proxy, token) == 200 and await status(proxy, token) == 200
        write_jwks(path, RSA)
        await until(lambda: _logged(logs, "jwks file reloaded"))
        assert await status(proxy, token) == 401


async def test_a_token_whose_kid_was_just_fetched_is_cached_with_the_new_set(
        origin, sluice_proxy, key_server, monkeypatch):
    """The entry is bound to the set its key came from (the one the refetch brought), not the
    set the request started with, so the next request with that token is a hit."""
    calls = []
    real = jwt_plugin.verify
    monkeypatch.setattr(jwt_plugin, "verify", lambda parsed, key: calls.append(key.kid) or real(parsed, key))
    proxy = await sluice_proxy(filters=["jwt", "router"], extra=EXTRA,
                               config=remote(key_server.origin.address, refetch_interval=60))
    assert await status(proxy, sign(RSA)) == 200
    key_server.keys = [RSA, RSA2]
    new = sign(RSA2)
    assert await status(proxy, new) == 200 and await status(proxy, new) == 200
    assert calls == ["rsa-1", "rsa-2"]  # the second request with the new kid was a hit
