"""Races between the two tasks of one exchange, over real loopback sockets.

While a request body streams upstream, an exchange runs two tasks: the pump
(client body to upstream, and the ``100 Continue``) and the relay (upstream
response to client). An upstream that answers as soon as it has the head
makes them run at once, and two bugs lived there:

* an early response cancelled the pump after the protocol object had framed
  the end of the body but before the bytes were written; the pool trusted
  the state machine and kept the connection, so the next request went out
  where a chunk was due (a desync: the request-smuggling class);
* with ``Expect: 100-continue`` the pump's 100 and the relayed response were
  written by two tasks at once: the client got the 100 and a closed
  connection, while the access log said 200.

Each race is lost in a window of one or two scheduler steps, and which
steps depends on how many the proxy takes. So the upstream answers a
chosen number of steps after it has a head (``EarlyAnswers.ticks``), each
test sweeps that number over a range wider than the windows, and repeats
the sweep: with the bugs, the races are lost with near certainty.

Every scenario runs over plain TCP and over TLS. A plain TCP write the
kernel takes at once does not yield (``streams.SocketIO``), which shuts
these windows there unless a socket buffer is full; TLS goes through trio's
streams, where every write is a checkpoint, so the TLS cases are the ones
that catch a regression of either fix today.

The clients are raw sockets, with h11 crafting the bytes they send and
checking the bytes they get.
"""

from __future__ import annotations

import json
import ssl
from collections import defaultdict
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trustme

from sluice.testing import serve

from .conftest import config

PLUGINS = ["router", "balancer", "tls"]
TICKS = 8  # the answer delays swept, in scheduler steps (the windows seen so far: 0 to 5)
ROUNDS = 8  # sweeps per test
SCENARIO_TIMEOUT = 5.0


@dataclass
class Tls:
    """What both ends need for TLS on loopback: files for sluice, contexts for the test's peers."""

    cert: str
    key: str
    ca: str
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Tls:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "upstream.test")
    where = tmp_path_factory.mktemp("tls")
    paths = {name: str(where / f"{name}.pem") for name in ("cert", "key", "ca")}
    cert.private_key_and_cert_chain_pem.write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(**paths, server=server, client=client)


def answer_to(target: bytes) -> bytes:
    """The body the upstream answers ``target`` with: who got whose answer shows."""
    return b"answer to " + target


class EarlyAnswers:
    """A keep-alive upstream that answers a request under ``/early/`` (200, a
    Content-Length body) as soon as its head is in, before reading its body,
    and any other request once its body is in, like most servers. It keeps
    every byte each connection received, and hangs up when the bytes stop
    making sense, as a real server would."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # serve TLS with this context
        self.ticks = 0  # scheduler steps between having a head and answering it early
        self.received: list[bytearray] = []  # one per connection, in accept order
        self.heads: dict[bytes, trio.Event] = defaultdict(trio.Event)  # by target, set when its head is in

    async def __call__(self, stream: trio.abc.Stream) -> None:
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)
        received = bytearray()
        self.received.append(received)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    received += data
                    conn.receive_data(data)
                elif type(event) is h11.Request:
                    target = event.target
                    self.heads[target].set()
                    if target.startswith(b"/early/"):
                        for _ in range(self.ticks):
                            await trio.sleep(0)
                        await stream.send_all(self._response(conn, target))
                elif type(event) is h11.EndOfMessage:
                    if conn.our_state is h11.SEND_RESPONSE:
                        await stream.send_all(self._response(conn, target))
                    conn.start_next_cycle()
                elif type(event) is h11.ConnectionClosed:
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError):
            return  # out of step with the proxy, or the upload was cut: hang up

    @staticmethod
    def _response(conn: h11.Connection, target: bytes) -> bytes:
        body = answer_to(target)
        return (
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(body))]))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )


def requests_in(data: bytes) -> list[tuple[bytes, bytes, bytes | None]]:
    """The requests in what one upstream connection received, in order, as
    ``(method, target, body)``; the body is None for a last request whose
    upload was cut short (the proxy closed the connection inside it).

    Raises h11.RemoteProtocolError where the bytes are not a well-framed
    request: say, a request line where a chunk-size line was due.
    """
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    requests: list[tuple[bytes, bytes, bytes | None]] = []
    while True:
        event = conn.next_event()
        if type(event) is h11.Request:
            method, target, body = event.method, event.target, bytearray()
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())  # any answer: it lets the next cycle start
        elif type(event) is h11.Data:
            body += event.data
        elif type(event) is h11.EndOfMessage:
            requests.append((method, target, bytes(body)))
            conn.start_next_cycle()
        else:  # NEED_DATA: the bytes ran out
            if conn.their_state is h11.SEND_BODY:
                requests.append((method, target, None))
            else:
                assert not conn.trailing_data[0], f"the bytes end inside a request head: {data!r}"
            return requests


@dataclass
class Received:
    """What a raw client got for one request, read with h11 as the client."""

    raw: bytes = b""
    interim: list[int] = field(default_factory=list)  # 1xx statuses, in order
    status: int | None = None  # of the final response, once its head arrived
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    whole: bool = False  # the final response arrived to its end
    error: str | None = None  # why h11 rejected the bytes (a close mid-message included)


async def receive_response(stream: trio.abc.Stream, client: h11.Connection) -> Received:
    """Read up to the end of one final response (or the connection's end)."""
    got = Received()
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            got.error = str(exc)
            return got
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            got.raw += data
            client.receive_data(data)
        elif type(event) is h11.InformationalResponse:
            got.interim.append(event.status_code)
        elif type(event) is h11.Response:
            got.status, got.headers = event.status_code, dict(event.headers)
        elif type(event) is h11.Data:
            got.body += event.data
        elif type(event) is h11.EndOfMessage:
            got.whole = True
            return got
        else:  # ConnectionClosed before any response
            return got


def post(target: str, framing: str, pieces: list[bytes], *, expect_continue: bool = False):
    """An h11 client and the bytes of a POST: its head, each body piece, its end
    (``b""`` when a Content-Length frames the body)."""
    client = h11.Connection(h11.CLIENT)
    headers = [(b"host", b"sluice.test")]
    if framing == "chunked":
        headers.append((b"transfer-encoding", b"chunked"))
    else:
        headers.append((b"content-length", b"%d" % len(b"".join(pieces))))
    if expect_continue:
        headers.append((b"expect", b"100-continue"))
    parts = [client.send(h11.Request(method="POST", target=target, headers=headers))]
    parts += [client.send(h11.Data(data=piece)) for piece in pieces]
    parts.append(client.send(h11.EndOfMessage()))
    return client, parts


def writes(parts: list[bytes], split: str) -> list[bytes]:
    """Group a request's parts into the writes a client makes."""
    if split == "at once":
        groups = [b"".join(parts)]
    elif split == "end apart":  # the last part (chunked: 0 CRLF CRLF) on its own
        groups = [b"".join(parts[:-1]), parts[-1]]
    else:  # "each apart"
        groups = parts
    return [w for w in groups if w]


# -- the pool never takes back a connection out of step ------------------------------


GAP = 0.002  # after A's response: time for its upstream connection to go back to the pool


async def _pair(proxy, upstream: EarlyAnswers, i: int, framing: str, pieces: list[bytes],
                split: str) -> tuple[Received, Received]:
    """Client A uploads to the early-answering upstream; then client B, on
    another connection, posts a small body (on A's upstream connection, if
    the pool kept it). A split upload makes its last write as soon as the
    upstream has A's head, so its end meets the answer at a point of the
    relay that the upstream's delay chooses."""
    target = f"/early/a{i}"
    client, parts = post(target, framing, pieces)
    *first, last = writes(parts, split)

    async def upload(stream: trio.SocketStream) -> None:
        try:
            for data in first:
                await stream.send_all(data)
                await trio.sleep(0)  # separate writes: likely separate reads
            if first:
                await upstream.heads[target.encode()].wait()
            await stream.send_all(last)
        except trio.BrokenResourceError:
            pass  # answered and closed before the upload ended: allowed

    a = await trio.open_tcp_stream(*proxy.address)
    async with a, trio.open_nursery() as nursery:
        nursery.start_soon(upload, a)
        got_a = await receive_response(a, client)
    await trio.sleep(GAP)
    client, parts = post(f"/b{i}", "content-length", [b"hello"])
    b = await trio.open_tcp_stream(*proxy.address)
    async with b:
        await b.send_all(b"".join(parts))
        got_b = await receive_response(b, client)
    return got_a, got_b


@pytest.mark.parametrize(
    ("framing", "pieces", "split"),
    [
        ("chunked", [b"hello"], "at once"),
        ("chunked", [b"hello"], "end apart"),
        ("chunked", [b"hel", b"lo"], "each apart"),
        ("content-length", [b"hello"], "at once"),
        ("content-length", [b"hel", b"lo"], "each apart"),
    ],
    ids=["chunked-at-once", "chunked-end-apart", "chunked-each-apart", "length-at-once", "length-each-apart"],
)
@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_an_early_answer_never_leaves_a_half_sent_request_in_the_pool(
    start_origin, tls, transport, framing, pieces, split
):
    """An upstream answering before the upload ends must not desync the pool.

    Client A uploads to an upstream that answers before reading the body;
    client B then posts on another connection, on A's upstream connection
    if the pool kept it.

    Bug: the early answer cancelled the body pump after the protocol object
    had framed the end of the body, before its bytes were written; the pool
    trusted the state machine and kept the connection. The upstream then
    read the next client's request line where A's last chunk was due, and
    that client got a 502.

    Expected: a connection goes back to the pool only when both messages
    were fully written and read on the wire; anything else is closed. So A
    and B get their own 200s in every pair, and what each upstream connection
    received parses as well-framed requests, every B's among them intact;
    only a last upload, cut when its connection was closed, may be short.
    (A Content-Length body has no bytes after its last piece to lose: those
    cases guard the fix, not the bug.)
    """
    upstream = EarlyAnswers(tls.server if transport == "tls" else None)
    origin = await start_origin(raw=upstream)
    cluster = {"tls": {"ca": tls.ca, "server_name": "upstream.test"}} if transport == "tls" else {}
    pairs = ROUNDS * TICKS
    outcomes = []
    async with serve(config(origin.address, cluster=cluster), plugins=PLUGINS) as proxy:
        for i in range(pairs):
            upstream.ticks = i % TICKS
            with trio.fail_after(SCENARIO_TIMEOUT):
                outcomes.append(await _pair(proxy, upstream, i, framing, pieces, split))

    for i, (a, _) in enumerate(outcomes):
        assert (a.status, a.body) == (200, answer_to(b"/early/a%d" % i)), a
    failed = [(i, b) for i, (_, b) in enumerate(outcomes) if (b.status, b.body) != (200, answer_to(b"/b%d" % i))]
    assert not failed, f"B did not get its answer in {len(failed)} of {pairs} pairs; first: {failed[0]}"

    seen_b = []
    for n, received in enumerate(upstream.received):
        try:
            requests = requests_in(bytes(received))
        except h11.RemoteProtocolError as exc:
            raise AssertionError(f"upstream connection {n} got out of step ({exc}): {bytes(received)!r}") from None
        seen_b += [(target, body) for _, target, body in requests if target.startswith(b"/b")]
    assert sorted(seen_b) == sorted((b"/b%d" % i, b"hello") for i in range(pairs))


# -- one writer per client connection -----------------------------------------------


async def _expect_continue(proxy, i: int, framing: str, tls: ssl.SSLContext | None) -> tuple[Received, bytes, bool]:
    """A client sends a head with ``Expect: 100-continue`` and waits: what it
    got, the bytes after the final response, and whether the proxy then closed."""
    client, parts = post(f"/early/e{i}", framing, [b"hello"], expect_continue=True)
    if tls is None:
        stream = await trio.open_tcp_stream(*proxy.address)
    else:
        stream = await trio.open_ssl_over_tcp_stream(*proxy.address, ssl_context=tls, https_compatible=True)
    async with stream:
        await stream.send_all(parts[0])  # the head only: the body waits for the 100
        got = await receive_response(stream, client)
        after, closed = client.trailing_data[0], got.error is not None
        if got.whole:
            # A close follows at once or not at all: wait long only for an announced one.
            announced = got.headers.get(b"connection", b"").lower() == b"close"
            with trio.move_on_after(1.0 if announced else 0.05) as waiting:
                try:
                    while chunk := await stream.receive_some(65536):
                        after += chunk
                except trio.BrokenResourceError:
                    pass
            closed = not waiting.cancelled_caught
    return got, after, closed


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_expect_continue_with_an_early_answer_delivers_the_whole_response(
    start_origin, tls, tmp_path, transport, framing
):
    """A client expecting 100-continue gets the upstream's early final response whole.

    Bug: the pump wrote the 100 while the relay wrote the upstream's response,
    two writers on one socket: trio raised BusyResourceError, the client got
    ``HTTP/1.1 100`` and then a closed connection, and the access log still
    said 200.

    Expected: one writer per client connection. The client receives the
    final response whole (status, headers, the body its Content-Length
    promises), a 100 before it or not, and nothing after it; the bytes parse
    as HTTP/1.1 from first to last. Closing after it is fine (the body was
    never read), and then the response says ``Connection: close``. The
    access log records the status the client actually got.
    """
    upstream = EarlyAnswers()
    origin = await start_origin(raw=upstream)
    log = tmp_path / "access.jsonl"
    listener = {"tls": {"cert": tls.cert, "key": tls.key}} if transport == "tls" else {}
    cfg = config(origin.address, filters=["access_log", "router"], listener=listener,
                 filter_settings={"access_log": {"path": str(log), "flush_interval": 0.05}})
    runs = ROUNDS * TICKS
    received = []
    async with serve(cfg, plugins=[*PLUGINS, "access_log"]) as proxy:
        for i in range(runs):
            upstream.ticks = i % TICKS
            with trio.fail_after(SCENARIO_TIMEOUT):
                received.append(await _expect_continue(proxy, i, framing, tls.client if transport == "tls" else None))
        with trio.fail_after(SCENARIO_TIMEOUT):  # the log is written off the event loop, in batches
            while not ((text := log.read_text()).endswith("\n") and text.count("\n") >= runs):
                await trio.sleep(0.05)

    broken = [(i, got.raw, got.error) for i, (got, _, _) in enumerate(received)
              if not (got.whole and got.status == 200 and got.body == answer_to(b"/early/e%d" % i))]
    assert not broken, f"{len(broken)} of {runs} clients did not get the response whole; first: {broken[0]}"
    for got, after, closed in received:
        assert got.interim in ([], [100]), got.raw
        assert after == b"", got.raw + after  # one request, one final response: nothing follows
        if closed:
            assert got.headers.get(b"connection", b"").lower() == b"close", got.raw

    logged = {entry["path"]: entry["status"] for entry in map(json.loads, text.splitlines())}
    assert logged == {f"/early/e{i}": got.status for i, (got, _, _) in enumerate(received)}
