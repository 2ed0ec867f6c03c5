#!/usr/bin/env python3
"""gRPC unary calls per second: grpcio's asyncio client straight to a grpcio server, and through sluice.

    python benchmarks/grpc_unary.py                          # 5 x 5 s, 2 s warm-up, 50 calls in flight
    python benchmarks/grpc_unary.py --duration 2 --repeats 3 --concurrency 100
    python benchmarks/run.py --scenarios grpc-unary          # the same, as run.py's scenario (in --full)

The server is tests/grpc_support/echo_server.py (grpcio's asyncio server, one
process) with stubs generated from tests/grpc_support/echo.proto. Two targets:

- ``direct``: the client calls the server;
- ``sluice``: the client calls sluice (h2c listener, chain access_log,
  router; one worker), which forwards over h2c to the same server.

The client runs in a process of its own (this script with ``--client``), like
wrk: one channel (one HTTP/2 connection), ``--concurrency`` tasks each making
``Unary`` calls with a 32-byte payload back to back for ``--duration``
seconds. Each target gets a warm-up run, then the runs go in rounds (direct,
sluice, direct, sluice, ...) so that drift falls on both alike; the table
shows medians of the runs and sluice's share of direct's calls/s.

Every process shares the machine's cores: on 2 cores the client, sluice and
the server compete, as wrk, the proxy and the upstream do in run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import peers
from load import failed_run
from procs import Command, StartError, free_port, log, running
from report import summarize

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.grpc_support: the server, the .proto, the stubs

PAYLOAD = b"0123456789abcdef0123456789abcde\n"  # 32 bytes, as run.py's small scenario
PERCENTILES = (50, 75, 90, 99)
TARGETS = ("direct", "sluice")
CLIENT_TIMEOUT_S = 60  # beyond a run's duration: a client that hangs is a failed run


# ------------------------------------------------------------------- client


async def _load(address: str, stubs: Path, concurrency: int, duration_s: float) -> dict:
    import grpc

    from tests.grpc_support import CHANNEL_OPTIONS, load_stubs

    pb2, pb2_grpc = load_stubs(stubs)
    request = pb2.Call(payload=PAYLOAD)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb2_grpc.EchoStub(channel)
        try:
            await stub.Unary(request, timeout=10)  # connected before the clock starts
        except grpc.aio.AioRpcError as exc:
            return failed_run(f"the first call failed: {exc.code().name}: {exc.details()}")
        started = time.perf_counter()
        end = started + duration_s

        async def caller() -> None:
            while (now := time.perf_counter()) < end:
                try:
                    reply = await stub.Unary(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                if reply.payload != PAYLOAD:
                    errors["WRONG_PAYLOAD"] = errors.get("WRONG_PAYLOAD", 0) + 1
                    continue
                latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    rank = (lambda p: latencies[max(0, min(len(latencies) - 1, round(p / 100 * len(latencies)) - 1))])
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "elapsed_s": round(elapsed, 3),
        **{f"p{p}_ms": round(rank(p) * 1000, 3) if latencies else None for p in PERCENTILES},
        "errors": sum(errors.values()),
        "error_codes": errors,
    }


def run_client(address: str, stubs: Path, concurrency: int, duration_s: float) -> dict:
    """One run in a client process of its own: its figures, or ``{"failure": why}``."""
    argv = [peers.PYTHON, __file__, "--client", address, "--stubs", str(stubs),
            "--concurrency", str(concurrency), "--duration", str(duration_s)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return failed_run(f"the client did not finish within {duration_s + CLIENT_TIMEOUT_S} s")
    if proc.returncode != 0:
        return failed_run(f"the client failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout)


# ------------------------------------------------------------------ servers


def sluice_config(port: int, upstream: str, workdir: Path) -> dict:
    """run.py's ``sluice`` target, but HTTP/2 on both sides: an h2c listener, an h2c cluster."""
    return {
        "server": {"workers": 1},
        "listeners": [{"address": f"127.0.0.1:{port}", "filters": peers.DEFAULT_CHAIN, "http2": True}],
        "clusters": {"grpc": {"endpoints": [upstream], "protocol": "h2c"}},
        "routes": [{"match": {"prefix": "/"}, "cluster": "grpc"}],
        "filters": {"access_log": {"path": str(workdir / "access.jsonl")}},
    }


@contextlib.contextmanager
def servers(workdir: Path):
    """The echo server and sluice in front of it: ``({target: address}, stubs directory)``."""
    from tests.grpc_support import EchoServer, load_stubs

    stubs = workdir / "stubs"
    load_stubs(stubs)
    with contextlib.ExitStack() as stack:
        try:
            echo = stack.enter_context(EchoServer(stubs))
        except RuntimeError as exc:
            raise StartError(str(exc)) from exc
        log(f"grpc echo server ready at {echo.address} (pid {echo.pid})")
        port = free_port()
        conf = workdir / "sluice.toml"
        conf.write_text(peers.to_toml(sluice_config(port, echo.address, workdir)))
        command = Command([peers.PYTHON, "-m", "sluice", "run", "-c", str(conf)])
        stack.enter_context(running("sluice", command, f"http://127.0.0.1:{port}", workdir / "sluice.log"))
        yield {"direct": echo.address, "sluice": f"127.0.0.1:{port}"}, stubs


# ---------------------------------------------------------------- measuring


def describe(run: dict) -> str:
    if "failure" in run:
        return run["failure"]
    return (f"{run['rps']:.0f} calls/s, p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms, "
            f"errors {run['errors']}")


def measure(workdir: Path, concurrency: int, duration_s: float, repeats: int, warmup_s: float) -> dict[str, dict]:
    """Each target's outcome in run.py's shape: ``{"status", "runs", "summary"}``, with
    ``x_direct`` in the summary."""
    workdir.mkdir(parents=True, exist_ok=True)
    outcomes = {name: {"status": "ok", "runs": []} for name in TARGETS}
    try:
        with servers(workdir) as (addresses, stubs):
            for name, address in addresses.items() if warmup_s else ():
                log(f"grpc-unary: warm-up {name} ({warmup_s} s)")
                run = run_client(address, stubs, concurrency, warmup_s)
                if "failure" in run or run["errors"]:
                    outcomes[name] = {"status": "wrong answer", "error": describe(run)}
            for round_no in range(1, repeats + 1):
                for name, address in addresses.items():
                    if outcomes[name]["status"] != "ok":
                        continue
                    run = run_client(address, stubs, concurrency, duration_s)
                    outcomes[name]["runs"].append(run)
                    log(f"grpc-unary round {round_no}/{repeats} {name}: {describe(run)}")
    except StartError as exc:
        log(f"grpc-unary: did not start: {exc}")
        return {name: {"status": "did not start", "error": str(exc)} for name in TARGETS}
    for outcome in outcomes.values():
        if outcome.get("runs"):
            outcome["summary"] = summarize(outcome["runs"])
    base = outcomes["direct"].get("summary", {}).get("rps")
    for outcome in outcomes.values():
        rps = outcome.get("summary", {}).get("rps")
        if base and rps is not None:
            outcome["summary"]["x_direct"] = rps / base
    return outcomes


def table(outcomes: dict[str, dict]) -> str:
    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'target':<8} {'calls/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6} {'x direct':>8}"]
    for name, outcome in outcomes.items():
        s = outcome.get("summary", {})
        line = (f"{name:<8} {cell(s.get('rps'), '.0f'):>9} {cell(s.get('p50_ms'), '.2f'):>8} "
                f"{cell(s.get('p90_ms'), '.2f'):>8} {cell(s.get('p99_ms'), '.2f'):>8} "
                f"{s.get('errors', 0):>6} {cell(s.get('x_direct'), '.3f'):>8}")
        lines.append(line + (f"  {outcome['status']}" if outcome["status"] != "ok" else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5, help="seconds per measured run (%(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per target (%(default)s)")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up seconds per target (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=50, help="calls in flight (%(default)s)")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)  # one run, JSON on stdout
    parser.add_argument("--stubs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        print(json.dumps(asyncio.run(_load(args.client, args.stubs, args.concurrency, args.duration))))
        return 0
    with tempfile.TemporaryDirectory(prefix="sluice-grpc-bench-") as tmp:
        outcomes = measure(Path(tmp), args.concurrency, args.duration, args.repeats, args.warmup)
    runs = f"medians of {args.repeats} x {args.duration:g} s"
    print(f"== grpc-unary: unary calls, {args.concurrency} in flight on one channel ({runs}) ==")
    print(table(outcomes))
    failed = [name for name, o in outcomes.items()
              if o["status"] != "ok" or not o.get("runs") or any("failure" in r or r["errors"] for r in o["runs"])]
    for name in failed:
        log(f"FAILED: {name}: {outcomes[name].get('error') or 'a run failed or had errors (see above)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
