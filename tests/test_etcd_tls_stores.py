"""etcd over TLS for self-registration, ``sluice register`` and the config centre
(``[filters.registration]``, ``[config_store]`` and the commands' ``--ca/--cert/--key``),
against a real etcd asking clients for a certificate (mutual TLS, ``tests/servers/etcd.py``)."""

from __future__ import annotations

import json
import signal

import pytest
import trio
import trustme
from structlog.testing import capture_logs

from sluice import ConfigError
from sluice.control.config import parse
from sluice.plugins.etcd import EtcdClient, tls_context
from sluice.testing import serve

from .proc import ThreadOrigin, sluice
from .test_config_store import bootstrap, document
from .test_discovery_dns import addresses
from .test_etcd_client import etcd_tls  # noqa: F401 (a fixture)
from .test_registration import Sidecar

PLUGINS = ["router", "balancer", "discovery_etcd", "registration"]
DEADLINE = 10


@pytest.fixture
def wrong_ca(tmp_path) -> str:
    """A CA that did not sign etcd's certificate."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def mutual(files) -> dict:
    return {"ca": files["ca"], "cert": files["client_cert"], "key": files["client_key"]}


async def entries(server, files, prefix: str) -> dict:
    async with EtcdClient(server.url, timeout=2, tls=tls_context(**mutual(files))) as etcd:
        _, kvs = await etcd.get_prefix(prefix)
    return {kv.key.decode(): json.loads(kv.value) for kv in kvs}


async def until_entries(server, files, prefix: str, want) -> dict:
    with trio.fail_after(DEADLINE):
        while not want(found := await entries(server, files, prefix)):
            await trio.sleep(0.05)
    return found


def registering(url: str, prefix: str, tls: dict) -> dict:
    """A proxy registering its listener under ``prefix`` and discovering cluster app from it."""
    return {
        "listeners": [{"name": "public", "address": "127.0.0.1:0", "filters": ["router"]}],
        "clusters": {"app": {"discovery": {"source": "etcd", "address": url, "prefix": prefix, "timeout": 1,
                                           "initial_timeout": 5, **tls}}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "app"}],
        "filters": {"registration": {"store": "etcd", "address": url, "prefix": prefix, "ttl": 5,
                                     "instance_id": "me", "services": [{"listener": "public"}], **tls}},
    }


async def test_a_proxy_registers_over_mutual_tls_and_discovery_sees_it(etcd_tls):
    server, files = etcd_tls
    async with serve(registering(server.url, "/mtls-reg/", mutual(files)), plugins=PLUGINS) as proxy:
        listening = proxy.url.split("://", 1)[1].rstrip("/")
        found = await until_entries(server, files, "/mtls-reg/", bool)
        assert found == {"/mtls-reg/me": {"address": listening, "weight": 1, "metadata": {}}}
        with trio.fail_after(DEADLINE):
            while addresses(proxy) != {listening}:  # discovery, over mutual TLS too, reads it back
                await trio.sleep(0.05)
    assert await entries(server, files, "/mtls-reg/") == {}  # deregistered at the stop


async def test_a_wrong_ca_is_a_registration_lost_naming_the_key(etcd_tls, wrong_ca):
    server, files = etcd_tls
    tls = {**mutual(files), "ca": wrong_ca}
    data = registering(server.url, "/mtls-wrong/", tls)
    data["clusters"]["app"]["discovery"].update(mutual(files), initial_timeout=0.1)
    with capture_logs() as logs:
        async with serve(data, plugins=PLUGINS):
            with trio.fail_after(DEADLINE):
                while not [e for e in logs if e["event"] == "registration lost"]:
                    await trio.sleep(0.05)
    lost = next(e for e in logs if e["event"] == "registration lost")
    assert "CERTIFICATE_VERIFY_FAILED" in lost["error"] and "filters.registration.ca" in lost["error"]
    assert not [e for e in logs if e["event"] == "registration failed"]  # an outage, not a bug
    assert await entries(server, files, "/mtls-wrong/") == {}


@pytest.mark.parametrize(("over", "message"), [
    ({"ca": "/nowhere/ca.pem"}, "filters.registration.ca: /nowhere/ca.pem: not a readable PEM CA file"),
    ({"key": "CLIENT_KEY"}, "filters.registration.key: a key without its certificate"),
    ({"address": "http://127.0.0.1:2379", "ca": "CA"}, "filters.registration.ca: TLS settings need an https://"),
    ({"store": "zookeeper", "path": "/x", "ca": "CA"}, "filters.registration: ca, cert and key are for etcd"),
])
def test_registration_tls_settings_are_checked_by_key_path(tmp_path, over, message):
    from sluice.control.app import App
    from sluice.control.registry import Plugins
    from tests.test_etcd_client import tls_files

    files = tls_files(tmp_path)
    names = {"CA": files["ca"], "CLIENT_KEY": files["client_key"]}
    data = registering("https://127.0.0.1:2379", "/p/", {})
    data["filters"]["registration"].update({k: names.get(v, v) for k, v in over.items()})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        App(parse(data), Plugins(PLUGINS))


async def test_sluice_register_over_mutual_tls_and_a_wrong_ca_named_by_its_flag(etcd_tls, wrong_ca):
    server, files = etcd_tls
    base = ["--store", "etcd", "--address", server.url, "--prefix", "/mtls-cli/", "--service", "127.0.0.1:9",
            "--id", "app-1", "--ttl", "5"]
    tls = ["--ca", files["ca"], "--cert", files["client_cert"], "--key", files["client_key"]]
    sidecar = Sidecar(*base, *tls)
    try:
        found = await until_entries(server, files, "/mtls-cli/", bool)
        assert found == {"/mtls-cli/app-1": {"address": "127.0.0.1:9", "weight": 1, "metadata": {}}}
        assert await trio.to_thread.run_sync(sidecar.stop, signal.SIGTERM) == 0
        assert await entries(server, files, "/mtls-cli/") == {}
    finally:
        sidecar.stop()
    wrong = Sidecar(*base, "--ca", wrong_ca, "--cert", files["client_cert"], "--key", files["client_key"])
    try:
        with trio.fail_after(DEADLINE):
            while "registration lost" not in wrong.output():
                await trio.sleep(0.05)
    finally:
        wrong.stop()
    assert "check --ca" in wrong.output() and "Traceback" not in wrong.output()
    r = await trio.to_thread.run_sync(lambda: sluice("register", *base, "--ca", "/nowhere.pem"))
    assert r.returncode == 2 and "--ca: /nowhere.pem: not a readable PEM CA file" in r.stderr, r.stderr


def test_config_push_get_over_mutual_tls_and_a_wrong_ca_is_one_line_naming_it(etcd_tls, wrong_ca, tmp_path):
    server, files = etcd_tls
    a = ThreadOrigin(body=b"A")
    try:
        good = tmp_path / "good.toml"
        good.write_text(document(a.address))
        flags = ["--store", "etcd", "--address", server.url, "--prefix", "/mtls-config/"]
        tls = ["--ca", files["ca"], "--cert", files["client_cert"], "--key", files["client_key"]]
        r = sluice("config", "push", str(good), *flags, *tls)
        assert r.returncode == 0, r.stderr
        r = sluice("config", "get", *flags, *tls)
        assert (r.returncode, r.stdout) == (0, good.read_text()), r.stderr
        # the same store named by a bootstrap's [config_store]
        table = (f'[config_store]\nstore = "etcd"\naddress = "{server.url}"\nprefix = "/mtls-config/"\n'
                 f'ca = "{files["ca"]}"\ncert = "{files["client_cert"]}"\nkey = "{files["client_key"]}"\n')
        r = sluice("config", "diff", str(good), "-c", bootstrap(tmp_path, table))
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        # a CA that did not sign etcd's certificate: status 2, one line naming the setting
        r = sluice("config", "get", *flags, "--ca", wrong_ca, "--timeout", "2")
        assert r.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in r.stderr and "check --ca" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        wrong = bootstrap(tmp_path, table.replace(files["ca"], wrong_ca), name="wrong")
        r = sluice("config", "get", "-c", wrong)
        assert r.returncode == 2 and "check config_store.ca" in r.stderr, r.stderr
        # without the client certificate etcd refuses the handshake
        r = sluice("config", "get", *flags, "--ca", files["ca"], "--timeout", "2")
        assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr
    finally:
        a.close()


@pytest.mark.parametrize(("table", "message"), [
    ('store = "etcd"\naddress = "https://127.0.0.1:1"\nprefix = "/p/"\nca = "/nowhere.pem"\n',
     "config_store.ca: /nowhere.pem: not a readable PEM CA file"),
    ('store = "etcd"\naddress = "http://127.0.0.1:1"\nprefix = "/p/"\ncert = "/c.pem"\n',
     "config_store.cert: TLS settings need an https:// address"),
    ('store = "zookeeper"\naddress = "127.0.0.1:1"\npath = "/p"\nca = "/c.pem"\n',
     "config_store: ca, cert and key are for etcd over https"),
])
def test_config_store_tls_settings_are_checked_by_key_path(tmp_path, table, message):
    r = sluice("run", "-c", bootstrap(tmp_path, "[config_store]\n" + table))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
