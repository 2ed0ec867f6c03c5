"""Plugin ``access_log``: one JSON line per request.

Fields: ``time`` (UTC, ISO 8601), ``client``, ``method``, ``path``,
``host``, ``status``, ``bytes_in``, ``bytes_out``, ``duration_ms``,
``upstream`` (endpoint address or null), ``route``, ``request_id``,
``user_agent`` and ``flags``: how sluice answered when it answered itself
(NR no route, UH no healthy upstream, UF upstream connect failure, UT
upstream timeout, UC upstream connection error, UPE upstream protocol error,
UBL upstream body over the buffer limit,
LR local reply by a filter, FE filter error, DC client disconnected,
DT client timed out, DPE client protocol error, DO refused because every
connection slot had a request in flight (503), DTLS TLS handshake failed
(with DT: not done within ``header_read``), TLSP a TLS handshake on a
plain listener, TI a tunnel closed after ``tunnel_idle`` without a byte,
TM a tunnel closed at ``tunnel_max``).

An upgraded exchange (a WebSocket) logs one line when its tunnel ends, with
``status`` 101, an extra ``upgraded`` field (the protocol, ``"websocket"``),
the tunnel's bytes each way in ``bytes_in``/``bytes_out`` and its whole
life in ``duration_ms``.

A request that went to more than one endpoint (a connect failover, or a
route's retry) has ``attempts`` and ``tried``: the addresses whose try
failed, in order (``upstream`` is the one that answered, or the last tried).

Requests the core refused before they became requests (a bad head: DPE;
an unfinished head: DT; DTLS, TLSP, DO) have a line too, with no upstream,
no host or user agent, and a method and path only when the head got that
far. A connection that never sent a byte has none.

``on_complete`` renders the line and appends it to a buffer; a background
task writes the buffer every ``flush_interval``:

- to a regular file, in one write from the event loop, as nginx writes a
  buffered access log: into the page cache, well under a millisecond for a
  0.2 s batch. Handing each batch to a worker thread instead cost ~20 us of
  CPU per request (``benchmarks/exchange_cost.py``: 92 -> 73 us with the
  access log), in GIL hand-offs between the thread and the event loop;
- to anything else (stdout as a pipe or a terminal), through a worker
  thread, since a pipe's reader may stall and the event loop must never
  wait for it.

The line is rendered here rather than through a structlog processor chain:
with the fields fixed, joining pre-escaped strings costs about 4 us where
structlog's bound logger, a time processor and its JSON renderer cost about
20 us. A failed write (disk full, a closed pipe) loses that batch, says so
in sluice's own log, and nothing else. If the disk cannot keep up and the
buffer reaches ``max_pending`` lines, new lines are dropped and counted
(reported in sluice's own log) rather than letting memory grow or requests
wait.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import Annotated

import structlog
import trio
from pydantic import Field

from sluice import ConfigError, Filter, FilterConfig, hookimpl

__all__ = ["AccessLog"]

log = structlog.get_logger("sluice.access_log")


class _Clock:
    """An ISO 8601 UTC timestamp with microseconds; the date part is
    formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1e6):06d}Z"


def _json(value) -> str:
    """A JSON string literal, or null."""
    return "null" if value is None else _quote(value)


class AccessLog(Filter):
    """One JSON line per request (a structlog event), written off the event loop."""

    name = "access_log"

    class Config(FilterConfig):
        path: str | None = None  # None: stdout
        flush_interval: Annotated[float, Field(gt=0, le=60)] = 0.2
        max_pending: Annotated[int, Field(ge=100)] = 100_000

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if config.path is not None:  # fail at validation, before any socket opens
            try:
                open(config.path, "a", encoding="utf-8").close()  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"filters.access_log.path: cannot write {config.path}: {exc.strerror}") from None
        self._pending: list[str] = []
        self._dropped = 0
        self._file = None
        self._regular = False  # a regular file: written from the event loop
        self._clock = _Clock()
        # One flush at a time: close() must not shut the file under a batch
        # the writer task is still writing, or that batch is lost.
        self._flushing = trio.Lock()

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
        request = ctx.request
        response = ctx.response
        endpoint = ctx.endpoint
        route = ctx.matched_route  # never resolve a route just to log it
        headers = request.headers if request is not None else None
        self._enqueue("".join((
            '{"time": "', self._clock(),
            '", "client": ', _quote(ctx.client[0]),
            ', "method": ', _json(request.method if request is not None else None),
            ', "path": ', _json(request.target if request is not None else None),
            ', "host": ', _json(headers.get("host") if headers is not None else None),
            ', "status": ', str(response.status) if response is not None else "null",
            ', "bytes_in": ', str(ctx.bytes_in),
            ', "bytes_out": ', str(ctx.bytes_out),
            ', "duration_ms": ', repr(round(ctx.duration * 1000, 3)),
            ', "upstream": ', _json(endpoint.address if endpoint is not None else None),
            ', "route": ', _json(route.name if route else None),
            ', "request_id": ', _quote(ctx.request_id),
            ', "user_agent": ', _json(headers.get("user-agent") if headers is not None else None),
            ', "flags": ', _json(",".join(ctx.flags) or None),
            ', "upgraded": ' + _quote(ctx.upgraded) if ctx.upgraded else "",
            (', "attempts": ' + str(len(ctx.tried) + 1) + ', "tried": ['
             + ", ".join(_quote(e.address) for e in ctx.tried) + "]") if ctx.tried else "",
            "}",
        )))

    def _enqueue(self, line: str) -> None:
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


@hookimpl
def sluice_filters():
    return [AccessLog]


@hookimpl
def sluice_reopen_logs(app):
    access_log = app.filters.get(AccessLog.name)
    return access_log.reopen() if access_log is not None else None
