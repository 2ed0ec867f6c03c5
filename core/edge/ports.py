"""A listener's port, held by the ``--workers N`` master so only its own workers share it.

Each worker binds the port itself with SO_REUSEPORT, and Linux lets any
socket of the same user with SO_REUSEPORT join the group: a second
``sluice run --workers N`` on the same port would start silently and take
half the connections. So, before forking, the master reserves each
listener's port:

1. it binds a socket with SO_REUSEADDR and *without* SO_REUSEPORT. That
   fails with EADDRINUSE when any socket listens on the port (another
   sluice, nginx, a plain python server), and only then: connections left
   in TIME_WAIT by a previous run do not count;
2. it keeps that socket, bound but never listening, for its whole life,
   switched to SO_REUSEPORT without SO_REUSEADDR. Its workers (SO_REUSEPORT,
   same user) still bind next to it, while another instance's step 1 now
   fails even in the moment before the first worker listens, and even
   while every worker is down between restarts. A bound socket that does
   not listen receives no connections.

Port 0 is resolved here once, so that N workers share one port rather than
each getting its own.
"""

from __future__ import annotations

import socket

from ..addresses import parse_hostport

__all__ = ["reserve"]


def reserve(address: str) -> tuple[socket.socket, str]:
    """The reservation socket for ``host:port`` and the address with its port resolved.

    OSError (EADDRINUSE, EADDRNOTAVAIL, ...) when the address cannot be listened on.
    """
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    return sock, f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
