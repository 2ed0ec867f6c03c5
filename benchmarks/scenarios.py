"""What the benchmark asks of every target: one Scenario per kind of traffic.

Each load scenario is one wrk command line (path, method, connections, extra
headers, Lua script, TLS), or for the ``h2`` ones one h2load command line (h2c
with prior knowledge, streams per connection), and the answer every target
must give to it, which is checked once per target before it is measured.
``idle10k`` is not a load run: it holds idle connections open and reads the
proxies' memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from peers import LARGE_BYTES, LARGE_PATH, SMALL_BODY, UPLOAD_ANSWER, UPLOAD_BYTES, UPLOAD_PATH

# The body is built in the script, so wrk reads nothing from disk per request.
UPLOAD_LUA = f"""\
wrk.method = "POST"
wrk.body = string.rep("x", {UPLOAD_BYTES})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    path: str = "/"
    connections: int = 50
    headers: tuple[str, ...] = ()
    lua: str | None = None  # a wrk script
    request_bytes: int = 0  # body sent with each request (POST if > 0)
    answer_bytes: int = len(SMALL_BODY)  # body length of the expected 200 answer
    tls: bool = False
    idle: bool = False  # hold connections and read memory instead of running wrk
    max_connections: int | None = None  # what a proxy with a connection limit must allow
    h2: bool = False  # h2c with prior knowledge, driven by h2load; only targets that speak it
    streams: int = 1  # (h2) requests in flight per connection: h2load -m
    grpc: bool = False  # grpc_unary.py's own targets and client instead of wrk (connections: calls in flight)
    route_scale: bool = False  # route_scale.py's pure-Python timing of route matching: no targets, no traffic
    policy_cost: bool = False  # policy_cost.py's pure-Python timing of one balancer pick: no targets, no traffic
    filter_cost: bool = False  # filter_cost.py: what each built-in filter adds to a request, no sockets

    @property
    def payload_bytes(self) -> int:
        """Bytes per request that make bandwidth worth showing (0: not a bandwidth scenario)."""
        size = max(self.request_bytes, self.answer_bytes)
        return size if size >= 64 * 1024 else 0


IDLE_CONNECTIONS = 10_000

SCENARIOS = {s.name: s for s in (
    Scenario("small", "GET / (32-byte body), keep-alive, 50 connections"),
    Scenario("newconn", "GET /, a new connection per request (Connection: close), 50 connections",
             headers=("Connection: close",)),
    Scenario("1m", "GET /1m (1 MiB body), keep-alive, 50 connections", path=LARGE_PATH,
             answer_bytes=LARGE_BYTES),
    Scenario("upload", "POST /upload (100 KiB body), keep-alive, 50 connections", path=UPLOAD_PATH,
             lua=UPLOAD_LUA, request_bytes=UPLOAD_BYTES, answer_bytes=len(UPLOAD_ANSWER)),
    Scenario("tls", "GET / over TLS (self-signed ECDSA P-256), keep-alive, 50 connections", tls=True),
    Scenario("c1000", "GET /, keep-alive, 1000 connections", connections=1000, max_connections=2000),
    Scenario("idle10k", f"{IDLE_CONNECTIONS:,} idle keep-alive connections: RSS of the proxy",
             connections=IDLE_CONNECTIONS, idle=True, max_connections=IDLE_CONNECTIONS + 2000),
    # The same 50 requests in flight as `small`, one per connection: what HTTP/2's
    # framing costs per request against HTTP/1.1's.
    Scenario("h2", "GET / over h2c (prior knowledge), 50 connections x 1 stream", h2=True),
    # What HTTP/2 is for: many streams on few connections.
    Scenario("h2-many", "GET / over h2c (prior knowledge), 10 connections x 10 streams", h2=True,
             connections=10, streams=10),
    # gRPC through sluice, HTTP/2 both sides, against the same grpcio server called directly.
    Scenario("grpc-unary", "gRPC unary calls (grpcio asyncio client), 50 in flight on one channel: "
             "direct vs sluice h2c -> h2c", grpc=True),
    # Route matching at scale (issue 8): the req/s column is matches/s of the router alone.
    Scenario("route-scale", "the router's match at 10, 1,000 and 10,000 routes, pure Python "
             "(req/s: matches/s; goal <= 2x the cost at 10)", route_scale=True),
    # One balancer pick per policy (issue 8): the req/s column is picks/s of the policy alone.
    Scenario("policy-cost", "one pick of each balancing policy at 3, 10 and 100 endpoints, pure Python "
             "(req/s: picks/s)", policy_cost=True),
    # What each built-in filter adds to a proxied request (issue 10): req/s is 1e6 / the added us.
    Scenario("filter-cost", "what each built-in filter adds to one proxied request, sluice's Python "
             "without sockets (req/s: 1e6 / added us)", filter_cost=True),
)}
QUICK = ("small", "newconn", "1m", "upload")
