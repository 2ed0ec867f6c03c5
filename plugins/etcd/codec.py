"""The v3 JSON gateway's encoding: bytes as base64, int64 as strings, zero values omitted.

The gateway is grpc-gateway over etcd's protobuf API, so every ``bytes`` field (keys,
values) travels base64-encoded, every int64 (revisions, lease IDs, TTLs) as a decimal
string, and a field at its zero value is left out (a PUT event has no ``type``; an empty
range has no ``kvs``). These helpers are the only place that knows it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

__all__ = ["KeyValue", "b64", "from_b64", "integer", "key_value", "prefix_end", "revision_of"]


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def from_b64(text: str | None) -> bytes:
    return base64.b64decode(text, validate=True) if text else b""  # binascii.Error is a ValueError


def integer(value: str | int | None) -> int:
    return int(value) if value else 0


def prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's rule: last byte + 1).

    Trailing 0xff bytes cannot be incremented and are dropped; an empty result (all 0xff)
    is etcd's "\\0", meaning "to the end of the keyspace".
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it. ``lease`` is 0 when the key has none."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


def key_value(kv: dict) -> KeyValue:
    return KeyValue(key=from_b64(kv.get("key")), value=from_b64(kv.get("value")),
                    create_revision=integer(kv.get("create_revision")),
                    mod_revision=integer(kv.get("mod_revision")),
                    version=integer(kv.get("version")), lease=integer(kv.get("lease")))


def revision_of(answer: dict) -> int:
    """The store's revision in an answer's header."""
    return integer(answer.get("header", {}).get("revision"))
