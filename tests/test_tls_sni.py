"""SNI certificate selection (exact, wildcard, default), TLS versions and ciphers,
seen by real clients: openssl s_client -servername, curl, httpx."""

from __future__ import annotations

import re
import ssl

import httpx
import pytest
import trio
import trustme

from sluice.testing import serve

from .conftest import config
from .tls_support import ca_file, issue

PLUGINS = ["router", "balancer", "tls"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    where = tmp_path_factory.mktemp("sni")
    ca = trustme.CA()
    return {
        "ca": ca_file(ca, where),
        "default": issue(ca, where, "default", "default.test"),
        "api": issue(ca, where, "api", "api.example.com"),  # named explicitly below
        "wild": issue(ca, where, "wild", "*.example.com"),  # names from its SANs
        "other": issue(ca, where, "other", "other.test", "www.other.test"),
    }


def sni_listener(pki, **extra) -> dict:
    return {"tls": {
        "cert": str(pki["default"].cert), "key": str(pki["default"].key),
        "certificates": [
            {"cert": str(pki["wild"].cert), "key": str(pki["wild"].key)},
            {"cert": str(pki["api"].cert), "key": str(pki["api"].key), "server_names": ["API.example.com"]},
            {"cert": str(pki["other"].cert), "key": str(pki["other"].key)},
        ], **extra}}


async def s_client(port: int, *args: str) -> tuple[str | None, str]:
    """The common name of the certificate the server sent, and s_client's output."""
    done = await trio.run_process(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                                  stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    found = re.search(r"^subject=.*?CN\s*=\s*([^,\n]+)", out, re.M)
    return (found.group(1).strip() if found else None), out


async def test_sni_selects_exact_wildcard_and_default(start_origin, pki):
    origin = await start_origin()
    async with serve(config(origin.address, listener=sni_listener(pki)), plugins=PLUGINS) as proxy:
        port = proxy.address[1]
        seen = {}
        for name in ("api.example.com", "shop.example.com", "www.other.test", "OTHER.test",
                     "deep.shop.example.com", "unknown.test"):
            seen[name] = (await s_client(port, "-servername", name))[0]
        seen[None] = (await s_client(port, "-noservername"))[0]
        # A real HTTPS client verifies what it was given, by name.
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        async with httpx.AsyncClient(verify=ctx) as client:
            for host in ("api.example.com", "shop.example.com", "other.test"):
                done = await trio.run_process(
                    ["curl", "-sS", "--max-time", "5", "--cacert", str(pki["ca"]), "--resolve",
                     f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/{host}"],
                    capture_stdout=True, capture_stderr=True, check=False)
                assert done.returncode == 0 and done.stdout == f"/{host}".encode(), done.stderr
            r = await client.get(f"https://127.0.0.1:{port}/", headers={"host": "default.test"},
                                 extensions={"sni_hostname": "default.test"})
            assert r.status_code == 200
    assert seen == {
        "api.example.com": "api",  # the exact name beats the wildcard
        "shop.example.com": "wild",
        "www.other.test": "other",
        "OTHER.test": "other",  # names are case-insensitive
        "deep.shop.example.com": "default",  # a wildcard covers one label
        "unknown.test": "default",
        None: "default",
    }


async def test_min_version_and_ciphers(start_origin, pki):
    origin = await start_origin()
    only13 = config(origin.address, listener=sni_listener(pki, min_version="1.3"))
    async with serve(only13, plugins=PLUGINS) as proxy:
        refused, _ = await s_client(proxy.address[1], "-servername", "api.example.com", "-tls1_2")
        accepted, out = await s_client(proxy.address[1], "-servername", "api.example.com", "-tls1_3")
    assert refused is None and accepted == "api" and "TLSv1.3" in out

    cipher = "ECDHE-ECDSA-CHACHA20-POLY1305"
    pinned = config(origin.address, listener=sni_listener(pki, max_version="1.2", ciphers=cipher))
    async with serve(pinned, plugins=PLUGINS) as proxy:
        name, out = await s_client(proxy.address[1], "-servername", "shop.example.com")
        other, out_other = await s_client(proxy.address[1], "-servername", "shop.example.com",
                                          "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert name == "wild" and f"Cipher is {cipher}" in out and "TLSv1.2" in out
    assert other is None, out_other  # no cipher in common


async def test_a_bad_pair_at_startup_names_its_file(pki, tmp_path):
    from sluice import ConfigError

    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    tls = sni_listener(pki)["tls"]
    bad = {**tls, "certificates": [*tls["certificates"], {"cert": str(pki["api"].cert),
                                                        "key": str(pki["other"].key)}]}
    with pytest.raises(ConfigError) as mismatched:
        async with serve(config("127.0.0.1:9", listener={"tls": bad}), plugins=PLUGINS):
            pass
    bad = {**tls, "certificates": [{"cert": str(garbage), "key": str(pki["api"].key)}]}
    with pytest.raises(ConfigError) as unreadable:
        async with serve(config("127.0.0.1:9", listener={"tls": bad}), plugins=PLUGINS):
            pass
    bad = {**tls, "certificates": [{"cert": str(pki["api"].cert), "key": str(pki["api"].key),
                                    "server_names": ["*bad.example.com"]}]}
    with pytest.raises(ConfigError) as name:
        async with serve(config("127.0.0.1:9", listener={"tls": bad}), plugins=PLUGINS):
            pass
    assert "listeners[0].tls" in str(mismatched.value) and str(pki["other"].key) in str(mismatched.value)
    assert str(garbage) in str(unreadable.value)
    assert "KEY_VALUES_MISMATCH" in str(mismatched.value)
    assert "listeners[0].tls.certificates[0].server_names" in str(name.value)


async def test_http2_by_alpn_on_a_certificate_chosen_by_sni(start_origin, pki):
    origin = await start_origin()
    cfg = config(origin.address, listener={**sni_listener(pki), "http2": True})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        port = proxy.address[1]
        done = await trio.run_process(
            ["curl", "-sS", "--http2", "--max-time", "5", "--cacert", str(pki["ca"]), "-w", "\n%{http_version}",
             "--resolve", f"api.example.com:{port}:127.0.0.1", f"https://api.example.com:{port}/h2"],
            capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0 and done.stdout == b"/h2\n2", done.stderr  # the switched context offers h2 too
