"""The router's config: one ``[[routes]]`` entry as a validated model.

Every key the router reads is declared here, with its checks, so that a
mistake is a ConfigError under its key path before a socket opens; what a
model alone cannot know (clusters that exist, a prefix to rewrite) is
``check_route``. The keys are documented in ``router``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from sluice import ConfigError
from sluice.proxy.header_edits import HeaderOps, check_ops
from sluice.proxy.routes import RetryPolicy

__all__ = ["FORWARD_ONLY", "DirectResponse", "HeaderMatch", "Redirect", "RegexRewrite",
           "RouteConfig", "check_route"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listify(value: Any) -> Any:
    """``x`` is short for ``[x]``."""
    return [value] if isinstance(value, (str, int, dict)) else value


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regex: {exc}") from None
    return pattern


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an address or CIDR block: {exc}") from None
    return value


def _matches(pattern: str, message: str) -> Callable[[str], str]:
    """A validator that says what a value should be, not which regex it failed."""
    rx = re.compile(pattern)

    def check(value: str) -> str:
        if not rx.fullmatch(value):
            raise ValueError(message)
        return value

    return check


_NAME = r"\*|(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?"


class HeaderMatch(_Model):
    """A condition on one header (or query parameter): ``exact``, ``regex``
    (a full match) or ``present`` (true: there; false: absent)."""

    name: str
    exact: str | None = None
    regex: Annotated[str, AfterValidator(_regex)] | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> HeaderMatch:
        given = [k for k in ("exact", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, regex, present")
        return self


class Match(_Model):
    host: str | None = None
    prefix: str | None = None
    path: str | None = None
    regex: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] | list[HeaderMatch] = []
    query: Annotated[list[HeaderMatch], BeforeValidator(_listify)] = []
    source: Annotated[list[Annotated[str, AfterValidator(_network)]], BeforeValidator(_listify)] | None = None
    port: Annotated[list[Annotated[int, Field(ge=1, le=65535)]], BeforeValidator(_listify)] | None = None
    sni: Annotated[str, AfterValidator(_matches(_NAME, "not a server name, *.suffix or *"))] | None = None

    @model_validator(mode="after")
    def _one_path_rule(self) -> Match:
        if sum(x is not None for x in (self.prefix, self.path, self.regex)) > 1:
            raise ValueError("give at most one of prefix, path, regex")
        if self.regex is not None:
            _regex(self.regex)
        return self


class DirectResponse(_Model):
    status: Annotated[int, Field(ge=200, le=599)] = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


class RegexRewrite(_Model):
    pattern: Annotated[str, AfterValidator(_regex)]
    substitution: str

    @model_validator(mode="after")
    def _groups_exist(self) -> RegexRewrite:
        rx = re.compile(self.pattern)
        for m in re.finditer(r"\\g<([^>]*)>|\\([0-9]+)", self.substitution):
            ref = m.group(1) if m.group(1) is not None else m.group(2)
            known = ref in rx.groupindex or (ref.isdigit() and int(ref) <= rx.groups)
            if not known:
                raise ValueError(f"substitution: no group {ref!r} in pattern")
        if re.search(r"[\x00-\x20\x7f#]", self.substitution):
            raise ValueError("substitution: no spaces, controls or '#' in a path")
        return self


_Path = Annotated[str, AfterValidator(_matches(r"/[^\x00-\x20\x7f#]*",
                                               "a path starts with '/' and has no spaces, controls or '#'"))]
_HostPort = Annotated[str, AfterValidator(_matches(r"[A-Za-z0-9_.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?",
                                                   "not a host or host:port"))]


class Redirect(_Model):
    status: Literal[301, 302, 303, 307, 308] = 302
    location: str | None = None  # absolute; otherwise built from the parts below
    scheme: Literal["http", "https"] | None = None
    host: _HostPort | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    path: _Path | None = None
    prefix_rewrite: _Path | None = None
    regex_rewrite: RegexRewrite | None = None
    keep_query: bool = True

    @model_validator(mode="after")
    def _coherent(self) -> Redirect:
        if self.location is not None and any(
            getattr(self, k) is not None
            for k in ("scheme", "host", "port", "path", "prefix_rewrite", "regex_rewrite")
        ):
            raise ValueError("location is the whole Location: give it alone, or build it from parts")
        if sum(x is not None for x in (self.path, self.prefix_rewrite, self.regex_rewrite)) > 1:
            raise ValueError("give at most one of path, prefix_rewrite, regex_rewrite")
        return self


class WeightedCluster(_Model):
    name: str
    weight: Annotated[int, Field(ge=0, le=1_000_000)]


class ClusterFromHost(_Model):
    """``Host: <service>[<suffix>][:port]`` -> cluster ``<service>``."""

    suffix: Annotated[str, AfterValidator(_matches(r"\.[A-Za-z0-9_.-]+", "a suffix starts with '.'"))] | None = None


class RetryConfig(_Model):
    """``retry = { attempts = 3, on = [...] }`` (``sluice.proxy.routes.RetryPolicy``)."""

    attempts: Annotated[int, Field(ge=1, le=10)] = 2
    on: list[Literal["reset", "timeout", "protocol_error", "5xx", "gateway_error", "retriable_status"]] = [
        "reset", "gateway_error"]
    statuses: list[Annotated[int, Field(ge=100, le=599)]] = []
    per_try_timeout: Annotated[float, Field(gt=0)] | None = None
    backoff: Annotated[float, Field(ge=0)] = 0.025
    max_backoff: Annotated[float, Field(ge=0)] = 0.25
    budget_percent: Annotated[float, Field(gt=0, le=100)] = 20.0
    min_retries: Annotated[int, Field(ge=0)] = 3
    max_body_bytes: Annotated[int, Field(ge=0)] = 64 * 1024

    @model_validator(mode="after")
    def _statuses_named(self) -> RetryConfig:
        if self.statuses and "retriable_status" not in self.on:
            raise ValueError("statuses: add \"retriable_status\" to on, or they are never retried")
        if "retriable_status" in self.on and not self.statuses:
            raise ValueError("on: \"retriable_status\" needs statuses")
        return self

    def policy(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.attempts, on=frozenset(self.on), statuses=frozenset(self.statuses),
                           per_try_timeout=self.per_try_timeout, backoff=self.backoff,
                           max_backoff=max(self.max_backoff, self.backoff), budget_percent=self.budget_percent,
                           min_retries=self.min_retries, max_body_bytes=self.max_body_bytes)


class MirrorConfig(_Model):
    """``mirror = { cluster = "shadow", percent = 10 }`` (``sluice.proxy.mirror``)."""

    cluster: str
    percent: Annotated[float, Field(gt=0, le=100)] = 100.0


class RouteConfig(_Model):
    name: str | None = None
    match: Match = Match()
    cluster: str | None = None
    clusters: list[WeightedCluster] | None = None
    cluster_from_host: ClusterFromHost | None = None
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None
    timeout: Annotated[float, Field(gt=0)] | None = None
    retry: RetryConfig | None = None
    mirror: MirrorConfig | None = None
    prefix_rewrite: _Path | None = None
    regex_rewrite: RegexRewrite | None = None
    host_rewrite: _HostPort | None = None
    host_rewrite_to_endpoint: bool = False
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    filters: dict[str, dict[str, Any]] = {}
    upgrades: list[Annotated[str, Field(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]] = ["websocket"]

    @model_validator(mode="after")
    def _no_h2c(self) -> RouteConfig:
        if any(t.lower() == "h2c" for t in self.upgrades):
            raise ValueError("upgrades: h2c is never forwarded (h2c smuggling)")
        return self

    @model_validator(mode="after")
    def _one_action(self) -> RouteConfig:
        given = [k for k in _ACTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one action: " + ", ".join(_ACTIONS[:-1]) + " or " + _ACTIONS[-1])
        if self.direct_response is not None or self.redirect is not None:
            extra = [k for k in FORWARD_ONLY if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for a route that forwards")
        if self.host_rewrite_to_endpoint and (self.direct_response is not None or self.redirect is not None):
            raise ValueError("host_rewrite_to_endpoint: only for a route that forwards")
        if self.host_rewrite_to_endpoint and self.host_rewrite is not None:
            raise ValueError("give at most one of host_rewrite, host_rewrite_to_endpoint")
        if self.prefix_rewrite is not None and self.regex_rewrite is not None:
            raise ValueError("give at most one of prefix_rewrite, regex_rewrite")
        return self


_ACTIONS = ("cluster", "clusters", "cluster_from_host", "direct_response", "redirect")
FORWARD_ONLY = ("prefix_rewrite", "regex_rewrite", "host_rewrite", "request_headers", "response_headers",
                "retry", "mirror")

# (a bool, so not in FORWARD_ONLY's None test: checked in _one_action)


def check_route(rc: RouteConfig, where: str, clusters) -> None:
    """What the model alone cannot know: clusters that exist, a prefix to rewrite."""
    known = ", ".join(sorted(clusters)) or "(none)"
    if rc.cluster is not None and rc.cluster not in clusters:
        raise ConfigError(f"{where}.cluster: unknown cluster {rc.cluster!r}; defined: {known}")
    if rc.mirror is not None and rc.mirror.cluster not in clusters:
        raise ConfigError(f"{where}.mirror.cluster: unknown cluster {rc.mirror.cluster!r}; defined: {known}")
    if rc.clusters is not None:
        if not rc.clusters:
            raise ConfigError(f"{where}.clusters: name at least one cluster")
        for j, wc in enumerate(rc.clusters):
            if wc.name not in clusters:
                raise ConfigError(f"{where}.clusters[{j}].name: unknown cluster {wc.name!r}; defined: {known}")
        if not any(wc.weight for wc in rc.clusters):
            raise ConfigError(f"{where}.clusters: every weight is 0; at least one must be positive")
    for key, rule in (("prefix_rewrite", rc.prefix_rewrite),
                      ("redirect.prefix_rewrite", rc.redirect and rc.redirect.prefix_rewrite)):
        if rule is not None and rc.match.prefix is None:
            raise ConfigError(f"{where}.{key}: needs match.prefix (the part it replaces)")
    check_ops(rc.request_headers, f"{where}.request_headers", request=True, host_hint=" (use host_rewrite)")
    check_ops(rc.response_headers, f"{where}.response_headers", request=False)


# -- what a matched route does -----------------------------------------------
