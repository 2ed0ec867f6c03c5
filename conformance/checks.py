"""Assertions shared by the conformance tests; failures quote the exact bytes involved."""

from __future__ import annotations

import time

from .client import RawClient, Response
from .recorder import Recorder, Request

_GRACE = 0.3


def describe(sent: bytes, response: Response | None = None) -> str:
    text = f"\nsent:     {sent!r}"
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
