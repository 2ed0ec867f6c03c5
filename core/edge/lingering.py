"""Lingering close: let a client read its answer before the connection closes.

When sluice closes a connection while request bytes may still be on their
way (a refused head, an answer sent before the request body ended, pipelined
requests it will not serve), closing at once makes the kernel answer those
bytes with a reset, and a reset can destroy the answer before the client
has read it (RFC 9112 9.6); a client that is still sending sees its send
fail and never reads at all. So, as nginx's ``lingering_close`` does: shut
down writing (the client sees the answer end), then read and drop what comes
until the client closes, or stays quiet for ``lingering_timeout``, or
``lingering_time`` has passed, or ``MAX_DISCARD`` bytes were dropped; then
close.

The bounds are nginx's defaults (30 s in all, 5 s of quiet): a client still
uploading when the answer came, which only reads once its request is sent,
must be let finish to see the answer. They cost no one a slot: a lingering
connection is the first to give its slot up when a new client needs one
(``slots.py``), and a draining listener ends it. ``MAX_DISCARD`` bounds the
work a fast client can make sluice do; on Linux the kernel drops the bytes
(``MSG_TRUNC``) without copying them.

Under TLS the same happens on the TCP socket below the TLS layer: the FIN
says the answer is over, the client's records are dropped unread. No
close_notify is sent (sluice sends none on any close): every answer sluice
closes after is framed by its length or its chunks, so its end is known
without one.
"""

from __future__ import annotations

import socket
import sys

import trio

from .byteio import borrowed
from .slots import Waiting

__all__ = ["MAX_DISCARD", "linger", "shut_now"]

MAX_DISCARD = 64 * 1024 * 1024  # bytes dropped at most before closing anyway
_CHUNK = 64 * 1024
_BURST = 16 * _CHUNK  # dropped per wake-up before letting other tasks run
_SCRAP = bytearray(_CHUNK)  # never read: with MSG_TRUNC the kernel does not even write it
_TRUNC = socket.MSG_TRUNC if sys.platform == "linux" else 0


def _drop(sock: socket.socket) -> int | None:
    """Drop what can be read now (up to a burst); None once the client closed."""
    dropped = 0
    while dropped < _BURST:
        try:
            n = sock.recv_into(_SCRAP, _CHUNK, _TRUNC)
        except BlockingIOError:
            break
        except OSError:  # reset: nothing left to protect
            return None
        if not n:
            return None
        dropped += n
    return dropped


async def linger(io, idle: dict, *, total: float, quiet: float) -> int:
    """Shut down writing on ``io``'s connection and drop what the client
    still sends, within the bounds above; returns the bytes dropped. The
    wait is in ``idle`` (evictable) the whole time. The caller closes ``io``."""
    fd = io.fileno()
    if fd < 0:
        return 0
    dropped = 0
    with borrowed(fd) as sock:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # already reset or gone
            return 0
        waiting = Waiting(trio.CancelScope(deadline=trio.current_time() + total))
        idle[waiting] = None
        try:
            with waiting.scope:
                while dropped < MAX_DISCARD:
                    with trio.move_on_after(quiet) as gap:
                        await trio.lowlevel.wait_readable(fd)
                    if gap.cancelled_caught:
                        break
                    n = _drop(sock)
                    if n is None:
                        break
                    dropped += n
        finally:
            idle.pop(waiting, None)
    return dropped


def shut_now(fd: int) -> None:
    """The no-wait version, for a client refused because no slot is free:
    shut down writing and drop what has already arrived, so that closing
    right after resets nothing for those bytes (later ones still may)."""
    with borrowed(fd) as sock:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        _drop(sock)
