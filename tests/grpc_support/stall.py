"""An h2c upstream that takes every stream and never answers, for deadline tests.

A grpcio server enforces ``grpc-timeout`` itself and answers
DEADLINE_EXCEEDED at the deadline, racing the proxy's own timer; this server
ignores it, so whatever answer the client gets at the deadline is the
proxy's. It records which streams were opened and which the proxy reset
(a proxy that gives up on a call should cancel its upstream stream).

Threads and blocking sockets; ``close()`` ends them.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class StallServer:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self.opened: list[dict[bytes, bytes]] = []  # each stream's request head
        self.reset: list[int] = []                 # RST_STREAM error codes received
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                sock, _ = self._listener.accept()
                with self._lock:
                    self._sockets.append(sock)
                threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            sock.sendall(conn.data_to_send())
            while chunk := sock.recv(65536):
                for event in conn.receive_data(chunk):
                    with self._lock:
                        if isinstance(event, h2.events.RequestReceived):
                            self.opened.append(dict(event.headers))
                        elif isinstance(event, h2.events.StreamReset):
                            self.reset.append(event.error_code)
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                sock.sendall(conn.data_to_send())

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def __enter__(self) -> StallServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
