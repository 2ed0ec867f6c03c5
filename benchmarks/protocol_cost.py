#!/usr/bin/env python3
"""CPU cost of sluice's sans-I/O HTTP/1.1 work for one proxied request, no sockets.

Parses a wrk-like request, applies the forwarding rules, serialises it for
the upstream, parses an nginx-like response and serialises it for the client:
everything the protocol layer does per request, without trio or a network.
It isolates the parser's share of the per-request cost measured by run.py.

    .venv/bin/python benchmarks/protocol_cost.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

from sluice.protocol.http1 import CODECS, select
from sluice.proxy.forwarding import add_via, forward_request, strip_hop_by_hop

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:20:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 20\r\nConnection: keep-alive\r\n\r\n"
    b"hello from upstream\n"
)
LIMITS = {"max_head_bytes": 32768, "max_header_count": 100}


def one_exchange(codec) -> None:
    down = codec.server(**LIMITS)
    down.feed(REQUEST)
    head = down.next_event()
    down.next_event()  # End
    headers = head.request.headers
    forward_request(headers, client_ip="127.0.0.1", scheme="http", trusted=False, drop_expect=False)
    add_via(headers)
    up = codec.client(**LIMITS)
    up.request(head.request, chunked=False)
    up.end()
    up.feed(RESPONSE)
    response = up.next_event().response
    body = up.next_event()
    up.next_event()  # End
    strip_hop_by_hop(response.headers)
    add_via(response.headers)
    down.respond(response)
    down.data(body.data)
    down.end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="exchanges per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codec", choices=CODECS, default="auto", help="HTTP/1.1 codec")
    parser.add_argument("--profile", action="store_true", help="print the top functions by own time")
    args = parser.parse_args()
    codec = select(args.codec)
    for _ in range(1000):
        one_exchange(codec)
    samples = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.n):
            one_exchange(codec)
        samples.append((time.perf_counter() - start) / args.n * 1e6)
    print(f"protocol work per proxied request: median {statistics.median(samples):.1f} us "
          f"(min {min(samples):.1f}, max {max(samples):.1f}, {args.repeats} x {args.n})")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [one_exchange(codec) for _ in range(5000)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
