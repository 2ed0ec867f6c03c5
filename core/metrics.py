"""Prometheus metrics: what sluice counts, how ``--workers N`` makes one view of it, and the
plugins' own metrics.

**Config.** ``[metrics] enabled = true`` (the default) records; ``false`` records nothing and
leaves the data path as it is without metrics (no per-filter timing either). ``sluice_plugin_``
metrics work either way: they are the plugin's. The text exposition is ``render()``, which the
admin listener serves as ``GET /metrics``.

**One view of every worker.** prometheus_client's multiprocess mode: every process that records
writes its values to mmap'ed files in one directory, and ``render()`` (in any process) adds them
up. ``prepare_multiprocess()`` chooses that directory before anything imports prometheus_client
(it reads ``PROMETHEUS_MULTIPROC_DIR`` when it picks its value class): the operator's, when that
variable is set (the files of a previous run are removed from it), else a fresh temporary one the
process removes when it exits. ``sluice run`` calls it first, with one worker too (one code path:
the files cost nothing per request, since values reach them only at a flush, below). A master
calls ``worker_exited(pid)`` for each worker it reaps, so that the dead worker's gauges leave the
sums; its counters and histograms stay (a replacement worker does not reset a total). Without
``prepare_multiprocess()`` (an App run in a test's process) metrics live in this process's own
registry, and ``render()`` shows that.

**Cheap on the data path.** No prometheus_client call happens per request. What a request did is
added, once, when it completes (``record(ctx)``, from ``answers.complete``), to plain dicts of this
worker, keyed by label tuples; each try at an upstream is added the same way
(``upstream_try``, from ``Cluster.report``). A task in each worker (``run(app)``, in the app's
nursery) flushes those sums into prometheus_client every ``FLUSH_INTERVAL`` seconds (and once more
as the worker stops), and samples the state gauges (connections, requests in flight, health,
ejections, pool, EWMA scores) at the same pace. A scrape is so at most ``FLUSH_INTERVAL`` behind,
and always consistent: a flush is synchronous, counters only grow, and a reload changes neither
the process nor its files (a route a reload removes keeps its totals; a new one starts at zero).

**Bounded labels.** ``listener`` is the listener's name (else its address), ``route`` the
configured name of the route the request matched ("" when none did), ``cluster`` and
``endpoint`` come from the config, ``status_class`` is ``1xx``..``5xx`` (``none`` when no
response was sent: the client went away), ``outcome`` is one of ``sluice.upstream.cluster``'s
attempt outcomes, ``filter`` a filter's name and ``phase`` one of the seven phases. No path,
header value or client address ever becomes a label.

=====================================================  ======================================  =====
metric                                                 labels                                  kind
=====================================================  ======================================  =====
sluice_downstream_requests_total                       listener, route, status_class           counter
sluice_downstream_request_duration_seconds             listener, route, status_class           histogram
sluice_downstream_received_bytes_total                 listener (request bodies)               counter
sluice_downstream_sent_bytes_total                     listener (response bodies)              counter
sluice_downstream_connections_active                   listener                                gauge (livesum)
sluice_downstream_requests_active                      listener                                gauge (livesum)
sluice_upstream_requests_total                         cluster, endpoint, outcome (each try)   counter
sluice_upstream_request_duration_seconds               cluster, endpoint (to the response      histogram
                                                       head, tries that got one)
sluice_upstream_retries_total                          cluster (tries at another endpoint)     counter
sluice_upstream_overflows_total                        cluster (circuit breakers, flag UO)     counter
sluice_upstream_requests_active                        cluster, endpoint                       gauge (livesum)
sluice_upstream_connections                            cluster (open: the pool's size)         gauge (livesum)
sluice_upstream_connections_pending                    cluster (requests waiting for one)      gauge (livesum)
sluice_upstream_endpoint_healthy                       cluster, endpoint                       gauge (livemin)
sluice_upstream_endpoint_ejected                       cluster, endpoint                       gauge (livesum)
sluice_upstream_endpoint_ewma_seconds                  cluster, endpoint                       gauge (livemax)
sluice_filter_duration_seconds                         filter, phase                           histogram
sluice_config_last_reload_successful                   (none): 0 after a failed reload         gauge (livemin)
sluice_config_store_revision                           (none): the store document applied      gauge (livemin)
sluice_config_store_connected                          (none): 1 while following the store     gauge (livemin)
sluice_config_store_stale_seconds                      (none): since last in sync (0: no store) gauge (livemax)
sluice_tls_certificate_expiry_timestamp_seconds        listener, cert (its file): notAfter     gauge (livemin)
=====================================================  ======================================  =====

Connect failures, timeouts and resets are ``sluice_upstream_requests_total`` by ``outcome``
(``connect_failure``, ``timeout``, ``reset``; also ``http_5xx``, ``protocol_error``,
``success``). Gauges choose how workers add up: counts of things in flight or open are the
sum over live workers (``livesum``); each worker runs its own health checks and outlier
detection, so ``healthy`` is 1 only when every live worker sees the endpoint healthy
(``livemin``), ``ejected`` is how many workers eject it (``livesum``), and an EWMA score is the
worst any worker holds (``livemax``). A gauge of an endpoint or cluster a reload removed keeps
its last value (prometheus_client's multiprocess files cannot forget a label set) until the
workers restart.

``sluice_filter_duration_seconds`` is the time one request spent in one phase of one filter
(the phase's calls added up: every body chunk), wall time from the call to its return, awaits
included: what the filter costs the request's latency. The same figures are on the context
while it completes, as ``ctx.filter_time``: ``{(filter, phase): seconds}`` (None when metrics
are off), for an access-log field.

**Plugins' metrics.** ``sluice.metrics.counter(name, documentation, labels=())``, ``gauge(...,
mode="livesum")`` and ``histogram(..., buckets=...)`` return prometheus_client metrics named
``sluice_plugin_<name>``: call them once (a filter's ``__init__``, or at startup) and use the
result as prometheus_client documents (``.labels(...).inc()``), keeping label values bounded.
Asking again for the same name and kind returns the same metric (a reload builds filters
again); a name of another kind, or one that starts with ``sluice_`` but not ``sluice_plugin_``,
is refused with ``ValueError``. These are recorded when the plugin calls them: cache the
``.labels()`` child on the hot path.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from .proxy.context import Context
    from .upstream.cluster import Cluster, Endpoint

__all__ = [
    "FLUSH_INTERVAL",
    "begin",
    "counter",
    "enabled",
    "end",
    "flush",
    "gauge",
    "histogram",
    "prepare_multiprocess",
    "record",
    "render",
    "run",
    "upstream_try",
    "worker_exited",
]

log = structlog.get_logger("sluice")

FLUSH_INTERVAL = 1.0  # seconds between flushes (and gauge samples) in each worker
_ENV = "PROMETHEUS_MULTIPROC_DIR"
# What generate_latest writes, as prometheus_client's own server labels it when the scraper does
# not ask for another format (its CONTENT_TYPE_LATEST says version=1.0.0 from 0.22 on, which
# older scrapers do not know).
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PLUGIN_PREFIX = "sluice_plugin_"
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# Bucket upper bounds. Requests: 1 ms to a minute. Filters: 10 us to a second (a filter that
# costs more than that has bigger problems than a histogram shows).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, float("inf"))
FILTER_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                  0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))
_STATUS_CLASS = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")

_dir: str | None = None  # the multiprocess directory, once prepared
_owner = 0  # the pid that created a temporary directory (and removes it)
_registry = None  # the one-process registry (no multiprocess directory)
_plugin_metrics: dict[str, Any] = {}
timing = False  # whether the chain times filters' phases (sluice.proxy.chain reads it)
_recorder: _Recorder | None = None  # recording now (an app with metrics on runs)
_built: _Recorder | None = None  # its metrics, made once per process
_running = 0  # apps recording in this process (tests run several)


# -- the process tree ------------------------------------------------------------------------


def prepare_multiprocess() -> str:
    """Choose the directory every process of this sluice writes its metrics to; call it before
    anything imports prometheus_client, and before workers fork. Returns the directory."""
    global _dir, _owner
    if _dir is not None:
        return _dir
    given = os.environ.get(_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):  # a previous run's values are not this run's
            if name.endswith(".db"):
                os.remove(os.path.join(given, name))
        _dir = given
    else:
        _dir = tempfile.mkdtemp(prefix="sluice-metrics-")
        os.environ[_ENV] = _dir
        _owner = os.getpid()
        atexit.register(_remove_dir)
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not values.ValueClass._multiprocess:
        # Something imported prometheus_client first: metrics made from now on share the files.
        values.ValueClass = values.get_value_class()
    return _dir


def _remove_dir() -> None:
    if _dir is not None and os.getpid() == _owner:
        shutil.rmtree(_dir, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """A worker was reaped: its live gauges leave the sums (its counters stay)."""
    if _dir is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, _dir)


def render() -> tuple[bytes, str]:
    """The text exposition of every worker's metrics (this process's, when there is no
    multiprocess directory): ``(body, content type)``."""
    from prometheus_client import CollectorRegistry, generate_latest

    flush()  # this process's own sums, up to now
    if _dir is not None:
        registry = CollectorRegistry()
        registry.register(_Files(_dir))
    else:
        registry = _own_registry()
    return generate_latest(registry), _CONTENT_TYPE


class _Files:
    """Every worker's files, added up (prometheus_client's MultiProcessCollector), less a file
    a worker is creating at this moment: it is empty until prometheus_client sizes it, and
    reading it would fail the whole scrape."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for name in os.listdir(self.path):
            if name.endswith(".db"):
                path = os.path.join(self.path, name)
                try:
                    if os.path.getsize(path) >= 8:  # (its header: how much of it is used)
                        files.append(path)
                except FileNotFoundError:  # a dead worker's live gauges, just removed
                    pass
        return MultiProcessCollector.merge(files, accumulate=True)


def _own_registry():
    global _registry
    if _registry is None:
        from prometheus_client import CollectorRegistry

        _registry = CollectorRegistry()
    return _registry


def _make(kind: str, name: str, documentation: str, labels: Sequence[str], **options: Any):
    """A prometheus_client metric, registered where ``render()`` finds it."""
    import prometheus_client

    cls = getattr(prometheus_client, kind)
    if _dir is not None:
        # Multiprocess: the files are the registry; a mode only matters for gauges.
        return cls(name, documentation, list(labels), registry=None, **options)
    options.pop("multiprocess_mode", None)
    return cls(name, documentation, list(labels), registry=_own_registry(), **options)


# -- plugins' metrics --------------------------------------------------------------------------


def _plugin_metric(kind: str, name: str, documentation: str, labels: Sequence[str], **options: Any):
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"metric name {name!r}: letters, digits and '_' only, not starting with a digit")
    if name.startswith("sluice_") and not name.startswith(_PLUGIN_PREFIX):
        raise ValueError(f"metric name {name!r} has a prefix of sluice's own; a plugin's metric is named "
                         f"without it, and sluice makes it {_PLUGIN_PREFIX}<name>")
    full = name if name.startswith(_PLUGIN_PREFIX) else _PLUGIN_PREFIX + name
    if kind == "Counter" and full.endswith("_total"):
        full = full[: -len("_total")]  # prometheus_client adds it back
    known = _plugin_metrics.get(full)
    if known is not None:
        if known[0] != kind or known[1] != tuple(labels):
            raise ValueError(f"metric {full!r} is already a {known[0].lower()} with labels {list(known[1])}")
        return known[2]
    metric = _make(kind, full, documentation, labels, **options)
    _plugin_metrics[full] = (kind, tuple(labels), metric)
    return metric


def counter(name: str, documentation: str, labels: Sequence[str] = ()):
    """A plugin's counter, ``sluice_plugin_<name>_total``."""
    return _plugin_metric("Counter", name, documentation, labels)


def gauge(name: str, documentation: str, labels: Sequence[str] = (), mode: str = "livesum"):
    """A plugin's gauge, ``sluice_plugin_<name>``; ``mode`` says how workers' values add up
    (prometheus_client's ``multiprocess_mode``: livesum, livemax, livemin, liveall, ...)."""
    return _plugin_metric("Gauge", name, documentation, labels, multiprocess_mode=mode)


def histogram(name: str, documentation: str, labels: Sequence[str] = (),
              buckets: Sequence[float] = REQUEST_BUCKETS):
    """A plugin's histogram, ``sluice_plugin_<name>``."""
    return _plugin_metric("Histogram", name, documentation, labels, buckets=tuple(buckets))


# -- recording -----------------------------------------------------------------------------------


def enabled() -> bool:
    """Whether this process records (a worker whose config has metrics on, while it runs)."""
    return _recorder is not None


def record(ctx: Context) -> None:
    """Add what a completed request did (the core calls it once per request)."""
    recorder = _recorder
    if recorder is None:
        return
    response = ctx.response
    status = response.status // 100 if response is not None else 0
    route = ctx._route
    key = (ctx.listener, route.name if route else "", _STATUS_CLASS[status] if status < 6 else "none")
    hist = recorder.down.get(key)
    if hist is None:
        hist = recorder.down[key] = _Requests()
    took = time.monotonic() - ctx.start
    hist.counts[bisect_left(REQUEST_BUCKETS, took)] += 1
    hist.sum += took
    hist.bytes_in += ctx.bytes_in
    hist.bytes_out += ctx.bytes_out
    if ctx.tried or ctx.flags:
        recorder.troubles(ctx)
    spent = ctx.filter_time
    if spent:
        filters = recorder.filters
        for key, took in spent.items():
            hist = filters.get(key)
            if hist is None:
                hist = filters[key] = _Hist(len(FILTER_BUCKETS))
            hist.counts[bisect_left(FILTER_BUCKETS, took)] += 1
            hist.sum += took


def upstream_try(cluster: Cluster, endpoint: Endpoint, outcome: str, latency: float) -> None:
    """Add one try at an upstream endpoint (``Cluster.report`` calls it)."""
    recorder = _recorder
    if recorder is None:
        return
    tries = recorder.tries.get(endpoint)  # (an Endpoint hashes by identity: cheap)
    if tries is None:
        tries = recorder.tries[endpoint] = _Tries(cluster.name)
    outcomes = tries.outcomes
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if outcome == "success" or outcome == "http_5xx":
        tries.counts[bisect_left(REQUEST_BUCKETS, latency)] += 1
        tries.sum += latency


def flush() -> None:
    """Write this worker's sums into prometheus_client now."""
    recorder = _recorder
    if recorder is not None:
        recorder.flush()


class _Hist:
    """Observations not yet flushed: a count per bucket and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0


class _Requests(_Hist):
    """Requests of one (listener, route, status class) not yet flushed: their durations
    and body bytes."""

    __slots__ = ("bytes_in", "bytes_out")

    def __init__(self) -> None:
        super().__init__(len(REQUEST_BUCKETS))
        self.bytes_in = 0
        self.bytes_out = 0


class _Tries(_Hist):
    """Tries at one endpoint not yet flushed: a count per outcome, and the latency of
    those that got a response head."""

    __slots__ = ("cluster", "outcomes")

    def __init__(self, cluster: str) -> None:
        super().__init__(len(REQUEST_BUCKETS))
        self.cluster = cluster
        self.outcomes: dict[str, int] = {}


class _Recorder:
    """One worker's sums between flushes, and the metrics they go to."""

    def __init__(self) -> None:
        m = _make
        self.requests = m("Counter", "sluice_downstream_requests", "Requests answered, by listener, "
                          "route and status class", ("listener", "route", "status_class"))
        self.duration = m("Histogram", "sluice_downstream_request_duration_seconds", "From the request "
                          "head to the end of the exchange", ("listener", "route", "status_class"),
                          buckets=REQUEST_BUCKETS)
        self.received = m("Counter", "sluice_downstream_received_bytes", "Request body bytes read from "
                          "clients", ("listener",))
        self.sent = m("Counter", "sluice_downstream_sent_bytes", "Response body bytes sent to clients",
                      ("listener",))
        self.up_requests = m("Counter", "sluice_upstream_requests", "Tries at an upstream endpoint, by "
                             "outcome", ("cluster", "endpoint", "outcome"))
        self.up_duration = m("Histogram", "sluice_upstream_request_duration_seconds", "From the pick of "
                             "the endpoint to its response head", ("cluster", "endpoint"),
                             buckets=REQUEST_BUCKETS)
        self.retries = m("Counter", "sluice_upstream_retries", "Tries at another endpoint after a "
                         "failure (failovers and a route's retries)", ("cluster",))
        self.overflows = m("Counter", "sluice_upstream_overflows", "Requests refused by a circuit "
                           "breaker (flag UO)", ("cluster",))
        self.filter_duration = m("Histogram", "sluice_filter_duration_seconds", "Time one request spent "
                                 "in one phase of one filter", ("filter", "phase"), buckets=FILTER_BUCKETS)
        gauges = {
            "connections": ("sluice_downstream_connections_active", "Open client connections",
                            ("listener",), "livesum"),
            "active": ("sluice_downstream_requests_active", "Requests in flight", ("listener",), "livesum"),
            "up_active": ("sluice_upstream_requests_active", "Requests in flight to an endpoint",
                          ("cluster", "endpoint"), "livesum"),
            "pool": ("sluice_upstream_connections", "Open upstream connections (the pool's size)",
                     ("cluster",), "livesum"),
            "pending": ("sluice_upstream_connections_pending", "Requests waiting for an upstream "
                        "connection (max_connections)", ("cluster",), "livesum"),
            "healthy": ("sluice_upstream_endpoint_healthy", "1 when every worker's health checks pass",
                        ("cluster", "endpoint"), "livemin"),
            "ejected": ("sluice_upstream_endpoint_ejected", "Workers whose outlier detection ejects it",
                        ("cluster", "endpoint"), "livesum"),
            "ewma": ("sluice_upstream_endpoint_ewma_seconds", "The EWMA policy's response-time score "
                     "(the worst of the workers)", ("cluster", "endpoint"), "livemax"),
            "reload_ok": ("sluice_config_last_reload_successful", "0 when the latest reload failed (the "
                          "previous config serves), else 1", (), "livemin"),
            "store_revision": ("sluice_config_store_revision", "The config store's revision whose document "
                               "serves (the oldest any worker serves)", (), "livemin"),
            "store_connected": ("sluice_config_store_connected", "1 while every worker follows the config "
                                "store, else 0", (), "livemin"),
            "store_stale": ("sluice_config_store_stale_seconds", "Seconds since the config store was last "
                            "known in sync (0 while connected; the worst of the workers)", (), "livemax"),
            "cert_expiry": ("sluice_tls_certificate_expiry_timestamp_seconds", "When a listener's "
                            "certificate expires (Unix time; the earliest any worker serves)",
                            ("listener", "cert"), "livemin"),
        }
        self.gauges = {key: m("Gauge", name, doc, labels, multiprocess_mode=mode)
                       for key, (name, doc, labels, mode) in gauges.items()}
        self._children: dict[tuple, Any] = {}  # (metric id, label values) -> its child
        self._sampled: dict[str, set[tuple]] = {key: set() for key in gauges}
        self._reset()

    def _reset(self) -> None:
        self.down: dict[tuple, _Requests] = {}  # (listener, route, status class) -> its sums
        self.tries: dict[Endpoint, _Tries] = {}
        self.retried: dict[str, int] = {}
        self.overflowed: dict[str, int] = {}
        self.filters: dict[tuple, _Hist] = {}  # (filter, phase) -> duration sums

    def troubles(self, ctx: Context) -> None:
        """A request that failed over or was flagged: its retries and overflows."""
        cluster = ctx._cluster
        if cluster is None:
            return
        if ctx.tried:
            self.retried[cluster.name] = self.retried.get(cluster.name, 0) + len(ctx.tried)
        if "UO" in ctx.flags:
            self.overflowed[cluster.name] = self.overflowed.get(cluster.name, 0) + 1

    # -- the flush: into prometheus_client --

    def _child(self, metric, labels: tuple):
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels) if labels else metric  # (no labels)
        return child

    def _observe(self, metric, labels: tuple, hist: _Hist) -> None:
        # A histogram child keeps one value per bucket (not cumulative) and a sum: add to them
        # directly, rather than one observe() per request (tests/test_metrics.py holds this
        # to prometheus_client's exposition).
        child = self._child(metric, labels)
        for bucket, n in zip(child._buckets, hist.counts, strict=True):
            if n:
                bucket.inc(n)
        child._sum.inc(hist.sum)

    def flush(self) -> None:
        down, tries, filters = self.down, self.tries, self.filters
        retried, overflowed = self.retried, self.overflowed
        self._reset()  # (nothing here awaits: no request is recorded between these lines)
        received: dict[str, int] = {}
        sent: dict[str, int] = {}
        for labels, hist in down.items():
            self._child(self.requests, labels).inc(sum(hist.counts))
            self._observe(self.duration, labels, hist)
            listener = labels[0]
            received[listener] = received.get(listener, 0) + hist.bytes_in
            sent[listener] = sent.get(listener, 0) + hist.bytes_out
        for listener, n in received.items():
            if n:
                self._child(self.received, (listener,)).inc(n)
        for listener, n in sent.items():
            if n:
                self._child(self.sent, (listener,)).inc(n)
        for endpoint, endpoint_tries in tries.items():
            labels = (endpoint_tries.cluster, endpoint.address)
            for outcome, n in endpoint_tries.outcomes.items():
                self._child(self.up_requests, (*labels, outcome)).inc(n)
            if endpoint_tries.sum or any(endpoint_tries.counts):
                self._observe(self.up_duration, labels, endpoint_tries)
        for cluster, n in retried.items():
            self._child(self.retries, (cluster,)).inc(n)
        for cluster, n in overflowed.items():
            self._child(self.overflows, (cluster,)).inc(n)
        for labels, hist in filters.items():
            self._observe(self.filter_duration, labels, hist)

    # -- the state gauges, sampled --

    def sample(self, app: Any) -> None:
        values: dict[str, dict[tuple, float]] = {key: {} for key in self.gauges}
        for listener in app.listeners:
            values["connections"][(listener.name,)] = listener.active
            values["active"][(listener.name,)] = listener.chain.active
            if listener.transport is not None:  # (the tls plugin also looks at its files then)
                for cert, when in listener.transport.expiry().items():
                    values["cert_expiry"][(listener.name, cert)] = when
        last = app.last_reload
        values["reload_ok"][()] = 0 if last is not None and not last["ok"] else 1
        store = app.config_store
        values["store_stale"][()] = store.stale_seconds() if store is not None else 0  # (always: rules read it)
        if store is not None:
            values["store_revision"][()] = store.good.revision if store.good is not None else 0
            values["store_connected"][()] = 1 if store.connected else 0
        now = time.monotonic()
        for name, cluster in app.clusters.items():
            breaker = cluster.breaker
            values["pool"][(name,)] = breaker.connections
            values["pending"][(name,)] = breaker.pending
            scores = getattr(cluster.balancer, "scores", None)
            scores = scores() if scores is not None else {}
            for endpoint in cluster.endpoints:
                labels = (name, endpoint.address)
                values["up_active"][labels] = endpoint.active
                values["healthy"][labels] = 1 if endpoint.healthy else 0
                values["ejected"][labels] = 1 if endpoint.ejected_until > now else 0
                if endpoint.address in scores:
                    values["ewma"][labels] = scores[endpoint.address]
        for key, gauge in self.gauges.items():
            now_set = values[key]
            for labels, value in now_set.items():
                self._child(gauge, labels).set(value)
            gone = self._sampled[key] - now_set.keys()
            for labels in gone:  # removed by a reload: nothing of it is open or in flight any more
                self._child(gauge, labels).set(0)
            self._sampled[key] = set(now_set)


def begin() -> None:
    """Start recording in this process (``run`` does; so does a benchmark without an app)."""
    global _recorder, _built, _running, timing
    if _built is None:
        _built = _Recorder()
    _recorder = _built
    _running += 1
    timing = True


def end() -> None:
    """Stop recording (once every ``begin`` has its ``end``), after a last flush."""
    global _recorder, _running, timing
    flush()
    _running -= 1
    if not _running:
        timing = False
        _recorder = None


async def run(app: Any) -> None:
    """Record for ``app`` while it runs (a task in its nursery): flush the sums and sample
    the gauges every ``FLUSH_INTERVAL``, and flush once more when cancelled."""
    import trio

    settings = getattr(app.config, "metrics", None)
    if settings is not None and not settings.enabled:
        return
    begin()
    recorder = _built
    try:
        while True:
            recorder.sample(app)
            recorder.flush()
            await trio.sleep(FLUSH_INTERVAL)
    finally:
        end()
