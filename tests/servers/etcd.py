"""A real etcd (Debian ``etcd-server``, 3.4) for the tests: one per session, a prefix per test.

The server is a single member on two free loopback ports (client and peer) with its data in a
temp dir; it can be stopped and started again on the same ports and data, which is how the
client's tests cut a watch off without losing a revision. Each test gets its own key prefix
(``etcd_prefix``), so tests share the server without seeing each other's keys.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Iterator

import pytest

from . import ServerProcess, free_port, require_binary, running, unique_name


def etcd_server_process(data_root, *, client: int | None = None, peer: int | None = None,
                        tls: dict | None = None) -> ServerProcess:
    """An etcd ``ServerProcess`` (not started) on loopback ports (free ones by default) under ``data_root``.

    ``.client_port`` and ``.peer_port`` say which: a test can start another process on the same
    data and peer port but another client port, to change the store where its clients cannot see.
    ``tls``: PEM files ``cert``, ``key`` (the server's), ``ca`` (which signed the clients'),
    ``client_cert`` and ``client_key`` (one of them, for the ready check): the client port is
    then https and asks every client for a certificate (``--client-cert-auth``).
    """
    binary = require_binary("etcd", "etcd-server")
    client, peer = client or free_port(), peer or free_port()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{client}"
    peer_url = f"http://127.0.0.1:{peer}"
    context = None
    if tls:
        context = ssl.create_default_context(cafile=tls["ca"])
        context.load_cert_chain(tls["client_cert"], tls["client_key"])

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=1, context=context) as answer:
            return json.loads(answer.read()).get("health") == "true"

    server = ServerProcess("etcd", [
        binary, "--name", "sluice-test", "--data-dir", str(data_root / "etcd"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"sluice-test={peer_url}", "--log-level", "warn",
        *(["--cert-file", tls["cert"], "--key-file", tls["key"], "--trusted-ca-file", tls["ca"],
           "--client-cert-auth"] if tls else []),
    ], data_dir=data_root / "etcd", ready=ready)
    server.url, server.client_port, server.peer_port = url, client, peer
    return server


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The session's etcd, started once (``.url`` is its client URL), stopped by PID at the end."""
    yield from running(etcd_server_process(tmp_path_factory.mktemp("etcd")))


@pytest.fixture
def etcd_prefix(etcd_server, request) -> str:
    """A key prefix of this test's own: ``/sluice-test/<unique name>/``."""
    return f"/sluice-test/{unique_name(request)}/"
