"""The README's mTLS mesh: two sluice instances, each with its own SPIFFE ID.
``frontend``'s sidecar calls ``orders``' sidecar over mTLS, pinning its ID;
``orders`` admits it by RBAC on the verified SPIFFE ID and passes the caller's
identity on in x-forwarded-client-cert. Real proxies, real sockets."""

from __future__ import annotations

import ssl

import httpx
import pytest
import trustme

from sluice.plugins import rbac
from sluice.testing import serve

from .conftest import config
from .tls_support import ca_file, issue

PLUGINS = ["router", "balancer", "tls"]
FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
ORDERS = "spiffe://example.org/ns/shop/sa/orders"
INTRUDER = "spiffe://example.org/ns/shop/sa/reports"


@pytest.fixture(scope="module")
def svids(tmp_path_factory):
    """One trust domain's CA and an SVID (a certificate with a SPIFFE ID) per workload."""
    where = tmp_path_factory.mktemp("mesh")
    ca = trustme.CA()
    return {"ca": ca_file(ca, where),
            "frontend": issue(ca, where, "frontend", uri=FRONTEND),
            "orders": issue(ca, where, "orders", "orders.mesh", uri=ORDERS),
            "reports": issue(ca, where, "reports", uri=INTRUDER)}


def orders_sidecar(app: str, svids) -> dict:
    """In front of the orders app: mTLS required, RBAC on who calls."""
    cfg = config(app, filters=["rbac", "router"], listener={"tls": {
        "cert": str(svids["orders"].cert), "key": str(svids["orders"].key),
        "client_auth": "require", "client_ca": str(svids["ca"]),
        "forward_client_cert": "sanitize_set", "client_cert_details": ["uri"]}})
    cfg["filters"]["rbac"] = {"policies": [
        {"name": "frontend-reads-orders", "action": "allow", "principals": [{"spiffe_id": FRONTEND}],
         "permissions": [{"methods": ["GET"], "prefix": "/orders"}]},
    ]}
    return cfg


def frontend_sidecar(orders: str, svids, pinned: str = ORDERS) -> dict:
    """Beside the frontend app: plain on loopback, mTLS out with its own SVID."""
    return config(orders, cluster={"tls": {
        "ca": str(svids["ca"]), "server_name": "orders.mesh",
        "cert": str(svids["frontend"].cert), "key": str(svids["frontend"].key),
        "verify_spiffe_id": [pinned]}})


async def test_two_sidecars_with_spiffe_ids_and_rbac_between_them(start_origin, svids):
    app = await start_origin()
    async with serve(orders_sidecar(app.address, svids), plugins=PLUGINS, extra={"rbac": rbac}) as orders:
        orders_at = f"127.0.0.1:{orders.address[1]}"
        async with serve(frontend_sidecar(orders_at, svids), plugins=PLUGINS) as frontend:
            async with httpx.AsyncClient(base_url=frontend.url) as client:
                allowed = await client.get("/orders/42")
                wrong_method = await client.post("/orders/42", content=b"{}")
                wrong_path = await client.get("/admin")
        # Another workload of the same trust domain, calling orders directly: verified, not allowed.
        ctx = ssl.create_default_context(cafile=str(svids["ca"]))
        ctx.load_cert_chain(str(svids["reports"].cert), str(svids["reports"].key))
        async with httpx.AsyncClient(verify=ctx) as client:
            intruder = await client.get(f"https://{orders_at}/orders/42",
                                        extensions={"sni_hostname": "orders.mesh"})
        # frontend pinned to another ID refuses the orders sidecar it reached.
        async with serve(frontend_sidecar(orders_at, svids, pinned=INTRUDER), plugins=PLUGINS) as misled:
            async with httpx.AsyncClient(base_url=misled.url) as client:
                mispinned = await client.get("/orders/42")
    assert allowed.status_code == 200 and allowed.text == "/orders/42"
    assert (wrong_method.status_code, wrong_path.status_code, intruder.status_code) == (403, 403, 403)
    assert mispinned.status_code == 503
    assert len(app.requests) == 1
    headers = dict(app.requests[0][0].headers)
    assert headers[b"x-forwarded-client-cert"] == f"URI={FRONTEND}".encode()
