"""``sluice.plugins.etcd``: an etcd v3 client on trio, for discovery, self-registration and config.

Why etcd's own v3 JSON gateway over httpx, and not a Python etcd client
----------------------------------------------------------------------

The maintained Python clients speak gRPC: ``etcd3`` (python-etcd3) is blocking, runs its
watches on grpcio's threads, and has had no release since 2020; ``aetcd`` and
``etcd3-py``'s async mode run on asyncio (``grpc.aio``), which cannot run inside a trio
program. On trio they would all be used from worker threads, with grpcio's own thread pool
and cancellation rules on the other side of the bridge.

etcd serves the same API as JSON (grpc-gateway, ``/v3/...``) on its client port, since 3.3
and in every 3.4/3.5 server. httpx runs on trio natively (through anyio and sniffio: it is
the client sluice's tests already use), so a request is a trio call that a cancel scope
bounds and cancels cleanly, with no thread. What we need is small and the gateway has all of
it: ``/v3/kv/range`` with a range end for a prefix (and the revision it was read at),
``/v3/kv/put`` and ``/v3/kv/deleterange``, ``/v3/watch`` as a streaming POST of
newline-delimited results (with ``start_revision``, and ``compact_revision`` when that is
gone), ``/v3/lease/grant``, ``/v3/lease/keepalive`` (one answer per request through the
gateway) and ``/v3/lease/revoke``. The costs, accepted: JSON and base64 instead of protobuf
(a registry moves little data), one HTTP/1.1 connection per watch (a proxy watches a
handful of prefixes), and the gateway's encoding rules, kept in ``codec.py``.

The public names::

    async with EtcdClient("http://127.0.0.1:2379", timeout=5) as etcd:
        # https: EtcdClient("https://etcd:2379", tls=tls_context(ca, cert, key)) (mutual TLS)
        revision, kvs = await etcd.get_prefix("/services/api/")
        async with etcd.watch_prefix("/services/api/", start_revision=revision + 1,
                                     check_interval=1) as updates:  # a hung member: Disconnected
            async for update in updates:          # Events | Resync | Disconnected | Reconnected
                ...
        async with etcd.mirror_prefix("/services/api/") as states:
            async for state in states:            # PrefixState: every key, after each change
                ...
        async with etcd.lease(ttl=10) as lease:   # kept alive, revoked at the end
            await etcd.put("/services/api/me", b"{...}", lease=lease.id)
"""

from __future__ import annotations

from .client import EtcdClient, Lease, TlsFileError, tls_context, tls_for, tls_hint
from .codec import KeyValue
from .errors import EtcdCompacted, EtcdError, EtcdRequestError, EtcdUnavailable, LeaseExpired
from .mirror import PrefixState
from .watch import Disconnected, Event, Events, Reconnected, Resync

__all__ = [
    "Disconnected", "EtcdClient", "EtcdCompacted", "EtcdError", "EtcdRequestError", "EtcdUnavailable", "Event",
    "Events", "KeyValue", "Lease", "LeaseExpired", "PrefixState", "Reconnected", "Resync", "TlsFileError",
    "tls_context", "tls_for", "tls_hint",
]
