#!/usr/bin/env python3
"""The floor under any trio proxy on this machine: a relay with no HTTP at all.

Per request it does what sluice's edge does (receive from the client, send a
fixed request upstream, receive the response, send it back) and nothing
else: no parsing, no headers, no chain. Compare its req/s with run.py's
sluice row to see what the HTTP layer costs on top of trio and the kernel.

    .venv/bin/python benchmarks/trio_floor.py --listen 18090 --upstream 127.0.0.1:18081
    wrk -t1 -c32 -d10s http://127.0.0.1:18090/

The upstream must answer ``GET /`` with a body ending in ``upstream\\n`` (the
benchmark's nginx upstream does).
"""

from __future__ import annotations

import argparse
import functools

import trio

REQUEST = b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n"
BODY_END = b"upstream\n"


async def relay(upstream: tuple[str, int], client: trio.SocketStream) -> None:
    try:
        async with client, await trio.open_tcp_stream(*upstream) as up:
            while True:
                with trio.move_on_after(60):
                    if not await client.receive_some(65536):
                        return
                await up.send_all(REQUEST)
                response = b""
                while not response.endswith(BODY_END):
                    response += await up.receive_some(65536)
                await client.send_all(response)
    except (trio.BrokenResourceError, OSError):
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, default=18090, help="port on 127.0.0.1")
    parser.add_argument("--upstream", default="127.0.0.1:18081", help="host:port")
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    trio.run(functools.partial(trio.serve_tcp, functools.partial(relay, (host, int(port))),
                               args.listen, host="127.0.0.1"))


if __name__ == "__main__":
    main()
