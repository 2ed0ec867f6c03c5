"""The admin listener: what an operator reads and changes while sluice runs.

A listener of its own (``[admin]``, off by default, ``127.0.0.1:9901``),
never routed through a proxy chain: a small HTTP/1.1 server on trio and h11
(the reference codec), JSON in and out except ``/metrics``.

==========================  ==================================================
``GET /live``               200 while the event loop runs
``GET /ready``              200 once the listeners accept, 503 while draining or
                            while a discovered cluster has had no snapshot
``GET /metrics``            Prometheus text for every worker (``sluice.metrics``)
``GET /clusters``           endpoints: health, ejection, requests in flight, scores, draining
``GET /routes``             each listener's routes: name, what they match and do
``GET /config``             the effective config, secrets redacted (``redact``)
``GET /plugins``            each listener's chain and the phases each filter runs
``GET /log-level``          the level logged at now
``POST /reload``            reload; answers with the outcome (202 if it is late)
``POST /drain``             drain and stop, as SIGTERM
``POST /log-level``         ``{"level": "debug"}``: every worker logs at it
==========================  ==================================================

**Where it runs.** In worker 0 only (``app.worker_index``; the one process
without ``--workers``): the master is a plain blocking process with no trio
loop. ``/metrics`` covers every worker (prometheus_client's multiprocess
files); ``/clusters`` is worker 0's own view, since health and ejections
are per worker. A mutation reaches every worker: with ``--workers N`` it is
the master's signal (SIGHUP reload, SIGTERM drain), which the master
forwards to all; the log level is memory the workers share
(``sluice.logs``).

**Tokens.** Every mutation needs ``Authorization: Bearer <token>``, compared
in constant time; with no token configured, mutations are refused. A
request without the token, or with a wrong one, gets 401 and is logged as
``admin unauthorized`` (client and path, never what was sent). Binding a
non-loopback address without a token fails startup (``admin_token``).

**Bad input.** At most ``MAX_CONNECTIONS`` connections are served at once.
A head over ``MAX_HEAD`` bytes gets 431, a body over
``MAX_BODY`` 413, a malformed request 400, an unknown path 404, a wrong
method 405; a client that stalls for ``READ_TIMEOUT`` is dropped. A bug in
a handler is a 500 with no traceback sent (it is logged).

The ``[admin]`` table is read at startup; a reload leaves the running
admin listener, its address and its token as they were.

**The read-only set.** ``READ_ONLY`` (``/live``, ``/ready``, ``/metrics``,
GET and HEAD) is what ``[metrics] address`` serves with no token
(``sluice.control.metrics_listener``): the same ``Admin`` with only those
routes, so a scraper and a kubelet get the admin's answers without the
admin's reach.
"""

from __future__ import annotations

import hmac
import importlib
import ipaddress
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import h11
import structlog
import trio

from .. import logs
from ..addresses import parse_hostport
from ..secrets import REDACTED
from ..edge.listener import bind
from ..errors import ConfigError
from ..proxy.filters import PHASES, overrides
from .config import AdminConfig

if TYPE_CHECKING:
    from .app import App

__all__ = ["READ_ONLY", "Admin", "admin_token", "listen", "redact", "serve_admin"]

log = structlog.get_logger("sluice")

MAX_CONNECTIONS = 64  # at once; more are closed as they come (each is held READ_TIMEOUT at most)
MAX_HEAD = 16 * 1024  # an admin request head is a line and a few headers
MAX_BODY = 64 * 1024  # ``{"level": "debug"}`` and the like
READ_TIMEOUT = 10.0  # for a whole request, and between requests on a connection
WRITE_TIMEOUT = 10.0
RELOAD_WAIT = 10.0  # how long POST /reload waits for the outcome before a 202
# Nothing here changes state or shows config: safe to serve beyond loopback with no token.
READ_ONLY = ("/live", "/ready", "/metrics")
_READS = ("GET", "HEAD")

# -- config ------------------------------------------------------------------


def admin_token(cfg: AdminConfig) -> str | None:
    """The admin token from wherever ``[admin]`` says it is; ConfigError
    (by key path) when it cannot be read, or when the listener would bind
    beyond loopback without one."""
    token = cfg.token
    if cfg.token_env is not None:
        token = os.environ.get(cfg.token_env)
        if not token:
            raise ConfigError(f"admin.token_env: the environment variable {cfg.token_env} is not set "
                              "(or is empty)")
    elif cfg.token_file is not None:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"admin.token_file: cannot read {cfg.token_file}: {why}") from None
        if not token:
            raise ConfigError(f"admin.token_file: {cfg.token_file} is empty")
    if token is None and not _loopback(cfg.address):
        raise ConfigError(f"admin.address: {cfg.address} is not a loopback address, and binding there "
                          "needs a token (admin.token, admin.token_env or admin.token_file)")
    return token


def _loopback(address: str) -> bool:
    host, _ = parse_hostport(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


# Names whose values are secrets wherever they appear: ending in a word such
# as token, password, secret or key (``jwt_secret``, ``private_key``; not
# ``token_file``, a path, or ``require_token_for_reads``). Under a ``tls``
# table anything naming a key or a password also is (``key_file``).
_SECRET = re.compile(r"(^|[-_])(tokens?|password|passwd|passphrase|secrets?|keys?|apikey|credentials?)$",
                     re.I)
_TLS_SECRET = re.compile(r"key|pass", re.I)


def redact(value: Any, *, tls: bool = False) -> Any:
    """``value`` (a config as plain data) with every secret's value replaced
    by ``REDACTED``: keys named like a token, password, secret or key, and
    key and password settings under any ``tls`` table. Unset values (None,
    empty) stay as they are, so that one sees whether a secret is set."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            secret = isinstance(k, str) and (_SECRET.search(k) or (tls and _TLS_SECRET.search(k)))
            if secret and v not in (None, "", [], {}):
                out[k] = REDACTED
            else:
                out[k] = redact(v, tls=tls or k == "tls")
        return out
    if isinstance(value, list):
        return [redact(v, tls=tls) for v in value]
    return value


# -- the server ----------------------------------------------------------------


class _Reply(Exception):
    """An answer decided early (a bad body, a refusal): raised, then sent."""

    def __init__(self, status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or []


class _Request:
    def __init__(self, head: h11.Request, body: bytes, client: str) -> None:
        self.method = head.method.decode("ascii", "replace")
        target = urlsplit(head.target.decode("ascii", "replace"))
        self.path = target.path
        self.query = parse_qs(target.query)
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
        self.body = body
        self.client = client

    def json(self) -> dict:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise _Reply(400, {"error": "the body is not JSON"}) from None
        if not isinstance(data, dict):
            raise _Reply(400, {"error": "the body is not a JSON object"})
        return data


Handler = Callable[["Admin", _Request], Awaitable[tuple[int, Any]]]


async def serve_admin(app: App, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app``'s admin listener until cancelled; reports its URL."""
    cfg = app.config.admin
    sock, url = listen(cfg.address, "admin.address")
    admin = Admin(app, app.admin_token, cfg.require_token_for_reads)
    log.info("admin listening", url=url, worker=app.worker_index, token=app.admin_token is not None)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, admin.connection, [sock])
        task_status.started(url)


def listen(address: str, key: str) -> tuple[trio.SocketListener, str]:
    """A listener bound on ``address`` (one process's: no SO_REUSEPORT) and
    its URL; a ConfigError naming ``key`` when it cannot be bound."""
    try:
        sock = bind(address, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot listen on {address}: {exc.strerror or exc}") from None
    host, port = sock.socket.getsockname()[:2]
    return sock, f"http://{f'[{host}]' if ':' in host else host}:{port}"


class Admin:
    """The admin endpoints of one app, and the HTTP/1.1 loop serving them.

    ``read_only``: only ``READ_ONLY``'s paths, by GET or HEAD, and never a
    token asked for (the ``[metrics]`` listener): any other method is 405
    whatever the path, since nothing here takes one; ``kind`` names it in the log."""

    def __init__(self, app: App, token: str | None, require_token_for_reads: bool = False, *,
                 read_only: bool = False, kind: str = "admin") -> None:
        self.app = app
        self.kind = kind
        self.read_only = read_only
        self.token = token
        self.require_token_for_reads = require_token_for_reads
        self.open = 0  # connections being served
        self.routes: dict[str, dict[str, Handler]] = {
            "/live": {"GET": Admin.live},
            "/ready": {"GET": Admin.ready},
            "/metrics": {"GET": Admin.metrics},
            "/clusters": {"GET": Admin.clusters},
            "/routes": {"GET": Admin.route_table},
            "/config": {"GET": Admin.config},
            "/plugins": {"GET": Admin.plugins},
            "/log-level": {"GET": Admin.get_log_level, "POST": Admin.set_log_level},
            "/reload": {"POST": Admin.reload},
            "/drain": {"POST": Admin.drain},
        }
        if read_only:
            self.token, self.require_token_for_reads = None, False
            self.routes = {p: {"GET": self.routes[p]["GET"], "HEAD": self.routes[p]["GET"]} for p in READ_ONLY}

    # -- HTTP ------------------------------------------------------------------

    async def connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
            client = f"{peer[0]}:{peer[1]}"
        except OSError:
            client = "?"
        if self.open >= MAX_CONNECTIONS:
            log.warning(f"{self.kind} connection refused: too many open", client=client, open=self.open)
            await trio.aclose_forcefully(stream)
            return
        self.open += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                try:
                    request = await self._read(conn, stream, client)
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # 400, or 431 for a head too large
                        await self._send(conn, stream, exc.error_status_hint, {"error": "bad request"}, close=True)
                    return
                except _Reply as reply:  # 413: the body is left unread, so the connection ends
                    await self._send(conn, stream, reply.status, reply.body, reply.headers, close=True)
                    return
                if request is None:
                    return
                status, body, headers = await self._answer(request)
                await self._send(conn, stream, status, body, headers, bare=request.method == "HEAD")
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return
        except Exception as exc:  # a bug of ours: this connection's end, never the listener's
            log.error(f"{self.kind} connection failed", client=client, exc_info=exc)
        finally:
            self.open -= 1
            await trio.aclose_forcefully(stream)

    async def _read(self, conn: h11.Connection, stream: trio.SocketStream, client: str) -> _Request | None:
        """The next whole request, or None once the client is gone or stalled."""
        head, body, received = None, bytearray(), 0
        with trio.move_on_after(READ_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(MAX_HEAD)
                    received += len(data)
                    # (h11 bounds only a head still incomplete; one that came whole is counted here)
                    if head is None and received > MAX_HEAD:
                        raise _Reply(431, {"error": f"the request head is over {MAX_HEAD} bytes"})
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    head = event
                    length = dict(event.headers).get(b"content-length")
                    if length is not None and int(length) > MAX_BODY:
                        raise _Reply(413, {"error": f"the body is over {MAX_BODY} bytes"})
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise _Reply(413, {"error": f"the body is over {MAX_BODY} bytes"})
                elif isinstance(event, h11.EndOfMessage):
                    return _Request(head, bytes(body), client)
                else:  # ConnectionClosed, or PAUSED
                    return None
        if head is not None or received:  # stalled within a request: say so before closing
            raise _Reply(408, {"error": "the request took too long"})
        return None

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, status: int, body: Any,
                    headers: list[tuple[str, str]] | None = None, close: bool = False,
                    bare: bool = False) -> None:
        """Send one answer; ``bare`` (HEAD): its head only, with the length a GET's body has."""
        if isinstance(body, tuple):  # (bytes, content type): /metrics
            payload, content_type = body
        else:
            payload, content_type = (json.dumps(body, indent=2) + "\n").encode(), "application/json"
        head = [("content-type", content_type), ("content-length", str(len(payload))),
                ("cache-control", "no-store"), *(headers or [])]
        if close:
            head.append(("connection", "close"))
        with trio.move_on_after(WRITE_TIMEOUT) as scope:
            data = conn.send(h11.Response(status_code=status, headers=head, reason=HTTPStatus(status).phrase))
            if not bare:
                data += conn.send(h11.Data(data=payload))
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("admin client did not read its answer")

    async def _answer(self, request: _Request) -> tuple[int, Any, list[tuple[str, str]]]:
        if self.read_only and request.method not in _READS:
            return 405, {"error": f"this listener is read-only: {', '.join(_READS)}"}, [("allow", ", ".join(_READS))]
        methods = self.routes.get(request.path)
        if methods is None:
            return 404, {"error": f"no {self.kind} endpoint {request.path}", "endpoints": sorted(self.routes)}, []
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(methods)
            return 405, {"error": f"{request.path} takes {allowed}"}, [("allow", allowed)]
        if request.method not in _READS or self.require_token_for_reads:
            refusal = self._refused(request)
            if refusal is not None:
                return 401, {"error": refusal}, [("www-authenticate", 'Bearer realm="sluice admin"')]
            if request.method not in _READS:
                log.info("admin request", method=request.method, path=request.path, client=request.client)
        try:
            status, body = await handler(self, request)
        except _Reply as reply:
            return reply.status, reply.body, reply.headers
        except Exception as exc:  # a bug of ours: logged with its traceback, never sent
            log.error(f"{self.kind} request failed", path=request.path, exc_info=exc)
            return 500, {"error": "internal error (logged)"}, []
        return status, body, []

    def _refused(self, request: _Request) -> str | None:
        """Why the request may not go on (None: it may): the bearer token check."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if self.token is None:
            why = "no admin token is configured: mutations are disabled"
        elif scheme.lower() != "bearer" or not given:
            why = "a bearer token is needed"
        elif hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return None
        else:
            why = "wrong token"
        log.warning("admin unauthorized", client=request.client, method=request.method,
                    path=request.path, reason=why)
        return why

    # -- endpoints -------------------------------------------------------------

    async def live(self, request: _Request) -> tuple[int, Any]:
        return 200, {"live": True, "pid": os.getpid(), "worker": self.app.worker_index}

    async def ready(self, request: _Request) -> tuple[int, Any]:
        app = self.app
        draining = any(x.draining for x in app.listeners)
        # Clusters whose discovery source has sent no snapshot yet answer 503 UH: not ready
        # until each has had one, even past initial_timeout (which only bounds how long the
        # listeners and a reload wait), so a load balancer sends traffic to instances that
        # have endpoints; the body names the clusters that wait.
        waiting = sorted(n for n, d in app.discoveries.items() if not d.ready.is_set())
        ready = bool(app.addresses) and not draining and not waiting
        out = {"ready": ready, "draining": draining, "listeners": app.addresses}
        if app.discoveries:
            out["discovery_waiting"] = waiting
        return (200 if ready else 503), out

    async def metrics(self, request: _Request) -> tuple[int, Any]:
        try:
            render = importlib.import_module("sluice.metrics").render
        except (ImportError, AttributeError):
            return 501, {"error": "metrics are not available in this build"}
        # In this thread, not a worker thread: it flushes this worker's own
        # sums first, which the loop's tasks add to. Reading the files takes ms.
        return 200, render()

    async def clusters(self, request: _Request) -> tuple[int, Any]:
        now, wall = time.monotonic(), time.time()
        out = {}
        for name, cluster in self.app.clusters.items():
            scores = _scores(cluster.balancer)
            endpoints = []
            for e in [*cluster.endpoints, *cluster.draining]:  # (draining: discovery dropped it)
                ejected = e.ejected_until > now
                endpoints.append({
                    "address": e.address,
                    "weight": e.weight,
                    "healthy": e.healthy,
                    "ejected": ejected,
                    "ejected_until": round(wall + e.ejected_until - now, 3) if ejected else None,
                    "ejections": e.ejections,
                    "active_requests": e.active,
                    "consecutive_connect_failures": e.connect_failures,
                    "consecutive_5xx": e.server_errors,
                    "score": scores.get(e.address),
                    "draining": e.draining,
                })
            available = sum(e.available(now) for e in cluster.endpoints)
            out[name] = {
                "policy": type(cluster.balancer).name,
                "protocol": cluster.protocol,
                "available": available,
                "panic": available != len(cluster.endpoints)
                and available * 100 < cluster.panic_threshold * len(cluster.endpoints),
                "requests_in_flight": cluster.breaker.requests,
                "connections": cluster.breaker.connections,
                "endpoints": endpoints,
            }
        return 200, {"worker": self.app.worker_index,
                     "view": "this worker's (health and ejections are per worker; /metrics has all)",
                     "clusters": out}

    async def route_table(self, request: _Request) -> tuple[int, Any]:
        out = {}
        for listener in self.app.listeners:
            resolver = listener.chain.resolver
            routes = getattr(resolver.__self__, "routes", ()) if resolver is not None else ()
            out[listener.name] = [{
                "name": r.name,
                "summary": r.summary,
                "cluster": r.cluster,
                "timeout": r.timeout,
                "retry_attempts": r.retry.attempts if r.retry is not None else 1,
                "mirror": getattr(getattr(r.mirror, "cluster", None), "name", None),
                "disabled_filters": sorted(r.disabled_filters),
            } for r in routes]
        return 200, {"listeners": out}

    async def config(self, request: _Request) -> tuple[int, Any]:
        out = {"generation": self.app.generation, "last_reload": self.app.last_reload,
               "config": redact(self.app.config.model_dump(mode="json"))}
        if self.app.config_store is not None:  # the config centre: revision, connection, last error
            out["config_store"] = self.app.config_store.status()
        return 200, out

    async def plugins(self, request: _Request) -> tuple[int, Any]:
        registry = self.app.plugins
        listeners = {}
        for listener in self.app.listeners:
            listeners[listener.name] = [{
                "filter": f.name,
                "plugin": registry.filters[f.name][1] if f.name in registry.filters else None,
                "phases": [p.removeprefix("on_") for p in PHASES if overrides(f, p)],
            } for f in listener.chain.filters]
        loaded = {name: {"dist": info.dist, "filters": sorted(info.filters), "balancers": sorted(info.balancers),
                         "transports": sorted(info.transports), "discovery": sorted(info.discovery)}
                  for name, info in registry.loaded.items()}
        return 200, {"listeners": listeners, "plugins": loaded}

    async def get_log_level(self, request: _Request) -> tuple[int, Any]:
        return 200, {"level": logs.current_level()}

    async def set_log_level(self, request: _Request) -> tuple[int, Any]:
        level = request.json().get("level") or (request.query.get("level") or [None])[0]
        if level not in logs.LEVELS:
            raise _Reply(400, {"error": f"level: one of {', '.join(logs.LEVELS)}"})
        was = logs.current_level()
        logs.set_level(level)
        log.warning("log level changed", level=level, was=was, worker=self.app.worker_index)
        return 200, {"level": level, "was": was, "workers": "all"}

    async def reload(self, request: _Request) -> tuple[int, Any]:
        """Ask every worker to reload, then wait for this worker's outcome."""
        app = self.app
        before = app.last_reload
        self._everywhere(signal.SIGHUP, app.request_reload)
        with trio.move_on_after(RELOAD_WAIT):
            while app.last_reload is before:
                await trio.sleep(0.05)
        outcome = app.last_reload
        if outcome is before:
            return 202, {"requested": True, "outcome": None,
                         "note": f"no outcome within {RELOAD_WAIT:g}s; see the log"}
        return (200 if outcome["ok"] else 422), {"requested": True, "outcome": outcome}

    async def drain(self, request: _Request) -> tuple[int, Any]:
        self._everywhere(signal.SIGTERM, self.app.stop)
        return 202, {"draining": True, "drain_timeout": self.app.config.server.drain_timeout}

    def _everywhere(self, sig: signal.Signals, here: Callable[[], None]) -> None:
        """Do it in every worker: the master's signal (it forwards it to all)
        with ``--workers N``; else in this process, ``here()``."""
        if self.app._reuse_port and os.getppid() != 1:  # a worker: its parent is the sluice master
            os.kill(os.getppid(), sig)
        else:
            here()


def _scores(balancer: Any) -> dict[str, float]:
    """The policy's scores by endpoint address (``Balancer.scores()``; none for most)."""
    try:
        return {address: round(float(v), 6) for address, v in balancer.scores().items()}
    except Exception as exc:  # a policy's bug costs its scores, not the answer
        log.warning("balancer scores failed", policy=type(balancer).name, error=repr(exc))
    return {}
