"""The Echo service of echo.proto on a real grpcio (asyncio) server, as a process of its own.

    python echo_server.py --stubs DIR [--port 0]

``DIR`` holds the generated ``echo_pb2`` modules (``grpc_support.load_stubs``).
The server prints ``listening on 127.0.0.1:PORT`` once it serves, and stops on
SIGTERM. Each call's first message says how it behaves (see echo.proto): how
many replies, how long to sleep before each, what metadata to send, and
whether to abort, with which status, after how many replies. An abort before
any reply and without initial metadata is gRPC's trailers-only response.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

# 4 MiB payloads each way, above grpcio's default 4 MiB message limit.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def _metadata(pairs) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((p.key, p.value.encode("latin-1") if p.key.endswith("-bin") else p.value) for p in pairs)


def _pairs(pb2, metadata) -> list:
    return [pb2.Pair(key=key, value=value.decode("latin-1") if isinstance(value, bytes) else value)
            for key, value in metadata]


def servicer(pb2, pb2_grpc):
    class Echo(pb2_grpc.EchoServicer):
        async def _begin(self, call, context) -> None:
            if call.trailing_metadata:
                context.set_trailing_metadata(_metadata(call.trailing_metadata))
            if call.initial_metadata:
                await context.send_initial_metadata(_metadata(call.initial_metadata))

        async def _abort_at(self, call, context, sent: int) -> None:
            """Abort as ``call`` asks once ``sent`` replies have gone out."""
            if call.abort_code and sent == call.abort_after:
                await context.abort(status_code(call.abort_code), call.abort_message,
                                    trailing_metadata=_metadata(call.trailing_metadata))

        def _reply(self, call, context, index: int, received: int, received_bytes: int, payload=None):
            reply = pb2.Reply(index=index, received=received, received_bytes=received_bytes,
                              payload=b"x" * call.reply_size if call.reply_size else
                              call.payload if payload is None else payload)
            if index == 0:
                reply.metadata.extend(_pairs(pb2, context.invocation_metadata()))
            return reply

        async def Unary(self, call, context):
            await self._begin(call, context)
            if call.delay:
                await asyncio.sleep(call.delay)
            await self._abort_at(call, context, 0)
            return self._reply(call, context, 0, 1, len(call.payload))

        async def ClientStream(self, calls, context):
            first, payloads = None, []
            async for call in calls:
                if first is None:
                    first = call
                    await self._begin(call, context)
                payloads.append(call.payload)
            first = first or pb2.Call()
            if first.delay:
                await asyncio.sleep(first.delay)
            await self._abort_at(first, context, 0)
            joined = b"".join(payloads)
            return self._reply(first, context, 0, len(payloads), len(joined), payload=joined)

        async def ServerStream(self, call, context):
            await self._begin(call, context)
            for index in range(call.count):
                await self._abort_at(call, context, index)
                if call.delay:
                    await asyncio.sleep(call.delay)
                yield self._reply(call, context, index, 1, len(call.payload))
            await self._abort_at(call, context, call.count)

        async def Bidi(self, calls, context):
            first, received, received_bytes = None, 0, 0
            async for call in calls:
                received += 1
                received_bytes += len(call.payload)
                if first is None:
                    first = call
                    await self._begin(call, context)
                await self._abort_at(first, context, received - 1)
                if first.delay:
                    await asyncio.sleep(first.delay)
                reply = self._reply(first, context, received - 1, received, received_bytes, payload=call.payload)
                if first.reply_size:
                    reply.payload = b"x" * first.reply_size
                yield reply
            if first is not None:
                await self._abort_at(first, context, received)

    return Echo()


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode for its number on the wire."""
    return next(code for code in grpc.StatusCode if code.value[0] == number)


async def serve(port: int, pb2, pb2_grpc) -> None:
    server = grpc.aio.server(options=OPTIONS)
    pb2_grpc.add_EchoServicer_to_server(servicer(pb2, pb2_grpc), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--stubs", required=True, help="directory with echo_pb2 and echo_pb2_grpc")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()
    sys.path.insert(0, args.stubs)
    import echo_pb2
    import echo_pb2_grpc

    asyncio.run(serve(args.port, echo_pb2, echo_pb2_grpc))


if __name__ == "__main__":
    main()
