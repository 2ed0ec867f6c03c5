"""Plugin ``rbac``: ordered allow/deny policies over who calls (principals) and what they ask (permissions).

Each policy has an ``action`` (``allow`` or ``deny``), ``principals`` and
``permissions`` (any of each; omitted: any). The first policy whose
principals and permissions both match decides; when none does, ``default``
does (``deny`` unless set). A denied request gets 403 with flag ``RBAC``.
With ``shadow = true`` the decision is logged and counted but not enforced,
to try a policy set on live traffic before it bites.

Principals read the identity the filters before this one left in the
context (the auth filters' ``auth.user``/``auth.method``, the jwt filter's
``jwt.claims``, the TLS client certificate in ``ctx.tls_peer``) and the
client's address: so rbac sits after them in the chain. The rules are
compiled once, at load (``rbac_rules``); a route may bring its own policy
set (``filters = { rbac = { policies = [...] } }``), which replaces the
listener's for requests on it.

Every decision is in ``ctx.vars`` (``rbac.decision``, ``rbac.policy``,
``rbac.shadow``), the access log (``rbac_decision``/``%RBAC_DECISION%``,
``rbac_policy``/``%RBAC_POLICY%``) and ``sluice_plugin_rbac_decisions_total
{policy, decision, shadow}``; the policy label is a configured name, so the
series are bounded by the config, never by traffic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from sluice import CONTINUE, ConfigError, Filter, FilterConfig, LocalReply, hookimpl, metrics

from .per_route import PerRoute
from .rbac_rules import Test, permission, principal

__all__ = ["Rbac"]

Action = Literal["allow", "deny"]


class Policy(FilterConfig):
    name: str | None = None  # in the log, the access log and the metric's label; default: its key path
    action: Action
    principals: list[dict[str, Any]] = Field(default_factory=lambda: [{"any": True}], min_length=1)
    permissions: list[dict[str, Any]] = Field(default_factory=lambda: [{"any": True}], min_length=1)


class Settings(FilterConfig):
    policies: list[Policy] = Field(default_factory=list)
    default: Action = "deny"
    shadow: bool = False


class RouteSettings(FilterConfig):
    """A route's own policy set: it replaces the listener's (unset keys keep the listener's)."""

    policies: list[Policy] | None = None
    default: Action | None = None
    shadow: bool | None = None


def _decisions():
    return metrics.counter("rbac_decisions", "rbac decisions by the policy that made them (default: none matched)",
                           labels=["policy", "decision", "shadow"])


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    action: str
    principals: tuple[Test, ...]
    permissions: tuple[Test, ...]
    counted: Any  # the metric's child for this rule's decision


class PolicySet:
    """Compiled policies: ``decide(request, ctx)`` is the first matching rule (or the default)."""

    __slots__ = ("rules", "default", "shadow")

    def __init__(self, policies: list[Policy], default: str, shadow: bool, where: str) -> None:
        counter = _decisions()
        mode = "true" if shadow else "false"
        rules, seen = [], set()
        for i, p in enumerate(policies):
            at = f"{where}.policies[{i}]"
            name = p.name or at
            if name in seen:
                raise ConfigError(f"{at}.name: {name!r} names another policy already")
            seen.add(name)
            rules.append(_Rule(
                name, p.action,
                tuple(principal(x, f"{at}.principals[{j}]") for j, x in enumerate(p.principals)),
                tuple(permission(x, f"{at}.permissions[{j}]") for j, x in enumerate(p.permissions)),
                counter.labels(name, p.action, mode)))
        self.rules = tuple(rules)
        self.default = _Rule("default", default, (), (), counter.labels("default", default, mode))
        self.shadow = shadow

    def decide(self, request, ctx) -> _Rule:
        for rule in self.rules:  # plain loops: a generator per policy cost more than most tests
            for test in rule.principals:
                if test(request, ctx):
                    break
            else:
                continue
            for test in rule.permissions:
                if test(request, ctx):
                    return rule
        return self.default


_FORBIDDEN = "forbidden by policy\n"


class Rbac(Filter):
    """Ordered allow/deny policies over principals (mTLS, JWT, API key, user, CIDR) and permissions."""

    name = "rbac"
    Config = Settings
    RouteConfig = RouteSettings
    after = ("api_key", "basic", "jwt")  # the identities it reads are theirs

    def __init__(self, config: Settings) -> None:
        super().__init__(config)
        listener = PolicySet(config.policies, config.default, config.shadow, "filters.rbac")
        self._policies = PerRoute(self.name, listener, lambda own, where: self._route_set(config, own, where))

    @classmethod
    def from_config(cls, config: Settings, app: Any) -> Rbac:
        """Built, and every route's own policies compiled, so a bad one fails at load by its key path."""
        rbac = cls(config)
        rbac._policies.check(app)
        return rbac

    @staticmethod
    def _route_set(config: Settings, data: Mapping[str, Any], where: str) -> PolicySet:
        own = RouteSettings.model_validate(dict(data))
        return PolicySet(own.policies if own.policies is not None else config.policies,
                         own.default or config.default,
                         own.shadow if own.shadow is not None else config.shadow, where)

    async def on_request_headers(self, ctx, request):
        policies = self._policies.get(ctx)
        rule = policies.decide(request, ctx)
        rule.counted.inc()
        ctx.vars["rbac.decision"] = rule.action
        ctx.vars["rbac.policy"] = rule.name
        if policies.shadow:
            ctx.vars["rbac.shadow"] = True
            if rule.action == "deny":
                self.log(ctx).info("rbac shadow denied", policy=rule.name, user=ctx.vars.get("auth.user"))
            return CONTINUE
        if rule.action == "deny":
            self.log(ctx).info("rbac denied", policy=rule.name, user=ctx.vars.get("auth.user"))
            return LocalReply(403, _FORBIDDEN, [("content-type", "text/plain; charset=utf-8")], flag="RBAC")
        return CONTINUE


@hookimpl
def sluice_filters():
    return [Rbac]
