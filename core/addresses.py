"""Network addresses as configs write them: ``host:port``, ``[v6]:port``.

Shared by the config model (validation) and the edge (binding), so it sits
below both.
"""

from __future__ import annotations

__all__ = ["parse_hostport"]


def parse_hostport(value: str, *, allow_zero: bool = True) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); ValueError if malformed.

    Port 0 (any free port) makes sense for a listener, not for an endpoint.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not int(port) < 65536:
        raise ValueError("not a host:port")
    if int(port) == 0 and not allow_zero:
        raise ValueError("port 0 is not an upstream port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
