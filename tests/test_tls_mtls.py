"""mTLS on listeners (client_auth, ctx.tls_peer's identity), x-forwarded-client-cert,
and mTLS to upstreams with pinned names: real clients (curl, httpx) and a real
TLS origin that requires a client certificate."""

from __future__ import annotations

import functools
import json
import ssl

import httpx
import pytest
import trio
import trustme
from structlog.testing import capture_logs

from sluice import CONTINUE, ConfigError, Filter
from sluice.testing import serve

from .conftest import InProcess, config
from .tls_support import ca_file, issue

PLUGINS = ["router", "balancer", "tls"]
SPIFFE = "spiffe://example.org/ns/shop/sa/checkout"


class PeerEcho(Filter):
    """Sends ctx.tls_peer upstream as JSON in x-peer (the origin records it)."""

    name = "peer_echo"

    async def on_request_headers(self, ctx, request):
        request.headers.set("x-peer", json.dumps(ctx.tls_peer, sort_keys=True))
        return CONTINUE


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    where = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    return {
        "trust": ca,
        "ca": ca_file(ca, where),
        "server": issue(ca, where, "server", "localhost", uri="spiffe://example.org/ns/edge/sa/sluice"),
        "client": issue(ca, where, "client", "client.test", uri=SPIFFE, common_name="checkout, shop"),
        "rogue": issue(rogue, where, "rogue", "client.test", uri=SPIFFE),
        "upstream": issue(ca, where, "upstream", "upstream.test", uri="spiffe://example.org/ns/pay/sa/api"),
        "api": issue(ca, where, "api", "api.test", uri="spiffe://example.org/ns/edge/sa/api"),
    }


def mtls_listener(pki, **extra) -> dict:
    return {"tls": {"cert": str(pki["server"].cert), "key": str(pki["server"].key),
                    "client_ca": str(pki["ca"]), **extra}}


def client_ctx(pki, who: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if who is not None:
        ctx.load_cert_chain(str(pki[who].cert), str(pki[who].key))
    return ctx


def seen_peer(origin, i: int = -1) -> dict:
    return json.loads(dict(origin.requests[i][0].headers)[b"x-peer"])


async def curl(url: str, *args: str) -> trio.CompletedProcess:
    return await trio.run_process(["curl", "-sS", "--max-time", "5", *args, url], capture_stdout=True,
                                  capture_stderr=True, check=False)


async def test_require_fills_the_identity_and_refuses_no_certificate(start_origin, pki):
    origin = await start_origin()
    cfg = config(origin.address, filters=["peer_echo", "router"],
                 listener=mtls_listener(pki, client_auth="require"))
    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(PeerEcho)}) as proxy:
        url = f"https://localhost:{proxy.address[1]}/who"
        done = await curl(url, "--cacert", str(pki["ca"]), "--cert", str(pki["client"].cert),
                          "--key", str(pki["client"].key))
        assert done.returncode == 0 and done.stdout == b"/who", done.stderr
        peer = seen_peer(origin)
        async with httpx.AsyncClient(verify=client_ctx(pki)) as client:  # httpx with a client cert
            assert (await client.get(url)).status_code == 200
        with capture_logs() as logs:
            bare = await curl(url, "--cacert", str(pki["ca"]))
    assert bare.returncode != 0 and len(origin.requests) == 2
    assert peer["verified"] is True
    assert peer["subject"] == "CN=checkout\\, shop,O=sluice tests"  # RFC 4514, escaped
    assert peer["dns_sans"] == ["client.test"] and peer["uri_sans"] == [SPIFFE]
    assert peer["spiffe_id"] == SPIFFE and len(peer["cert_sha256"]) == 64
    assert peer["server_name"] == "localhost" and peer["version"] in ("TLSv1.2", "TLSv1.3")
    assert seen_peer(origin) == peer | {"cert_sha256": peer["cert_sha256"]}
    failed = [e for e in logs if e["event"] == "tls handshake failed"]
    assert failed and failed[0]["log_level"] == "warning" and failed[0]["client"] == "127.0.0.1"
    assert "CERTIFICATE" in failed[0]["reason"].upper()


async def test_an_untrusted_client_certificate_fails_the_handshake_and_is_logged(start_origin, pki):
    origin = await start_origin()
    cfg = config(origin.address, listener=mtls_listener(pki, client_auth="request"))
    async with serve(cfg, plugins=PLUGINS) as proxy:
        with capture_logs() as logs:
            async with httpx.AsyncClient(verify=client_ctx(pki, "rogue")) as client:
                with pytest.raises(httpx.HTTPError):
                    await client.get(f"https://localhost:{proxy.address[1]}/")
            # The proxy lives on: a trusted client right after gets through.
            async with httpx.AsyncClient(verify=client_ctx(pki)) as client:
                assert (await client.get(f"https://localhost:{proxy.address[1]}/")).status_code == 200
    failed = [e for e in logs if e["event"] == "tls handshake failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "warning", logs
    assert failed[0]["reason"] == "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"
    assert len(origin.requests) == 1


@pytest.mark.parametrize("mode", ["request", "none"])
async def test_request_and_none_admit_clients_without_a_certificate(start_origin, pki, mode):
    origin = await start_origin()
    cfg = config(origin.address, filters=["peer_echo", "router"], listener=mtls_listener(pki, client_auth=mode))
    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(PeerEcho)}) as proxy:
        url = f"https://localhost:{proxy.address[1]}/"
        async with httpx.AsyncClient(verify=client_ctx(pki, None)) as client:
            assert (await client.get(url)).status_code == 200
        without = seen_peer(origin)
        async with httpx.AsyncClient(verify=client_ctx(pki)) as client:
            assert (await client.get(url)).status_code == 200
        shown = seen_peer(origin)
    assert without["verified"] is False and without["spiffe_id"] is None and without["dns_sans"] == []
    # "request" verifies a certificate shown; "none" never asks for one.
    assert shown["verified"] is (mode == "request")
    assert shown["spiffe_id"] == (SPIFFE if mode == "request" else None)


class FlagsSeen(Filter):
    """Keeps each completed exchange's flags."""

    name = "flags_seen"
    seen: list = []

    async def on_complete(self, ctx):
        FlagsSeen.seen.append(list(ctx.flags))


XFCC = b"x-forwarded-client-cert"
FORGED = b'By=spiffe://evil;Hash=00;Subject="CN=admin"'


def expected_xfcc(mode: str, peer: dict, incoming: bytes | None) -> bytes | None:
    element = (f'Hash={peer["cert_sha256"]};Subject="{peer["subject"]}";URI={SPIFFE};DNS=client.test'
               ).encode()
    return {
        "sanitize": None,
        "forward_only": incoming,
        "append_forward": incoming + b"," + element if incoming else element,
        "sanitize_set": element,
        "always_forward_only": incoming,
    }[mode]


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
@pytest.mark.parametrize("mode", ["sanitize", "forward_only", "append_forward", "sanitize_set",
                                  "always_forward_only"])
async def test_x_forwarded_client_cert_modes(start_origin, pki, mode, http2):
    origin = await start_origin()
    cfg = config(origin.address, filters=["peer_echo", "router"],
                 listener={**mtls_listener(pki, client_auth="request", forward_client_cert=mode),
                           "http2": http2})
    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(PeerEcho)}) as proxy:
        url = f"https://localhost:{proxy.address[1]}/"
        async with httpx.AsyncClient(verify=client_ctx(pki), http2=http2, http1=not http2) as client:
            r = await client.get(url, headers={"x-forwarded-client-cert": FORGED.decode()})
            assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert (await client.get(url)).status_code == 200
        # A client without a certificate cannot pass one on, except where everything passes.
        async with httpx.AsyncClient(verify=client_ctx(pki, None), http2=http2, http1=not http2) as client:
            await client.get(url, headers={"x-forwarded-client-cert": FORGED.decode()})
    peer = seen_peer(origin, 0)
    got = [dict(req.headers).get(XFCC) for req, _ in origin.requests]
    assert got[0] == expected_xfcc(mode, peer, FORGED)
    assert got[1] == expected_xfcc(mode, peer, None)
    assert got[2] == (FORGED if mode == "always_forward_only" else None)


async def test_xfcc_sent_by_a_client_is_stripped_on_a_plain_listener(start_origin):
    origin = await start_origin()
    async with serve(config(origin.address), plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            await client.get(proxy.url + "/", headers={"x-forwarded-client-cert": FORGED.decode()})
    assert XFCC not in dict(origin.requests[0][0].headers)


async def tls_origin(nursery, pki, *, require_client: bool) -> tuple[int, list]:
    """A TLS origin (trio's SSLStream) that answers with the client certificate's SPIFFE ID."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki["upstream"].cert), str(pki["upstream"].key))
    ctx.load_verify_locations(str(pki["ca"]))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
    seen: list = []

    async def handle(stream):
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
            data = b""
            while b"\r\n\r\n" not in data:
                data += await tls.receive_some(4096)
        except trio.BrokenResourceError as exc:
            seen.append(exc)
            return
        peer = tls.getpeercert() or {}
        uri = next((v for k, v in peer.get("subjectAltName", ()) if k == "URI"), "none")
        seen.append(uri)
        body = uri.encode()
        await tls.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                           % (len(body), body))
        await tls.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], seen


async def test_upstream_mtls_presents_the_cluster_certificate(nursery, pki):
    port, seen = await tls_origin(nursery, pki, require_client=True)
    base = {"ca": str(pki["ca"]), "server_name": "upstream.test"}
    mesh = config(f"127.0.0.1:{port}", cluster={"tls": {**base, "cert": str(pki["client"].cert),
                                                        "key": str(pki["client"].key)}})
    async with serve(mesh, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 200 and r.text == SPIFFE
    # Without a client certificate the origin refuses the handshake. Under TLS 1.3 the client's
    # side of it is done before the server checks (the close comes first: 502, flag UC); under
    # TLS 1.2 the handshake itself fails (503, UF).
    for version, status in (("1.3", 502), ("1.2", 503)):
        cfg = config(f"127.0.0.1:{port}", cluster={"tls": {**base, "max_version": version}})
        async with serve(cfg, plugins=PLUGINS) as proxy:
            async with httpx.AsyncClient() as client:
                r = await client.get(proxy.url + "/")
        assert r.status_code == status
    assert isinstance(seen[-1], trio.BrokenResourceError) and isinstance(seen[-2], trio.BrokenResourceError)


@pytest.mark.parametrize(("pins", "allowed"), [
    ({"verify_spiffe_id": ["spiffe://example.org/ns/pay/sa/api"]}, True),
    ({"verify_san": ["UPSTREAM.test"]}, True),
    ({"verify_spiffe_id": ["spiffe://example.org/ns/pay/sa/other"], "verify_san": ["other.test"]}, False),
])
async def test_pinned_upstream_names(nursery, pki, pins, allowed):
    port, _ = await tls_origin(nursery, pki, require_client=False)
    cfg = config(f"127.0.0.1:{port}", filters=["flags_seen", "router"],
                 cluster={"tls": {"ca": str(pki["ca"]), "server_name": "upstream.test", **pins}})
    FlagsSeen.seen = []
    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(FlagsSeen)}) as proxy:
        with capture_logs() as logs:
            async with httpx.AsyncClient() as client:
                r = await client.get(proxy.url + "/")
    if allowed:
        assert r.status_code == 200
        return
    assert r.status_code == 503
    refused = [e for e in logs if e["event"] == "tls peer not allowed"]
    assert refused and refused[0]["dns_sans"] == ["upstream.test"]
    assert refused[0]["uri_sans"] == ["spiffe://example.org/ns/pay/sa/api"]
    failed = [e for e in logs if e["event"] == "upstream failed"]
    assert failed and "none of them pinned" in failed[0]["error"]
    assert FlagsSeen.seen == [["UF"]]  # a connect failure, as the core flags one


@pytest.mark.parametrize(("tls", "where"), [
    ({"client_auth": "require"}, "listeners[0].tls"),
    ({"ciphers": "NO-SUCH-CIPHER"}, "listeners[0].tls.ciphers"),
    ({"min_version": "1.3", "max_version": "1.2"}, "listeners[0].tls"),
    ({"forward_client_cert": "forward"}, "listeners[0].tls.forward_client_cert"),
])
async def test_bad_listener_settings_name_their_key(pki, tls, where):
    cfg = config("127.0.0.1:9", listener={"tls": {"cert": str(pki["server"].cert),
                                                  "key": str(pki["server"].key), **tls}})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert where in str(info.value)


async def test_xfcc_by_and_cert_details(start_origin, pki):
    from urllib.parse import unquote

    origin = await start_origin()
    cfg = config(origin.address, listener=mtls_listener(pki, client_auth="require", forward_client_cert="sanitize_set",
                                                         client_cert_details=["by", "cert", "hash"]))
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient(verify=client_ctx(pki)) as client:
            assert (await client.get(f"https://localhost:{proxy.address[1]}/")).status_code == 200
    value = dict(origin.requests[0][0].headers)[XFCC].decode()
    by, digest, cert = value.split(";")  # in Envoy's order: By, Hash, Cert, Subject, URI, DNS
    assert by == "By=spiffe://example.org/ns/edge/sa/sluice"  # the URI SAN of sluice's own certificate
    assert cert.startswith('Cert="') and cert.endswith('"') and "%0A" in cert  # URL-encoded PEM
    assert unquote(cert[6:-1]) == pki["client"].cert.read_text()
    assert digest.startswith("Hash=") and len(digest) == 5 + 64


async def test_xfcc_by_names_the_certificate_sni_chose(start_origin, pki):
    origin = await start_origin()
    listener = mtls_listener(pki, client_auth="require", forward_client_cert="sanitize_set",
                             client_cert_details=["by"])
    listener["tls"]["certificates"] = [{"cert": str(pki["api"].cert), "key": str(pki["api"].key)}]
    async with serve(config(origin.address, listener=listener), plugins=PLUGINS) as proxy:
        for name in ("api.test", "localhost"):  # a client each: one connection per name
            async with httpx.AsyncClient(verify=client_ctx(pki)) as client:
                r = await client.get(f"https://127.0.0.1:{proxy.address[1]}/", headers={"host": name},
                                     extensions={"sni_hostname": name})
                assert r.status_code == 200
    got = [dict(req.headers)[XFCC] for req, _ in origin.requests]
    assert got == [b"By=spiffe://example.org/ns/edge/sa/api", b"By=spiffe://example.org/ns/edge/sa/sluice"]


async def test_a_subject_beyond_ascii_is_escaped_in_xfcc_and_kept_in_tls_peer(start_origin, pki, tmp_path):
    origin = await start_origin()
    cafe = issue(pki["trust"], tmp_path, "cafe", common_name="café")
    cfg = config(origin.address, filters=["peer_echo", "router"],
                 listener=mtls_listener(pki, client_auth="require", forward_client_cert="sanitize_set",
                                        client_cert_details=["subject"]))
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(cafe.cert), str(cafe.key))
    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(PeerEcho)}) as proxy:
        async with httpx.AsyncClient(verify=ctx) as client:
            assert (await client.get(f"https://localhost:{proxy.address[1]}/")).status_code == 200
    assert dict(origin.requests[0][0].headers)[XFCC] == b'Subject="CN=caf\\C3\\A9,O=sluice tests"'
    assert seen_peer(origin)["subject"] == "CN=café,O=sluice tests"
