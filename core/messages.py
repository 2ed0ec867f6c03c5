"""Protocol-agnostic HTTP message heads: headers, requests, responses.

Header names are stored lower-cased as ``bytes`` and values as ``bytes``, the
form h11 and h2 hand us, so the hot path converts nothing. Filters may pass
``str`` or ``bytes``; ``str`` is encoded as latin-1 (RFC 9110 field values are
octets, latin-1 maps them one to one). Reads return ``str``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["Headers", "Request", "Response"]


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _field(name: str | bytes, value: str | bytes) -> tuple[bytes, bytes]:
    """A field a filter is adding, checked so it cannot inject a header or a line."""
    n, v = _b(name).lower(), _b(value)
    if not _TOKEN.fullmatch(n):
        raise ValueError(f"invalid header name {n!r}")
    if _BAD_VALUE.search(v):
        raise ValueError(f"invalid value for header {n.decode()!r}: CR, LF, NUL or edge whitespace")
    return n, v


class Headers:
    """An ordered multi-map of header fields.

    Order and repetition are preserved (they matter for Set-Cookie, Via, ...).
    Lookups are case-insensitive. Fields added here are checked (a token
    name, no CR/LF/NUL in the value), so a filter cannot split a message.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        self._fields: list[tuple[bytes, bytes]] = [_field(n, v) for n, v in fields]

    @classmethod
    def _trusted(cls, fields: list[tuple[bytes, bytes]]) -> Headers:
        """Wrap an already-normalised list (lower-case bytes names) without copying."""
        h = cls.__new__(cls)
        h._fields = fields
        return h

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        key = _b(name).lower()
        for n, v in self._fields:
            if n == key:
                return v.decode("latin-1")
        return default

    def get_all(self, name: str | bytes) -> list[str]:
        """Every value of ``name``, in order."""
        key = _b(name).lower()
        return [v.decode("latin-1") for n, v in self._fields if n == key]

    def get_raw(self, name: bytes) -> bytes | None:
        """The first value of a lower-case ``bytes`` name, undecoded (hot path)."""
        for n, v in self._fields:
            if n == name:
                return v
        return None

    def add(self, name: str | bytes, value: str | bytes) -> None:
        """Append a field, keeping any existing ones. ValueError if it is malformed."""
        self._fields.append(_field(name, value))

    def set(self, name: str | bytes, value: str | bytes) -> None:
        """Replace every field called ``name`` by one with ``value``. ValueError if malformed."""
        field = _field(name, value)
        self._fields = [(n, v) for n, v in self._fields if n != field[0]]
        self._fields.append(field)

    def remove(self, *names: str | bytes) -> None:
        """Drop every field with any of these names."""
        keys = {_b(n).lower() for n in names}
        self._fields = [(n, v) for n, v in self._fields if n not in keys]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        key = _b(name).lower()
        return any(n == key for n, _ in self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for n, v in self._fields:
            yield n.decode("latin-1"), v.decode("latin-1")

    def __len__(self) -> int:
        return len(self._fields)

    def raw(self) -> list[tuple[bytes, bytes]]:
        """The underlying list of ``(name, value)`` byte pairs (not a copy)."""
        return self._fields

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


@dataclass(slots=True)
class Request:
    """A request head. ``target`` is the request-target as sent (origin form)."""

    method: str
    target: str
    headers: Headers
    http_version: str = "1.1"
    scheme: str = "http"

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    @property
    def host(self) -> str:
        """The Host (or :authority) without port, lower-cased; '' when absent."""
        host = self.headers.get_raw(b"host") or b""
        h = host.decode("latin-1").lower()
        if h.startswith("["):  # IPv6 literal
            return h.split("]", 1)[0] + "]"
        return h.rsplit(":", 1)[0] if ":" in h else h


@dataclass(slots=True)
class Response:
    """A response head."""

    status: int
    headers: Headers = field(default_factory=Headers)
    reason: str = ""
    http_version: str = "1.1"
