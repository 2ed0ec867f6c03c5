"""The filter-contract battery: one call in a plugin's tests checks a filter
against the contract of ``sluice.proxy.filters`` under every kind of
exchange a proxy meets.

    # tests/test_contract.py of a plugin
    from sluice.testing import contract
    import sluice_myplugin

    test_contract = contract.battery(
        "my_filter", settings={"limit": 3}, extra={"myplugin": sluice_myplugin},
        request_headers={"x-api-key": "k"},   # added to every request (to pass auth, say)
    )

``battery`` returns a pytest test function parametrised over ``SCENARIOS``
(ids like ``test_contract[chunked-request-body]``); pytest collects it under
the name it is bound to. It is a plain function that runs each scenario in
its own ``trio.run``, so it needs no async plugin and no fixture.
``check(filter, scenario, ...)`` runs one scenario directly and raises
``ContractViolation`` (an AssertionError) naming the filter, the scenario
and every rule broken. Both take the keywords of ``Options``.

The package, module by module (each says the rest of what it holds):

- ``scenarios``: ``SCENARIOS``, what each provokes and what it expects;
- ``rules``: the rule names, and the verdict that checks them after each;
- ``run``: one scenario's origin, proxy and checks, in its own ``trio.run``;
- ``probes``: the watched filter, and the probe filters around it;
- ``recorder``: what the watched filter and the probes saw;
- ``instrument``: the trio instrument that finds a step blocking the loop;
- ``clients``: the h11 client that reads every byte, and a bare socket's head;
- ``spec``: the filter and its ``Options``, resolved into plugins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from ...proxy.filters import Filter
from .rules import BLOCKED, DESIGNED, ENDED, FRAMING, HEAD_ONCE, ISOLATED, ONCE, RAISED, RELEASED, ContractViolation
from .run import _run
from .scenarios import SCENARIOS
from .spec import Options, _Spec

__all__ = [
    "BLOCKED", "DESIGNED", "ENDED", "FRAMING", "HEAD_ONCE", "ISOLATED", "ONCE", "RAISED", "RELEASED", "SCENARIOS",
    "ContractViolation", "Options", "battery", "check",
]


def battery(
    filter: str | type[Filter], *, xfail: Mapping[str, str] | None = None, **options,
) -> Callable[[str], None]:
    """A pytest test function running every scenario in ``SCENARIOS`` against ``filter``.

    ``filter`` is a filter name (found among the enabled plugins and
    ``extra``) or a class; ``options`` are ``Options``' keywords
    (``settings``, ``extra``, ``request_headers``, ``config``,
    ``block_threshold``, ``plugins``). ``xfail`` maps a scenario to the
    reason it is expected to fail (strictly: it must fail).
    """
    spec = _Spec(filter, Options(**options))
    unknown = set(xfail or ()) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"xfail names unknown scenarios {sorted(unknown)}; scenarios: {', '.join(SCENARIOS)}")
    params = [
        pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=(xfail or {})[name])]
                     if name in (xfail or {}) else [])
        for name in SCENARIOS
    ]

    @pytest.mark.parametrize("scenario", params)
    def test_contract(scenario: str) -> None:
        __tracebackhide__ = True  # pytest shows the violation's message, not the battery's insides
        _run(spec, scenario)

    test_contract.__doc__ = f"The filter contract, for filter {spec.name!r} (sluice.testing.contract)."
    return test_contract


def check(filter: str | type[Filter], scenario: str, **options) -> None:
    """Run one scenario against ``filter`` (``options``: ``Options``' keywords,
    as for ``battery``); raise ContractViolation if a rule broke."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; scenarios: {', '.join(SCENARIOS)}")
    _run(_Spec(filter, Options(**options)), scenario)
