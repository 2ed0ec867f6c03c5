"""What a matched route does: forward (with its rewrites and header edits),
or redirect. Built once from a validated ``RouteConfig`` (``build_action``);
the router runs them per request.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluice.proxy.header_edits import HeaderEdits

from .routing_config import Redirect, RegexRewrite, RouteConfig

__all__ = ["Forward", "RedirectTo", "build_action", "location", "service_name"]


def _path_rewrite(rc_prefix: str | None, prefix_rewrite: str | None,
                  regex_rewrite: RegexRewrite | None, path: str | None = None) -> Callable[[str], str] | None:
    """A function from a target to the rewritten target (query kept), or None."""
    if prefix_rewrite is not None:
        cut = len(rc_prefix)
        return lambda target: prefix_rewrite + target[cut:]
    if regex_rewrite is not None:
        rx, sub = re.compile(regex_rewrite.pattern), regex_rewrite.substitution

        def regex(target: str) -> str:
            p, sep, q = target.partition("?")
            p = rx.sub(sub, p)
            return ("" if p.startswith("/") else "/") + p + sep + q

        return regex
    if path is not None:
        return lambda target: path + target[len(target.partition("?")[0]):]
    return None


@dataclass(slots=True, eq=False)
class Forward:
    """Forward: to one cluster, a weighted split, or the one the host names;
    with the route's rewrites."""

    cluster: str | None = None
    split: tuple[tuple[str, ...], tuple[int, ...], int] | None = None  # names, cumulative weights, total
    host_suffix: str | None = None  # cluster_from_host (None: the whole host)
    rewrite: Callable[[str], str] | None = None
    host_rewrite: bytes | None = None
    request_edits: HeaderEdits | None = None
    response_edits: HeaderEdits | None = None


@dataclass(slots=True, eq=False)
class RedirectTo:
    config: Redirect
    rewrite: Callable[[str], str] | None


def service_name(host: str, suffix: str | None) -> str:
    """The service a (lower-cased, port-less) host names."""
    if suffix is not None and host.endswith(suffix) and len(host) > len(suffix):
        return host[: -len(suffix)]
    return host


def build_action(rc: RouteConfig) -> Any:
    """The route's action: a DirectResponse (its model, as is), a RedirectTo, or a Forward."""
    if rc.direct_response is not None:
        return rc.direct_response
    if rc.redirect is not None:
        r = rc.redirect
        return RedirectTo(r, _path_rewrite(rc.match.prefix, r.prefix_rewrite, r.regex_rewrite, r.path))
    split = None
    if rc.clusters is not None:
        total, cumulative = 0, []
        for wc in rc.clusters:
            total += wc.weight
            cumulative.append(total)
        split = (tuple(wc.name for wc in rc.clusters), tuple(cumulative), total)
    cfh = rc.cluster_from_host
    return Forward(
        cluster=rc.cluster,
        split=split,
        host_suffix=cfh.suffix.lower() if cfh is not None and cfh.suffix else None,
        rewrite=_path_rewrite(rc.match.prefix, rc.prefix_rewrite, rc.regex_rewrite),
        host_rewrite=rc.host_rewrite.encode("ascii") if rc.host_rewrite else None,
        request_edits=HeaderEdits.of(rc.request_headers),
        response_edits=HeaderEdits.of(rc.response_headers),
    )




def _split_port(hostport: str) -> tuple[str, str | None]:
    if hostport.startswith("["):
        host, _, rest = hostport.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else None
    host, sep, port = hostport.rpartition(":")
    return (host, port) if sep else (hostport, None)


def location(action: RedirectTo, ctx, request) -> str:
    """The Location of a redirect: given whole, or the request's URL with the parts it sets."""
    r = action.config
    if r.location is not None:
        return r.location
    target = request.target if action.rewrite is None else action.rewrite(request.target)
    if not r.keep_query:
        target = target.partition("?")[0]
    scheme = r.scheme or ctx.scheme
    if r.host is not None:
        host, port = _split_port(r.host)
    else:
        host, port = _split_port(request.headers.get("host") or "")
        if scheme != ctx.scheme:
            port = None  # the request's port belongs to the other scheme
    if r.port is not None:
        port = str(r.port)
    return f"{scheme}://{host}{':' + port if port else ''}{target}"
