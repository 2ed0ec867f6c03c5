"""Whatever bytes arrive, the protocol layer answers with events or a ProtocolError
carrying a 4xx/5xx status: never another exception, never a hang (NEED_DATA only
when more bytes could still make sense)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.messages import Headers, Request
from sluice.protocol.events import NEED_DATA, Closed, End, ProtocolError
from sluice.protocol.http1 import CODECS, select

LIMITS = {"max_head_bytes": 4096, "max_header_count": 20}

# Byte soup biased toward what HTTP parsers trip on.
TOKENS = [b"GET ", b"POST ", b"/ ", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r", b": ",
          b"Host: a", b"Content-Length: ", b"Transfer-Encoding: chunked", b"0", b"5", b"ff",
          b"hello", b" ", b"\t", b"\x00", b";ext", b"Expect: 100-continue", b"Connection: close"]
soup = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=8)), max_size=40).map(b"".join)


def drain(conn, data: bytes, split: int) -> None:
    for piece in (data[:split], data[split:], b""):
        conn.feed(piece)
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                assert 400 <= exc.status <= 505
                return
            if event is NEED_DATA or type(event) is Closed:
                break
            if type(event) is End and hasattr(conn, "respond"):
                return  # one exchange is enough


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=soup, split=st.integers(min_value=0, max_value=80))
def test_server_side_never_raises_anything_else(data, split):
    for name in CODECS[1:]:
        drain(select(name).server(**LIMITS), data, split)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=soup, split=st.integers(min_value=0, max_value=80))
def test_client_side_never_raises_anything_else(data, split):
    for name in CODECS[1:]:
        conn = select(name).client(**LIMITS)
        conn.request(Request("GET", "/", Headers([(b"host", b"a")])), chunked=False)
        conn.end()
        drain(conn, b"HTTP/1.1 " + data, split)
