#!/usr/bin/env python3
"""What a new connection costs on a plain, a TLS and an mTLS listener.

One ``sluice run`` (1 worker, metrics on as by default) with three listeners
whose one route answers locally (``direct_response``: no upstream, so the
figures are the connection's cost, not proxying's): ``plain``, ``tls`` (a
P-256 certificate) and ``mtls`` (the same, with ``client_auth = "require"``
against a CA, and ``forward_client_cert = "sanitize_set"`` so the XFCC
element is made). The client, in this process, opens a connection, does the
handshake (with a client certificate for mtls), sends one GET with
``connection: close`` and reads the answer; sequentially, so the figure is
the latency of one new connection (both sides of the handshake run on this
machine: the client's share is in it). Rounds interleave the three
listeners; figures are medians of the rounds' medians.

    .venv/bin/python benchmarks/tls_handshake.py
    .venv/bin/python benchmarks/tls_handshake.py --rounds 7 --connections 300 --tls 1.2
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import trustme

from peers import PYTHON, to_toml
from procs import Command, free_port, running

MODES = ("plain", "tls", "mtls")


def files(where: Path) -> dict[str, str]:
    ca = trustme.CA()
    server, client = ca.issue_cert("localhost"), ca.issue_cert("client.test")
    paths = {name: str(where / f"{name}.pem") for name in ("ca", "cert", "key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    return paths


def config(ports: dict[str, int], paths: dict[str, str]) -> dict:
    tls = {"cert": paths["cert"], "key": paths["key"]}
    listeners = {
        "plain": {},
        "tls": {"tls": tls},
        "mtls": {"tls": {**tls, "client_auth": "require", "client_ca": paths["ca"],
                         "forward_client_cert": "sanitize_set"}},
    }
    return {
        "server": {"workers": 1},
        "listeners": [{"name": mode, "address": f"127.0.0.1:{ports[mode]}", "filters": ["router"], **extra}
                      for mode, extra in listeners.items()],
        "clusters": {"none": {"endpoints": ["127.0.0.1:9"]}},
        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": "ok\n"}}],
    }


def client_context(mode: str, paths: dict[str, str], version: str) -> ssl.SSLContext | None:
    if mode == "plain":
        return None
    ctx = ssl.create_default_context(cafile=paths["ca"])
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if mode == "mtls":
        ctx.load_cert_chain(paths["client_cert"], paths["client_key"])
    return ctx


REQUEST = b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"


def one(port: int, ctx: ssl.SSLContext | None) -> float:
    began = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    # Without it Nagle holds the request behind the client's last handshake flight until
    # the server's delayed ACK (40 ms on Linux): a client's artefact, not sluice's cost.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname="localhost")  # the handshake, with the client cert
    try:
        sock.sendall(REQUEST)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok\n"), data[:100]
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=200, help="per listener per round")
    parser.add_argument("--tls", choices=("1.2", "1.3"), default="1.3", help="the client's highest version")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        paths = files(where)
        ports = {mode: free_port() for mode in MODES}
        conf = where / "sluice.toml"
        conf.write_text(to_toml(config(ports, paths)))
        command = Command([PYTHON, "-m", "sluice", "run", "-c", str(conf)])
        with running("sluice", command, f"http://127.0.0.1:{ports['plain']}", where / "sluice.log"):
            contexts = {mode: client_context(mode, paths, args.tls) for mode in MODES}
            for mode in MODES:  # warm up (and check each answers)
                for _ in range(20):
                    one(ports[mode], contexts[mode])
            medians: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(args.rounds):
                for mode in MODES:
                    times = [one(ports[mode], contexts[mode]) for _ in range(args.connections)]
                    medians[mode].append(statistics.median(times))
    base = statistics.median(medians["plain"])
    print(f"TLS {args.tls}, {args.rounds} rounds x {args.connections} connections per listener")
    print("| listener | ms per new connection (median) | connections/s, one at a time | vs plain |")
    print("|---|--:|--:|--:|")
    for mode in MODES:
        m = statistics.median(medians[mode])
        print(f"| {mode} | {m * 1000:.2f} | {1 / m:.0f} | +{(m - base) * 1000:.2f} ms |")


if __name__ == "__main__":
    main()
