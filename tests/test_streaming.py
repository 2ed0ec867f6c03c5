"""1 GiB each way through the proxy, with the proxy's memory flat.

sluice runs as its own process so its RSS is measured alone; curl is the
client; the origin is a few plain sockets in a thread of this process,
cheap enough that the machine's cores go to the proxy. While a transfer
runs, the proxy's RSS is sampled every 50 ms: the peak must stay within
64 MiB of the baseline taken after a warm-up, whatever the body size, or
the proxy is buffering bodies instead of streaming them.

Run with ``-s`` to see the figures (baseline, peak, time, throughput).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from .proc import Running, curl, free_port, rss_bytes

pytestmark = pytest.mark.slow

GiB = 1 << 30
MiB = 1 << 20
SIZE = GiB
BLOCK = b"\xa5" * MiB  # sent SIZE // MiB times: the origin allocates nothing per block
HEADROOM = 64 * MiB  # how far above its baseline the proxy's RSS may go
CURL_TIMEOUT = 180


class RawOrigin:
    """HTTP/1.1 just big enough for this test, over plain blocking sockets.

    ``GET /download`` answers SIZE bytes with Content-Length; ``PUT /upload``
    reads and discards the body (Content-Length or chunked) and answers the
    byte count; anything else answers ``ok``. Keep-alive is honoured since
    the proxy pools its upstream connections.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.uploads: list[int] = []
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        scratch = memoryview(bytearray(MiB))
        try:
            with conn:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    request_line, *lines = head.decode("latin-1").split("\r\n")
                    method, target, _ = request_line.split(" ", 2)
                    headers = {}
                    for line in lines:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    if headers.get("expect", "").lower() == "100-continue":
                        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        received, buf = self._read_chunked(conn, buf, scratch)
                    else:
                        length = int(headers.get("content-length", "0"))
                        received, buf = self._discard(conn, buf, length, scratch)
                    if method == "GET" and target == "/download":
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
                        for _ in range(SIZE // len(BLOCK)):
                            conn.sendall(BLOCK)
                        continue
                    if method == "PUT" and target == "/upload":
                        self.uploads.append(received)
                        body = b"%d" % received
                    else:
                        body = b"ok\n"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                                 b"Content-Type: text/plain\r\n\r\n%s" % (len(body), body))
        except OSError:
            return  # the proxy went away mid-message: its test reports that
        except Exception as exc:  # a parsing bug here must not pass silently
            self.errors.append(exc)

    @staticmethod
    def _discard(conn: socket.socket, buf: bytes, length: int, scratch: memoryview) -> tuple[int, bytes]:
        """Read ``length`` body bytes (some already in ``buf``); return (count, leftover)."""
        take = min(length, len(buf))
        received, buf = take, buf[take:]
        while received < length:
            n = conn.recv_into(scratch, min(length - received, len(scratch)))
            if n == 0:
                raise ConnectionError(f"body ended after {received} of {length} bytes")
            received += n
        return received, buf

    @classmethod
    def _read_chunked(cls, conn: socket.socket, buf: bytes, scratch: memoryview) -> tuple[int, bytes]:
        def line(buf: bytes) -> tuple[bytes, bytes]:
            while b"\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    raise ConnectionError("chunked body ended early")
                buf += data
            return tuple(buf.split(b"\r\n", 1))  # type: ignore[return-value]

        total = 0
        while True:
            size_line, buf = line(buf)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer, buf = line(buf)
                    if not trailer:
                        return total, buf
            _, buf = cls._discard(conn, buf, size, scratch)
            total += size
            crlf, buf = line(buf)
            assert crlf == b"", f"chunk of {size} bytes not followed by CRLF"


class PeakRSS:
    """Sample a process's RSS every 50 ms in a thread; ``peak`` once stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


@pytest.fixture(scope="module")
def origin():
    o = RawOrigin()
    yield o
    o.close()
    assert not o.errors, o.errors


@pytest.fixture(scope="module", params=["httptools", "h11"])
def proxy(origin, request):
    """A proxy on each HTTP/1.1 codec in turn: both must stream."""
    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{origin.port}",
                 "--plugins", "router,balancer", "--http1-codec", request.param) as p:
        url = f"http://127.0.0.1:{port}"
        for _ in range(3):  # warm up: first connections, imports, pool
            r = curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/warm-up")
            assert r.stdout == "200", (r.stdout, r.stderr, "".join(p.stderr))
        p.base_url = url
        yield p


def _baseline(pid: int) -> int:
    """The proxy's RSS at rest, after the warm-up and before a transfer."""
    time.sleep(0.2)
    return rss_bytes(pid)


def _report(what: str, seconds: float, baseline: int, rss: PeakRSS) -> None:
    print(f"\n{what}: {SIZE / GiB:.0f} GiB in {seconds:.1f} s = {SIZE / MiB / seconds:.0f} MiB/s;"
          f" proxy RSS baseline {baseline / MiB:.1f} MiB, peak {rss.peak / MiB:.1f} MiB"
          f" (+{(rss.peak - baseline) / MiB:.1f} MiB, {rss.samples} samples)")


def test_download_1gib_streams_with_flat_memory(proxy):
    baseline = _baseline(proxy.pid)
    with PeakRSS(proxy.pid) as rss:
        start = time.monotonic()
        r = curl("-o", "/dev/null", "-w", "%{size_download} %{http_code}", f"{proxy.base_url}/download",
                 timeout=CURL_TIMEOUT)
        seconds = time.monotonic() - start
    _report("download", seconds, baseline, rss)
    assert r.returncode == 0, (r.stderr, "".join(proxy.stderr[-20:]))
    assert r.stdout == f"{SIZE} 200"
    assert rss.peak < baseline + HEADROOM, f"RSS peaked at {rss.peak / MiB:.1f} MiB"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upload_1gib_streams_with_flat_memory(proxy, origin, tmp_path, framing):
    body = tmp_path / "upload.bin"
    body.touch()
    os.truncate(body, SIZE)  # sparse: no disk I/O, reads as zeros
    before = len(origin.uploads)
    baseline = _baseline(proxy.pid)
    with PeakRSS(proxy.pid) as rss:
        start = time.monotonic()
        chunked = ["-H", "Transfer-Encoding: chunked"] if framing == "chunked" else []
        r = curl(*chunked, "-T", str(body), "-w", " %{size_upload} %{http_code}",
                 f"{proxy.base_url}/upload", timeout=CURL_TIMEOUT)
        seconds = time.monotonic() - start
    _report("upload", seconds, baseline, rss)
    assert r.returncode == 0, (r.stderr, "".join(proxy.stderr[-20:]))
    count, sent, status = r.stdout.split()  # the origin's count, curl's (with chunk framing)
    assert (count, status) == (str(SIZE), "200") and int(sent) >= SIZE
    assert origin.uploads[before:] == [SIZE]
    assert rss.peak < baseline + HEADROOM, f"RSS peaked at {rss.peak / MiB:.1f} MiB"


@pytest.fixture(scope="module")
def h2proxy(origin, tmp_path_factory):
    """A proxy serving h2c (prior knowledge) to the same HTTP/1.1 origin."""
    port = free_port()
    config = tmp_path_factory.mktemp("h2") / "sluice.toml"
    config.write_text(
        f'[[listeners]]\naddress = "127.0.0.1:{port}"\nfilters = ["router"]\nhttp2 = true\n'
        f'[clusters.origin]\nendpoints = ["127.0.0.1:{origin.port}"]\n'
        '[[routes]]\nmatch = { prefix = "/" }\ncluster = "origin"\n'
    )
    with Running("-c", str(config), "--plugins", "router,balancer") as p:
        p.base_url = f"http://127.0.0.1:{port}"
        for _ in range(3):
            r = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", f"{p.base_url}/warm-up")
            assert r.stdout == "200", (r.stdout, r.stderr, "".join(p.stderr))
        yield p


def test_h2_download_1gib_streams_with_flat_memory(h2proxy):
    """HTTP/2 flow control is the backpressure: the proxy sends no faster
    than the client's windows open, and reads the origin no faster."""
    baseline = _baseline(h2proxy.pid)
    with PeakRSS(h2proxy.pid) as rss:
        start = time.monotonic()
        r = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download} %{http_code} %{http_version}",
                 f"{h2proxy.base_url}/download", timeout=CURL_TIMEOUT)
        seconds = time.monotonic() - start
    _report("h2 download", seconds, baseline, rss)
    assert r.returncode == 0, (r.stderr, "".join(h2proxy.stderr[-20:]))
    assert r.stdout == f"{SIZE} 200 2"
    assert rss.peak < baseline + HEADROOM, f"RSS peaked at {rss.peak / MiB:.1f} MiB"


def test_h2_upload_1gib_streams_with_flat_memory(h2proxy, origin, tmp_path):
    """Request DATA is acknowledged only as the exchange forwards it, so the
    client has at most a stream window in flight."""
    body = tmp_path / "upload.bin"
    body.touch()
    os.truncate(body, SIZE)
    before = len(origin.uploads)
    baseline = _baseline(h2proxy.pid)
    with PeakRSS(h2proxy.pid) as rss:
        start = time.monotonic()
        r = curl("--http2-prior-knowledge", "-T", str(body), "-w", " %{size_upload} %{http_code}",
                 f"{h2proxy.base_url}/upload", timeout=CURL_TIMEOUT)
        seconds = time.monotonic() - start
    _report("h2 upload", seconds, baseline, rss)
    assert r.returncode == 0, (r.stderr, "".join(h2proxy.stderr[-20:]))
    count, sent, status = r.stdout.split()
    assert (count, status) == (str(SIZE), "200") and int(sent) == SIZE
    assert origin.uploads[before:] == [SIZE]
    assert rss.peak < baseline + HEADROOM, f"RSS peaked at {rss.peak / MiB:.1f} MiB"
