"""The client side of the benchmark: wrk and h2load runs and their parsing,
answer checks, and a holder of idle keep-alive connections.

Nothing here starts a server; it only talks to URLs it is given.
"""

from __future__ import annotations

import http.client
import re
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import trio

# wrk's own timeout: a request slower than this counts as a timeout error and
# drops out of the latency figures, so keep it well above any latency expected.
WRK_TIMEOUT_S = 10
# wrk prints times as e.g. 812.00us, 1.23ms, 2.01s (and m/h for huge values),
# and bytes with binary prefixes.
MS_PER_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
BYTES_PER_UNIT = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
PERCENTILES = ("50", "75", "90", "99")
IDLE_OPENERS = 200  # connections being opened at once by hold_idle
IDLE_TIMEOUT_S = 180


class ParseError(Exception):
    """wrk's or h2load's output did not have the expected shape."""


# ------------------------------------------------------------------------ wrk


def wrk_argv(url: str, scenario, threads: int, duration_s: int, script: Path | None) -> list[str]:
    argv = ["wrk", f"-t{threads}", f"-c{scenario.connections}", f"-d{duration_s}s",
            f"--timeout={WRK_TIMEOUT_S}s", "--latency"]
    for header in scenario.headers:
        argv += ["-H", header]
    if script:
        argv += ["-s", str(script)]
    return argv + [url + scenario.path]


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ParseError(f"unrecognised wrk time {text!r}")
    return round(float(match[1]) * MS_PER_UNIT[match[2]], 4)


def _to_bytes(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text)
    if not match:
        raise ParseError(f"unrecognised wrk size {text!r}")
    return float(match[1]) * BYTES_PER_UNIT[match[2]]


def parse_wrk(output: str) -> dict:
    """Throughput, latency percentiles (ms) and error counts from ``wrk --latency`` output."""
    def find(pattern: str) -> re.Match:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise ParseError(f"could not find {pattern!r} in wrk output:\n{output}")
        return match

    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_counts = dict(zip(("connect", "read", "write", "timeout"),
                             map(int, socket_errors.groups() if socket_errors else (0,) * 4),
                             strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result = {
        "requests": int(find(r"(\d+) requests in")[1]),
        "rps": float(find(r"Requests/sec:\s+([\d.]+)")[1]),
        "transfer_bytes_s": _to_bytes(find(r"Transfer/sec:\s+(\S+)")[1]),
        **{f"p{p}_ms": _to_ms(find(rf"^\s+{p}%\s+(\S+)")[1]) for p in PERCENTILES},
        "socket_errors": socket_counts,
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
    }
    result["errors"] = result["non_2xx"] + sum(socket_counts.values())
    return result


def failed_run(message: str) -> dict:
    return {"requests": 0, "rps": 0.0, "errors": 0, "failure": message}


def run_wrk(url: str, scenario, threads: int, duration_s: int, script: Path | None) -> dict:
    """One wrk run. If wrk fails (e.g. the target died and refuses
    connections) the run is recorded with no requests and a failure message,
    so that the other runs and the table still happen."""
    argv = wrk_argv(url, scenario, threads, duration_s, script)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        return failed_run(f"wrk did not finish within {duration_s + 60}s")
    if proc.returncode != 0:
        return failed_run(f"wrk exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()}")
    try:
        return parse_wrk(proc.stdout)
    except ParseError as exc:
        return failed_run(str(exc))


# --------------------------------------------------------------------- h2load


def h2load_argv(url: str, scenario, threads: int, duration_s: int, log_file: Path) -> list[str]:
    """h2c with prior knowledge (an http:// URL), for a duration; every request's
    latency goes to ``log_file``, as h2load prints no percentiles of its own."""
    argv = ["h2load", f"-t{min(threads, scenario.connections)}", f"-c{scenario.connections}",
            f"-m{scenario.streams}", f"-D{duration_s}", "--log-file", str(log_file)]
    for header in scenario.headers:
        argv += ["-H", header]
    return argv + [url + scenario.path]


def _h2load_counts(output: str) -> dict:
    """The request and status counts of an h2load summary. ``failed`` includes
    answers that are not 2xx or 3xx; ``errored`` and ``timeout`` are the
    requests lost to the connection (reset, refused, closed, timed out)."""
    requests = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                         r"(\d+) failed, (\d+) errored, (\d+) timeout", output, re.MULTILINE)
    statuses = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx",
                         output, re.MULTILINE)
    data = re.search(r"^traffic: .*\((\d+)\) data", output, re.MULTILINE)
    if not requests or not statuses or not data:
        raise ParseError(f"could not find the request, status and traffic counts in h2load output:\n"
                         f"{output}")
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    counts = dict(zip(keys, map(int, requests.groups()), strict=True))
    counts["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, statuses.groups()), strict=True))
    counts["data_bytes"] = int(data[1])
    return counts


def _percentile_ms(ordered_us: list[int], percent: float) -> float:
    """Nearest-rank percentile of sorted microseconds, in ms."""
    rank = max(0, min(len(ordered_us) - 1, round(percent / 100 * len(ordered_us)) - 1))
    return round(ordered_us[rank] / 1000, 4)


def parse_h2load(output: str, log_text: str) -> dict:
    """The same figures as parse_wrk from h2load's summary and its ``--log-file``
    (one line per request: start time, status, duration in microseconds).
    Errors are the failed requests (including non-2xx/3xx answers) and the
    connections lost."""
    counts = _h2load_counts(output)
    finished = re.search(r"^finished in \S+, ([\d.]+) req/s, ([\d.]+)(B|KB|MB|GB|TB)/s", output,
                         re.MULTILINE)
    if not finished:
        raise ParseError(f"could not find 'finished in' in h2load output:\n{output}")
    durations = sorted(int(line.split("\t")[2]) for line in log_text.splitlines() if line.count("\t") == 2)
    if not durations:
        raise ParseError(f"h2load logged no requests:\n{output}")
    # A connection the server closed: h2load -D does not open another, so that
    # client sends nothing more for the rest of the run. Not always in `failed`.
    lost = len(re.findall(r"^Process Request Failure:", output, re.MULTILINE))
    return {
        "requests": counts["done"],
        "rps": float(finished[1]),
        "transfer_bytes_s": float(finished[2]) * BYTES_PER_UNIT[finished[3]],
        **{f"p{p}_ms": _percentile_ms(durations, float(p)) for p in PERCENTILES},
        "h2load": counts,
        "connections_lost": lost,
        "errors": counts["failed"] + lost,
    }


def run_h2load(url: str, scenario, threads: int, duration_s: int) -> dict:
    """One h2load run, recorded like a wrk run (a failure message if h2load fails)."""
    with tempfile.TemporaryDirectory(prefix="sluice-h2load-") as tmp:
        log_file = Path(tmp) / "requests.log"
        argv = h2load_argv(url, scenario, threads, duration_s, log_file)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
        except subprocess.TimeoutExpired:
            return failed_run(f"h2load did not finish within {duration_s + 60}s")
        if proc.returncode != 0:
            return failed_run(f"h2load exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()}")
        try:
            return parse_h2load(proc.stdout, log_file.read_text() if log_file.exists() else "")
        except ParseError as exc:
            return failed_run(str(exc))


def h2_fetch(url: str, headers: tuple[str, ...] = (), timeout: float = 5.0) -> tuple[str, int]:
    """One GET over h2c with prior knowledge (h2load -n1): (status class, body
    bytes), e.g. ("2xx", 32). OSError if no answer came."""
    argv = ["h2load", "-n1", "-c1", "-m1"]
    for header in headers:
        argv += ["-H", header]
    try:
        proc = subprocess.run(argv + [url], capture_output=True, text=True, timeout=timeout)
        counts = _h2load_counts(proc.stdout)
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"h2load got no answer within {timeout}s") from exc
    except ParseError as exc:
        raise OSError(f"h2load failed: {(proc.stdout + proc.stderr).strip()[-500:]}") from exc
    answered = [code for code, count in counts["status"].items() if count]
    if counts["done"] != 1 or not answered:
        raise OSError(f"no HTTP/2 answer (h2load: {counts['errored']} errored, "
                      f"{counts['timeout']} timeout); its output: {proc.stdout.strip()[-500:]}")
    return answered[0], counts["data_bytes"]


def run_load(url: str, scenario, threads: int, duration_s: int, script: Path | None) -> dict:
    """One measured run of the scenario's load generator: h2load for h2, else wrk."""
    if scenario.h2:
        return run_h2load(url, scenario, threads, duration_s)
    return run_wrk(url, scenario, threads, duration_s, script)


# --------------------------------------------------------------------- checks


def fetch(url: str, method: str = "GET", body: bytes | None = None, headers: tuple[str, ...] = (),
          timeout: float = 5.0) -> tuple[int, bytes]:
    """One request on a new connection (TLS unverified), with extra
    ``"Name: value"`` headers; (status, body)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        fields = (header.partition(":") for header in headers)
        conn.request(method, parts.path or "/", body=body,
                     headers={name: value.strip() for name, _, value in fields})
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"not an HTTP answer: {exc!r}") from exc
    finally:
        conn.close()


def wrong_answer(url: str, scenario) -> str | None:
    """What is wrong with the target's answer to the scenario's request, or None."""
    if scenario.h2:
        return _wrong_h2_answer(url, scenario)
    body = b"x" * scenario.request_bytes if scenario.request_bytes else None
    method = "POST" if body else "GET"
    try:
        status, answer = fetch(url + scenario.path, method, body, scenario.headers, timeout=10.0)
    except OSError as exc:
        return f"{method} {scenario.path} failed: {exc}"
    if status != 200 or len(answer) != scenario.answer_bytes:
        return (f"{method} {scenario.path} answered {status} with {len(answer)} body bytes, "
                f"expected 200 with {scenario.answer_bytes}")
    return None


def _wrong_h2_answer(url: str, scenario) -> str | None:
    """h2load counts statuses only by class: a 2xx with the right body length passes."""
    try:
        status, body_bytes = h2_fetch(url + scenario.path, scenario.headers, timeout=10.0)
    except OSError as exc:
        return f"GET {scenario.path} over h2c failed: {exc}"
    if status != "2xx" or body_bytes != scenario.answer_bytes:
        return (f"GET {scenario.path} over h2c answered {status} with {body_bytes} body bytes, "
                f"expected 2xx with {scenario.answer_bytes}")
    return None


# ----------------------------------------------------------- idle connections


async def _read_response(stream: trio.SocketStream) -> None:
    """Read one response with a Content-Length body, or raise ValueError."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ValueError("closed before the response head")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if not head.startswith(b"HTTP/1.1 200") or not match:
        raise ValueError(f"unexpected response head {head[:80]!r}")
    while len(rest) < int(match[1]):
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ValueError("closed during the response body")
        rest += chunk


async def _hold(port: int, count: int, headers: tuple[str, ...],
                measure: Callable[[set[int]], dict]) -> dict:
    lines = ["GET / HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    held: list[trio.SocketStream] = []
    failures: list[str] = []
    limiter = trio.CapacityLimiter(IDLE_OPENERS)

    async def open_one() -> None:
        async with limiter:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError as exc:
                failures.append(f"connect: {exc}")
                return
            try:
                await stream.send_all(request)
                await _read_response(stream)
                held.append(stream)
            except (OSError, trio.BrokenResourceError, ValueError) as exc:
                failures.append(f"request: {exc}")
                await stream.aclose()

    started = time.monotonic()
    try:
        with trio.move_on_after(IDLE_TIMEOUT_S) as opening:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(open_one)
        open_s = time.monotonic() - started
        await trio.sleep(1.0)  # let the proxy settle (buffers freed, workers idle)
        ours = {stream.socket.getsockname()[1] for stream in held}
        result = {"opened": len(held), "open_s": round(open_s, 2), **measure(ours)}
    finally:
        for stream in held:
            stream.socket.close()
    if opening.cancelled_caught:
        failures.append(f"gave up opening after {IDLE_TIMEOUT_S}s")
    result["failures"] = len(failures)
    result["first_failures"] = sorted(set(failures))[:5]
    return result


def hold_idle(port: int, count: int, headers: tuple[str, ...],
              measure: Callable[[set[int]], dict]) -> dict:
    """Open ``count`` keep-alive connections to 127.0.0.1:port, each after one
    GET / (with the extra headers) answered, call ``measure(their local
    ports)`` while they are all open and idle, and close them. Returns
    measure()'s dict with what was opened and what failed."""
    return trio.run(_hold, port, count, headers, measure)


def still_held(port: int, clients: set[int]) -> int:
    """How many of our connections (from local ports ``clients``) the server
    listening on ``port`` still holds open, from /proc/net/tcp: the server's
    ends in state ESTABLISHED. Counted as a set: the file is read in pieces,
    and a line can come twice when other sockets change in between."""
    held = set()
    with open("/proc/net/tcp") as lines:
        next(lines)
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            remote_port = int(remote.rsplit(":", 1)[1], 16)
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and remote_port in clients:
                held.add(remote_port)
    return len(held)
