"""The exceptions the core raises, and what each means for the client.

A filter meets them in ``ctx.error``, the exception that ended an exchange
early (None when it ran to its end), read in ``on_complete`` or in the
response phases a core-generated reply runs through. All are exported from
``sluice``; the flag each leaves in ``ctx.flags`` is in ``sluice.FLAGS``.

=====================  ==============================================  =================
``ctx.error`` is       when                                            client gets
=====================  ==============================================  =================
``UpstreamError``      the upstream failed: ``.status`` (502/503/504)  ``.status``, or a
                       and ``.flag`` (UC, UPE, UF, UT, UO, UBL, FE)    cut once started
``ProtocolError``      the client's request body was malformed:        ``.status`` (400)
                       ``.status``; flag DPE
``ClientGone``         the client left (flag DC) or stalled            nothing, or 408
                       (``.timed_out``, flag DT)
``trio.Cancelled``     the exchange was cancelled (shutdown, drain)    nothing
any other Exception    a filter raised (flag FE), logged with its      500
                       traceback
=====================  ==============================================  =================

For what the edge refused before it became a request (``on_complete``
only, ``ctx.request`` None or bare), ``ctx.error`` is the edge's reason: a
``ProtocolError`` for a bad head (DPE), or a timeout or TLS error (DT, DTLS,
TLSP); test the flags, not the type.

``ConfigError`` is a startup (or reload) error: raise it from
``Filter.from_config`` or ``Filter.check`` with the key path in its message.
"""

from __future__ import annotations

__all__ = ["ClientGone", "ConfigError", "UpstreamError"]


class ConfigError(Exception):
    """The configuration or plugin set cannot run; the message names the key or plugin."""


class ClientGone(Exception):
    """The downstream peer closed, broke, or stalled its connection mid-exchange.

    ``timed_out`` says it stalled (the client may still read a 408).
    """

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamError(Exception):
    """The upstream could not give a response.

    ``status`` is what the client gets if no response has started yet
    (502 reset / protocol error, 503 connect failure, 504 timeout); ``flag``
    is the access-log response flag.
    """

    def __init__(self, message: str, *, status: int, flag: str, retryable: bool = False,
                 unprocessed: bool = False):
        super().__init__(message)
        self.status = status
        self.flag = flag
        # True when nothing of the response arrived on a reused connection:
        # an idempotent request may be replayed once on a fresh one.
        self.retryable = retryable
        # True when the upstream says it never processed the request (an
        # HTTP/2 REFUSED_STREAM, or a GOAWAY below the stream, RFC 9113
        # 8.7): any method may be replayed.
        self.unprocessed = unprocessed
