"""Plugin ``ip_filter``: admit or refuse a request by its client's address (CIDR allow and deny lists).

The address is ``ctx.client_ip``: the peer's, or, on a listener with
``trust_forwarded = true``, the one X-Forwarded-For names (the same
address rate limits and rbac see). The rule is *deny wins, then allow*:

- an address in any ``deny`` network is refused;
- otherwise, when ``allow`` is not empty, an address in none of its
  networks is refused;
- everything else passes (both lists empty: everyone).

So ``allow = ["10.0.0.0/8"]`` with ``deny = ["10.0.5.0/24"]`` is "the
private network except one subnet"; the order of the entries never
matters. IPv4 and IPv6 networks mix in one list; an IPv4 client on a
dual-stack socket (``::ffff:a.b.c.d``) is matched as its IPv4 address. An
address that is not an IP (a Unix socket's peer) is in no network.

A refused request gets 403 (flag ``LR``) and never reaches the upstream; it
is logged as ``ip refused`` with the address and counted in
``sluice_plugin_ip_filter_requests_total{decision}``. A route may bring its
own lists (``filters = { ip_filter = { allow = [...] } }``): a list it gives
replaces the listener's, one it leaves out keeps the listener's.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import AfterValidator

from sluice import CONTINUE, Filter, FilterConfig, LocalReply, hookimpl, metrics

from .per_route import PerRoute
from .routing_match import source_test

__all__ = ["IpFilter"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(text: str) -> Network:
    """A CIDR (host bits allowed: ``10.1.2.3/8`` is ``10.0.0.0/8``) or one address."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 network (CIDR) or address") from None


Cidr = Annotated[str, AfterValidator(_network)]


class Settings(FilterConfig):
    allow: list[Cidr] = []
    deny: list[Cidr] = []


class RouteSettings(FilterConfig):
    allow: list[Cidr] | None = None
    deny: list[Cidr] | None = None


class _Lists:
    """Compiled lists: the tests are routing's ``source`` match (v4-mapped clients as v4).

    A decision depends on the address alone, so it is remembered per address
    (bounded: forgotten wholesale past 4096), which spares parsing it on each
    request of a keep-alive client.
    """

    __slots__ = ("allow", "deny", "open", "_seen")

    def __init__(self, allow: list[Network], deny: list[Network]) -> None:
        self.allow, self.deny, self.open = source_test(allow), source_test(deny), not allow
        self._seen: dict[str, bool] = {}

    def admits(self, ctx: Any) -> bool:
        ip = ctx.client_ip
        decision = self._seen.get(ip)
        if decision is None:
            decision = not self.deny(None, ctx) and (self.open or self.allow(None, ctx))
            if len(self._seen) >= 4096:
                self._seen.clear()
            self._seen[ip] = decision
        return decision


_REFUSED = "forbidden\n"


class IpFilter(Filter):
    """Refuses (403) clients outside the allowed networks or inside the denied ones."""

    name = "ip_filter"
    before = ("router",)
    Config = Settings
    RouteConfig = RouteSettings

    def __init__(self, config: Settings) -> None:
        super().__init__(config)
        default = _Lists(config.allow, config.deny)

        def build(own: Any, where: str) -> _Lists:
            s = RouteSettings.model_validate(own)  # checked at load already: cannot fail here
            return _Lists(config.allow if s.allow is None else s.allow, config.deny if s.deny is None else s.deny)

        self._lists = PerRoute(self.name, default, build)
        counter = metrics.counter("ip_filter_requests", "Requests the ip_filter admitted or refused",
                                  labels=["decision"])
        self._allowed, self._denied = counter.labels("allowed"), counter.labels("denied")

    async def on_request_headers(self, ctx, request):
        if self._lists.get(ctx).admits(ctx):
            self._allowed.inc()
            return CONTINUE
        self._denied.inc()
        self.log(ctx).info("ip refused", client_ip=ctx.client_ip)
        return LocalReply(403, _REFUSED, [("content-type", "text/plain; charset=utf-8")])


@hookimpl
def sluice_filters():
    return [IpFilter]
