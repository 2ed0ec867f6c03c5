"""Prometheus metrics (``sluice.metrics``): real ``sluice run`` processes with
``--workers 2``, real origins and clients, the exposition parsed with
prometheus_client's own parser; and, in-process, the plugin API, per-filter
time on the context, and circuit-breaker overflows."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sluice import Filter, metrics
from sluice.testing import serve

from .conftest import InProcess, config, raw_request
from .origin import Reply
from .proc import Running, ThreadOrigin, children, free_port
from .test_admin import admin_url

BODY = b"hello"
PLUGINS = ["router", "balancer", "access_log"]


def write_config(path: Path, origin: str, *, route: str = "all", extra: str = "") -> Path:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    path.write_text(textwrap.dedent(f"""
        [server]
        drain_timeout = 5
        {extra}

        [[listeners]]
        name = "public"
        address = "127.0.0.1:0"
        filters = ["access_log", "router"]

        [filters.access_log]
        path = "/dev/null"

        [clusters.app]
        endpoints = ["{origin}"]

        [clusters.dead]
        endpoints = ["{dead}"]

        [clusters.mixed]
        endpoints = ["{dead}", "{origin}"]

        [[routes]]
        name = "dead"
        match = {{ prefix = "/dead" }}
        cluster = "dead"

        [[routes]]
        name = "mixed"
        match = {{ prefix = "/mixed" }}
        cluster = "mixed"

        [[routes]]
        name = "{route}"
        match = {{ prefix = "/" }}
        cluster = "app"
    """))
    return path


def scrape(directory: Path) -> tuple[str, list]:
    """What ``sluice.metrics.render()`` serves, read from the workers' directory as it does."""
    registry = CollectorRegistry()
    registry.register(metrics._Files(str(directory)))
    text = generate_latest(registry).decode()
    return text, [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(directory: Path, predicate, timeout: float = 10.0) -> tuple[str, list]:
    """Scrape until ``predicate(samples)`` (each worker flushes once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        text, samples = scrape(directory)
        if predicate(samples):
            return text, samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never got there:\n{text}")
        time.sleep(0.1)


def get(url: str) -> httpx.Response:
    with httpx.Client() as client:  # a new connection each: the kernel spreads them over workers
        return client.get(url)


@pytest.fixture
def origin():
    served = ThreadOrigin(body=BODY)
    yield served
    served.close()


def run(tmp_path: Path, origin: ThreadOrigin, **options) -> tuple[Running, Path]:
    directory = tmp_path / "prom"
    directory.mkdir()
    path = write_config(tmp_path / "sluice.toml", origin.address, **options)
    proxy = Running("-c", str(path), "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    return proxy, directory


def test_every_workers_requests_add_up_by_bounded_labels(tmp_path, origin):
    proxy, directory = run(tmp_path, origin)
    with proxy:
        for i in range(40):
            assert get(f"{proxy.url}/unknown/{i}?q={i}").content == BODY
        for _ in range(6):
            assert get(f"{proxy.url}/dead/x").status_code == 503
        for _ in range(4):
            assert get(f"{proxy.url}/mixed/x").content == BODY
        text, samples = wait_for(directory, lambda s: total(
            s, "sluice_downstream_requests_total") == 50)
        pids = {name.rsplit("_", 1)[1] for name in os.listdir(directory) if name.startswith("counter_")}
        assert len(pids) == 2  # both workers record into the one directory

    requests = "sluice_downstream_requests_total"
    assert total(samples, requests, listener="public", route="all", status_class="2xx") == 40
    assert total(samples, requests, route="dead", status_class="5xx") == 6
    assert total(samples, requests, route="mixed", status_class="2xx") == 4
    assert total(samples, "sluice_downstream_request_duration_seconds_count", route="all") == 40
    assert total(samples, "sluice_downstream_request_duration_seconds_bucket", route="all", le="+Inf") == 40
    assert "/unknown" not in text and "q=" not in text  # a path never becomes a label
    assert {s.labels.get("route") for s in samples if s.name == requests} == {"all", "dead", "mixed"}
    # 44 bodies from the origin, six local "service unavailable\n"
    assert total(samples, "sluice_downstream_sent_bytes_total", listener="public") == 44 * 5 + 6 * 20

    upstream = "sluice_upstream_requests_total"
    assert total(samples, upstream, cluster="app", outcome="success") == 40
    assert total(samples, upstream, cluster="dead", outcome="connect_failure") == 6
    # mixed lists the dead endpoint first: each worker's first try fails over once, then it is ejected
    failovers = total(samples, upstream, cluster="mixed", outcome="connect_failure")
    assert 1 <= failovers <= 2
    assert total(samples, "sluice_upstream_retries_total", cluster="mixed") == failovers
    assert total(samples, upstream, cluster="mixed", outcome="success") == 4
    assert total(samples, "sluice_upstream_request_duration_seconds_count", cluster="app") == 40

    # every request went through the router's request headers and the access log's on_complete
    phases = "sluice_filter_duration_seconds_count"
    assert total(samples, phases, filter="router", phase="request_headers") == 50
    assert total(samples, phases, filter="access_log", phase="complete") == 50
    assert total(samples, "sluice_filter_duration_seconds_sum", filter="router") > 0

    assert total(samples, "sluice_upstream_endpoint_healthy", cluster="app") == 1  # livemin over workers
    assert total(samples, "sluice_upstream_endpoint_ejected", cluster="dead") >= 1
    # (sampled once a second: a connection the client just closed may still count)
    assert any(s.name == "sluice_downstream_connections_active" for s in samples)


def test_a_killed_worker_keeps_its_counts_and_drops_its_gauges(tmp_path, origin):
    proxy, directory = run(tmp_path, origin)
    with proxy:
        for _ in range(20):
            assert get(proxy.url + "/").content == BODY
        wait_for(directory, lambda s: total(s, "sluice_downstream_requests_total") == 20)
        workers = children(proxy.pid)
        assert len(workers) == 2
        victim = workers[0]
        assert (directory / f"gauge_livesum_{victim}.db").exists()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not (len(now := children(proxy.pid)) == 2 and victim not in now):
            assert time.monotonic() < deadline, "the master did not replace the worker"
            time.sleep(0.05)
        assert not (directory / f"gauge_livesum_{victim}.db").exists()  # mark_process_dead
        for _ in range(10):
            assert get(proxy.url + "/").content == BODY
        wait_for(directory, lambda s: total(s, "sluice_downstream_requests_total") == 30)


def test_a_scrape_during_a_reload_stays_consistent(tmp_path, origin):
    proxy, directory = run(tmp_path, origin, route="before")
    answered = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            answered.append(get(proxy.url + "/").status_code)

    with proxy:
        thread = threading.Thread(target=load)
        thread.start()
        try:
            previous: dict = {}
            reloaded = False
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if not reloaded and time.monotonic() > deadline - 2.5:
                    write_config(tmp_path / "sluice.toml", origin.address, route="after")
                    proxy.signal(signal.SIGHUP)
                    reloaded = True
                _, samples = scrape(directory)  # parses, every time
                for s in samples:
                    if s.name.endswith("_total") or s.name.endswith("_count"):
                        key = (s.name, tuple(sorted(s.labels.items())))
                        assert s.value >= previous.get(key, 0), key  # a counter never goes back
                        previous[key] = s.value
        finally:
            stop.set()
            thread.join()
        assert answered and set(answered) == {200}, answered
        wait_for(directory, lambda s: total(s, "sluice_downstream_requests_total") == len(answered)
                 and total(s, "sluice_downstream_requests_total", route="after") > 0)


def test_metrics_off_record_nothing(tmp_path, origin):
    proxy, directory = run(tmp_path, origin, extra="[metrics]\nenabled = false")
    with proxy:
        for _ in range(5):
            assert get(proxy.url + "/").content == BODY
        time.sleep(1.5)  # (two flush intervals: what would have been flushed, was)
        text, samples = scrape(directory)
    assert total(samples, "sluice_downstream_requests_total") == 0
    assert "sluice_filter_duration_seconds" not in text


def test_one_worker_serves_its_metrics_through_the_admin_listener(tmp_path, origin):
    """--workers 1 takes the same path (a directory sluice makes itself), scraped as operators do."""
    path = write_config(tmp_path / "sluice.toml", origin.address,
                        extra='[admin]\nenabled = true\naddress = "127.0.0.1:0"')
    path.write_text(path.read_text().replace('[clusters.app]\n', '[clusters.app]\npolicy = "ewma"\n'))
    with Running("-c", str(path), "--workers", "1") as proxy:
        admin = admin_url(proxy)
        for _ in range(12):
            assert get(proxy.url + "/").content == BODY
        deadline = time.monotonic() + 10
        while True:
            response = httpx.get(f"{admin}/metrics")
            samples = [s for f in text_string_to_metric_families(response.text) for s in f.samples]
            # (gauges are sampled once a second: the score may lag the counts by one tick)
            if total(samples, "sluice_downstream_requests_total", route="all") == 12 \
                    and total(samples, "sluice_upstream_endpoint_ewma_seconds", cluster="app") > 0:
                break
            assert time.monotonic() < deadline, response.text
            time.sleep(0.1)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 0 < total(samples, "sluice_upstream_endpoint_ewma_seconds", cluster="app") < 1  # Balancer.scores()
    assert total(samples, "sluice_filter_duration_seconds_count", filter="router") == 12


# -- in-process: the plugin API and what a filter sees --------------------------------------------


def exposition() -> list:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


class Counting(Filter):
    """A plugin's filter with its own metric, and a look at its own cost."""

    name = "counting"
    seen: list = []

    def __init__(self, config) -> None:
        super().__init__(config)
        self.hits = metrics.counter("test_counting_hits", "Requests the test filter saw", labels=["method"])

    async def on_request_headers(self, ctx, request):
        self.hits.labels(request.method).inc()

    async def on_complete(self, ctx):
        Counting.seen.append(dict(ctx.filter_time or {}))


async def test_a_plugin_registers_its_own_metrics_under_the_plugin_prefix(start_origin):
    origin = await start_origin()
    Counting.seen = []
    cfg = config(origin.address, filters=["counting", "router"])
    async with serve(cfg, plugins=PLUGINS, extra={"t": InProcess(Counting)}) as proxy:
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await client.get(proxy.url + "/")).status_code == 200
    samples = exposition()
    assert total(samples, "sluice_plugin_test_counting_hits_total", method="GET") == 3
    # each request's on_complete saw its own filters' time so far, by (filter, phase)
    assert len(Counting.seen) == 3
    for spent in Counting.seen:
        assert spent.keys() == {("counting", "request_headers"), ("router", "request_headers")}
        assert all(0 < seconds < 1 for seconds in spent.values())


def test_plugin_metric_names_are_checked():
    hits = metrics.counter("test_names_total", "x")
    assert metrics.counter("sluice_plugin_test_names", "x") is hits  # the same metric, asked again
    with pytest.raises(ValueError, match="prefix of sluice's own"):
        metrics.counter("sluice_requests", "x")
    with pytest.raises(ValueError, match="already a counter"):
        metrics.gauge("test_names", "x")
    with pytest.raises(ValueError, match="letters, digits"):
        metrics.histogram("bad-name", "x")
    level = metrics.gauge("test_names_level", "x", mode="livemax")
    level.set(2)
    seconds = metrics.histogram("test_names_seconds", "x", buckets=(0.1, 1.0))
    seconds.observe(0.5)
    samples = exposition()
    assert total(samples, "sluice_plugin_test_names_level") == 2
    assert total(samples, "sluice_plugin_test_names_seconds_bucket", le="1.0") == 1


async def _slow(request, body):
    await trio.sleep(0.5)
    return Reply(200, [], b"slow")


async def test_circuit_breaker_overflows_are_counted_by_cluster(start_origin):
    origin = await start_origin(_slow)
    before = total(exposition(), "sluice_upstream_overflows_total", cluster="backend")
    cfg = config(origin.address, cluster={"circuit_breakers": {"max_requests": 1}})
    async with serve(cfg, plugins=PLUGINS) as proxy:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=3)) as client:
            statuses = []

            async def one() -> None:
                statuses.append((await client.get(proxy.url + "/")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
        assert sorted(statuses) == [200, 503, 503]
        assert total(exposition(), "sluice_upstream_overflows_total", cluster="backend") == before + 2


async def test_a_refused_head_is_counted_without_any_on_complete(start_origin):
    origin = await start_origin()
    labels = {"route": "", "status_class": "4xx"}
    before = total(exposition(), "sluice_downstream_requests_total", **labels)
    async with serve(config(origin.address, filters=["router"]), plugins=PLUGINS) as proxy:
        answer = await raw_request(proxy.address, b"GET / HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        samples = exposition()
    assert total(samples, "sluice_downstream_requests_total", **labels) == before + 1
