"""The battery's clients: an h11 client that reads every byte, and the
request head a bare socket sends.

The h11 client sees every byte, so a response longer than its
Content-Length is caught, where httpx would silently drop the rest; the
bare socket aborts mid-body. (httpx is the client of the concurrent and
keep-alive scenarios: it is what they need, many exchanges at once.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio

_WAIT = 6.0  # seconds any client wait may take before it counts as a hang


@dataclass
class _Answer:
    """A response as the h11 client read it."""

    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False  # its end arrived
    head: bool = False  # the answer to a HEAD: a Content-Length, no body
    problem: str = ""  # why it is not a well-framed response
    hung: bool = False

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


async def _exchange(address: tuple[str, int], method: str, target: str, body: bytes | list[bytes],
                    chunked: bool, trailers: list[tuple[str, str]] | None, fields: list[tuple[str, str]],
                    answer: _Answer) -> None:
    """One request with head ``fields`` (its framing added) on a connection of
    its own to ``address``; the response read into ``answer``."""
    chunks = body if isinstance(body, list) else [body]
    fields = list(fields)
    if chunked or trailers:
        fields.append(("transfer-encoding", "chunked"))
    elif method not in ("GET", "HEAD") or any(chunks):
        fields.append(("content-length", str(sum(map(len, chunks)))))
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        try:
            await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=fields)))
            for chunk in chunks:
                if chunk:
                    await stream.send_all(conn.send(h11.Data(data=chunk)))
            await stream.send_all(conn.send(h11.EndOfMessage(headers=trailers or [])))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # answered (and closed) before the body went: read what came
        await _read_answer(stream, conn, answer)


async def _read_answer(stream: trio.SocketStream, conn: h11.Connection, answer: _Answer) -> None:
    """Read one response into ``answer``: its parts, and what is wrong with its framing."""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    answer.problem = f"the connection broke before the response ended ({exc!r})"
                    return
                if not data and answer.status is None:
                    answer.problem = "the proxy closed the connection without a response"
                    return
                conn.receive_data(data)
            elif type(event) is h11.Response:
                answer.status = event.status_code
                answer.headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
            elif type(event) is h11.Data:
                answer.body += event.data
            elif type(event) is h11.EndOfMessage:
                answer.trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
                answer.complete = True
                break
            elif type(event) is h11.ConnectionClosed:
                answer.problem = "the connection closed before any response"
                return
    except h11.RemoteProtocolError as exc:
        if answer.status is None:
            answer.problem = f"the response head does not parse ({exc})"
        else:
            length = answer.header("content-length")
            answer.problem = (f"the connection closed {len(answer.body)} body bytes into a {answer.status} "
                              f"response whose Content-Length is {length}" if length is not None else
                              f"the {answer.status} response's body does not parse or ended early ({exc})")
        return
    rest = bytearray(conn.trailing_data[0])
    try:
        while data := await stream.receive_some(65536):
            rest += data
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    length = answer.header("content-length")
    if rest:
        answer.problem = (f"{len(rest)} bytes followed the end of the response ({bytes(rest[:40])!r}); "
                          f"its Content-Length is {length}, {len(answer.body)} body bytes before them")
    elif length is not None and length.isdigit() and int(length) != len(answer.body) and not answer.head:
        answer.problem = f"Content-Length {length} but {len(answer.body)} body bytes"


def _head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """A request head as a bare socket sends it (no body framing added)."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
