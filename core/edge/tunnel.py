"""The byte pump of an upgraded connection (a WebSocket, say): client <-> upstream.

Once a 101 has gone to the client, the two connections carry opaque bytes.
``pump`` moves them both ways until the tunnel ends, by these rules:

- Backpressure: each direction reads its next chunk only after the last one
  was written to the other side, so a slow reader holds at most one chunk
  (``byteio.RECEIVE_SIZE``) in sluice per direction, never a queue.
- Idle: no byte either way for ``idle`` seconds ends the tunnel (a write
  that cannot finish within ``idle`` ends it too: that peer stopped reading).
- Duration: the tunnel ends ``limit`` seconds after it opened, whatever flows.
- Half-close: an EOF from one side shuts down writing towards the other and
  the other direction goes on; the tunnel ends when both are done. Under
  TLS, where a stream cannot half-close, an EOF ends the tunnel.
- Breakage: a side that breaks (a reset) ends the tunnel at once.

Each end is a ``byteio`` object (``SocketIO``, ``StreamIO``) or anything
with their ``receive(deadline)`` and ``send_all(data, deadline)`` and an
``async send_eof() -> bool`` that half-closes it (False: it cannot): an
HTTP/2 stream carrying a WebSocket (``http2.py``) is one, so both kinds of
downstream share this pump.

It never closes either connection: their owners do (the upstream one is
never pooled again).
"""

from __future__ import annotations

import socket

import trio

from .byteio import SocketIO, StreamIO

__all__ = ["BROKEN", "CLOSED", "IDLE", "LIMIT", "pump"]

CLOSED = "closed"  # both sides finished (or one did, and the other cannot half-close)
BROKEN = "broken"  # one side broke
IDLE = "idle"  # no byte either way for ``idle`` seconds
LIMIT = "limit"  # the tunnel lived ``limit`` seconds


class _Tunnel:
    __slots__ = ("idle", "stats", "scope", "quiet", "open", "broken")

    def __init__(self, idle: float, stats) -> None:
        self.idle = idle
        self.stats = stats
        self.scope: trio.CancelScope | None = None  # the directions' nursery
        # Ends the tunnel when ``idle`` passes with no byte either way. A
        # cancel scope, not the watchdog's deadlines: an expired watchdog
        # wait closes its socket, and here a quiet direction is no reason to
        # end the other's write (the tunnel is no hot path).
        self.quiet = trio.CancelScope(deadline=trio.current_time() + idle)
        self.open = 2  # directions still running
        self.broken = False

    async def direction(self, src, dst, first: bytes, counter: str) -> None:
        data = first
        stats = self.stats
        try:
            while True:
                if data:
                    setattr(stats, counter, getattr(stats, counter) + len(data))
                    self.quiet.deadline = trio.current_time() + self.idle
                    await dst.send_all(data, _NEVER)
                    self.quiet.deadline = trio.current_time() + self.idle
                data = await src.receive(_NEVER)
                if not data:
                    break
        except trio.BrokenResourceError:
            self.broken = True
            self.scope.cancel()
            return
        self.open -= 1
        if not self.open or not await _shutdown_write(dst):
            self.scope.cancel()


_NEVER = float("inf")  # the byteio deadline: the tunnel's cancel scopes bound every wait


async def _shutdown_write(io) -> bool:
    """Send an EOF on ``io``, keeping its read side; False when it cannot half-close."""
    kind = type(io)
    if kind is StreamIO:
        return False  # TLS: no half-close for a stream that has no send_eof
    if kind is not SocketIO:
        return await io.send_eof()
    try:
        io.sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    return True


async def pump(down, up: SocketIO | StreamIO, *, to_up: bytes = b"", to_down: bytes = b"",
               idle: float, limit: float, stats) -> str:
    """Move bytes between ``down`` (the client's end) and ``up`` until the
    tunnel ends; return how it ended (CLOSED, BROKEN, IDLE or LIMIT). ``to_up`` and
    ``to_down`` were received before the switch and go first. Bytes are
    added to ``stats.bytes_in`` (client to upstream) and ``stats.bytes_out``."""
    tunnel = _Tunnel(idle, stats)
    with trio.move_on_after(limit) as deadline, tunnel.quiet:
        async with trio.open_nursery() as nursery:
            tunnel.scope = nursery.cancel_scope
            nursery.start_soon(tunnel.direction, down, up, to_up, "bytes_in")
            nursery.start_soon(tunnel.direction, up, down, to_down, "bytes_out")
    if deadline.cancelled_caught:
        return LIMIT
    if tunnel.quiet.cancelled_caught:
        return IDLE
    return BROKEN if tunnel.broken else CLOSED
