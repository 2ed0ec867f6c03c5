"""The frames ``H2Server`` answers itself, looked at before h2 sees them.

h2 4.x makes a connection error of what RFC 9113 makes a stream error (or
names another code), and closes its whole state machine on a GOAWAY. The
gate reads each frame's 9-byte header (and a few payload bytes) as the
bytes arrive and says, per frame, whether h2 may have it as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.errors
import h2.events

from .h2_events import PREFACE, Terminated

if TYPE_CHECKING:
    from .h2_codec import H2Server

__all__ = ["DROP", "LOOK", "OVER", "PASS", "WAIT", "FrameGate"]

# -- what is looked at before h2 --------------------------------------------

_DATA, _HEADERS, _SETTINGS, _GOAWAY, _WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x7, 0x8
_END_STREAM, _ACK, _PADDED = 0x1, 0x1, 0x8

# ``FrameGate.look``'s verdicts (``decide`` may also return a rewritten header).
PASS = "pass"  # to h2 as it is
WAIT = "wait"  # more bytes needed to say
LOOK = "look"  # h2 must have what came before: ``decide`` then says
DROP = "drop"  # handled here; h2 never sees it
OVER = "over"  # a connection error: nothing more is read


class FrameGate:
    """The frames ``H2Server`` answers itself, because h2 would answer them
    otherwise (h2 4.x raises a connection error where RFC 9113 names a
    stream error, or names another code):

    ======================================  ==========================  ==========================
    frame                                   RFC 9113                    done here
    ======================================  ==========================  ==========================
    SETTINGS with ACK and a payload         6.5: connection error       GOAWAY FRAME_SIZE_ERROR
                                              FRAME_SIZE_ERROR            (h2: PROTOCOL_ERROR)
    WINDOW_UPDATE of 0 on an open stream    6.9: stream error           RST_STREAM PROTOCOL_ERROR,
                                              PROTOCOL_ERROR              the frame dropped
    DATA past the content-length, or        8.1.1: malformed (a         RST_STREAM PROTOCOL_ERROR,
      END_STREAM short of it                  stream error)               then h2 takes the frame
                                                                          (its window is counted)
    trailers without END_STREAM, or ending  8.1: malformed              END_STREAM set for h2 (its
      the body short of the content-length                                HPACK state must see the
                                                                          block), then RST_STREAM
                                                                          PROTOCOL_ERROR
    a request with END_STREAM on its        8.1.1: malformed            RST_STREAM PROTOCOL_ERROR
      HEADERS and a content-length above 0    (h2 lets it through)
    the client's GOAWAY with NO_ERROR       6.8: the streams open       ``Terminated``; the frame
                                              carry on                    dropped (h2 would close its
                                                                          whole state machine,
                                                                          python-hyper/h2#1181)
    ======================================  ==========================  ==========================

    Only headers are read (and 4 bytes of a WINDOW_UPDATE, 1 of a padded
    DATA); payloads stream through untouched. Body sizes are counted here
    per stream with a content-length (a HEAD's is 0, as h2 counts it), so
    h2's own count, which raises, never finds a mismatch first.
    """

    __slots__ = ("through", "dropped", "lengths", "bad_trailers", "newest", "_short", "_preface")

    def __init__(self) -> None:
        self.through = 0  # payload bytes of the current frame still to pass
        self.dropped = 0  # payload size of the frame ``decide`` dropped
        self.lengths: dict[int, list[int]] = {}  # stream -> [content-length, bytes so far]
        self.bad_trailers: set[int] = set()  # streams whose trailers h2 gets with END_STREAM set
        self.newest = 0  # the highest stream a HEADERS frame was seen on
        self._short = 0  # the stream whose DATA ``look`` found breaking its content-length
        self._preface = len(PREFACE)

    def preface(self, size: int) -> int:
        """How many of ``size`` new bytes belong to the client preface."""
        take = min(self._preface, size)
        self._preface -= take
        return take

    def opened(self, event: h2.events.RequestReceived) -> str | None:
        """Note a new request's content-length; why it is malformed, if it is."""
        length = None
        method = None
        for name, value in event.headers:
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b":method":
                method = value
        if method == b"HEAD":
            length = 0
        if event.stream_ended is not None:
            if length:
                return f"content-length {length}, but no body"
        elif length is not None:
            self.lengths[event.stream_id] = [length, 0]
        return None

    def forget(self, stream_id: int) -> None:
        self.lengths.pop(stream_id, None)

    def look(self, data: bytes, pos: int, server: H2Server) -> object:
        """What to do with the frame at ``pos`` (a first look, no h2 state)."""
        if len(data) - pos < 9:
            return WAIT
        kind = data[pos + 3]
        flags = data[pos + 4]
        sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        if kind == _DATA:
            if flags & _PADDED and len(data) - pos < 10:
                return WAIT
            if sid in self.lengths:  # counted without h2: a mismatch only needs it
                if self._body(data, pos):
                    return PASS
                self._short = sid
                return LOOK
            # The stream may be opened by bytes h2 has not had yet.
            return LOOK if sid > server._h2.highest_inbound_stream_id else PASS
        if kind == _HEADERS:
            if sid > self.newest:
                self.newest = sid
                return PASS  # a new stream
            return LOOK  # trailers, maybe
        if kind == _WINDOW_UPDATE and sid and int.from_bytes(data[pos:pos + 3], "big") == 4:
            if len(data) - pos < 13:
                return WAIT
            return LOOK if not int.from_bytes(data[pos + 9:pos + 13], "big") & 0x7FFFFFFF else PASS
        if kind == _SETTINGS and flags & _ACK and sid == 0 and data[pos:pos + 3] != b"\0\0\0":
            return LOOK
        if kind == _GOAWAY and sid == 0:
            size = int.from_bytes(data[pos:pos + 3], "big")
            if 8 <= size <= server._h2.max_inbound_frame_size:  # else h2's connection error
                if len(data) - pos < 9 + size:
                    return WAIT
                return LOOK if not int.from_bytes(data[pos + 13:pos + 17], "big") else PASS
        return PASS

    def decide(self, data: bytes, pos: int, server: H2Server, out: list) -> object:
        """The verdict on the frame at ``pos``, h2 having had what came before."""
        kind = data[pos + 3]
        flags = data[pos + 4]
        sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        if kind == _GOAWAY:
            size = int.from_bytes(data[pos:pos + 3], "big")
            last = int.from_bytes(data[pos + 9:pos + 13], "big") & 0x7FFFFFFF
            out.append((0, Terminated(0, last, data[pos + 17:pos + 9 + size].decode("latin-1"))))
            self.dropped = size
            return DROP
        if kind == _SETTINGS:
            code = h2.errors.ErrorCodes.FRAME_SIZE_ERROR
            server._h2.close_connection(code, additional_data=b"SETTINGS ACK with a payload")
            out.append((0, Terminated(int(code), server._h2.highest_inbound_stream_id,
                                      "SETTINGS ACK with a payload")))
            return OVER
        if kind == _WINDOW_UPDATE:
            if sid > server._h2.highest_inbound_stream_id or not sid & 1:
                return PASS  # an idle stream: h2's connection error (RFC 9113 5.1)
            if server._open(sid):
                server._stream_error(sid, out)
            self.dropped = 4  # on a stream closed already: nothing to say
            return DROP
        if kind == _DATA:
            short, self._short = self._short == sid, 0
            if short or not self._body(data, pos):
                server._stream_error(sid, out)  # then h2 takes the frame as on any reset stream
            return PASS
        # HEADERS on a stream already open: trailers (8.1), which end the body.
        if not server.remote_open(sid):
            return PASS  # on a closed stream, or a lower id than one used: h2's connection error
        counted = self.lengths.pop(sid, None)
        if flags & _END_STREAM and (counted is None or counted[1] == counted[0]):
            return PASS
        self.bad_trailers.add(sid)
        return data[pos:pos + 4] + bytes([flags | _END_STREAM]) + data[pos + 5:pos + 9]

    def _body(self, data: bytes, pos: int) -> bool:
        """Count the DATA frame at ``pos`` against its stream's content-length;
        False when it goes past it, or ends the stream short of it."""
        sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        counted = self.lengths.get(sid)
        if counted is None:
            return True
        size = int.from_bytes(data[pos:pos + 3], "big")
        flags = data[pos + 4]
        if flags & _PADDED:
            size -= 1 + data[pos + 9]
            if size < 0:
                return True  # padding past the payload: h2's connection error (6.1)
        counted[1] += size
        if counted[1] > counted[0] or flags & _END_STREAM and counted[1] != counted[0]:
            return False
        if flags & _END_STREAM:
            del self.lengths[sid]
        return True
