"""A real grpcio server and client for the gRPC tests and benchmarks/grpc_unary.py.

- ``load_stubs(directory)`` generates echo.proto's modules with grpcio-tools
  into ``directory`` (never checked in), puts it on ``sys.path`` and imports them.
- ``EchoServer`` runs echo_server.py as a process of its own, on a free port,
  and stops it by its PID.
- ``CHANNEL_OPTIONS`` are the client options every channel here uses.

grpcio and grpcio-tools are in the ``test`` extra; importing this package
without them fails at the ``grpc`` imports (callers ``pytest.importorskip``).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
PROTO = HERE / "echo.proto"
SERVER = HERE / "echo_server.py"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # as echo_server.py's: 4 MiB payloads fit
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),  # an http_proxy in the environment must not be in the path
    ("grpc.enable_retries", 0),     # a failure must show, not be retried away
]
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0

__all__ = ["CHANNEL_OPTIONS", "EchoServer", "load_stubs"]


def load_stubs(directory: Path) -> tuple[ModuleType, ModuleType]:
    """``(echo_pb2, echo_pb2_grpc)``, generated from echo.proto into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "echo_pb2_grpc.py").exists():
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={directory}",
                        f"--grpc_python_out={directory}", str(PROTO)], check=True, capture_output=True)
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")


class EchoServer:
    """echo_server.py in its own process; ``address`` once it listens.

    Its output after the first line is kept in ``output`` for failure messages."""

    def __init__(self, stubs: Path, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--stubs", str(stubs), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.output: list[str] = []
        self.address = ""
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or not self.address:
            self.stop()
            raise RuntimeError(f"the gRPC echo server did not start:\n{''.join(self.output)}")

    def _read(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if not self.address and (match := re.search(r"listening on (\S+)", line)):
                self.address = match.group(1)
                ready.set()
        ready.set()  # it exited before it listened

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> int:
        """SIGTERM by PID, SIGKILL if it is still there after STOP_TIMEOUT_S; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
