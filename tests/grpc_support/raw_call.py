"""One gRPC call as raw HTTP/2 frames (h2c, prior knowledge), for what grpcio will not do.

grpcio sends ``grpc-timeout`` only with a deadline of its own, and then its
own timer races the proxy's; ``raw_call`` sends the header with no timer
behind it, so the answer shows what the proxy did with it. Blocking
sockets, bounded by ``timeout``.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


def frame_message(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return struct.pack(">?I", False, len(message)) + message


@dataclass
class Answer:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    trailers_only: bool = False  # the head ended the stream: gRPC's trailers-only form
    reset: int | None = None     # RST_STREAM's error code, if the stream was reset
    elapsed: float = 0.0


def raw_call(address: tuple[str, int], path: str, message: bytes, headers: list[tuple[str, str]] = (),
             timeout: float = 10.0) -> Answer:
    """POST ``path`` with one gRPC message and read the whole answer."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    answer = Answer()
    started = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                   (":authority", f"{address[0]}:{address[1]}"),
                                   ("content-type", "application/grpc"), ("te", "trailers"), *headers])
        conn.send_data(stream, frame_message(message), end_stream=True)
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = dict(event.headers)
                    answer.trailers_only = event.stream_ended is not None
                elif isinstance(event, h2.events.DataReceived):
                    answer.data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    answer.reset = event.error_code
                    done = True
            sock.sendall(conn.data_to_send())
    answer.elapsed = time.monotonic() - started
    return answer
