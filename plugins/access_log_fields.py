"""The access log's field catalog, and the compiler that turns a chosen
format into a renderer once, at load.

Each ``Field`` says what it means, the Envoy format operator it answers to
(or, marked ``sluice``, the one sluice names where Envoy has none), what
kind of value it is, and how to read it from the context. ``compile_json``
and ``compile_text`` build, from the fields or the template, one function
that joins pre-escaped keys (or the template's literal text) with each
field's value, encoded inline: a request pays for the fields chosen and
nothing else, with no lookup by name, no format parsing, and no dict built
to be serialised. A field is read by a Python expression over ``ctx``
(``req``, ``resp``: its request and response) written in this module, or by
a getter when it takes more than an expression; the function is generated
once, at load, from those expressions, because a call per field (a closure,
then its getter) cost the default line 4.5 us more than this (11 against
6.5 us, ``benchmarks/exchange_cost.py``). Nothing from the config is ever
part of the generated source: header names and keys are passed in as
constants.

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
from itertools import chain
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from sluice import ConfigError
from sluice.secrets import REDACTED

__all__ = ["CATALOG", "DEFAULT_FIELDS", "DEFAULT_TEMPLATE", "FIELD_NAME", "Capture", "Field", "build_catalog",
           "compile_json", "compile_text", "template_fields"]

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
    kind: str  # str, int, ms (seconds rendered as ms), bool, list, map, body, times ({(filter, phase): s})
    get: str | Getter  # an expression over ctx, req and resp; or a getter of ctx
    envoy: bool = True  # the operator is Envoy's; False: sluice's own name
    capture: str | None = None  # "timing", "request_body", "response_body"
    optional: bool = False  # a JSON line leaves the key out when there is no value


def _iso(ts: float, _cache=[-1, ""]) -> str:  # noqa: B006 - the per-second prefix, formatted once
    second = int(ts)
    if second != _cache[0]:
        _cache[0], _cache[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_cache[1]}.{int((ts - second) * 1e6):06d}Z"


# Headers that carry credentials: logged as REDACTED when present, whatever the
# template or ``request_headers`` names (a log is read by more people than the
# credentials were given to). x-api-key is the api_key filter's default header.
SECRET_REQUEST_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
SECRET_RESPONSE_HEADERS = frozenset({"set-cookie"})


def _request_header(name: str) -> Getter:
    secret = name in SECRET_REQUEST_HEADERS

    def get(ctx):
        request = ctx.request
        value = request.headers.get(name) if request is not None else None
        return REDACTED if secret and value is not None else value
    return get


def _response_header(name: str) -> Getter:
    secret = name in SECRET_RESPONSE_HEADERS

    def get(ctx):
        response = ctx.response
        value = response.headers.get(name) if response is not None else None
        return REDACTED if secret and value is not None else value
    return get


def _head_bytes(start_line: int, headers) -> int:
    """A head's size as HTTP/1.1 writes it (uncompressed, for HTTP/2):
    the start line, each field with its ": " and CRLF, the blank line."""
    fields = headers.raw()
    return start_line + sum(map(len, chain.from_iterable(fields))) + 4 * len(fields) + 2


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


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

# Flags that say the client did not get a whole answer, whatever its status.
_CUT_SHORT = frozenset({"DC", "DT", "DPE", "UC", "UPE", "DTLS", "TLSP"})


def _success(ctx):
    response = ctx.response
    return response is not None and response.status < 500 and not _CUT_SHORT.intersection(ctx.flags)


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
              "ctx.client[0]"),
        Field("client_port", "%DOWNSTREAM_DIRECT_REMOTE_PORT%", "the peer's port", "int", "ctx.client[1]"),
        Field("client_ip", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
              "the client's IP as trusted through X-Forwarded-For (``trust_forwarded``), else the peer's", "str",
              "ctx.client_ip"),
        Field("remote_user", "%REMOTE_USER%", "who the auth filter let in (``ctx.vars['auth.user']``)", "str",
              "ctx.vars.get('auth.user')", envoy=False),
        Field("local_address", "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "the address the client reached", "str",
              "ctx.local[0] or None"),
        Field("local_port", "%DOWNSTREAM_LOCAL_PORT%", "the port the client reached", "int",
              "ctx.local[1] or None"),
        Field("listener", "%LISTENER%", "the listener's name", "str", "ctx.listener or None", envoy=False),
        # -- the exchange ---------------------------------------------------
        Field("time", "%TIME%", "when the line was made: the exchange's end (UTC, ISO 8601)", "str",
              "_iso(_now())", envoy=False),
        Field("start_time", "%START_TIME%", "when the exchange started (UTC, ISO 8601)", "str",
              "_iso(_now() - ctx.duration)"),
        Field("duration_ms", "%DURATION%", "from the accept (or the previous response) to the end", "ms",
              "ctx.duration"),
        Field("request_id", "%REQUEST_ID%", "x-request-id, kept or made (also ``%REQ(X-REQUEST-ID)%``)", "str",
              "ctx.request_id or None", envoy=False),
        Field("trace_id", "%TRACE_ID%", "the W3C trace id, kept from traceparent or started", "str",
              "ctx.trace_id or None"),
        Field("status", "%RESPONSE_CODE%", "the status sent; null for a bare close", "int",
              "resp.status if resp is not None else None"),
        Field("success", "%SUCCESS%", "a whole answer below 500 went out (no DC, DT, DPE, UC, UPE, DTLS, TLSP)",
              "bool", _success, envoy=False),
        Field("flags", "%RESPONSE_FLAGS%", "how sluice answered when it answered itself (the flag table)", "str",
              "','.join(ctx.flags) or None"),
        Field("method", "%REQ(:METHOD)%", "the request method", "str", "req.method if req is not None else None"),
        Field("url", "%URL%", "scheme://host/target as the client asked", "str", _url, envoy=False),
        Field("path", "%REQ(:PATH)%", "the request target, with its query", "str",
              "req.target if req is not None else None"),
        Field("host", "%REQ(:AUTHORITY)%", "Host (HTTP/2: :authority)", "str",
              "req.headers.get('host') if req is not None else None"),
        Field("scheme", "%REQ(:SCHEME)%", "http or https, as the client spoke", "str", "ctx.scheme"),
        Field("protocol", "%PROTOCOL%", "HTTP/1.0, HTTP/1.1 or HTTP/2", "str",
              "_PROTOCOLS.get(req.http_version) if req is not None else None"),
        Field("user_agent", "%REQ(USER-AGENT)%", "User-Agent", "str",
              "req.headers.get('user-agent') if req is not None else None"),
        Field("route", "%ROUTE_NAME%", "the route matched", "str",
              "(r.name or None) if (r := ctx.matched_route) else None"),
        Field("rbac_decision", "%RBAC_DECISION%",
              "the rbac filter's decision: allow or deny (shadow-allow, shadow-deny in shadow mode)", "str",
              "(('shadow-' + d) if ctx.vars.get('rbac.shadow') else d) if (d := ctx.vars.get('rbac.decision')) "
              "else None", envoy=False),
        Field("rbac_policy", "%RBAC_POLICY%", "the rbac policy that decided (``default``: none matched)", "str",
              "ctx.vars.get('rbac.policy')", envoy=False),
        Field("upgraded", "%UPGRADED%", "the protocol a 101 switched to (only then)", "str",
              "ctx.upgraded", envoy=False, optional=True),
        # -- sizes ----------------------------------------------------------
        Field("request_header_bytes", "%REQUEST_HEADERS_BYTES%",
              "the request head as forwarded, in HTTP/1.1 form", "int", _request_header_bytes),
        Field("response_header_bytes", "%RESPONSE_HEADERS_BYTES%",
              "the response head as sent, in HTTP/1.1 form", "int", _response_header_bytes),
        Field("bytes_in", "%BYTES_RECEIVED%", "request body bytes (a tunnel: bytes from the client)", "int",
              "ctx.bytes_in"),
        Field("bytes_out", "%BYTES_SENT%", "response body bytes (a tunnel: bytes to the client)", "int",
              "ctx.bytes_out"),
        # -- the upstream ---------------------------------------------------
        Field("upstream", "%UPSTREAM_HOST%", "the endpoint that answered (or the last tried)", "str",
              "e.address if (e := ctx.endpoint) is not None else None"),
        Field("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%",
              "the upstream connection's own address, host:port", "str",
              "_hostport(u) if (u := ctx.upstream_local) is not None else None"),
        Field("cluster", "%UPSTREAM_CLUSTER%", "the cluster", "str",
              "c.name if (c := ctx.cluster) is not None else None"),
        Field("attempts", "%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "endpoints tried (only past one)", "int",
              "len(ctx.tried) + 1 if ctx.tried else None", optional=True),
        Field("tried", "%UPSTREAM_TRIED%", "the endpoints whose try failed, in order (only when any)", "list",
              "[e.address for e in ctx.tried] if ctx.tried else None", envoy=False, optional=True),
        Field("upstream_connected_ms", "%UPSTREAM_CONNECTED%",
              "from the start until an upstream connection was ready (pooled or new)", "ms",
              "ctx.timings.get('upstream_connected')", envoy=False),
        Field("filter_ms", "%FILTER_TIME%",
              "ms spent in each filter phase so far, by ``filter.phase`` (metrics on, else null)", "times",
              "ctx.filter_time or None", envoy=False),
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


# -- the compiler: one generated function per format ---------------------------
# Each kind's encoding, as an expression over ``v`` (the value, never None):
# JSON, and template text (where a body is escaped and quoted, since it may
# hold a newline; a header or target cannot).
_JSON = {
    "str": "_quote(v)",
    "body": "_quote(v)",
    "int": "str(v)",
    "ms": "repr(round(v * 1000, 3))",
    "bool": "('true' if v else 'false')",
    "list": "'[' + ', '.join([_quote(x) for x in v]) + ']'",
    "map": "'{' + ', '.join([_quote(k) + ': ' + ('null' if x is None else _quote(x)) for k, x in v.items()]) + '}'",
    "times": "'{' + ', '.join([_quote(f'{f}.{p}') + ': ' + repr(round(t * 1000, 3)) for (f, p), t in v.items()]) + '}'",
}
_TEXT = {**_JSON, "str": "v", "int": "str(v)", "list": "','.join(v)", "map": "str(v)",
         "times": "','.join([f'{f}.{p}={round(t * 1000, 3)!r}' for (f, p), t in v.items()])"}

# What a generated function may name, besides the constants it is given.
_GLOBALS = {"_quote": _quote, "_iso": _iso, "_now": time.time, "_PROTOCOLS": _PROTOCOLS, "_hostport": _hostport}


class _Source:
    """A generated renderer's source and its namespace of constants."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = dict(_GLOBALS)

    def const(self, value: Any) -> str:
        """A name for ``value`` in the generated code (config text never
        becomes code: it is bound to a name)."""
        name = f"_c{len(self.names)}"
        self.names[name] = value
        return name

    def read(self, field: Field) -> str:
        """The expression that reads ``field``."""
        return f"({field.get})" if isinstance(field.get, str) else f"{self.const(field.get)}(ctx)"

    def build(self, parts: list[str]) -> Callable[[Any], str]:
        source = ("def render(ctx):\n    req = ctx.request\n    resp = ctx.response\n"
                  "    return ''.join((\n        " + ",\n        ".join(parts) + ",\n    ))\n")
        namespace = dict(self.names)
        exec(compile(source, "<access_log format>", "exec"), namespace)  # noqa: S102 - our expressions only
        render = namespace["render"]
        render.source = source  # for a reader in a debugger
        return render


def _json_part(src: _Source, key: str, field: Field, first: bool) -> str:
    prefix = src.const(("{" if first else ", ") + _quote(key) + ": ")
    value = f"(v := {src.read(field)})"
    if field.optional:
        return f"('' if {value} is None else {prefix} + {_JSON[field.kind]})"
    if field.kind == "bool":
        return f"{prefix} + ('true' if {src.read(field)} else 'false')"
    return f"{prefix} + ('null' if {value} is None else {_JSON[field.kind]})"


def _unknown(where: str, what: str, known: Iterable[str]) -> ConfigError:
    return ConfigError(f"filters.access_log.{where}: unknown {what}; known: {', '.join(known)}")


def compile_json(names: Iterable[str], catalog: dict[str, Field], request_headers: list[str],
                 response_headers: list[str]) -> Callable[[Any], str]:
    """A renderer of one JSON object (no newline) with the fields ``names``,
    in that order. ``request_headers``/``response_headers``: the headers a
    ``request_headers``/``response_headers`` field holds, as an object."""
    src = _Source()
    parts = []
    for i, name in enumerate(names):
        if name in ("request_headers", "response_headers"):
            chosen = request_headers if name == "request_headers" else response_headers
            field = Field(name, "", "", "map", _headers(chosen, name == "request_headers"))
        elif name in catalog:
            field = catalog[name]
        else:
            raise _unknown(f"fields[{i}]", f"field {name!r}", [*catalog, "request_headers", "response_headers"])
        parts.append(_json_part(src, name, field, first=i == 0 and not field.optional))
    if not parts:
        return lambda ctx: "{}"
    if parts[0].startswith("("):  # an optional first field: the "{" on its own
        parts.insert(0, "'{'")
    render = src.build([*parts, "'}'"])
    if parts[0] != "'{'":
        return render

    def line(ctx) -> str:  # the rare line led by an optional field: drop the ", " after "{"
        text = render(ctx)
        return "{" + text[3:] if text.startswith("{, ") else text
    return line


def _headers(names: list[str], request: bool) -> Getter:
    secret = SECRET_REQUEST_HEADERS if request else SECRET_RESPONSE_HEADERS

    def get(ctx):
        message = ctx.request if request else ctx.response
        if message is None:
            return None
        headers = message.headers
        found = {name: headers.get(name) for name in names}
        for name in secret.intersection(found):
            if found[name] is not None:
                found[name] = REDACTED
        return found
    return get


# %NAME%, %NAME(ARG)%, either with :N (a length cap), as Envoy writes them.
_OPERATOR = re.compile(r"%([A-Z_0-9]+)(?:\(([^()%]*)\))?(?::(\d+))?%")
_PSEUDO = {":METHOD": "method", ":PATH": "path", ":AUTHORITY": "host", ":SCHEME": "scheme"}
FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header field name (RFC 9110 5.1)


def _operator(match: re.Match, catalog: dict[str, Field], by_operator: dict[str, Field]) -> Field:
    """The field an operator reads; ConfigError when there is none."""
    name, arg, _ = match.groups()
    if name in ("REQ", "RESP") and arg is not None:
        if name == "REQ" and arg.upper() in _PSEUDO:
            return catalog[_PSEUDO[arg.upper()]]
        if not FIELD_NAME.fullmatch(arg):
            raise ConfigError(f"filters.access_log.template: {match[0]} does not name a header field")
        get = _request_header(arg.lower()) if name == "REQ" else _response_header(arg.lower())
        return Field(arg.lower(), match[0], "", "str", get)
    field = by_operator.get(f"%{name}%") if arg is None else None
    if field is None:
        known = sorted({*by_operator, "%REQ(HEADER)%", "%RESP(HEADER)%"})
        raise _unknown("template", f"operator {match[0]}", known)
    return field


# What is left of a template once its operators are taken out must not look
# like one: a misspelt or unsupported operator (``%START_TIME(%Y)%``, an
# unclosed ``%REQ(X``) would otherwise print as literal text, silently.
_ALMOST = re.compile(r"%[A-Z][A-Z_0-9]*[(%:]")


def template_fields(template: str, catalog: dict[str, Field]) -> list[Field]:
    """The fields a template reads (ConfigError for an unknown operator, or
    text that looks like a broken one)."""
    if any(c in template for c in "\r\n"):
        raise ConfigError("filters.access_log.template: one line, without CR or LF")
    left = _ALMOST.search(_OPERATOR.sub(" ", template))
    if left is not None:
        raise ConfigError(f"filters.access_log.template: {left[0]!r}... is not an operator as sluice reads them "
                          "(%NAME%, %REQ(HEADER)%, %RESP(HEADER)%, each optionally with :N)")
    by_operator = {f.operator: f for f in catalog.values()}
    return [_operator(m, catalog, by_operator) for m in _OPERATOR.finditer(template)]


def compile_text(template: str, catalog: dict[str, Field]) -> Callable[[Any], str]:
    """A renderer of ``template`` (one line, no newline): literal text as
    written, each operator its value, ``-`` when there is none (as Envoy)."""
    template_fields(template, catalog)  # every check, before anything is built
    by_operator = {f.operator: f for f in catalog.values()}
    src = _Source()
    parts: list[str] = []
    at = 0
    for m in _OPERATOR.finditer(template):
        if m.start() > at:
            parts.append(src.const(template[at:m.start()]))
        field = _operator(m, catalog, by_operator)
        value = f"('-' if (v := {src.read(field)}) is None else {_TEXT[field.kind]})"
        parts.append(f"{value}[:{int(m[3])}]" if m[3] else value)
        at = m.end()
    if at < len(template):
        parts.append(src.const(template[at:]))
    return src.build(parts or ["''"])
