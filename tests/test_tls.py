"""The tls plugin: termination on a listener, origination to an upstream."""

from __future__ import annotations

import functools
import ssl

import httpx
import pytest
import trio
import trustme

from sluice import ConfigError
from sluice.testing import serve

from .conftest import config

PLUGINS = ["router", "balancer", "tls"]


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def cert_files(ca, tmp_path):
    cert = ca.issue_cert("localhost", "127.0.0.1", "upstream.test")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return cert_path, key_path, ca_path


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # old on purpose
async def test_terminates_tls_on_a_listener(start_origin, cert_files):
    origin = await start_origin()
    cert, key, ca_path = cert_files
    cfg = config(origin.address, listener={"tls": {"cert": str(cert), "key": str(key)}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        url = proxy.url
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca_path))) as client:
            r = await client.get(url + "/secure")
        # An old protocol version is refused outright.
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(ca_path))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.minimum_version = ssl.TLSVersion.TLSv1
        async with httpx.AsyncClient(verify=old) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url + "/")
    assert r.status_code == 200 and r.text == "/secure"
    headers = dict(origin.requests[0][0].headers)
    assert headers[b"x-forwarded-proto"] == b"https"


async def test_tls_connections_outlive_the_handshake_timeout(start_origin, cert_files):
    from .origin import Reply

    async def slow(request, body):
        await trio.sleep(0.6)
        return Reply(200, [], b"worth the wait")

    origin = await start_origin(slow)
    cert, key, ca_path = cert_files
    cfg = config(origin.address, listener={"tls": {"cert": str(cert), "key": str(key)},
                                           "timeouts": {"header_read": 0.3}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca_path))) as client:
            first = await client.get(proxy.url + "/")
            second = await client.get(proxy.url + "/")  # same connection, well past 0.3 s
    assert (first.text, second.text) == ("worth the wait", "worth the wait")


async def test_originates_verified_tls_with_sni(nursery, ca, cert_files):
    cert, key, ca_path = cert_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    seen_sni: list[str] = []
    server_ctx.sni_callback = lambda sock, name, ctx: seen_sni.append(name)

    async def tls_origin(stream):
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return  # the proxy refused our certificate
        data = b""
        while b"\r\n\r\n" not in data:
            data += await tls.receive_some(4096)
        await tls.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nvia tls")
        await tls.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, tls_origin, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    good = config(f"127.0.0.1:{port}", cluster={"tls": {"ca": str(ca_path), "server_name": "upstream.test"}})
    async with serve(good, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 200 and r.text == "via tls"
    assert seen_sni == ["upstream.test"]

    # Without our CA the upstream certificate is not trusted: 503, never plaintext.
    untrusted = config(f"127.0.0.1:{port}", cluster={"tls": {"server_name": "upstream.test"}})
    async with serve(untrusted, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/")
    assert r.status_code == 503


async def test_tls_without_the_plugin_names_it(cert_files):
    cert, key, _ = cert_files
    cfg = config("127.0.0.1:9", listener={"tls": {"cert": str(cert), "key": str(key)}})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=["router", "balancer"]):
            pass
    assert "listeners[0].tls" in str(info.value) and "plugin 'tls'" in str(info.value)


async def test_missing_certificate_file_is_a_config_error(tmp_path):
    cfg = config("127.0.0.1:9", listener={"tls": {"cert": str(tmp_path / "no.pem"), "key": str(tmp_path / "no.key")}})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS):
            pass
    assert "listeners[0].tls.cert" in str(info.value)


async def test_an_encrypted_key_needs_its_password_and_never_prompts(ca, tmp_path):
    from cryptography.hazmat.primitives import serialization

    cert = ca.issue_cert("localhost")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"s3cret"))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    key_path.write_bytes(encrypted)
    tls = {"cert": str(cert_path), "key": str(key_path)}
    with pytest.raises(ConfigError) as info:
        async with serve(config("127.0.0.1:9", listener={"tls": tls}), plugins=PLUGINS):
            pass
    assert "listeners[0].tls" in str(info.value) and "set key_password" in str(info.value)
    async with serve(config("127.0.0.1:9", listener={"tls": {**tls, "key_password": "s3cret"}}),
                     plugins=PLUGINS) as proxy:
        assert proxy.url.startswith("https://")
