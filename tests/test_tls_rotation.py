"""Certificates rotated without a restart: new handshakes see the new pair within
seconds, open connections keep theirs, a broken pair keeps the old one (logged,
naming the file), the client CA rotates too, and the expiry gauge follows."""

from __future__ import annotations

import os
import shutil
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from sluice import metrics
from sluice.testing import serve

from .conftest import config
from .tls_support import Pair, ca_file, issue

PLUGINS = ["router", "balancer", "tls"]
WITHIN = 5.0  # seconds a rotation may take to show (it takes about one: the files are looked at each second)


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    made = tmp_path / "made"
    made.mkdir()
    return {"ca": ca_file(ca, made), "trustme": ca,
            **{name: issue(ca, made, name, "localhost", days=days)
               for name, days in (("first", 30), ("second", 60), ("third", 90))}}


def install(source: Pair, live: Pair) -> None:
    """Replace the live files the way deploy tools do: write beside, rename over."""
    for src, dst in ((source.cert, live.cert), (source.key, live.key)):
        shutil.copyfile(src, str(dst) + ".new")
        os.replace(str(dst) + ".new", dst)


def common_name(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value


async def open_tls(port: int, ca: Path, client: Pair | None = None) -> trio.SSLStream:
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def served(port: int, ca: Path) -> str:
    """The common name of the certificate a new handshake gets."""
    stream = await open_tls(port, ca)
    try:
        return common_name(stream.getpeercert(binary_form=True))
    finally:
        await trio.aclose_forcefully(stream)


async def wait_for(port: int, ca: Path, name: str) -> float:
    """Seconds until new handshakes get ``name``."""
    began = time.monotonic()
    with trio.fail_after(WITHIN):
        while await served(port, ca) != name:
            await trio.sleep(0.05)
    return time.monotonic() - began


async def get(stream: trio.SSLStream, path: str) -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode())
    data = b""
    with trio.fail_after(5):
        while not data.endswith(path.encode()):
            data += await stream.receive_some(65536)
    return data


def swap_link(source: Pair, live: Pair) -> None:
    """Kubernetes' way (a secret volume): the files are links through ``..data``, a link
    to a directory that is swapped whole by a rename."""
    data = live.cert.parent / "..data"
    fresh = live.cert.parent / f"..{source.cert.stem}"
    fresh.mkdir()
    shutil.copyfile(source.cert, fresh / "tls.crt")
    shutil.copyfile(source.key, fresh / "tls.key")
    os.symlink(fresh.name, str(data) + ".new")
    os.replace(str(data) + ".new", data)
    for path, name in ((live.cert, "tls.crt"), (live.key, "tls.key")):
        if not path.is_symlink():
            os.symlink(f"..data/{name}", path)


@pytest.mark.parametrize("replace", [install, swap_link], ids=["rename", "symlink"])
async def test_new_handshakes_get_the_new_pair_and_open_connections_keep_theirs(start_origin, pki, tmp_path,
                                                                                 replace):
    origin = await start_origin()
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    replace(pki["first"], live)
    cfg = config(origin.address, listener={"tls": {"cert": str(live.cert), "key": str(live.key)}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        port = proxy.address[1]
        kept = await open_tls(port, pki["ca"])
        assert b"200 OK" in await get(kept, "/before")
        replace(pki["second"], live)
        took = await wait_for(port, pki["ca"], "second")
        # The connection made before the rotation keeps working, on the pair it was made with.
        assert b"200 OK" in await get(kept, "/after")
        assert common_name(kept.getpeercert(binary_form=True)) == "first"
        await kept.aclose()
    print(f"rotation seen by new handshakes after {took * 1000:.0f} ms")
    assert took < WITHIN


async def until_failed(logs: list, count: int, port: int, ca: Path, serving: str) -> None:
    """Until ``count`` reloads have failed, every new handshake still gets ``serving``."""
    with trio.fail_after(WITHIN):
        while sum(e["event"] == "tls certificate reload failed" for e in logs) < count:
            assert await served(port, ca) == serving
            await trio.sleep(0.05)


async def test_a_broken_pair_keeps_the_old_one_and_is_logged(start_origin, pki, tmp_path):
    origin = await start_origin()
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    install(pki["first"], live)
    cfg = config(origin.address, listener={"tls": {"cert": str(live.cert), "key": str(live.key)}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        port = proxy.address[1]
        with capture_logs() as logs:
            # Half written: the new certificate is in place, its key not yet.
            shutil.copyfile(pki["second"].cert, live.cert)
            await until_failed(logs, 1, port, pki["ca"], "first")
            # Then the key lands: the pair loads.
            shutil.copyfile(pki["second"].key, live.key)
            await wait_for(port, pki["ca"], "second")
            # Garbage over the certificate: still the last good pair.
            live.cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
            await until_failed(logs, 2, port, pki["ca"], "second")
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki["ca"]))) as client:
                assert (await client.get(f"https://localhost:{port}/")).status_code == 200
    failed = [e for e in logs if e["event"] == "tls certificate reload failed"]
    assert failed[0]["file"] == str(live.key) and "KEY_VALUES_MISMATCH" in failed[0]["error"]
    assert failed[1]["file"] == str(live.cert) and failed[0]["log_level"] == "error"
    assert [e for e in logs if e["event"] == "tls certificates reloaded"]


async def test_the_client_ca_rotates_too(start_origin, pki, tmp_path):
    origin = await start_origin()
    new_ca = trustme.CA()
    old_client = issue(pki["trustme"], tmp_path, "old-client", "client.test")
    new_client = issue(new_ca, tmp_path, "new-client", "client.test")
    bundle = tmp_path / "clients.pem"
    shutil.copyfile(pki["ca"], bundle)
    cfg = config(origin.address, listener={"tls": {
        "cert": str(pki["first"].cert), "key": str(pki["first"].key),
        "client_auth": "require", "client_ca": str(bundle)}})

    async def admitted(client: Pair) -> bool:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        async with httpx.AsyncClient(verify=ctx) as http:
            try:
                return (await http.get(f"https://localhost:{proxy.address[1]}/")).status_code == 200
            except httpx.HTTPError:
                return False

    async with serve(cfg, plugins=PLUGINS) as proxy:
        assert await admitted(old_client) and not await admitted(new_client)
        new_ca.cert_pem.write_to_path(str(bundle) + ".new")
        os.replace(str(bundle) + ".new", bundle)
        with trio.fail_after(WITHIN):
            while not await admitted(new_client):
                await trio.sleep(0.05)
        assert not await admitted(old_client)


def expiry_samples() -> dict[tuple[str, str], float]:
    body, _ = metrics.render()
    return {(s.labels["listener"], s.labels["cert"]): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples
            if s.name == "sluice_tls_certificate_expiry_timestamp_seconds"}


async def test_the_expiry_gauge_follows_the_served_certificate(start_origin, pki, tmp_path):
    origin = await start_origin()
    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    install(pki["first"], live)
    cfg = config(origin.address, listener={"name": "public", "tls": {
        "cert": str(live.cert), "key": str(live.key),
        "certificates": [{"cert": str(pki["third"].cert), "key": str(pki["third"].key),
                          "server_names": ["third.test"]}]}})

    def not_after(pair: Pair) -> float:
        return x509.load_pem_x509_certificate(pair.cert.read_bytes()).not_valid_after_utc.timestamp()

    async with serve(cfg, plugins=PLUGINS):
        with trio.fail_after(WITHIN):
            while ("public", str(live.cert)) not in expiry_samples():
                await trio.sleep(0.05)
        first = expiry_samples()
        install(pki["second"], live)  # no handshake needed: the sampler looks at the files too
        with trio.fail_after(WITHIN):
            while expiry_samples()[("public", str(live.cert))] != not_after(pki["second"]):
                await trio.sleep(0.05)
    assert first[("public", str(live.cert))] == not_after(pki["first"])
    assert first[("public", str(pki["third"].cert))] == not_after(pki["third"])
    days = (first[("public", str(live.cert))] - time.time()) / 86400
    assert 29.9 < days < 30.1


def test_every_worker_of_a_real_sluice_run_rotates(pki, tmp_path):
    """``sluice run`` with 2 workers: each looks at the files itself; handshakes spread over
    both (SO_REUSEPORT) all get the new pair once it is in place."""
    import socket

    from .proc import Running, free_port, poll

    live = Pair(tmp_path / "live.crt", tmp_path / "live.key")
    install(pki["first"], live)
    port = free_port()
    conf = tmp_path / "sluice.toml"
    conf.write_text(f"""
[server]
workers = 2

[[listeners]]
address = "127.0.0.1:{port}"
filters = ["router"]
tls = {{ cert = "{live.cert}", key = "{live.key}" }}

[clusters.none]
endpoints = ["127.0.0.1:9"]

[[routes]]
match = {{ prefix = "/" }}
direct_response = {{ status = 200, body = "ok" }}
""")
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))

    def names(n: int) -> set[str]:
        seen = set()
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    seen.add(common_name(tls.getpeercert(binary_form=True)))
        return seen

    with Running("-c", str(conf)) as proxy:
        poll(lambda: any("workers ready" in line for line in proxy.stdout + proxy.stderr), what="workers ready",
             proxy=proxy)
        assert names(20) == {"first"}
        install(pki["second"], live)
        poll(lambda: names(1) == {"second"}, timeout=WITHIN, what="the new pair served", proxy=proxy)
        # Within a second more, every worker has looked at the files: 40 handshakes, one name.
        poll(lambda: names(40) == {"second"}, timeout=WITHIN, what="every worker on the new pair", proxy=proxy)
