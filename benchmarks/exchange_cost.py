#!/usr/bin/env python3
"""What one proxied exchange costs in sluice's own Python, without sockets.

A real listener (built from a real config and the installed plugins) serves
one keep-alive connection whose bytes come from memory, and its upstream
connection answers from memory too; everything between (codec, chain,
forwarding, pool, exchange, the edge's waits) is the code that runs in
production. What is left out is the kernel: no system calls, so the figure
is stable on a busy machine where wrk's req/s is not. Use it to see what a
change to the hot path buys, then confirm with ``run.py``.

    .venv/bin/python benchmarks/exchange_cost.py                    # router only
    .venv/bin/python benchmarks/exchange_cost.py --filters access_log,router
    .venv/bin/python benchmarks/exchange_cost.py --codec h11 --profile
    .venv/bin/python benchmarks/exchange_cost.py --filters access_log,router --access-log all
    .venv/bin/python benchmarks/exchange_cost.py --filters access_log,router --metrics both

``--access-log`` picks the access log's format: ``default`` (the JSON line
sluice writes unless told otherwise), ``all`` (every field of the catalog,
two request headers, one response header and both bodies), ``text``
(Envoy's default template) or ``text-all`` (a template with every operator).

``--metrics`` records Prometheus metrics (``sluice.metrics``, into
multiprocess files as ``sluice run`` does, flushed once per repeat) or not;
``both`` interleaves rounds with and without, and prints the ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections import deque

import trio

from sluice import metrics
from sluice.control.app import App
from sluice.control.config import parse
from sluice.control.registry import Plugins
from sluice.edge.pool import UpstreamConnection

FLUSH = 0.2  # the access log's flush interval, as configured by default


def _access_log_formats() -> dict[str, dict]:
    """The access-log settings ``--access-log`` names (the whole catalog, or not)."""
    from sluice.plugins.access_log_fields import CATALOG

    every = {"fields": [*CATALOG, "request_headers", "response_headers"],
             "request_headers": ["user-agent", "accept"], "response_headers": ["content-type"],
             "bodies": {"max_bytes": 1024}}
    template = " ".join(f.operator for f in CATALOG.values()) + " %REQ(ACCEPT)% %RESP(CONTENT-TYPE)%"
    return {"default": {}, "all": every, "text": {"format": "text"},
            "text-all": {"format": "text", "template": template}}
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:20:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 31\r\nConnection: keep-alive\r\n\r\n"
    b"hello from upstream 32 bytes!!\n"
)


class _MemoryIO:
    """The edge's byte I/O interface over memory. Each receive parks the task
    once, as a real wait does (its deadline is the watchdog's: free here)."""

    def __init__(self, chunks: list[bytes], reply: bytes | None = None) -> None:
        self._chunks = chunks  # what receive() hands out, in order
        self._reply = reply  # an upstream: every completed write queues this answer

    async def receive(self, deadline: float, watch=None) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self._chunks.pop(0) if self._chunks else b""

    async def send_all(self, data: bytes, deadline: float) -> bool:
        if self._reply is not None:
            self._chunks.append(self._reply)
        return True

    def readable_now(self) -> bool:
        return False

    async def aclose(self) -> None:
        pass


def _app(filters: list[str], codec: str, log_dir: str, access_log: dict | None = None,
         settings: dict | None = None, extra: dict | None = None, clusters: dict | None = None) -> App:
    """The App for ``filters`` (``settings``: other filters' ``[filters.X]`` tables; ``extra``:
    in-process plugins, as ``Plugins`` takes them; ``clusters``: more, besides "up")."""
    config = parse({
        "server": {"http1_codec": codec},
        "listeners": [{"address": "127.0.0.1:0", "filters": filters}],
        "clusters": {"up": {"endpoints": ["127.0.0.1:9"]}, **(clusters or {})},
        "routes": [{"match": {"prefix": "/"}, "cluster": "up"}],
        "filters": {**({"access_log": {"path": f"{log_dir}/access.jsonl", "flush_interval": FLUSH,
                                        **(access_log or {})}} if "access_log" in filters else {}),
                    **{name: s for name, s in (settings or {}).items() if name in filters}},
    })
    return App(config, Plugins(None, extra))


async def _serve(app: App, n: int, request: bytes = REQUEST) -> float:
    """Serve ``n`` requests on one connection; CPU seconds per request."""
    listener = app.listeners[0]
    cluster = app.clusters["up"]
    endpoint = cluster.endpoints[0]
    upstream = UpstreamConnection(_MemoryIO([], RESPONSE), endpoint, app.codec, io_timeout=30,
                                  max_head_bytes=65536, max_header_count=200)
    upstream.idle_deadline = float("inf")
    app.pool._idle[id(endpoint)] = deque([upstream])  # pooled, as a warm connection is
    async with trio.open_nursery() as nursery:
        for f in app.filters.values():
            await f.open(nursery)
        down = _MemoryIO([request] * n)
        start = time.process_time()
        await listener._exchanges(down, ("127.0.0.1", 40000), ("127.0.0.1", 8080), None)
        metrics.flush()  # (what sluice's flush task does once a second: in the figure)
        elapsed = time.process_time() - start
        for f in app.filters.values():
            await f.close()
        nursery.cancel_scope.cancel()
    return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", default="router", help="the chain (default: router)")
    parser.add_argument("--codec", default="auto", choices=["auto", "h11", "httptools"])
    parser.add_argument("-n", type=int, default=20000, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print the top functions by own time")
    parser.add_argument("--access-log", default="default", choices=["default", "all", "text", "text-all"],
                        help="the access log's format, when the chain has it (default: its default)")
    parser.add_argument("--metrics", default="off", choices=["off", "on", "both"],
                        help="record Prometheus metrics; both: interleaved rounds, and the ratio")
    args = parser.parse_args()
    filters = args.filters.split(",")
    log = None
    if "access_log" in filters:
        log = _access_log_formats()[args.access_log] if args.access_log != "default" else {}
    modes = ["off", "on"] if args.metrics == "both" else [args.metrics]
    if "on" in modes:
        metrics.prepare_multiprocess()

    def serve(mode: str, n: int) -> float:
        if mode == "on":
            metrics.begin()
        try:
            return trio.run(_serve, _app(filters, args.codec, log_dir, log), n)
        finally:
            if mode == "on":
                metrics.end()

    with tempfile.TemporaryDirectory() as log_dir:
        app = _app(filters, args.codec, log_dir, log)
        for mode in modes:
            serve(mode, 2000)  # warm-up
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:  # interleaved: off, on, off, on, ... share the machine's noise
                samples[mode].append(serve(mode, args.n) * 1e6)
        fmt = f", access log {args.access_log}" if log is not None else ""
        for mode, figures in samples.items():
            print(f"sluice's Python per proxied request ({app.codec.name}, chain {','.join(filters)}{fmt}, "
                  f"metrics {mode}): median {statistics.median(figures):.1f} us (min {min(figures):.1f}, "
                  f"max {max(figures):.1f}, {args.repeats} x {args.n})")
        if len(modes) == 2:
            off, on = (statistics.median(samples[m]) for m in modes)
            print(f"metrics on / off: {on / off:.3f} (+{on - off:.1f} us a request; "
                  f"throughput at one core: {off / on:.3f} of metrics off)")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(trio.run, _serve, _app(filters, args.codec, log_dir, log), 5000)
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
