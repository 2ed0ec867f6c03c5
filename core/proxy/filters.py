"""The Filter base class, the phase contract, and flow results.

A filter is a class with optional ``async`` phase methods; the base class
defines each as a no-op, and a chain only ever calls the phases a filter
overrides. One instance is built per listener chain at load time (with its
validated ``Config``) and shared by every request on it; per-request state
lives in ``ctx.state(self)`` (created by ``new_state``).

Phases, in the order an exchange meets them:

=====================  ========================================  ===================
phase                  called with                               may return
=====================  ========================================  ===================
on_request_headers     ctx, request (mutable head)               CONTINUE, LocalReply
on_request_body        ctx, chunk, end (if there is a body)      CONTINUE, bytes, LocalReply
on_request_trailers    ctx, trailers (only if the client sent)   CONTINUE, LocalReply
on_response_headers    ctx, response (mutable head)              CONTINUE, LocalReply
on_response_body       ctx, chunk, end (if there is a body)      CONTINUE, bytes
on_response_trailers   ctx, trailers (only if upstream sent)     CONTINUE
on_complete            ctx (always runs, once, last)             nothing
=====================  ========================================  ===================

Request phases run in chain order, response phases in reverse. A LocalReply
from a request phase skips the upstream; the reply then runs through the
response phases of the filters *before* the one that answered. Returning
``None`` is the same as ``CONTINUE``; returning anything else (a bool, say)
is a bug in the filter and answers 500.

``on_complete`` runs exactly once per exchange, in chain order, whatever
happened: normal end, local reply, upstream failure, client abort or
cancellation. ``ctx.error`` holds the exception that ended the exchange
early, if any (``sluice.errors``); ``ctx.flags`` says how sluice answered
(``sluice.FLAGS``).

Replies the core makes. Each response phase runs at most once per exchange.
A reply the core makes *before* the response phases ran goes through them
like an upstream's response (flagged, so a filter can tell); one made
*after* ``on_response_headers`` ran on the upstream's head goes out without
them; once response bytes went out nothing can be sent, and the client's
connection is cut:

============================================  ========  =======  ===============================
what happened                                 status    flag     response phases it runs through
============================================  ========  =======  ===============================
no route (the router, or no cluster chosen)   404       NR       filters before the router
request body over ``max_body_bytes``          413       LR       every filter
a filter's LocalReply in a request phase      its       LR       filters before it
circuit breaker full, no healthy endpoint     503       UO, UH   every filter
connect failure on every endpoint tried       503       UF       every filter
reset, close, bad response before its head    502       UC, UPE  every filter
no response head within the timeout           504       UT       every filter
the client's body malformed, or stalled       400, 408  DPE, DT  none
a filter raised (any phase)                   500       FE       none
a filter's LocalReply in on_response_headers  its       LR       filters before it
a buffered response body broke, stalled or    502, 504  UC, UT,  none (the head phases ran
  overflowed, after the upstream's head                 UBL        once, on the upstream's)
a streamed response broke after its head      (cut)     UC, UT,  none more; on_complete
  went out                                              UPE        sees the upstream's status
a refused head (bad, too large, too slow)     400, 414  DPE, DT  none: on_complete only,
  or connection (TLS failed, no free slot)    431, 408  DTLS,      with ctx.request None or
                                              503       TLSP, DO   bare (see below)
============================================  ========  =======  ===============================

A filter tells a core reply from an upstream's by ``ctx.flags`` (non-empty,
or holding a flag of the table) and ``ctx.error`` (an ``UpstreamError``
with ``status`` and ``flag``); ``ctx.endpoint`` is None when no upstream
was picked. In ``on_complete``, ``ctx.response`` is what the client got
(the upstream's head when the cut came after it).

Body phases. ``bytes`` returned from a body phase replace the chunk;
``None``/``CONTINUE`` pass it on. ``end`` is True on the last call of a
body, whose chunk may be empty (a streamed body ends with a ``(b"", True)``
call; returned bytes are sent as the body's tail). A message without a body
(a request without one, a response to HEAD, a 204 or 304) gets no body
call; a response with an empty body gets the one ``(b"", True)``. How the
core frames what the phases produce:

- Streamed (the default): the head goes out before the body, as the
  head phases left it. If it keeps ``content-length``, the body phases must
  produce exactly that many bytes: more (or, at the end, fewer) is the
  filter's bug, never sent as declared: a request answers 500 (FE) and a
  response already started is cut (HTTP/1.1: the connection closes;
  HTTP/2: the stream is reset), with a log naming the rule. A filter that
  changes sizes removes ``content-length`` in its head phase: the request
  then goes upstream chunked, the response to an HTTP/1.1 client chunked
  (HTTP/1.0: until the connection closes), to HTTP/2 in DATA frames with
  no length. Same-size rewrites need nothing.
- Whole (``ctx.buffer_request_body()`` in ``on_request_headers``,
  ``ctx.buffer_response_body()`` in ``on_response_headers``): the body
  phases run once, with the whole body and ``end=True``, and the core sets
  ``content-length`` to the exact size of what they return (past
  ``max_buffered_body_bytes``: 413 for a request, 502 UBL for a response).
  Trailers are dropped then: a length-framed message carries none.
- Transfer-Encoding is hop-by-hop: the core removes it both ways and picks
  the framing itself (chunked exactly when there is a body and no
  ``content-length``); a filter never sets it.

An upgraded exchange (a WebSocket, see ``Context.upgrade``/``upgraded``)
meets the request phases on its handshake, so auth and routing apply, and
``on_response_headers`` on the upstream's 101 with ``ctx.upgraded`` set (a
LocalReply there refuses the switch: the client gets the reply); then it is
a byte tunnel that no body or trailer phase sees, and ``on_complete`` runs
when the tunnel ends.

``on_complete`` also runs, with no other phase before it, for what the core refused
before it became a request (a bad or unfinished head, a failed TLS
handshake, a TLS hello on a plain listener, a client refused for want of a
slot; the flags are in ``sluice.edge.listener``): ``ctx.request`` is then
None, or holds only the method and target (``""`` when too long to keep)
with empty headers; ``ctx.response`` is what was sent, or None for a bare
close. A filter pairing work in a request phase with ``on_complete`` must
therefore find its own state there (``ctx.state(self)``), not assume it.

Two optional roles:

- ``from_config(config, app)`` (a classmethod) builds a filter that needs
  more than its settings, e.g. the app's clusters or routes.
- A filter defining ``resolve_route(ctx) -> Route | None`` and a ``routes``
  sequence is its chain's route resolver (the router): ``ctx.route`` asks
  it, so filters before it can read per-route settings, and a route's
  ``filters = { name = { disabled = true } }`` skips that filter. Other
  per-route keys are checked at load against the filter's ``RouteConfig``;
  an unknown filter name there is an error by key path.

Ordering: ``before``/``after`` (names of other filters) and ``first``/
``last`` declare where a filter must sit in a chain; a chain that breaks
them, or declarations that form a cycle, is a startup error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..messages import Headers, Request, Response
    from .context import Context

_log = structlog.get_logger("sluice.filter")

__all__ = ["CONTINUE", "Continue", "Filter", "FilterConfig", "LocalReply", "PHASES", "SettingsOnly"]


class Continue:
    """Go on to the next filter (the default flow result)."""

    __slots__ = ()
    _instance: ClassVar[Continue | None] = None

    def __new__(cls) -> Continue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE = Continue()


@dataclass(slots=True)
class LocalReply:
    """Answer the client from the proxy instead of forwarding.

    ``flag`` is the response flag put in ``ctx.flags`` and the access log
    (LR: a filter's local reply; the core's own are in ``sluice.FLAGS``).
    """

    status: int
    body: bytes | str = b""
    headers: list[tuple[str, str]] | dict[str, str] = field(default_factory=list)
    flag: str = "LR"


class FilterConfig(BaseModel):
    """Base for filter settings: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Filter:
    """Base class of every filter. Subclass, set ``name``, override phases."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[FilterConfig]] = FilterConfig
    # Ordering constraints, validated per chain at startup and by ``sluice
    # check`` (never reordered: see ``sluice.proxy.ordering``). Names absent
    # from the chain constrain nothing.
    # Per-route settings (a route's ``filters = { name = {...} }``), checked
    # at load against this model; ``disabled = true`` is accepted for every
    # filter besides. Default: no per-route keys of its own.
    RouteConfig: ClassVar[type[FilterConfig]] = FilterConfig
    before: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    first: ClassVar[bool] = False
    last: ClassVar[bool] = False

    def __init__(self, config: FilterConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: FilterConfig, app: Any) -> Filter:
        """Build the filter for an app (once, at load). Override to read
        ``app.clusters`` or ``app.config``; raise ConfigError for bad input."""
        return cls(config)

    @classmethod
    def check(cls, config: FilterConfig, app: Any) -> None:
        """Check settings that no chain uses (a ``[filters.X]`` table for a
        filter in no listener's ``filters``: a plugin configured there that
        does its work from hooks, or one left for later). ``config`` has
        passed ``Config``; check it against the rest of ``app.config`` and
        raise ConfigError with key paths. ``sluice check`` and a reload run it
        like any other check. Default: nothing more to check."""

    # -- lifecycle (per listener chain) --------------------------------------

    async def open(self, nursery: Any) -> None:
        """Called once before the listener accepts; start background tasks here."""

    async def close(self) -> None:
        """Called once after the listener has drained."""

    def log(self, ctx: Context) -> Any:
        """A structlog logger bound to this request and filter: events it logs
        carry ``request_id`` and ``filter`` (``self.log(ctx).info("denied")``)."""
        return _log.bind(request_id=ctx.request_id, filter=self.name)

    def new_state(self) -> Any:
        """Per-request state for this filter, made on first ``ctx.state(self)``."""
        return None

    # -- phases ----------------------------------------------------------------

    async def on_request_headers(self, ctx: Context, request: Request) -> Any:
        return CONTINUE

    async def on_request_body(self, ctx: Context, chunk: bytes, end: bool) -> Any:
        return CONTINUE

    async def on_request_trailers(self, ctx: Context, trailers: Headers) -> Any:
        return CONTINUE

    async def on_response_headers(self, ctx: Context, response: Response) -> Any:
        return CONTINUE

    async def on_response_body(self, ctx: Context, chunk: bytes, end: bool) -> Any:
        return CONTINUE

    async def on_response_trailers(self, ctx: Context, trailers: Headers) -> Any:
        return CONTINUE

    async def on_complete(self, ctx: Context) -> None:
        return None


REQUEST_PHASES = ("on_request_headers", "on_request_body", "on_request_trailers")
RESPONSE_PHASES = ("on_response_headers", "on_response_body", "on_response_trailers")
PHASES = (*REQUEST_PHASES, *RESPONSE_PHASES, "on_complete")


class SettingsOnly(Filter):
    """A plugin's settings under ``[filters.NAME]``, for a plugin that is not a traffic filter.

    Alerting and self-registration run from lifecycle hooks, yet their settings
    belong beside the other plugins' (validated by ``Config``, key paths,
    ``sluice check``, ``--set``). Such a class implements no phase and refuses a
    place in a chain; ``sluice plugins`` shows it as "hooks only". Override
    ``check`` to test the settings against the rest of the config.
    """

    @classmethod
    def from_config(cls, config: FilterConfig, app: Any = None) -> Filter:
        raise ConfigError(f"{cls.name} is not a traffic filter: configure it under [filters.{cls.name}] "
                          "and leave it out of listeners' filters")


def overrides(filter_: Filter | type[Filter], phase: str) -> bool:
    """Whether the filter's class (or the class given) replaces the base
    no-op for ``phase``."""
    cls = filter_ if isinstance(filter_, type) else type(filter_)
    return getattr(cls, phase) is not getattr(Filter, phase)
