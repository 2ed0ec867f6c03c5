"""Every response flag the core or a built-in plugin sets, in one table.

A flag is a short code in ``ctx.flags`` saying how sluice answered (or cut)
an exchange when the upstream's answer is not the whole story. Filters read
them in ``on_complete`` (and in response phases, to tell a core-generated
reply from an upstream's); the access log writes them as ``flags``
(``%RESPONSE_FLAGS%``). Codes follow Envoy's where one exists.

This module is the one place they are written down: the plugin guide's
flags table (``plugins/README.md``) is checked against it, and a test scans
the source tree so a flag the code sets cannot be missing here. A
third-party filter may set its own codes (``LocalReply(flag=...)``); pick
ones not in this table.

``status`` is what the client typically gets; "cut" means the response had
already started, so the connection was closed instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["FLAGS", "Flag"]


@dataclass(frozen=True, slots=True)
class Flag:
    """One response flag: its code, what it means, who sets it, the status."""

    code: str
    meaning: str
    set_by: str
    status: str


_TABLE = (
    Flag("NR", "no route matched: no filter chose a cluster", "router, core", "404"),
    Flag("UH", "no healthy endpoint in the cluster", "core", "503"),
    Flag("UF", "upstream connect failure or connect timeout, on every endpoint tried", "core", "503"),
    Flag("UO", "cluster overflow: a circuit breaker's limit was reached", "core", "503"),
    Flag("UT", "upstream timeout: no response head in time, a stalled body, or it stopped reading",
         "core", "504, or cut"),
    Flag("UC", "upstream connection closed or reset", "core", "502, or cut"),
    Flag("UPE", "upstream protocol error: a malformed response, or a switch nobody offered",
         "core", "502, or cut"),
    Flag("UBL", "a buffered response body went over max_buffered_body_bytes", "core", "502"),
    Flag("LR", "a local reply: a filter's LocalReply, or the core's 413 for a body over the limit",
         "filters, core", "the reply's"),
    Flag("RL", "rate limited: a rate_limit filter's limit was reached (or, failing closed, its store was "
         "unreachable)", "rate_limit", "429 (503)"),
    Flag("FE", "a filter raised, returned a bad result, replied after the response started, or resized "
         "a body under its Content-Length",
         "core", "500, or cut"),
    Flag("DC", "the client disconnected mid-exchange", "core", "none"),
    Flag("DT", "the client timed out: its head (or TLS handshake) or its body stalled", "core, edge", "408"),
    Flag("DPE", "client protocol error: a bad head (400/414/431/501/505) or a bad body", "core, edge", "400"),
    Flag("DO", "refused: every connection slot had a request in flight", "edge", "503"),
    Flag("DTLS", "the TLS handshake failed (with DT: not done within header_read)", "edge", "none"),
    Flag("TLSP", "a TLS handshake on a plain listener", "edge", "none"),
    Flag("TI", "a tunnel (WebSocket) closed after tunnel_idle without a byte", "core", "101, then a close"),
    Flag("TM", "a tunnel (WebSocket) closed at tunnel_max", "core", "101, then a close"),
    Flag("RBAC", "refused by an rbac policy (or its default)", "rbac", "403"),
    Flag("UAEX", "refused by the external authorization service, or it failed while failing closed",
         "ext_authz", "the service's, or status_on_error"),
)

FLAGS: MappingProxyType[str, Flag] = MappingProxyType({flag.code: flag for flag in _TABLE})
