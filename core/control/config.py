"""The configuration model (TOML) and its validation.

Validation happens before any socket opens. Every error names its key path,
e.g. ``clusters.api.endpoints[1]: not a host:port``. This module checks the
shape; what depends on plugins (filter names and settings, policies,
transports, routes) is checked by ``sluice.control.app`` with the same path style.

Defaults are chosen for a proxy facing the internet:

- ``max_header_bytes`` 32 KiB: above nginx's 8 KiB buffers, well below what
  lets a client pin much memory per connection.
- ``header_read`` 10 s for a whole request head (slowloris), and for a
  connection's first head from the moment it is accepted (TLS handshake
  included), so a client that connects and sends nothing holds its slot
  10 s, not 60; ``idle`` 60 s between requests and between body bytes.
- ``max_connections`` per listener: by default what the process's
  descriptor limit carries (raised to its hard limit at startup), two
  descriptors per client connection (its own and an upstream's) after the
  pools' idle connections and a reserve (``sluice.edge.slots``). A value
  set here wins; one above what the limit carries is warned about at
  startup. At the limit the connection waiting longest for a request gives
  its slot up to a new client.
- ``lingering_time`` 30 s in all and ``lingering_timeout`` 5 s of silence
  for a lingering close (nginx's defaults, see ``sluice.edge.lingering``):
  how long a connection closing with request bytes unread keeps reading
  and dropping them, so that its client reads the answer, not a reset.
- ``max_body_bytes`` 0 (unlimited): bodies stream, they are never buffered,
  unless a filter asks (``ctx.buffer_request_body()``), and then up to
  ``max_buffered_body_bytes`` (1 MiB, as Envoy's default buffer limit):
  413 past it for a request, 502 for a response.
- upstream ``connect_timeout`` 5 s, ``response_timeout`` 30 s (from the end
  of the request to the response head, and between response body bytes).
- ``tunnel_idle`` 300 s with no byte either way ends an upgraded connection
  (a WebSocket; nginx's 60 s ``proxy_read_timeout`` cuts quiet WebSockets
  that ping every minute or two, and a tunnel idles more than a request);
  ``tunnel_max`` 86400 s (a day) ends any tunnel, so none is held forever
  and clients that reconnect are rebalanced. Both under ``[listeners.timeouts]``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from ..addresses import parse_hostport
from ..errors import ConfigError
from ..secrets import Secret
from ..proxy.header_edits import HeaderOps

__all__ = ["Config", "ConfigStoreConfig", "format_errors", "load", "parse", "parse_hostport", "read_toml"]


def _hostport(value: str) -> str:
    parse_hostport(value)
    return value


def _upstream_hostport(value: str) -> str:
    parse_hostport(value, allow_zero=False)
    return value


HostPort = Annotated[str, AfterValidator(_hostport)]
UpstreamHostPort = Annotated[str, AfterValidator(_upstream_hostport)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Model):
    max_header_bytes: PositiveInt = 32 * 1024
    max_header_count: PositiveInt = 100
    max_body_bytes: Annotated[int, Field(ge=0)] = 0
    max_buffered_body_bytes: PositiveInt = 1024 * 1024
    max_connections: PositiveInt | None = None  # None: from the descriptor limit


class Timeouts(_Model):
    header_read: PositiveFloat = 10.0
    idle: PositiveFloat = 60.0
    lingering_time: PositiveFloat = 30.0
    lingering_timeout: PositiveFloat = 5.0
    tunnel_idle: PositiveFloat = 300.0
    tunnel_max: PositiveFloat = 86400.0


class Http2(_Model):
    """HTTP/2 on a listener (``[listeners.http2]``). ``max_concurrent_streams``
    is what the client is told it may open at once (RFC 9113 6.5.2; 100 as
    nginx and Envoy); ``initial_window`` the flow-control window each stream
    starts with, and so the request-body bytes a stream may have in flight
    before the exchange reads them; ``max_header_list_size`` caps a
    decompressed header block (HPACK bombs, CONTINUATION floods)."""

    enabled: bool = False
    max_concurrent_streams: Annotated[int, Field(ge=1, le=2**31 - 1)] = 100
    initial_window: Annotated[int, Field(ge=65535, le=2**31 - 1)] = 256 * 1024
    max_header_list_size: Annotated[int, Field(ge=1024)] = 64 * 1024


def _http2(value: Any) -> Any:
    """``http2 = true`` is short for ``http2 = { enabled = true }``."""
    return {"enabled": value} if isinstance(value, bool) else value


class ListenerConfig(_Model):
    name: str | None = None
    address: HostPort
    filters: list[str] = []
    tls: dict[str, Any] | None = None
    trust_forwarded: bool = False
    # HTTP/2: on a TLS listener offered by ALPN (h2 before http/1.1); on a
    # plain one, h2c with prior knowledge (a connection opening with the
    # HTTP/2 preface). Off by default while the HTTP/2 hardening lands.
    http2: Annotated[Http2, BeforeValidator(_http2)] = Http2()
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()


class EndpointConfig(_Model):
    address: UpstreamHostPort
    weight: Annotated[int, Field(ge=1, le=1000)] = 1


def _endpoint(value: Any) -> Any:
    """An endpoint may be written as a plain ``"host:port"`` string."""
    if isinstance(value, str):
        parse_hostport(value, allow_zero=False)
        return {"address": value}
    return value


Endpoint = Annotated[EndpointConfig, BeforeValidator(_endpoint)]


class PolicyConfig(BaseModel):
    """``policy = "name"`` or ``policy = { name = "name", ...settings }``: the
    settings are the policy's own, checked against its ``Config`` at build."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _policy(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class OutlierConfig(_Model):
    """Passive outlier detection (``sluice.upstream.cluster``); 0 turns a rule off."""

    consecutive_connect_failures: Annotated[int, Field(ge=0)] = 1
    consecutive_5xx: Annotated[int, Field(ge=0)] = 5
    base_ejection: PositiveFloat = 10.0
    max_ejection: PositiveFloat = 300.0
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50


def _statuses(value: Any) -> Any:
    """``[200, "300-399"]``: codes and inclusive ranges, as a set of codes."""
    if not isinstance(value, list):
        raise ValueError("a list of status codes and ranges (\"200-299\")")
    codes: set[int] = set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and "-" in item:
            try:
                low, high = (int(part) for part in item.split("-", 1))
            except ValueError:
                raise ValueError(f"{item!r} is not a range like \"200-299\"") from None
        else:
            raise ValueError(f"{item!r} is not a status code or a range like \"200-299\"")
        if not 100 <= low <= high <= 599:
            raise ValueError(f"{item!r}: status codes are 100-599")
        codes.update(range(low, high + 1))
    if not codes:
        raise ValueError("no status code")
    return frozenset(codes)


class HealthCheckConfig(_Model):
    """Active health checks (``sluice.upstream.health``)."""

    kind: Literal["http", "tcp"] = "http"
    path: Annotated[str, Field(pattern=r"^/[\x21-\x7e]*$")] = "/"
    host: Annotated[str, Field(pattern=r"^[\x21-\x7e]+$")] | None = None
    statuses: Annotated[frozenset[int], BeforeValidator(_statuses)] = frozenset(range(200, 400))
    interval: PositiveFloat = 5.0
    jitter: Annotated[float, Field(ge=0)] = 1.0
    timeout: PositiveFloat = 2.0
    healthy_threshold: PositiveInt = 2
    unhealthy_threshold: PositiveInt = 3


class CircuitBreakersConfig(_Model):
    """Per-cluster limits (``sluice.upstream.cluster.Breaker``); absent: none."""

    max_requests: PositiveInt | None = None
    max_connections: PositiveInt | None = None
    max_pending: Annotated[int, Field(ge=0)] | None = None
    max_retries: Annotated[int, Field(ge=0)] | None = None


class DiscoverySettings(BaseModel):
    """``discovery = { source = "dns", ...settings }``: where the endpoints come
    from at runtime (``sluice.upstream.discovery``). ``initial_timeout`` is the
    core's (seconds a worker waits for the first snapshot before serving);
    the rest is the source's, checked against its ``Config`` at build."""

    model_config = ConfigDict(extra="allow", frozen=True)
    source: str
    initial_timeout: Annotated[float, Field(ge=0, le=3600)] = 5.0

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ClusterConfig(_Model):
    # Required unless ``discovery`` gives them at runtime (then it must be empty).
    endpoints: list[Endpoint] = []
    discovery: DiscoverySettings | None = None  # absent: static, ``endpoints`` as written
    policy: Annotated[PolicyConfig, BeforeValidator(_policy)] = PolicyConfig(name="round_robin")
    outlier: OutlierConfig = OutlierConfig()
    # Below this percentage of endpoints available, every endpoint is
    # eligible (panic): better a try at one marked bad than a 503 for all.
    panic_threshold: Annotated[int, Field(ge=0, le=100)] = 50
    # Endpoints one request may try to connect to (a failed connect goes to
    # another eligible one: nothing was sent); 1 turns that failover off.
    connect_tries: Annotated[int, Field(ge=1, le=100)] = 5
    health_check: HealthCheckConfig | None = None  # absent: no active checks
    circuit_breakers: CircuitBreakersConfig = CircuitBreakersConfig()
    connect_timeout: PositiveFloat = 5.0
    response_timeout: PositiveFloat = 30.0
    idle_timeout: PositiveFloat = 60.0
    max_idle: Annotated[int, Field(ge=0)] = 64
    # Seconds a connection serves before it is retired (after its exchange,
    # or its last stream); None: no limit. Spreads load after scaling out.
    max_connection_age: PositiveFloat | None = None
    tls: dict[str, Any] | None = None
    # How endpoints are spoken to: HTTP/1.1, HTTP/2 over TLS (ALPN "h2"; needs
    # ``tls``), or HTTP/2 over plain TCP with prior knowledge ("h2c").
    protocol: Literal["h1", "h2", "h2c"] = "h1"
    # Header edits for every request to this cluster, and every answer from
    # it (``sluice.proxy.header_edits``): after the route's, whichever route
    # or filter chose the cluster.
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None

    @model_validator(mode="after")
    def _endpoints_or_discovery(self) -> ClusterConfig:
        if self.discovery is None and not self.endpoints:
            raise ValueError("endpoints: list at least one endpoint, or give a discovery table")
        if self.discovery is not None and self.endpoints:
            raise ValueError("endpoints: a cluster with discovery gets its endpoints from its source; "
                             "remove the endpoints list")
        return self


class MetricsConfig(_Model):
    """``[metrics]``: Prometheus metrics (``sluice.metrics``), served by the admin
    listener's ``GET /metrics``. Off, nothing is recorded per request.

    ``address`` (none by default) opens a read-only listener of its own
    (``sluice.control.metrics_listener``): ``/metrics``, ``/live`` and
    ``/ready`` with no token, for Prometheus and a kubelet to reach. It may
    not share a port with a listener or the admin (``parse``)."""

    enabled: bool = True
    address: HostPort | None = None


class ServerConfig(_Model):
    workers: PositiveInt = 1
    # "auto": httptools (llhttp) when it imports, else h11, the reference.
    http1_codec: Literal["auto", "h11", "httptools"] = "auto"
    drain_timeout: PositiveFloat = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Where `sluice reload -c FILE` finds the running sluice; --pid-file overrides it.
    pid_file: str | None = None
    # Reload when the config file changes (a stat every 0.5 s: sluice.control.watch), as SIGHUP does.
    watch_config: bool = False


class AdminConfig(_Model):
    """The admin listener (``sluice.control.admin``), off unless ``enabled``.

    Every mutation (``POST``) needs the bearer token, given at most one way:
    ``token`` in the file, ``token_env`` naming an environment variable, or
    ``token_file`` naming a file (its first line); a missing variable or an
    unreadable file fails startup. Without a token the admin listener may
    only bind a loopback address (checked at build, ``admin.admin_token``).
    """

    enabled: bool = False
    address: HostPort = "127.0.0.1:9901"
    token: Annotated[Secret, Field(min_length=1)] | None = None  # or { env = ... } / { file = ... }
    token_env: Annotated[str, Field(min_length=1)] | None = None
    token_file: Annotated[str, Field(min_length=1)] | None = None
    require_token_for_reads: bool = False

    @model_validator(mode="after")
    def _one_token_source(self) -> AdminConfig:
        given = [k for k in ("token", "token_env", "token_file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give the token one way, not {' and '.join(given)}")
        return self


class ConfigStoreConfig(_Model):
    """``[config_store]``: routes, clusters and filter settings kept in etcd or ZooKeeper
    (``sluice.control.config_store``); this file stays the bootstrap (listeners, server, admin)."""

    store: Annotated[str, Field(min_length=1)]  # a config store plugin's name: "etcd", "zookeeper"
    address: Annotated[str, Field(min_length=1)]  # etcd's client URL; ZooKeeper's host:port[,host:port]
    prefix: str | None = None  # etcd: the document is the key <prefix>config
    path: str | None = None  # ZooKeeper: the node holding the document
    cache: str | None = None  # the last good document, for a start while the store is down
    # etcd at https://: the CA (PEM) that signed its certificate (default: the system's), and the
    # client certificate and key (PEM) for its --client-cert-auth; checked by the store plugin
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: PositiveFloat = 5.0  # each store call, and the first read at start
    backoff_initial: PositiveFloat = 0.2  # reconnecting: the first wait, doubling...
    backoff_max: PositiveFloat = 10.0  # ...up to this

    @model_validator(mode="after")
    def _where(self) -> ConfigStoreConfig:
        if self.store == "etcd" and not self.prefix:
            raise ValueError("store etcd needs prefix (the document is the key <prefix>config)")
        if self.store == "zookeeper" and not (self.path or "").startswith("/"):
            raise ValueError("store zookeeper needs path, absolute (the node holding the document)")
        if self.store == "zookeeper" and (self.ca or self.cert or self.key):
            raise ValueError("ca, cert and key are for etcd over https")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max is below backoff_initial")
        return self


class Config(_Model):
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    listeners: Annotated[list[ListenerConfig], Field(min_length=1)]
    clusters: dict[str, ClusterConfig] = {}
    # ``[shared]``: the ``sluice.shared`` backend each worker opens (``backend = "local"``, the
    # default, or "redis", or a plugin's); the other keys are the backend's, checked by it
    # (``sluice.shared.open_backend``) when the app is built, with key paths ``shared.*``.
    shared: dict[str, Any] = {}
    # Routes and per-filter settings belong to plugins; they are checked by
    # the filter that reads them, with the same key paths.
    routes: list[dict[str, Any]] = []
    filters: dict[str, dict[str, Any]] = {}
    metrics: MetricsConfig = MetricsConfig()
    config_store: ConfigStoreConfig | None = None


def key_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    """``("clusters", "api", "endpoints", 1)`` -> ``clusters.api.endpoints[1]``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_errors(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``key.path: message``."""
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{key_path(err['loc'], prefix)}: {msg}")
    return "\n".join(lines)


def parse(data: dict[str, Any]) -> Config:
    """Validate a config mapping; ConfigError lists every problem."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None
    if (clash := _metrics_clash(config)) is not None:
        raise ConfigError(clash)
    return config


_ANY_HOST = ("0.0.0.0", "::", "*", "")


def _metrics_clash(config: Config) -> str | None:
    """Why ``metrics.address`` cannot be bound beside the other listeners (None: it can):
    the same port on the same host, or on a wildcard host covering the other's."""
    if config.metrics.address is None:
        return None
    host, port = parse_hostport(config.metrics.address)
    others = [(f"listeners[{i}].address", lc.address) for i, lc in enumerate(config.listeners)]
    if config.admin.enabled:
        others.append(("admin.address", config.admin.address))
    for key, address in others:
        other_host, other_port = parse_hostport(address)
        if port and port == other_port and (host == other_host or host in _ANY_HOST or other_host in _ANY_HOST):
            return f"metrics.address: {config.metrics.address} clashes with {key} ({address})"
    return None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a mapping, not yet validated (the config store overlays it first)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    return parse(read_toml(path))
