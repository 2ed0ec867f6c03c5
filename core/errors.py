"""The exceptions the core raises, and what each means for the client."""

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
