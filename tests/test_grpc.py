"""gRPC end to end: a real grpcio client, sluice (h2c listener, h2c cluster), a real grpcio server.

The server (grpc_support/echo_server.py) runs as a process of its own; sluice
runs as ``sluice run -c FILE``, as users run it, with its access log on
stdout. Each call's first message tells the server what to do (echo.proto):
how many replies, a sleep, metadata, an abort with a status.

Most tests run twice, ``direct`` (the client straight to the server) and
``sluice`` (through the proxy), with the same assertions: the direct run
shows the test asks only what gRPC itself does, so a failure through sluice
is sluice's. Tests of what only a proxy does (no route, an endpoint down,
``grpc-timeout`` as a cap on the upstream wait, TLS termination) run through
sluice only; the ``grpc-timeout`` one against an h2c upstream that never
answers (grpc_support/stall.py), since a grpcio server enforces the deadline
itself and would race sluice's timer.

The client is grpcio's blocking API, so these are plain (not trio) tests.
"""

from __future__ import annotations

import json
import os
import queue
import re
import time

import grpc
import pytest
import trustme

from .grpc_support import CHANNEL_OPTIONS, EchoServer, load_stubs
from .grpc_support.raw_call import raw_call
from .grpc_support.stall import StallServer
from .proc import Running, free_port

MIB = 1024 * 1024
ECHO = "/sluice.test.Echo/"
CONFIG = """\
[server]
drain_timeout = 2.0

[[listeners]]
address = "127.0.0.1:0"
filters = ["access_log", "router"]
http2 = true

[[listeners]]
address = "127.0.0.1:0"
filters = ["access_log", "router"]
http2 = true
tls = {{ cert = "{cert}", key = "{key}" }}

[filters.access_log]
flush_interval = 0.05

[clusters.echo]
endpoints = ["{echo}"]
protocol = "h2c"

[clusters.down]
endpoints = ["127.0.0.1:{down_port}"]
protocol = "h2c"
connect_timeout = 1.0

[[routes]]
match = {{ prefix = "/sluice.test.Echo/" }}
cluster = "echo"

[clusters.stall]
endpoints = ["{stall}"]
protocol = "h2c"

[[routes]]
match = {{ prefix = "/sluice.test.Down/" }}
cluster = "down"

[[routes]]
match = {{ prefix = "/sluice.test.Stall/" }}
cluster = "stall"
"""


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """``(echo_pb2, echo_pb2_grpc, directory)``, generated from echo.proto for this run."""
    directory = tmp_path_factory.mktemp("grpc_stubs")
    pb2, pb2_grpc = load_stubs(directory)
    return pb2, pb2_grpc, directory


@pytest.fixture(scope="module")
def pb2(stubs):
    return stubs[0]


@pytest.fixture(scope="module")
def echo_server(stubs):
    with EchoServer(stubs[2]) as server:
        yield server
    assert server.proc.returncode == 0, "".join(server.output)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


class Sluice:
    """``sluice run`` with CONFIG: ``plain`` (h2c) and ``tls`` (h2 by ALPN) listener addresses."""

    def __init__(self, running: Running, urls: list[str]) -> None:
        self.running = running
        self.plain = urls[0].removeprefix("http://")
        self.tls = urls[1].removeprefix("https://")

    def access_log(self) -> list[dict]:
        return [json.loads(line) for line in self.running.stdout if line.startswith("{")]

    def log_lines(self, user_agent: str, timeout: float = 5.0) -> list[dict]:
        """The access log lines of the calls whose user agent starts with ``user_agent``,
        once there is one (the log is flushed every 50 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [e for e in self.access_log() if (e.get("user_agent") or "").startswith(user_agent)]
            if lines:
                return lines
            time.sleep(0.05)
        return []


def _flags(line: dict) -> set[str]:
    return set((line.get("flags") or "").split(","))


@pytest.fixture(scope="module")
def stall():
    with StallServer() as server:
        yield server


@pytest.fixture(scope="module")
def sluice(echo_server, stall, ca, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sluice_grpc")
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    config = directory / "sluice.toml"
    config.write_text(CONFIG.format(cert=cert, key=key, echo=echo_server.address, down_port=free_port(),
                                   stall=stall.address))
    running = Running("-c", str(config))
    try:
        line = next(line for line in running.stderr if "listening on" in line)
        urls = re.findall(r"https?://[0-9.]+:\d+", line)
        assert len(urls) == 2, line
        yield Sluice(running, urls)
    finally:
        assert running.stop() == 0, "".join(running.stderr)


@pytest.fixture(params=["direct", "sluice"])
def target(request, echo_server) -> str:
    """The address the client calls: the server itself, or sluice's h2c listener."""
    if request.param == "direct":
        return echo_server.address
    return request.getfixturevalue("sluice").plain


def _channel(address: str, user_agent: str = "test") -> grpc.Channel:
    return grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, ("grpc.primary_user_agent", user_agent)])


@pytest.fixture
def stub(stubs, target, request):
    """An Echo stub on a new channel to ``target``; the test's name is its user agent."""
    with _channel(target, request.node.name) as channel:
        yield stubs[1].EchoStub(channel)


def _pairs(pb2, **metadata: str) -> list:
    return [pb2.Pair(key=key.replace("_", "-"), value=value) for key, value in metadata.items()]


def _metadata(pairs) -> dict[str, str | bytes]:
    return {key: value for key, value in pairs}


# ------------------------------------------------------------- the four kinds


def test_unary_echoes_and_metadata_goes_both_ways(stub, pb2):
    binary = bytes(range(256))
    reply, call = stub.Unary.with_call(
        pb2.Call(payload=b"hello", initial_metadata=_pairs(pb2, x_initial="first"),
                 trailing_metadata=_pairs(pb2, x_trailing="last")),
        metadata=[("x-test", "one"), ("x-blob-bin", binary)], timeout=10)
    assert reply.payload == b"hello" and reply.received == 1 and reply.received_bytes == 5
    seen = {p.key: p.value for p in reply.metadata}
    assert seen["x-test"] == "one"
    assert seen["x-blob-bin"].encode("latin-1") == binary
    assert _metadata(call.initial_metadata())["x-initial"] == "first"
    assert _metadata(call.trailing_metadata())["x-trailing"] == "last"
    assert call.code() == grpc.StatusCode.OK


def test_client_streaming_delivers_every_message_in_order(stub, pb2):
    payloads = [b"m%04d:" % i + bytes([i % 256]) * (i % 97) for i in range(1000)]
    reply = stub.ClientStream(iter(pb2.Call(payload=p) for p in payloads), timeout=20)
    assert reply.received == 1000
    assert reply.received_bytes == sum(map(len, payloads))
    assert reply.payload == b"".join(payloads)


def test_server_streaming_delivers_every_reply_in_order(stub, pb2):
    replies = list(stub.ServerStream(pb2.Call(payload=b"tick", count=1000), timeout=20))
    assert [r.index for r in replies] == list(range(1000))
    assert all(r.payload == b"tick" for r in replies)


def test_bidi_ping_pong_streams_each_message_through(stub, pb2):
    """The client sends message n+1 only once it has reply n: a proxy that held
    back either direction (buffering a body, batching frames) would stall the call
    until its deadline."""
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (message := outbox.get(timeout=10)) is not None:
            yield message

    outbox.put(pb2.Call(payload=b"ping 0"))
    replies = []
    for reply in stub.Bidi(requests(), timeout=20):
        replies.append(reply)
        n = len(replies)
        outbox.put(pb2.Call(payload=b"ping %d" % n) if n < 100 else None)
    assert [r.index for r in replies] == list(range(100))
    assert [r.payload for r in replies] == [b"ping %d" % i for i in range(100)]
    # When it answered message n, the server had read exactly n + 1 messages: nothing ran ahead.
    assert [r.received for r in replies] == list(range(1, 101))


def test_4_mib_each_way_under_flow_control(stub, pb2):
    payload = os.urandom(4 * MIB)
    reply = stub.Unary(pb2.Call(payload=payload), timeout=30)
    assert reply.received_bytes == 4 * MIB
    assert reply.payload == payload


def test_big_messages_both_ways_on_one_bidi_stream(stub, pb2):
    """Several 1 MiB messages each way on one stream: windows must be reopened as they drain."""
    payloads = [os.urandom(MIB) for _ in range(6)]
    replies = list(stub.Bidi(iter(pb2.Call(payload=p) for p in payloads), timeout=30))
    assert [r.payload for r in replies] == payloads
    assert replies[-1].received_bytes == 6 * MIB


# ----------------------------------------------------------------- statuses


def test_status_message_and_trailing_metadata_after_some_messages(stub, pb2):
    message = "nope: 100% not here ✓"  # percent-encoded on the wire; must arrive as it was sent
    call = stub.ServerStream(pb2.Call(
        payload=b"item", count=5, abort_code=grpc.StatusCode.NOT_FOUND.value[0], abort_message=message,
        abort_after=2, initial_metadata=_pairs(pb2, x_initial="head"),
        trailing_metadata=[pb2.Pair(key="x-why", value="gone"),
                           pb2.Pair(key="x-why-bin", value=b"\x00\xff".decode("latin-1"))]), timeout=10)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in call:
            received.append(reply)
    assert [r.index for r in received] == [0, 1]
    error = info.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == message
    trailing = _metadata(error.trailing_metadata())
    assert trailing["x-why"] == "gone" and trailing["x-why-bin"] == b"\x00\xff"
    assert _metadata(error.initial_metadata())["x-initial"] == "head"


def test_the_server_ends_the_call_while_the_client_still_streams(stub, pb2):
    """The server answers in full (status and all) while the request stream is still
    open: the client gets the reply and the status, whatever is left of its stream."""
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (message := outbox.get(timeout=10)) is not None:
            yield message

    outbox.put(pb2.Call(payload=b"first", abort_code=grpc.StatusCode.NOT_FOUND.value[0], abort_message="enough",
                        abort_after=1))
    replies = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in stub.Bidi(requests(), timeout=10):
            replies.append(reply)
            for _ in range(3):  # the first ends the call; the others are on their way as it ends
                outbox.put(pb2.Call(payload=b"more"))
    outbox.put(None)
    assert [r.payload for r in replies] == [b"first"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and info.value.details() == "enough"
    # How sluice logs such a call is test_a_burst_of_immediate_answers_is_clean_in_the_access_log's.


def test_trailers_only_abort_before_any_message(stub, pb2):
    with pytest.raises(grpc.RpcError) as info:
        stub.Unary(pb2.Call(abort_code=grpc.StatusCode.PERMISSION_DENIED.value[0], abort_message="keep out",
                            trailing_metadata=_pairs(pb2, x_reason="policy")), timeout=10)
    error = info.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "keep out"
    assert _metadata(error.trailing_metadata())["x-reason"] == "policy"


def test_trailers_only_abort_stays_trailers_only_on_the_wire(echo_server, pb2, request):
    """What the server sent as one HEADERS frame ending the stream reaches the client so,
    direct and through sluice."""
    addresses = {"direct": echo_server.address, "sluice": request.getfixturevalue("sluice").plain}
    call = pb2.Call(abort_code=grpc.StatusCode.PERMISSION_DENIED.value[0], abort_message="keep out")
    for name, address in addresses.items():
        host, port = address.rsplit(":", 1)
        answer = raw_call((host, int(port)), ECHO + "Unary", call.SerializeToString())
        assert answer.headers.get(b":status") == b"200", (name, answer)
        assert answer.trailers_only, (name, answer)
        assert answer.headers.get(b"grpc-status") == b"7", (name, answer)
        assert answer.headers.get(b"grpc-message") == b"keep out", (name, answer)


def test_client_deadline_shorter_than_the_server_sleep(stub, pb2, request):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Unary(pb2.Call(payload=b"late", delay=5.0), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    # The channel (and through sluice, its connection) is still good for the next call.
    assert stub.Unary(pb2.Call(payload=b"after"), timeout=5).payload == b"after"
    if request.node.callspec.params["target"] == "sluice":
        # sluice ended the exchange at the deadline (its own timer from grpc-timeout, UT,
        # or the client's reset, DC), not when the server answered 5 s later.
        late = request.getfixturevalue("sluice").log_lines(request.node.name)[0]  # logged first
        assert {"UT", "DC"} & _flags(late) and late["duration_ms"] < 2000, json.dumps(late)


def test_many_concurrent_unary_calls_on_one_channel(stub, pb2):
    """200 calls at once, past sluice's 100 concurrent streams per connection:
    the client queues what SETTINGS_MAX_CONCURRENT_STREAMS will not take yet."""
    futures = [stub.Unary.future(pb2.Call(payload=b"call %d" % i, delay=0.05), timeout=30) for i in range(200)]
    assert [f.result(timeout=40).payload for f in futures] == [b"call %d" % i for i in range(200)]


def test_a_burst_of_immediate_answers_is_clean_in_the_access_log(stub, pb2, request):
    """The server answers a unary call as soon as it has the message, before the
    client's END_STREAM, and then resets the stream with NO_ERROR (RFC 9113 8.1):
    for each of these calls the exchange went well, and sluice must say so."""
    futures = [stub.Unary.future(pb2.Call(payload=b"burst %d" % i), timeout=30) for i in range(500)]
    assert [f.result(timeout=40).payload for f in futures] == [b"burst %d" % i for i in range(500)]
    if request.node.callspec.params["target"] == "sluice":
        sluice = request.getfixturevalue("sluice")
        deadline = time.monotonic() + 5
        while len(lines := sluice.log_lines(request.node.name)) < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        flagged = [line for line in lines if line["flags"] or line["status"] != 200]
        assert len(lines) == 500 and not flagged, json.dumps(flagged[:3])


# ------------------------------------------------------- what sluice adds


def test_grpc_timeout_caps_sluices_wait_for_the_upstream(sluice, stall, pb2):
    """grpc-timeout with no client timer behind it (raw frames), to an upstream that
    never answers nor enforces it: sluice answers DEADLINE_EXCEEDED itself at the
    deadline, not at the cluster's response_timeout (30 s), and cancels the upstream
    stream."""
    host, port = sluice.plain.rsplit(":", 1)
    answer = raw_call((host, int(port)), "/sluice.test.Stall/Unary", pb2.Call(payload=b"x").SerializeToString(),
                      headers=[("grpc-timeout", "300m"), ("user-agent", "grpc-timeout-test")])
    assert 0.25 < answer.elapsed < 2.0, answer
    assert answer.headers.get(b":status") == b"200", answer
    assert answer.trailers_only, answer
    assert answer.headers.get(b"grpc-status") == b"4", answer  # DEADLINE_EXCEEDED
    [line] = sluice.log_lines("grpc-timeout-test")
    assert "UT" in _flags(line), json.dumps(line)
    [upstream_head] = stall.opened
    assert upstream_head[b":path"] == b"/sluice.test.Stall/Unary"
    assert b"grpc-timeout" in upstream_head  # the deadline goes on to the upstream too
    deadline = time.monotonic() + 2
    while not stall.reset and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stall.reset, "sluice left the upstream stream open after answering the call"


def test_no_route_is_unimplemented(sluice, pb2):
    with _channel(sluice.plain, "no-route-test") as channel:
        call = channel.unary_unary("/sluice.test.Nowhere/Unary", request_serializer=pb2.Call.SerializeToString,
                                   response_deserializer=pb2.Reply.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(pb2.Call(payload=b"x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "no route"
    [line] = sluice.log_lines("no-route-test")
    assert "NR" in _flags(line), json.dumps(line)


def test_an_endpoint_that_is_down_is_unavailable(sluice, pb2):
    with _channel(sluice.plain, "down-test") as channel:
        call = channel.unary_unary("/sluice.test.Down/Unary", request_serializer=pb2.Call.SerializeToString,
                                   response_deserializer=pb2.Reply.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(pb2.Call(payload=b"x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    [line] = sluice.log_lines("down-test")
    assert {"UF", "UH"} & _flags(line), json.dumps(line)


def test_tls_listener_to_an_h2c_upstream(sluice, stubs, ca, pb2):
    """grpc.secure_channel to sluice's TLS listener (h2 by ALPN), h2c on to the server."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", "localhost"),
               ("grpc.primary_user_agent", "tls-test")]
    with grpc.secure_channel(sluice.tls, credentials, options=options) as channel:
        stub = stubs[1].EchoStub(channel)
        assert stub.Unary(pb2.Call(payload=b"secret"), timeout=10).payload == b"secret"
        replies = list(stub.ServerStream(pb2.Call(payload=b"s", count=50), timeout=10))
    assert [r.index for r in replies] == list(range(50))
    lines = sluice.log_lines("tls-test")
    assert lines and all(line["status"] == 200 for line in lines), json.dumps(lines)


def test_sluice_logged_no_errors(sluice):
    """Runs last in this module: nothing above made sluice log an error."""
    errors = [line for line in sluice.running.stderr if '"level": "error"' in line]
    assert not errors, errors
