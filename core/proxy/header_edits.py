"""Header edits: ``{ remove = [...], set = {...}, add = {...} }`` tables,
validated once and applied per request.

A route has them (``request_headers``, ``response_headers``, applied by the
router) and so does a cluster (applied by the core once the cluster is
final: request edits before the head goes upstream, response edits before
the response filters run). Order within a table: remove, then set
(replaces), then add (appends).

Values may name variables, rendered per request: ``${client_ip}`` (the
client as trusted, ``ctx.client_ip``), ``${request_id}``, ``${route}`` (the
matched route's name, "" when none); ``$$`` is a ``$``. Names the framing
or the hop needs (Content-Length, Transfer-Encoding, Connection, ...; on a
request also Host) are the proxy's to set: a table touching one is a
config error.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from ..errors import ConfigError

__all__ = ["HeaderEdits", "HeaderOps", "TEMPLATE", "VARIABLES", "check_ops"]

VARIABLES = ("client_ip", "request_id", "route")
TEMPLATE = re.compile(r"\$\$|\$\{([^}]*)\}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Fields the framing or the hop needs; no table may add, set or remove them.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "upgrade", "te",
                     "trailer", "keep-alive", "proxy-connection"})


def _name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError("not a header name (a token)")
    return value


def _template(value: str) -> str:
    for m in TEMPLATE.finditer(value):
        if m.group(1) is not None and m.group(1) not in VARIABLES:
            raise ValueError(f"unknown variable ${{{m.group(1)}}}; known: "
                             + ", ".join(f"${{{v}}}" for v in VARIABLES))
    if re.search(r"[\x00\r\n]", value) or value != value.strip(" \t"):
        raise ValueError("a header value has no CR, LF, NUL, or leading or trailing whitespace")
    return value


_HeaderName = Annotated[str, AfterValidator(_name)]
_HeaderValue = Annotated[str, AfterValidator(_template)]


class HeaderOps(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    remove: list[_HeaderName] = []
    set: dict[_HeaderName, _HeaderValue] = {}
    add: dict[_HeaderName, _HeaderValue] = {}

    def touched(self) -> list[str]:
        return [n.lower() for n in (*self.remove, *self.set, *self.add)]


def check_ops(ops: HeaderOps | None, where: str, *, request: bool, host_hint: str = "") -> None:
    """Refuse a table that touches what the proxy sets (``where`` names it)."""
    if ops is None:
        return
    forbidden = FRAMING | {"host"} if request else FRAMING
    bad = [n for n in ops.touched() if n in forbidden]
    if bad:
        hint = host_hint if bad[0] == "host" else ""
        raise ConfigError(f"{where}: {bad[0]!r} is the proxy's to set{hint}")


def _variable(ctx: Any, name: str) -> str:
    if name == "client_ip":
        return ctx.client_ip
    if name == "request_id":
        return ctx.request_id
    route = ctx.matched_route
    return route.name if route is not None else ""


class _Template:
    """A header value with ``${variable}`` parts, rendered per request."""

    __slots__ = ("parts", "literal")

    def __init__(self, value: str) -> None:
        parts: list[tuple[bool, str]] = []  # (is_variable, text)
        pos = 0
        for m in TEMPLATE.finditer(value):
            parts.append((False, value[pos:m.start()]))
            parts.append((True, m.group(1)) if m.group(1) is not None else (False, "$"))
            pos = m.end()
        parts.append((False, value[pos:]))
        self.parts = [p for p in parts if p[0] or p[1]]
        self.literal = "".join(t for _, t in self.parts) if not any(v for v, _ in self.parts) else None

    def render(self, ctx: Any) -> str:
        if self.literal is not None:
            return self.literal
        return "".join(_variable(ctx, t) if v else t for v, t in self.parts)


class HeaderEdits:
    """One ``HeaderOps`` table, compiled: ``apply(headers, ctx)``."""

    __slots__ = ("remove", "set", "add")

    def __init__(self, ops: HeaderOps) -> None:
        self.remove = [n.lower() for n in ops.remove]
        self.set = [(n.lower(), _Template(v)) for n, v in ops.set.items()]
        self.add = [(n.lower(), _Template(v)) for n, v in ops.add.items()]

    @classmethod
    def of(cls, ops: HeaderOps | None) -> HeaderEdits | None:
        return None if ops is None else cls(ops)

    def apply(self, headers, ctx: Any) -> None:
        if self.remove:
            headers.remove(*self.remove)
        for name, value in self.set:
            headers.set(name, value.render(ctx))
        for name, value in self.add:
            headers.add(name, value.render(ctx))
