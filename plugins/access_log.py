"""Plugin ``access_log``: one line per request, JSON or an Envoy-style template.

Settings (``[filters.access_log]``): ``path`` (stdout when unset),
``flush_interval``, ``max_pending``, and the format:

- ``format = "json"`` (the default): one JSON object per line with the
  catalog ``fields`` chosen, in order; by default today's line:
  ``time``, ``client``, ``method``, ``path``, ``host``, ``status``,
  ``bytes_in``, ``bytes_out``, ``duration_ms``, ``upstream``, ``route``,
  ``request_id``, ``trace_id``, ``user_agent``, ``flags``, and, only when
  they have a value, ``upgraded``, ``attempts`` and ``tried``.
  ``request_headers = ["x-tenant"]`` (and ``response_headers``) add an
  object of those headers (null when absent).
- ``format = "text"``: ``template``, literal text with ``%OPERATOR%``
  fields as Envoy writes them (``%REQ(X-HEADER)%``, ``%RESP(X-HEADER)%``
  for any header, ``:N`` after an operator caps its length); ``-`` where a
  value is missing. The default is Envoy's default format.
- ``bodies = { max_bytes = 1024, redact = ["regex", ...] }`` for the
  body fields: the first ``max_bytes`` of a body (``...`` after when cut),
  as UTF-8 text; the values of common secret members and form fields
  (password, token, api_key, client_secret ...) are masked as ``***``, and
  each ``redact`` pattern's first group (or whole match) too.

An unknown field or operator is a ConfigError naming the key
(``filters.access_log.fields[3]``, ``filters.access_log.template``), the
unknown name and the known ones.

The catalog (``access_log_fields.CATALOG``; "(sluice)": an operator Envoy
has no equivalent of):

========================= ============================================== =============================================
field                     operator                                       meaning
========================= ============================================== =============================================
client                    %DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% the peer's IP address
client_port               %DOWNSTREAM_DIRECT_REMOTE_PORT%                the peer's port
client_ip                 %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%       the client's IP as trusted through
                                                                         X-Forwarded-For (``trust_forwarded``)
remote_user               %REMOTE_USER% (sluice)                         who the auth filter let in (``auth.user``)
local_address             %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%        the address the client reached
local_port                %DOWNSTREAM_LOCAL_PORT%                        the port the client reached
listener                  %LISTENER% (sluice)                            the listener's name
time                      %TIME% (sluice)                                the line's time: the exchange's end
start_time                %START_TIME%                                   when the exchange started (UTC, ISO 8601)
duration_ms               %DURATION%                                     from the accept (or the previous response)
request_id                %REQUEST_ID% (sluice)                          x-request-id, kept or made
trace_id                  %TRACE_ID%                                     the W3C trace id, kept or started
status                    %RESPONSE_CODE%                                the status sent; null for a bare close
success                   %SUCCESS% (sluice)                             a whole answer below 500 went out
flags                     %RESPONSE_FLAGS%                               how sluice answered itself (below)
method                    %REQ(:METHOD)%                                 the request method
url                       %URL% (sluice)                                 scheme://host/target
path                      %REQ(:PATH)%                                   the request target, with its query
host                      %REQ(:AUTHORITY)%                              Host (HTTP/2: :authority)
scheme                    %REQ(:SCHEME)%                                 http or https
protocol                  %PROTOCOL%                                     HTTP/1.0, HTTP/1.1 or HTTP/2
user_agent                %REQ(USER-AGENT)%                              User-Agent
route                     %ROUTE_NAME%                                   the route matched
rbac_decision             %RBAC_DECISION% (sluice)                       the rbac filter's decision (shadow-: not enforced)
rbac_policy               %RBAC_POLICY% (sluice)                         the rbac policy that decided (or ``default``)
upgraded                  %UPGRADED% (sluice)                            the protocol a 101 switched to
request_header_bytes      %REQUEST_HEADERS_BYTES%                        the request head as forwarded (HTTP/1.1 form)
response_header_bytes     %RESPONSE_HEADERS_BYTES%                       the response head as sent (HTTP/1.1 form)
bytes_in                  %BYTES_RECEIVED%                               request body bytes
bytes_out                 %BYTES_SENT%                                   response body bytes
upstream                  %UPSTREAM_HOST%                                the endpoint that answered (or last tried)
upstream_local_address    %UPSTREAM_LOCAL_ADDRESS%                       the upstream connection's own host:port
cluster                   %UPSTREAM_CLUSTER%                             the cluster
attempts                  %UPSTREAM_REQUEST_ATTEMPT_COUNT%               endpoints tried, when more than one
tried                     %UPSTREAM_TRIED% (sluice)                      the endpoints whose try failed, in order
upstream_connected_ms     %UPSTREAM_CONNECTED% (sluice)                  start to an upstream connection ready
filter_ms                 %FILTER_TIME% (sluice)                         ms per ``filter.phase`` so far (metrics on)
request_ms                %REQUEST_DURATION%                             start to the request's last byte
response_ms               %RESPONSE_DURATION%                            start to the upstream's response head
response_tx_ms            %RESPONSE_TX_DURATION%                         the upstream's response head to the end
request_body              %REQUEST_BODY% (sluice)                        the request body, capped and redacted
response_body             %RESPONSE_BODY% (sluice)                       the response body, capped and redacted
request_headers           (json only; text: %REQ(NAME)%)                 the ``request_headers`` chosen
response_headers          (json only; text: %RESP(NAME)%)                the ``response_headers`` chosen
========================= ============================================== =============================================

``flags``: how sluice answered when it answered itself, comma-joined
(``UF``, ``DC,DT``, ...). Every code, what it means, who sets it and the
status it goes with is in one table, ``sluice.FLAGS``
(``sluice/proxy/flags.py``), shown in the plugin guide
(``sluice/plugins/README.md``, "Flags"); a test keeps both in step with
the code.

An upgraded exchange (a WebSocket) logs one line when its tunnel ends, with
``status`` 101, ``upgraded`` (the protocol, ``"websocket"``), the tunnel's
bytes each way in ``bytes_in``/``bytes_out`` and its whole life in
``duration_ms``. A request that went to more than one endpoint (a connect
failover, or a route's retry) has ``attempts`` and ``tried``: the
addresses whose try failed, in order (``upstream`` answered, or was last).

Requests the core refused before they became requests have a line too
(``sluice.edge.listener``): a bad head (400, 414, 431: DPE), an unfinished
head (408: DT), a failed TLS handshake (DTLS), TLSP, DO; with no upstream,
no host or user agent, and a method and path only when the head got that
far. A body refused later (413, or a bad or stalled body: 400 DPE, 408 DT)
is on the request's own line. A connection that never sent a byte has none.

Off the hot path: the format is compiled once, at load, into one function
that joins pre-escaped keys or literals with each field's value
(``access_log_fields``); the request and response phases that capture
timings or bodies run only when a chosen field needs them (``from_config``).
The default line costs about what the fixed one did (+1 us, with its new
``trace_id``), the whole catalog about 23 us more (``benchmarks/RESULTS.md``,
2026-11-27). ``on_complete`` renders the line and
appends it to a buffer; a background task writes the buffer every
``flush_interval``:

- to a regular file, in one write from the event loop, as nginx writes a
  buffered access log: into the page cache, well under a millisecond for a
  0.2 s batch. Handing each batch to a worker thread instead cost ~20 us of
  CPU per request (``benchmarks/exchange_cost.py``: 92 -> 73 us with the
  access log), in GIL hand-offs between the thread and the event loop;
- to anything else (stdout as a pipe or a terminal), through a worker
  thread, since a pipe's reader may stall and the event loop must never
  wait for it.

The line is rendered here rather than through a structlog processor chain:
joining pre-escaped strings costs a few microseconds where structlog's
bound logger, a time processor and its JSON renderer cost about 20 us. A
failed write (disk full, a closed pipe) loses that batch, says so in
sluice's own log, and nothing else. If the disk cannot keep up and the
buffer reaches ``max_pending`` lines, new lines are dropped and counted
(reported in sluice's own log) rather than letting memory grow or requests
wait. SIGUSR1 reopens the file (``sluice_reopen_logs``), for logrotate.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from typing import Annotated, Literal

import structlog
import trio
from pydantic import Field

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, hookimpl

from .access_log_fields import (
    DEFAULT_FIELDS,
    DEFAULT_TEMPLATE,
    FIELD_NAME,
    Capture,
    build_catalog,
    compile_json,
    compile_text,
    template_fields,
)

__all__ = ["AccessLog"]

log = structlog.get_logger("sluice.access_log")

# Secrets a body commonly carries, as JSON members or form fields: their
# values are masked before a body is logged, whatever ``redact`` adds.
_SECRETS = r"password|passwd|pwd|secret|token|access_token|refresh_token|id_token|api_key|apikey|client_secret"
REDACTED = "***"
_BUILT_IN_REDACT = (
    rf'(?i)"(?:{_SECRETS})"\s*:\s*"((?:[^"\\]|\\.)*)',  # "password": "..." (to the cap if cut)
    rf"(?i)(?:^|[&?])(?:{_SECRETS})=([^&\s]*)",  # password=...&
)


class Bodies(FilterConfig):
    """How much of a body the body fields keep, and what they mask."""

    max_bytes: Annotated[int, Field(ge=0, le=1 << 20)] = 1024
    redact: list[str] = []  # regular expressions; a group's text (else the match) becomes ***


def _unwritable(path: str) -> str | None:
    """Why ``path`` could not be opened for appending, or None; asks the
    filesystem without creating the file, so ``sluice check`` writes nothing."""
    if os.path.isdir(path):
        return "Is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "Permission denied"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return "No such file or directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else "Permission denied"


class AccessLog(Filter):
    """One line per request (JSON or a template), rendered by a format
    compiled at load, written off the event loop."""

    name = "access_log"

    class Config(FilterConfig):
        path: str | None = None  # None: stdout
        flush_interval: Annotated[float, Field(gt=0, le=60)] = 0.2
        max_pending: Annotated[int, Field(ge=100)] = 100_000
        format: Literal["json", "text"] = "json"
        fields: list[str] | None = None  # json: catalog names, in order (None: DEFAULT_FIELDS)
        template: str | None = None  # text: Envoy-style %OPERATOR%s (None: DEFAULT_TEMPLATE)
        request_headers: list[str] = []  # json: these request headers, as a request_headers object
        response_headers: list[str] = []
        bodies: Bodies = Bodies()

    @classmethod
    def from_config(cls, config: Config, app=None) -> AccessLog:
        """The plain filter, or one that also runs the phases a chosen field
        captures in (timings, bodies): the chain calls only the phases a
        class defines, so a log without those fields costs them nothing."""
        captures = _captures(config)
        return (_CapturingAccessLog if captures else cls)(config)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if config.path is not None:  # fail at validation, before any socket opens
            problem = _unwritable(config.path)
            if problem:
                raise ConfigError(f"filters.access_log.path: cannot write {config.path}: {problem}")
        self._captures = _captures(config)
        self._redact = _redactions(config.bodies.redact)
        catalog = build_catalog(lambda ctx: ctx.state(self), self._body)
        if config.format == "json":
            names = list(DEFAULT_FIELDS if config.fields is None else config.fields)
            for extra in ("request_headers", "response_headers"):
                if getattr(config, extra) and extra not in names:
                    names.append(extra)
            self._render = compile_json(names, catalog, [h.lower() for h in config.request_headers],
                                        [h.lower() for h in config.response_headers])
        else:
            self._render = compile_text(config.template or DEFAULT_TEMPLATE, catalog)
        self._pending: list[str] = []
        self._dropped = 0
        self._file = None
        self._regular = False  # a regular file: written from the event loop
        # One flush at a time: close() must not shut the file under a batch
        # the writer task is still writing, or that batch is lost.
        self._flushing = trio.Lock()

    def new_state(self) -> Capture:
        return Capture()

    def _body(self, which: str):
        """A getter of the captured request or response body: text, capped, redacted."""
        def get(ctx):
            capture = ctx.state(self)
            data = capture.request_body if which == "request" else capture.response_body
            more = capture.request_more if which == "request" else capture.response_more
            if not data and not more:
                return None
            text = data.decode("utf-8", "replace")
            for pattern in self._redact:
                text = pattern.sub(_mask, text)
            return text + "..." if more else text
        return get

    async def open(self, nursery) -> None:
        path = self.config.path
        self._file = sys.stdout if path is None else open(path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            self._regular = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)
        except (OSError, ValueError):  # no file descriptor (a test's stand-in): the thread
            self._regular = False
        nursery.start_soon(self._writer)

    async def close(self) -> None:
        await self._flush()  # waits for a flush in progress, then writes the rest
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
            self._file = None

    async def reopen(self) -> None:
        """SIGUSR1 (logrotate renamed the file): the buffer to the old file, then the path anew."""
        if self.config.path is None or self._file is None:
            return
        async with self._flushing:
            await self._write_pending()
            new = open(self.config.path, "a", encoding="utf-8")  # noqa: SIM115 - if this fails, the old file stays
            self._file.close()
            self._file = new

    async def on_complete(self, ctx) -> None:
        line = self._render(ctx)
        if len(self._pending) >= self.config.max_pending:
            self._dropped += 1
            return
        self._pending.append(line)

    async def _writer(self) -> None:
        while True:
            await trio.sleep(self.config.flush_interval)
            await self._flush()

    async def _flush(self) -> None:
        async with self._flushing:
            await self._write_pending()

    async def _write_pending(self) -> None:
        if self._dropped:
            log.warning("access log lines dropped", dropped=self._dropped)
            self._dropped = 0
        if not self._pending or self._file is None:
            return
        lines, self._pending = self._pending, []
        data = "\n".join(lines) + "\n"
        file = self._file

        def write() -> None:
            file.write(data)
            file.flush()

        with trio.CancelScope(shield=True):
            try:
                if self._regular:
                    write()
                else:
                    await trio.to_thread.run_sync(write)
            except (OSError, ValueError) as exc:  # disk full, closed pipe: never the proxy's death
                log.error("access log write failed", lines=len(lines), error=str(exc))



class _CapturingAccessLog(AccessLog):
    """The access log with the phases its chosen fields capture in; the
    same filter to the chain (its ``name``), built by ``from_config``."""

    async def on_request_headers(self, ctx, request):
        if "timing" in self._captures:
            ctx.state(self).request_done = ctx.duration  # no body: its head is all of it
        return CONTINUE

    async def on_request_body(self, ctx, chunk: bytes, end: bool):
        capture = ctx.state(self)
        if "request_body" in self._captures and chunk:
            capture.request_more |= _keep(capture.request_body, chunk, self.config.bodies.max_bytes)
        if end and "timing" in self._captures:
            capture.request_done = ctx.duration
        return CONTINUE

    async def on_response_headers(self, ctx, response):
        if "timing" in self._captures and ctx.endpoint is not None and not ctx.flags:
            ctx.state(self).response_head = ctx.duration  # the upstream's, not a local reply
        return CONTINUE

    async def on_response_body(self, ctx, chunk: bytes, end: bool):
        if "response_body" in self._captures and chunk:
            capture = ctx.state(self)
            capture.response_more |= _keep(capture.response_body, chunk, self.config.bodies.max_bytes)
        return CONTINUE


def _keep(kept: bytearray, chunk: bytes, cap: int) -> bool:
    """Keep what fits of ``chunk`` under ``cap``; True when some did not."""
    room = cap - len(kept)
    if room > 0:
        kept += chunk[:room]
    return len(chunk) > room


def _captures(config: AccessLog.Config) -> frozenset[str]:
    """What the chosen fields need captured during the exchange (and a
    ConfigError for a field or operator the catalog does not have)."""
    catalog = build_catalog(lambda ctx: None, lambda which: lambda ctx: None)
    if config.format == "json":
        if config.template is not None:
            raise ConfigError("filters.access_log.template: only for format = \"text\" (json takes fields)")
        names = DEFAULT_FIELDS if config.fields is None else config.fields
        compile_json(names, catalog, [], [])  # the unknown-field error, with its index
        chosen = [catalog[n] for n in names if n in catalog]
        for key in ("request_headers", "response_headers"):
            for i, name in enumerate(getattr(config, key)):
                if not FIELD_NAME.fullmatch(name):
                    raise ConfigError(f"filters.access_log.{key}[{i}]: {name!r} is not a header field name")
    else:
        if config.fields is not None or config.request_headers or config.response_headers:
            raise ConfigError("filters.access_log.fields: only for format = \"json\" "
                              "(a template names its fields, and headers as %REQ(NAME)%)")
        chosen = template_fields(config.template or DEFAULT_TEMPLATE, catalog)
    return frozenset(f.capture for f in chosen if f.capture is not None)


def _redactions(extra: list[str]) -> list[re.Pattern]:
    patterns = []
    for i, pattern in enumerate(extra):
        try:
            patterns.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(f"filters.access_log.bodies.redact[{i}]: not a regular expression: {exc}") from None
    return [re.compile(p) for p in _BUILT_IN_REDACT] + patterns


def _mask(m: re.Match) -> str:
    """The match with its first group (or all of it) masked."""
    if m.re.groups and m.start(1) >= 0:
        return m[0][:m.start(1) - m.start()] + REDACTED + m[0][m.end(1) - m.start():]
    return REDACTED


@hookimpl
def sluice_filters():
    return [AccessLog]


@hookimpl
def sluice_reopen_logs(app):
    access_log = app.filters.get(AccessLog.name)
    return access_log.reopen() if access_log is not None else None
