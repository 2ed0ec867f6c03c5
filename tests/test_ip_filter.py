"""The ip_filter: allow and deny CIDR lists (v4, v6) on the client's address as trusted
through X-Forwarded-For, deny winning, per-route lists, config errors by key path, the 403
and its count (its contract battery is in test_contract_battery.py)."""

from __future__ import annotations

import httpx
import pytest

from sluice import ConfigError
from sluice.plugins import ip_filter
from sluice.testing import serve

from .authz_support import counted, plugin_counts
from .conftest import config

PLUGINS = ["router", "balancer"]
EXTRA = {"ip_filter": ip_filter}


def _config(origin, settings, routes=None) -> dict:
    return config(origin.address, filters=["ip_filter", "router"], routes=routes,
                  listener={"trust_forwarded": True}, filter_settings={"ip_filter": settings})


async def _statuses(origin, settings, clients, path="/x", routes=None) -> list[int]:
    async with serve(_config(origin, settings, routes), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            return [(await client.get(proxy.url + path, headers={"x-forwarded-for": ip})).status_code
                    for ip in clients]


@pytest.mark.parametrize(("settings", "clients", "expected"), [
    ({}, ["10.0.0.1", "2001:db8::1"], [200, 200]),
    ({"allow": ["10.0.0.0/8"]}, ["10.9.9.9", "192.168.0.1", "2001:db8::1"], [200, 403, 403]),
    ({"deny": ["192.168.0.0/16", "2001:db8::/32"]}, ["10.0.0.1", "192.168.4.4", "2001:db8:1::5", "2001:db9::1"],
     [200, 403, 403, 200]),
    # deny wins whatever the order: the private network except one subnet
    ({"deny": ["10.0.5.0/24"], "allow": ["10.0.0.0/8"]}, ["10.0.4.1", "10.0.5.1"], [200, 403]),
    ({"allow": ["2001:db8::/32", "127.0.0.1"]}, ["2001:db8::7", "127.0.0.1", "127.0.0.2"], [200, 200, 403]),
    # a v4 client on a dual-stack socket is its v4 address
    ({"allow": ["10.0.0.0/8"]}, ["::ffff:10.1.1.1"], [200]),
])
async def test_lists_decide_on_the_trusted_client_address(start_origin, settings, clients, expected):
    origin = await start_origin()
    assert await _statuses(origin, settings, clients) == expected
    assert len(origin.requests) == expected.count(200)  # a refused request never goes upstream


async def test_a_refusal_is_a_403_logged_and_counted(start_origin, capsys):
    origin = await start_origin()
    before = plugin_counts("ip_filter_requests", "decision")
    async with serve(_config(origin, {"deny": ["203.0.113.0/24"]}), plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            refused = await client.get(proxy.url + "/x", headers={"x-forwarded-for": "203.0.113.9"})
            admitted = await client.get(proxy.url + "/x")
    assert refused.status_code == 403 and refused.text == "forbidden\n"
    assert admitted.status_code == 200
    assert counted(before, plugin_counts("ip_filter_requests", "decision")) == {("denied",): 1, ("allowed",): 1}
    out = capsys.readouterr()
    assert "ip refused" in out.out + out.err and "203.0.113.9" in out.out + out.err


async def test_without_trust_the_peer_address_decides(start_origin):
    origin = await start_origin()
    cfg = _config(origin, {"allow": ["10.0.0.0/8"]})
    cfg["listeners"][0]["trust_forwarded"] = False
    async with serve(cfg, plugins=PLUGINS, extra=EXTRA) as proxy:
        async with httpx.AsyncClient() as client:
            spoofed = await client.get(proxy.url + "/x", headers={"x-forwarded-for": "10.0.0.1"})
    assert spoofed.status_code == 403  # the peer is 127.0.0.1, whatever the header says


async def test_a_route_brings_its_own_lists_or_opts_out(start_origin):
    origin = await start_origin()
    routes = [
        {"match": {"prefix": "/admin"}, "cluster": "backend", "filters": {"ip_filter": {"allow": ["10.1.0.0/16"]}}},
        {"match": {"prefix": "/public"}, "cluster": "backend", "filters": {"ip_filter": {"disabled": True}}},
        {"match": {"prefix": "/"}, "cluster": "backend"},
    ]
    settings = {"allow": ["10.0.0.0/8"], "deny": ["10.1.2.0/24"]}
    admin = await _statuses(origin, settings, ["10.1.0.1", "10.2.0.1", "10.1.2.3"], "/admin", routes)
    public = await _statuses(origin, settings, ["192.0.2.1"], "/public", routes)
    rest = await _statuses(origin, settings, ["10.1.0.1", "10.2.0.1"], "/", routes)
    assert admin == [200, 403, 403]  # its allow replaces the listener's; the listener's deny stays
    assert public == [200]
    assert rest == [200, 200]


@pytest.mark.parametrize(("settings", "routes", "path"), [
    ({"allow": ["10.0.0.0/33"]}, None, "filters.ip_filter.allow[0]"),
    ({"deny": ["not-an-ip"]}, None, "filters.ip_filter.deny[0]"),
    ({"allow": "10.0.0.0/8"}, None, "filters.ip_filter.allow"),
    ({}, [{"match": {"prefix": "/"}, "cluster": "backend", "filters": {"ip_filter": {"deny": ["x"]}}}],
     "routes[0].filters.ip_filter.deny[0]"),
])
async def test_bad_networks_are_config_errors_by_key_path(settings, routes, path):
    cfg = config("127.0.0.1:9", filters=["ip_filter", "router"], routes=routes,
                 filter_settings={"ip_filter": settings})
    with pytest.raises(ConfigError) as info:
        async with serve(cfg, plugins=PLUGINS, extra=EXTRA):
            pass
    assert path in str(info.value)


