"""What sluice does differently when the request is gRPC. Pure functions.

A gRPC client reads the call's outcome from ``grpc-status`` (and
``grpc-message``), not from the HTTP status: an HTTP 503 from a proxy is,
to it, a transport failure with no detail. So when sluice answers a gRPC
request itself (no route, no healthy endpoint, a timeout, a filter's
refusal), the answer is gRPC's "trailers-only" form: HTTP 200, ``content-type:
application/grpc``, the status in the head, no body. The mapping follows the
gRPC docs (doc/http-grpc-status-mapping.md), with sluice's own causes made
precise where the flags know them:

====================================  ==============================
sluice's answer                       grpc-status
====================================  ==============================
504 upstream timeout (flag UT)        4  DEADLINE_EXCEEDED
400                                   13 INTERNAL
401                                   16 UNAUTHENTICATED
403                                   7  PERMISSION_DENIED
404 (no route)                        12 UNIMPLEMENTED
429, 502, 503, 504                    14 UNAVAILABLE
anything else                         2  UNKNOWN
====================================  ==============================

``grpc-timeout`` (RFC-less, gRPC's own: up to 8 digits and a unit of H, M,
S, m, u or n) is the call's deadline; the exchange caps its upstream
timeout by it.
"""

from __future__ import annotations

from urllib.parse import quote

from ..messages import Headers, Request, Response

__all__ = ["grpc_reply", "grpc_timeout", "is_grpc"]

_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
_DEADLINE_EXCEEDED = 4
_UNKNOWN = 2
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(request: Request | None) -> bool:
    """Whether ``request`` is a gRPC call (its content type says so)."""
    if request is None:
        return False
    value = request.headers.get_raw(b"content-type")
    return value is not None and value[:16].lower() == b"application/grpc"


def grpc_status(http_status: int, flags: list[str]) -> int:
    if http_status == 504 and "UT" in flags:
        return _DEADLINE_EXCEEDED
    return _STATUS.get(http_status, _UNKNOWN)


def grpc_reply(response: Response, message: bytes, flags: list[str]) -> Response:
    """The trailers-only gRPC form of a local reply (the HTTP one the
    filters saw: its status becomes ``grpc-status``, its body the message)."""
    headers = Headers()
    headers.add(b"content-type", b"application/grpc")
    headers.add(b"grpc-status", b"%d" % grpc_status(response.status, flags))
    text = message.decode("utf-8", "replace").strip()
    if text:
        # Percent-encoded, as the gRPC spec asks of grpc-message.
        headers.add(b"grpc-message", quote(text, safe=" !#$&'()*+,/:;=?@[]~").encode("ascii"))
    for name, value in response.headers.raw():  # what a filter added (www-authenticate, ...)
        if name not in (b"content-type", b"content-length"):
            headers.add(name, value)
    return Response(200, headers)


def grpc_timeout(request: Request) -> float | None:
    """The call's ``grpc-timeout`` in seconds, or None (absent or malformed)."""
    value = request.headers.get_raw(b"grpc-timeout")
    if not value or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit
