"""The webhook: Alertmanager's API v2 JSON, POSTed from a task of its own.

The payload is what ``POST /api/v2/alerts`` takes: a list of
``{labels, annotations, startsAt, endsAt, generatorURL}``; a resolved alert
has ``endsAt`` set to when it ended (the past), a firing one no
``endsAt`` (Alertmanager then keeps it for its ``resolve_timeout``, so
firing alerts are sent again every ``repeat_interval``).

Sending never holds anything up: ``notify`` appends to a bounded queue and
returns (past ``max_queue`` the oldest notification is dropped and
counted); the sender task takes batches from it, and each POST has
``timeout`` per try and at most ``max_retries`` tries more, with backoff
doubling from ``backoff`` up to ``max_backoff``. A batch that still fails
is dropped and logged (``alert webhook failed``): alerts are also log
events, so nothing is lost from the log.

The POST is HTTP/1.1 through h11 (a dependency already; it parses the
answer) over a trio socket, TLS for https with the system's trust store:
one request per connection, nothing to pool at this rate, and no second
HTTP client (httpx is only a test dependency) on the runtime side.
"""

from __future__ import annotations

import json
import ssl
from collections import deque
from datetime import UTC, datetime
from urllib.parse import urlsplit

import h11
import structlog
import trio

from .settings import Webhook

__all__ = ["Sender", "alert_json"]

log = structlog.get_logger("sluice.alerts")

_READ = 16 * 1024


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_json(labels: dict[str, str], annotations: dict[str, str], starts_at: float,
               ends_at: float | None, generator_url: str) -> dict:
    """One alert as Alertmanager's API v2 takes it."""
    out = {"labels": labels, "annotations": annotations, "startsAt": _iso(starts_at),
           "generatorURL": generator_url}
    if ends_at is not None:
        out["endsAt"] = _iso(ends_at)
    return out


class Sender:
    """A bounded queue of alerts and the task that POSTs them."""

    def __init__(self, config: Webhook) -> None:
        self.config = config
        self.queue: deque[dict] = deque()
        self.dropped = 0  # notifications dropped: the queue was full, or a batch failed every try
        self.attempts = 0  # POSTs tried (tests and the log read it)
        self._ready = trio.Event()
        url = urlsplit(config.url)
        self._tls = url.scheme == "https"
        self._host = url.hostname or ""
        self._port = url.port or (443 if self._tls else 80)
        self._target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._authority = url.netloc.rsplit("@", 1)[-1]

    def notify(self, alert: dict) -> None:
        """Queue one alert; never waits."""
        if len(self.queue) >= self.config.max_queue:
            self.queue.popleft()
            self.dropped += 1
            log.warning("alert webhook queue full; oldest dropped", dropped=self.dropped)
        self.queue.append(alert)
        self._ready.set()

    async def run(self) -> None:
        """Send what is queued, until cancelled."""
        while True:
            await self._ready.wait()
            self._ready = trio.Event()
            while self.queue:
                batch = list(self.queue)
                self.queue.clear()
                await self._deliver(batch)

    async def _deliver(self, batch: list[dict]) -> None:
        body = json.dumps(batch).encode()
        delay = self.config.backoff
        for attempt in range(1, self.config.max_retries + 2):
            self.attempts += 1
            why = f"no answer within {self.config.timeout}s"
            with trio.move_on_after(self.config.timeout):
                try:
                    status = await self._post(body)
                except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                else:
                    if 200 <= status < 300:
                        return
                    why = f"status {status}"
            if attempt > self.config.max_retries:
                break
            log.info("alert webhook retry", attempt=attempt, error=why)
            await trio.sleep(delay)
            delay = min(delay * 2, self.config.max_backoff)
        self.dropped += len(batch)
        log.error("alert webhook failed", url=self.config.url, attempts=attempt, alerts=len(batch), error=why)

    async def _post(self, body: bytes) -> int:
        stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
        try:
            if self._tls:
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=self._host)
            conn = h11.Connection(h11.CLIENT)
            headers = [("host", self._authority), ("content-type", "application/json"),
                       ("content-length", str(len(body))), ("user-agent", "sluice-alerts"),
                       ("connection", "close"), *self.config.headers.items()]
            await stream.send_all(conn.send(h11.Request(method="POST", target=self._target, headers=headers))
                                  + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(_READ)
                    conn.receive_data(data)
                    continue
                if type(event) is h11.Response:
                    return event.status_code
                if type(event) is h11.ConnectionClosed:
                    raise trio.BrokenResourceError("closed before answering")
        finally:
            await trio.aclose_forcefully(stream)
