#!/usr/bin/env python3
"""What the rate_limit filter adds to one proxied request: local mode, and global mode on Redis.

Each mode is measured as ``[rate_limit, router]`` against ``[router]`` alone on
``exchange_cost.py``'s memory-backed listener (the production code, no system calls on the
client and upstream sides), rounds interleaved, medians of the differences. The limit always
admits (rate and burst 1e9, key ``client_ip``): the cost of the common path, one take per
request. Two figures per mode: CPU time of this process (what a worker spends), and wall time
(what a request waits: for ``global``, the Redis round trip on loopback is most of it).

The global mode needs a ``redis-server`` (Debian ``redis-server``): the script starts one on a
free loopback port, with nothing saved to disk, and stops it by PID at the end.

    .venv/bin/python benchmarks/rate_limit_cost.py
    .venv/bin/python benchmarks/rate_limit_cost.py --repeats 9 -n 3000
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import trio
from exchange_cost import _app, _serve

from sluice.control.app import App
from sluice.shared import open_backend

LIMIT = {"limits": [{"name": "bench", "key": "client_ip", "rate": 1e9, "burst": 1e9}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: str) -> tuple[subprocess.Popen, str]:
    """redis-server on a free loopback port, answering PING; (process, host:port)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not answer within 10 s")


async def _round(app, n: int, shared: dict | None) -> tuple[float, float]:
    """(CPU, wall) seconds per request for ``n`` requests, the app's [shared] backend open."""
    async with open_backend(shared) as state:
        app.shared = state
        began = time.perf_counter()
        cpu = await _serve(app, n)
        return cpu, (time.perf_counter() - began) / n


def measure(repeats: int, n: int, address: str, tmp: str) -> dict[str, tuple[float, float]]:
    """{variant: (CPU, wall) microseconds per request}: ``router`` itself, the others added to it."""
    shared = {"backend": "redis", "address": address, "prefix": "bench:", "timeout": 1.0}
    variants = {
        "router": (["router"], {}, None),
        "local": (["rate_limit", "router"], {"rate_limit": LIMIT}, None),
        "global": (["rate_limit", "router"], {"rate_limit": {**LIMIT, "mode": "global"}}, shared),
    }

    def serve(name: str, count: int) -> tuple[float, float]:
        chain, settings, backend = variants[name]
        if backend is None:
            app = _app(chain, "auto", tmp, None, settings)
        else:  # exchange_cost's config, with a [shared] table (global mode checks for one at build)
            local = _app(chain, "auto", tmp, None, {"rate_limit": LIMIT})
            app = App(local.config.model_copy(update={"shared": backend, "filters": settings}), local.plugins)
        return trio.run(_round, app, count, backend)

    for name in variants:
        serve(name, 500)  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            samples[name].append(serve(name, n))

    def median(name: str, i: int) -> float:
        return statistics.median(s[i] for s in samples[name]) * 1e6

    base = (median("router", 0), median("router", 1))
    return {"router": base, **{name: (median(name, 0) - base[0], median(name, 1) - base[1])
                               for name in ("local", "global")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("-n", type=int, default=2000, help="requests per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_redis(tmp)
        try:
            figures = measure(args.repeats, args.n, address, tmp)
        finally:
            proc.terminate()
            proc.wait(10)
    cpu, wall = figures.pop("router")
    print(f"router alone: {cpu:.1f} us CPU, {wall:.1f} us wall per proxied request")
    print(f"{'rate_limit':<12} {'adds, us CPU':>13} {'adds, us wall':>14}")
    for name, (cpu, wall) in figures.items():
        print(f"{name:<12} {cpu:>13.1f} {wall:>14.1f}")
    print(f"medians of {args.repeats} interleaved rounds of {args.n} requests; metrics off; Redis on loopback")


if __name__ == "__main__":
    main()
