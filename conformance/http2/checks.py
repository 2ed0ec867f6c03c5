"""Assertions shared by the HTTP/2 tests; failures quote the frames the proxy sent."""

from __future__ import annotations

from ..checks import settle
from ..h2client import ErrorCodes, H2Client, code_name, fetch, request_fields
from ..recorder import Recorder

MALFORMED_STATUSES = (400,)  # RFC 9113 8.1.1: a server MAY answer before it resets


def assert_connection_error(client: H2Client, *codes: int) -> None:
    """The proxy sends GOAWAY with one of `codes` (RFC 9113 5.4.1), then closes."""
    code = client.connection_error()
    assert code in codes, (
        f"GOAWAY {code_name(code)}, expected {[code_name(c) for c in codes]}{client.describe()}"
    )


def assert_stream_error(client: H2Client, stream_id: int, *codes: int) -> None:
    """The proxy resets `stream_id` with one of `codes` (RFC 9113 5.4.2) and the connection
    stays usable: a request after it is answered."""
    stream = client.response(stream_id)
    assert stream.reset in codes and stream.headers is None, (
        f"expected RST_STREAM {[code_name(c) for c in codes]}, got {stream}{client.describe()}"
    )
    assert_usable(client)


def assert_malformed(client: H2Client, stream_id: int, recorder: Recorder) -> None:
    """A malformed request (RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR, or a 400 first; it
    never reaches the upstream (an intermediary MUST NOT forward it), and the connection stays
    usable (a stream error, not a connection error)."""
    stream = client.response(stream_id)
    assert stream.reset == ErrorCodes.PROTOCOL_ERROR or stream.status in MALFORMED_STATUSES, (
        f"expected RST_STREAM PROTOCOL_ERROR or 400, got {stream}{client.describe()}"
    )
    settle()
    assert recorder.received() == b"", f"forwarded: {recorder.received()!r}"
    assert_usable(client)


def assert_usable(client: H2Client) -> None:
    """The connection still answers a request (no GOAWAY was sent)."""
    stream_id = client.request("/app/after")
    stream = client.response(stream_id)
    assert stream.status == 200 and client.goaway is None, (
        f"connection not usable after the error: {stream}{client.describe()}"
    )


def assert_still_serving(address: tuple[str, int]) -> None:
    """A fresh connection still gets an answer: the proxy neither died nor hangs."""
    [answer] = fetch(address, request_fields("/app/still-serving"))
    assert answer.status == 200, answer
