"""The access log's field catalog, and the compiler that turns a chosen
format into a renderer once, at load.

Each ``Field`` says what it means, the Envoy format operator it answers to
(or, marked ``sluice``, the one sluice names where Envoy has none), what
kind of value it is, and how to read it from the context. ``compile_json``
and ``compile_text`` build, from the fields or the template, a list of small
callables, each closing over its field's pre-escaped JSON key or its
literal text, so a request pays for the fields chosen and nothing else:
no lookup by name, no format parsing, no dict built to be serialised.

What needs watching during the exchange, rather than reading at its end
(the request and response times, the bodies), is a field's ``capture``;
the access log filter runs the phases that capture only when a chosen
field needs them (``access_log.AccessLog.from_config``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from sluice import ConfigError

__all__ = ["CATALOG", "DEFAULT_FIELDS", "DEFAULT_TEMPLATE", "Capture", "Field", "build_catalog", "compile_json",
           "compile_text", "template_fields"]

Getter = Callable[[Any], Any]


class Capture:
    """What the capturing phases saw of one exchange (``ctx.state(access_log)``)."""

    __slots__ = ("request_done", "response_head", "request_body", "response_body", "request_more",
                 "response_more")

    def __init__(self) -> None:
        self.request_done: float | None = None  # seconds from the start: the request's last byte
        self.response_head: float | None = None  # ... the upstream's response head
        self.request_body = bytearray()
        self.response_body = bytearray()
        self.request_more = False  # the body went past the cap
        self.response_more = False


@dataclass(frozen=True)
class Field:
    name: str
    operator: str  # "%RESPONSE_CODE%"
    meaning: str
    kind: str  # str, int, ms (seconds rendered as ms), bool, list, map, body
    get: Getter
    envoy: bool = True  # the operator is Envoy's; False: sluice's own name
    capture: str | None = None  # "timing", "request_body", "response_body"
    optional: bool = False  # a JSON line leaves the key out when there is no value


def _iso(ts: float, _cache=[-1, ""]) -> str:  # noqa: B006 - the per-second prefix, formatted once
    second = int(ts)
    if second != _cache[0]:
        _cache[0], _cache[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_cache[1]}.{int((ts - second) * 1e6):06d}Z"


def _request_header(name: str) -> Getter:
    def get(ctx):
        request = ctx.request
        return request.headers.get(name) if request is not None else None
    return get


def _response_header(name: str) -> Getter:
    def get(ctx):
        response = ctx.response
        return response.headers.get(name) if response is not None else None
    return get


def _head_bytes(start_line: int, headers) -> int:
    """A head's size as HTTP/1.1 writes it (uncompressed, for HTTP/2):
    the start line, each field with its ": " and CRLF, the blank line."""
    return start_line + sum(len(n) + len(v) + 4 for n, v in headers.raw()) + 2


def _request_header_bytes(ctx):
    request = ctx.request
    if request is None:
        return None
    return _head_bytes(len(request.method) + len(request.target) + 12, request.headers)


def _response_header_bytes(ctx):
    response = ctx.response
    if response is None:
        return None
    return _head_bytes(15 + len(response.reason), response.headers)


def _url(ctx):
    request = ctx.request
    if request is None:
        return None
    host = request.headers.get("host")
    return f"{ctx.scheme}://{host}{request.target}" if host else request.target


_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2"}

# Flags that say the client did not get a whole answer, whatever its status.
_CUT_SHORT = frozenset({"DC", "DT", "DPE", "UC", "UPE", "DTLS", "TLSP"})


def _success(ctx):
    response = ctx.response
    return response is not None and response.status < 500 and not _CUT_SHORT.intersection(ctx.flags)


def _since_start(key: str) -> Getter:
    return lambda ctx: ctx.timings.get(key)


def _tx(state: Getter) -> Getter:
    def get(ctx):
        head = state(ctx).response_head
        return None if head is None else ctx.duration - head
    return get


def build_catalog(state: Getter, bodies: Callable[[str], Getter]) -> dict[str, Field]:
    """The catalog; ``state(ctx)`` is the exchange's ``Capture``, ``bodies(which)``
    renders a captured body (capped and redacted)."""
    fields = [
        # -- the connection -------------------------------------------------
        Field("client", "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%", "the peer's IP address", "str",
              lambda ctx: ctx.client[0]),
        Field("client_port", "%DOWNSTREAM_DIRECT_REMOTE_PORT%", "the peer's port", "int",
              lambda ctx: ctx.client[1]),
        Field("client_ip", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
              "the client's IP as trusted through X-Forwarded-For (``trust_forwarded``), else the peer's", "str",
              lambda ctx: ctx.client_ip),
        Field("remote_user", "%REMOTE_USER%", "who the auth filter let in (``ctx.vars['auth.user']``)", "str",
              lambda ctx: ctx.vars.get("auth.user"), envoy=False),
        Field("local_address", "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "the address the client reached", "str",
              lambda ctx: ctx.local[0] or None),
        Field("local_port", "%DOWNSTREAM_LOCAL_PORT%", "the port the client reached", "int",
              lambda ctx: ctx.local[1] or None),
        Field("listener", "%LISTENER%", "the listener's name", "str", lambda ctx: ctx.listener or None,
              envoy=False),
        # -- the exchange ---------------------------------------------------
        Field("time", "%TIME%", "when the line was made: the exchange's end (UTC, ISO 8601)", "str",
              lambda ctx: _iso(time.time()), envoy=False),
        Field("start_time", "%START_TIME%", "when the exchange started (UTC, ISO 8601)", "str",
              lambda ctx: _iso(time.time() - ctx.duration)),
        Field("duration_ms", "%DURATION%", "from the accept (or the previous response) to the end", "ms",
              lambda ctx: ctx.duration),
        Field("request_id", "%REQUEST_ID%", "x-request-id, kept or made (also ``%REQ(X-REQUEST-ID)%``)", "str",
              lambda ctx: ctx.request_id or None, envoy=False),
        Field("trace_id", "%TRACE_ID%", "the W3C trace id, kept from traceparent or started", "str",
              lambda ctx: ctx.trace_id or None),
        Field("status", "%RESPONSE_CODE%", "the status sent; null for a bare close", "int",
              lambda ctx: ctx.response.status if ctx.response is not None else None),
        Field("success", "%SUCCESS%", "a whole answer below 500 went out (no DC, DT, DPE, UC, UPE, DTLS, TLSP)",
              "bool", _success, envoy=False),
        Field("flags", "%RESPONSE_FLAGS%", "how sluice answered when it answered itself (the flag table)", "str",
              lambda ctx: ",".join(ctx.flags) or None),
        Field("method", "%REQ(:METHOD)%", "the request method", "str",
              lambda ctx: ctx.request.method if ctx.request is not None else None),
        Field("url", "%URL%", "scheme://host/target as the client asked", "str", _url, envoy=False),
        Field("path", "%REQ(:PATH)%", "the request target, with its query", "str",
              lambda ctx: ctx.request.target if ctx.request is not None else None),
        Field("host", "%REQ(:AUTHORITY)%", "Host (HTTP/2: :authority)", "str", _request_header("host")),
        Field("scheme", "%REQ(:SCHEME)%", "http or https, as the client spoke", "str", lambda ctx: ctx.scheme),
        Field("protocol", "%PROTOCOL%", "HTTP/1.0, HTTP/1.1 or HTTP/2", "str",
              lambda ctx: _PROTOCOLS.get(ctx.request.http_version) if ctx.request is not None else None),
        Field("user_agent", "%REQ(USER-AGENT)%", "User-Agent", "str", _request_header("user-agent")),
        Field("route", "%ROUTE_NAME%", "the route matched", "str",
              lambda ctx: (r.name or None) if (r := ctx.matched_route) else None),
        Field("upgraded", "%UPGRADED%", "the protocol a 101 switched to (only then)", "str",
              lambda ctx: ctx.upgraded, envoy=False, optional=True),
        # -- sizes ----------------------------------------------------------
        Field("request_header_bytes", "%REQUEST_HEADERS_BYTES%",
              "the request head as forwarded, in HTTP/1.1 form", "int", _request_header_bytes),
        Field("response_header_bytes", "%RESPONSE_HEADERS_BYTES%",
              "the response head as sent, in HTTP/1.1 form", "int", _response_header_bytes),
        Field("bytes_in", "%BYTES_RECEIVED%", "request body bytes (a tunnel: bytes from the client)", "int",
              lambda ctx: ctx.bytes_in),
        Field("bytes_out", "%BYTES_SENT%", "response body bytes (a tunnel: bytes to the client)", "int",
              lambda ctx: ctx.bytes_out),
        # -- the upstream ---------------------------------------------------
        Field("upstream", "%UPSTREAM_HOST%", "the endpoint that answered (or the last tried)", "str",
              lambda ctx: e.address if (e := ctx.endpoint) is not None else None),
        Field("cluster", "%UPSTREAM_CLUSTER%", "the cluster", "str",
              lambda ctx: c.name if (c := ctx.cluster) is not None else None),
        Field("attempts", "%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "endpoints tried (only past one)", "int",
              lambda ctx: len(ctx.tried) + 1 if ctx.tried else None, optional=True),
        Field("tried", "%UPSTREAM_TRIED%", "the endpoints whose try failed, in order (only when any)", "list",
              lambda ctx: [e.address for e in ctx.tried] if ctx.tried else None, envoy=False, optional=True),
        Field("upstream_connected_ms", "%UPSTREAM_CONNECTED%",
              "from the start until an upstream connection was ready (pooled or new)", "ms",
              _since_start("upstream_connected"), envoy=False),
        Field("request_ms", "%REQUEST_DURATION%", "from the start until the request's last byte arrived", "ms",
              lambda ctx: state(ctx).request_done, capture="timing"),
        Field("response_ms", "%RESPONSE_DURATION%", "from the start until the upstream's response head", "ms",
              lambda ctx: state(ctx).response_head, capture="timing"),
        Field("response_tx_ms", "%RESPONSE_TX_DURATION%",
              "from the upstream's response head until the end", "ms", _tx(state), capture="timing"),
        # -- bodies (capped and redacted: ``bodies``) ---------------------
        Field("request_body", "%REQUEST_BODY%", "the request body's first ``bodies.max_bytes``, redacted",
              "body", bodies("request"), envoy=False, capture="request_body"),
        Field("response_body", "%RESPONSE_BODY%", "the response body's first ``bodies.max_bytes``, redacted",
              "body", bodies("response"), envoy=False, capture="response_body"),
    ]
    return {f.name: f for f in fields}


# Today's line, so an existing log keeps its shape (plus the trace id).
DEFAULT_FIELDS = ("time", "client", "method", "path", "host", "status", "bytes_in", "bytes_out", "duration_ms",
                  "upstream", "route", "request_id", "trace_id", "user_agent", "flags", "upgraded", "attempts",
                  "tried")

# Envoy's default text format.
DEFAULT_TEMPLATE = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
                    '%BYTES_RECEIVED% %BYTES_SENT% %DURATION% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
                    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"')

# The catalog as documentation: built with stand-in getters, never rendered.
CATALOG = build_catalog(lambda ctx: None, lambda which: lambda ctx: None)


# -- encoders: a value of each kind as JSON, and as template text ---------------

def _ms(seconds: float) -> str:
    return repr(round(seconds * 1000, 3))


_JSON: dict[str, Callable[[Any], str]] = {
    "str": _quote,
    "body": _quote,
    "int": str,
    "ms": _ms,
    "bool": lambda v: "true" if v else "false",
    "list": lambda v: "[" + ", ".join(_quote(x) for x in v) + "]",
    "map": lambda v: "{" + ", ".join(_quote(k) + ": " + ("null" if x is None else _quote(x))
                                     for k, x in v.items()) + "}",
}
_TEXT: dict[str, Callable[[Any], str]] = {
    "str": str,
    "body": _quote,  # a body may hold anything, a newline too: always escaped and quoted
    "int": str,
    "ms": _ms,
    "bool": lambda v: "true" if v else "false",
    "list": ",".join,
}


def _json_part(key: str, field: Field) -> Callable[[Any], str]:
    get, enc = field.get, _JSON[field.kind]
    prefix = ", " + _quote(key) + ": "
    if field.optional:
        def part(ctx):
            v = get(ctx)
            return "" if v is None else prefix + enc(v)
    elif field.kind in ("str", "body"):  # the common case, without a second call
        def part(ctx):
            v = get(ctx)
            return prefix + ("null" if v is None else _quote(v))
    else:
        null = prefix + "null"

        def part(ctx):
            v = get(ctx)
            return null if v is None else prefix + enc(v)
    return part


def _unknown(where: str, what: str, known: Iterable[str]) -> ConfigError:
    return ConfigError(f"filters.access_log.{where}: unknown {what}; known: {', '.join(known)}")


def compile_json(names: Iterable[str], catalog: dict[str, Field], request_headers: list[str],
                 response_headers: list[str]) -> Callable[[Any], str]:
    """A renderer of one JSON object (no newline) with the fields ``names``,
    in that order. ``request_headers``/``response_headers``: the headers a
    ``request_headers``/``response_headers`` field holds, as an object."""
    parts = []
    for i, name in enumerate(names):
        if name == "request_headers":
            parts.append(_json_part(name, Field(name, "", "", "map", _headers(request_headers, "request"))))
        elif name == "response_headers":
            parts.append(_json_part(name, Field(name, "", "", "map", _headers(response_headers, "response"))))
        elif name in catalog:
            parts.append(_json_part(name, catalog[name]))
        else:
            raise _unknown(f"fields[{i}]", f"field {name!r}", [*catalog, "request_headers", "response_headers"])

    def render(ctx) -> str:
        return "{" + "".join([part(ctx) for part in parts])[2:] + "}"

    return render


def _headers(names: list[str], side: str) -> Getter:
    def get(ctx):
        message = ctx.request if side == "request" else ctx.response
        if message is None:
            return None
        headers = message.headers
        return {name: headers.get(name) for name in names}
    return get


# %NAME%, %NAME(ARG)%, either with :N (a length cap), as Envoy writes them.
_OPERATOR = re.compile(r"%([A-Z_0-9]+)(?:\(([^()%]*)\))?(?::(\d+))?%")
_PSEUDO = {":METHOD": "method", ":PATH": "path", ":AUTHORITY": "host", ":SCHEME": "scheme"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _operator(match: re.Match, catalog: dict[str, Field], by_operator: dict[str, Field]) -> Field:
    """The field an operator reads; ConfigError when there is none."""
    name, arg, _ = match.groups()
    if name in ("REQ", "RESP") and arg is not None:
        if name == "REQ" and arg.upper() in _PSEUDO:
            return catalog[_PSEUDO[arg.upper()]]
        if not _TOKEN.fullmatch(arg):
            raise ConfigError(f"filters.access_log.template: {match[0]} does not name a header field")
        get = _request_header(arg.lower()) if name == "REQ" else _response_header(arg.lower())
        return Field(arg.lower(), match[0], "", "str", get)
    field = by_operator.get(f"%{name}%") if arg is None else None
    if field is None:
        known = sorted({*by_operator, "%REQ(HEADER)%", "%RESP(HEADER)%"})
        raise _unknown("template", f"operator {match[0]}", known)
    return field


def template_fields(template: str, catalog: dict[str, Field]) -> list[Field]:
    """The fields a template reads (ConfigError for an unknown operator)."""
    by_operator = {f.operator: f for f in catalog.values()}
    return [_operator(m, catalog, by_operator) for m in _OPERATOR.finditer(template)]


def compile_text(template: str, catalog: dict[str, Field]) -> Callable[[Any], str]:
    """A renderer of ``template`` (one line, no newline): literal text as
    written, each operator its value, ``-`` when there is none (as Envoy)."""
    by_operator = {f.operator: f for f in catalog.values()}
    parts: list[Any] = []
    at = 0
    for m in _OPERATOR.finditer(template):
        if m.start() > at:
            parts.append(template[at:m.start()])
        field = _operator(m, catalog, by_operator)
        parts.append(_text_part(field, int(m[3]) if m[3] else None))
        at = m.end()
    if at < len(template):
        parts.append(template[at:])
    if any(c in template for c in "\r\n"):
        raise ConfigError("filters.access_log.template: one line, without CR or LF")
    literal = [p if isinstance(p, str) else None for p in parts]
    calls = [(i, p) for i, p in enumerate(parts) if not isinstance(p, str)]

    def render(ctx) -> str:
        out = literal.copy()
        for i, part in calls:
            out[i] = part(ctx)
        return "".join(out)

    return render


def _text_part(field: Field, cap: int | None) -> Callable[[Any], str]:
    get, enc = field.get, _TEXT.get(field.kind, str)

    def part(ctx):
        v = get(ctx)
        if v is None:
            return "-"
        text = enc(v)
        return text[:cap] if cap is not None else text
    return part
