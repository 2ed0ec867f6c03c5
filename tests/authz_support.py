"""What the rbac and ext_authz tests share: a scripted authorization service, in a trio task or
(for the contract battery, whose config is made at collection) in a thread of its own, and a
plugin counter read the way the admin listener's /metrics serves it."""

from __future__ import annotations

import atexit
import threading
import time

import trio
from prometheus_client.parser import text_string_to_metric_families

from sluice import metrics
from sluice.testing import Origin, Reply

ALLOWED_USER = "alice"


def authz_service() -> Origin:
    """The service's answers, by the check's path (``path_prefix = "/authz"``):
    ``/authz/deny...`` 401 with a challenge, ``/authz/hang...`` never, ``/authz/fail...`` 500,
    anything else 200 naming the user in ``x-user`` (and ``x-other``, which is not allowed)."""
    service = Origin(Reply(200, headers=[("x-user", ALLOWED_USER), ("x-other", "no")], body=b""))
    service.script("/authz/deny*", Reply(401, headers=[("www-authenticate", 'Bearer realm="authz"'),
                                                       ("x-deny-reason", "no-ticket"), ("content-type", "text/plain")],
                                         body=b"no ticket, no entry\n"))
    service.script("/authz/hang*", Reply(hang=True))
    service.script("/authz/fail*", Reply(500, body=b"oops\n"))
    return service


def service_in_a_thread() -> str:
    """``authz_service()`` on its own trio loop in a daemon thread, stopped at exit; its address."""
    service = authz_service()
    token: list[trio.lowlevel.TrioToken] = []

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        await service.serve()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True, name="authz-service")
    thread.start()
    deadline = time.monotonic() + 10
    while not (token and service.port):
        if time.monotonic() > deadline:
            raise RuntimeError("the authorization service did not start within 10 s")
        time.sleep(0.005)

    def stop() -> None:
        trio.from_thread.run_sync(service.close, trio_token=token[0])
        thread.join(5)

    atexit.register(stop)
    return service.address


def plugin_counts(metric: str, *labels: str) -> dict[tuple[str, ...], float]:
    """``sluice_plugin_<metric>_total`` by the values of ``labels``, as ``metrics.render()`` has it."""
    text = metrics.render()[0].decode()
    return {tuple(s.labels[k] for k in labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == f"sluice_plugin_{metric}_total"}


def counted(before: dict, after: dict) -> dict:
    """What changed between two ``plugin_counts``."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
