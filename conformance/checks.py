"""Assertions shared by the conformance tests; failures quote the exact bytes involved."""

from __future__ import annotations

import time

from .client import RawClient, Response
from .recorder import Recorder, Request
from .wire import PeerClosed

_GRACE = 0.3
_QUOTED = 600  # longer inputs are quoted by their ends


def describe(sent: bytes, response: Response | None = None) -> str:
    shown = repr(sent) if len(sent) <= _QUOTED else (
        f"{sent[:400]!r} ... ({len(sent)} bytes) ... {sent[-100:]!r}"
    )
    text = f"\nsent:     {shown}"
    if response is not None:
        text += f"\nreceived: {response.raw_head!r} + body {response.body[:300]!r}"
    return text


def assert_clean_error(response: Response, status: int, sent: bytes) -> None:
    """The response has `status` and exposes no Python traceback."""
    assert response.status == status, (
        f"expected {status}, got {response.status}{describe(sent, response)}"
    )
    assert b"Traceback" not in response.body, describe(sent, response)


def settle() -> None:
    """Gives a proxy time to (wrongly) forward something before the upstream is inspected."""
    time.sleep(_GRACE)


def assert_nothing_forwarded(recorder: Recorder, sent: bytes) -> None:
    settle()
    received = recorder.received()
    assert received == b"", f"upstream received {received!r}{describe(sent)}"


def assert_rejected(
    address, recorder: Recorder, sent: bytes, status: int, closes: bool = True
) -> Response:
    """`sent` is answered with `status` (then the connection closes) and never reaches upstream."""
    with RawClient(address) as client:
        client.send(sent)
        response = client.read_response()
        assert_clean_error(response, status, sent)
        if closes:
            rest, _ = client.wait_closed()
            assert rest == b"", f"more bytes after the {status}: {rest!r}{describe(sent, response)}"
    assert_nothing_forwarded(recorder, sent)
    return response


def forward(
    address, recorder: Recorder, sent: bytes, method: str = "GET"
) -> tuple[Request, Response]:
    """Sends one request that must be forwarded; returns what upstream got and the client got."""
    with RawClient(address) as client:
        client.send(sent)
        response = client.read_response(method)
    forwarded = recorder.wait_for(1)
    assert len(forwarded) == 1, f"upstream got {len(forwarded)} requests{describe(sent, response)}"
    return forwarded[0], response


def answered_on_one_connection(address, sent: bytes, times: int = 2) -> list[Response]:
    """Sends `sent` `times` times on one connection, each after the previous answer; every
    answer must be the recorder's default 200 "ok". Returns the responses."""
    responses = []
    with RawClient(address) as client:
        for _ in range(times):
            client.send(sent)
            response = client.read_response()
            assert (response.status, response.body) == (200, b"ok"), describe(sent, response)
            responses.append(response)
    return responses


def assert_refused_mid_body(
    address, recorder: Recorder, sent: bytes, statuses: tuple[int, ...] = (400,)
) -> tuple[Response, float]:
    """`sent` is a request with a valid head and a body the proxy must refuse (chunk framing,
    trailers). A streaming proxy may have forwarded the head already; still the client gets
    one of `statuses`, never a bare close, the connection closes, and the upstream never sees
    a complete request. Returns the response and the seconds it took to arrive."""
    with RawClient(address) as client:
        start = time.monotonic()
        sending = client.send_in_background(sent)  # the proxy may stop reading mid-way
        try:
            response = client.read_response("POST")
        except PeerClosed:
            raise AssertionError(
                f"closed without a response ({sending.finish(0)}){describe(sent)}"
            ) from None
        elapsed = time.monotonic() - start
        assert response.status in statuses, (
            f"expected one of {statuses}, got {response.status}{describe(sent, response)}"
        )
        assert b"Traceback" not in response.body, describe(sent, response)
        client.wait_closed()
    settle()
    complete = [r for r in recorder.requests if r.complete]
    assert not complete, (
        f"upstream got complete requests {[r.raw_head for r in complete]}{describe(sent)}"
    )
    return response, elapsed
