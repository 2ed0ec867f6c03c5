"""What the etcd client raises: one base class, told apart by what the caller can do."""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["EtcdCompacted", "EtcdError", "EtcdRequestError", "EtcdUnavailable", "LeaseExpired", "malformed", "raise_for_error",
           "transport_reason"]


class EtcdError(Exception):
    """Anything the etcd client raises."""


class EtcdUnavailable(EtcdError):
    """etcd could not be reached, or did not answer within the timeout: try again later."""


class EtcdRequestError(EtcdError):
    """etcd answered with an error: ``code`` is its gRPC status code, ``message`` its words."""

    def __init__(self, message: str, code: int | None = None, status: int | None = None) -> None:
        super().__init__(message if code is None else f"{message} (gRPC code {code})")
        self.message = message
        self.code = code
        self.status = status


class EtcdCompacted(EtcdRequestError):
    """The revision asked for is older than ``compact_revision``: the history is gone, resync."""

    def __init__(self, compact_revision: int | None = None) -> None:
        after = "" if compact_revision is None else f" (history starts after {compact_revision})"
        super().__init__(f"required revision has been compacted{after}", 11)
        self.compact_revision = compact_revision


class LeaseExpired(EtcdError):
    """The lease is gone (its TTL ran out, or it was revoked): its keys are deleted."""


def raise_for_error(status: int, body: dict) -> None:
    """Raise the typed error an error answer (or an ``error`` stream message) stands for."""
    error = body.get("error")
    if isinstance(error, dict):  # in a stream, the error is a message of its own
        body = error
    message = body.get("message") or (error if isinstance(error, str) else None) or f"HTTP {status}"
    code = body.get("code")
    if code == 11 and "compacted" in message:
        raise EtcdCompacted()
    raise EtcdRequestError(message, code, status)


@contextmanager
def malformed(where: str):
    """Turn an answer that is not what the gateway sends (a missing field, a number or base64
    that does not parse) into ``EtcdRequestError``, instead of a KeyError deep in a caller."""
    try:
        yield
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        raise EtcdRequestError(f"{where}: malformed answer ({type(error).__name__}: {error})") from None


def transport_reason(error: BaseException) -> str:
    """What a transport failure says, with its root cause when httpx's own says nothing
    (``ConnectError('')`` for a refused certificate: the ``SSLError`` under it names why)."""
    reason = repr(error)
    if str(error):
        return reason
    cause, seen = error, 0
    while seen < 8 and (cause.__cause__ or cause.__context__) is not None:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return f"{reason} from {cause!r}" if cause is not error else reason
