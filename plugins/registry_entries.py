"""A registry's endpoint entries (JSON) as ``EndpointSpec``s: the schema the etcd and
ZooKeeper discovery sources share, so an instance registers itself the same way in either.

One entry (an etcd key's value, a znode's data) is one endpoint::

    {"address": "10.0.0.5:8080", "weight": 1, "zone": "eu-1", "metadata": {"version": "2.3"}}
    {"host": "10.0.0.5", "port": 8080}

``address`` (``"host:port"``, ``"[::1]:8080"`` for IPv6), or ``host`` and ``port``, is
required; ``weight`` (1-1000, default 1), ``zone`` (a string) and ``metadata`` (an object)
are optional. Other fields are ignored, so a registrar may add its own.

An entry that is not that (garbage JSON, a bad field) is skipped and logged as ``discovery
entry skipped`` naming its key, once per value: it never takes the other endpoints with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import structlog

from sluice.upstream.discovery import EndpointSpec

__all__ = ["Entries", "endpoint_of"]

log = structlog.get_logger("sluice.discovery")


def endpoint_of(data: bytes) -> EndpointSpec:
    """The endpoint one entry describes; ValueError saying what is wrong with it."""
    try:
        entry = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"a JSON {type(entry).__name__}, not an object")
    weight = entry.get("weight", 1)
    zone = entry.get("zone")
    metadata = entry.get("metadata", {})
    if isinstance(weight, bool):  # JSON true is not a weight of 1
        raise ValueError(f"weight {weight!r}: not an integer")
    if zone is not None and not isinstance(zone, str):
        raise ValueError(f"zone {zone!r}: not a string")
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata {metadata!r}: not an object")
    options = {"weight": weight, "zone": zone, "metadata": metadata}
    if "address" in entry:
        if "host" in entry or "port" in entry:
            raise ValueError("both address and host/port: give one")
        if not isinstance(entry["address"], str):
            raise ValueError(f"address {entry['address']!r}: not a 'host:port' string")
        return EndpointSpec.of(entry["address"], **options)
    if "host" not in entry or "port" not in entry:
        raise ValueError("no address (or host and port)")
    if isinstance(entry["port"], bool):
        raise ValueError(f"port {entry['port']!r}: not a port")
    return EndpointSpec(entry["host"], entry["port"], **options)


class Entries:
    """Turns a registry's whole listing into endpoints, skipping (and naming) bad entries.

    A bad entry is logged the first time its value is seen, not at every change of the others.
    """

    def __init__(self, cluster: str, source: str) -> None:
        self.cluster = cluster
        self.source = source
        self._reported: dict[str, bytes] = {}  # key -> the bad value already logged

    def endpoints(self, entries: Iterable[tuple[str, bytes]]) -> list[EndpointSpec]:
        out: list[EndpointSpec] = []
        bad: dict[str, bytes] = {}
        for key, data in entries:
            try:
                out.append(endpoint_of(data))
            except ValueError as exc:
                bad[key] = data
                if self._reported.get(key) != data:
                    log.error("discovery entry skipped", cluster=self.cluster, source=self.source, key=key,
                              error=str(exc))
        self._reported = bad
        return out
