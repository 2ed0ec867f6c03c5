"""The filter-contract battery (sluice.testing.contract): every built-in filter
and the example plugin's pass it, and deliberately broken filters fail it,
each by the rule it breaks."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import bcrypt
import pytest
import trio

from sluice import CONTINUE, Filter, LocalReply
from sluice.control.registry import Plugins
from sluice.proxy.filters import PHASES, overrides
from sluice.testing import contract

from .authz_support import service_in_a_thread
from .jwt_support import ISSUER, RSA, sign, write_jwks

# -- every built-in filter (`sluice plugins`), and the example plugin's ---------

test_router = contract.battery("router")
# The same contract on the reference HTTP/1.1 codec (the default is httptools), through ``config``.
test_router_on_h11 = contract.battery("router", config={"server": {"http1_codec": "h11"}})
test_access_log = contract.battery("access_log")
# Fields that need captures build another class (with body and timing phases).
test_access_log_capturing = contract.battery("access_log", settings={
    "fields": ["method", "path", "status", "request_ms", "response_ms", "request_body", "response_body"]})
# rate_limit admitting everything (its global mode on Redis: tests/test_rate_limit.py)
test_rate_limit = contract.battery("rate_limit", settings={"limits": [{"rate": 1e6, "burst": 1e6}]})
test_api_key = contract.battery(
    "api_key", settings={"keys": {"battery": hashlib.sha256(b"k-battery").hexdigest()}},
    request_headers={"x-api-key": "k-battery"})


def _htpasswd() -> str:
    """An htpasswd file for the basic filter (bcrypt at its cheapest cost: the
    battery measures the filter's contract, not bcrypt's speed)."""
    folder = tempfile.mkdtemp(prefix="sluice-battery-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # made at collection: gone with the session
    path = Path(folder) / "htpasswd"
    hashed = bcrypt.hashpw(b"pa55", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"battery:{hashed}\n")
    return str(path)


test_basic = contract.battery(
    "basic", settings={"htpasswd": _htpasswd()},
    request_headers={"authorization": "Basic YmF0dGVyeTpwYTU1"})  # battery:pa55


def _jwks() -> str:
    """A JWKS file for the jwt filter, made at collection like the htpasswd above."""
    folder = tempfile.mkdtemp(prefix="sluice-battery-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_jwks(Path(folder) / "jwks.json", RSA)


test_jwt = contract.battery(
    "jwt", settings={"providers": {"battery": {"issuer": ISSUER, "jwks_file": _jwks()}}},
    request_headers={"authorization": f"Bearer {sign(exp=4_000_000_000)}"})  # valid until 2096


test_rbac = contract.battery("rbac", settings={"policies": [
    {"action": "allow", "principals": [{"source_cidr": "127.0.0.0/8"}], "permissions": [{"prefix": "/"}]}]})

test_ext_authz = contract.battery(  # a real authorization service, in a thread: the config is made here
    "ext_authz", settings={"cluster": "authz", "path_prefix": "/authz"},
    config={"clusters": {"authz": {"endpoints": [service_in_a_thread()]}}})


def _source_module(path: Path) -> ModuleType:
    """A module loaded from its file, without putting its folder on sys.path
    (the other tests install the example plugin and must not find it there)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sluice_hello = _source_module(Path(__file__).parent / "example_plugin" / "sluice_hello.py")

test_ip_filter = contract.battery("ip_filter", settings={"allow": ["127.0.0.0/8", "::1"]})
test_cors = contract.battery("cors", settings={"allow_origins": ["http://example.test"]},
                             request_headers=[("origin", "http://example.test")])

test_hello = contract.battery("hello", extra={"hello": sluice_hello})

def test_every_built_in_filter_has_its_battery_here():
    """A new built-in filter fails this until a battery runs over it.

    Settings-only plugins (alerts, registration) offer a "filter" that implements no phase
    and refuses a place in a chain (sluice plugins: "phases: (none: hooks only)"): there
    is no exchange for a battery to watch, so they are told apart by their phases.
    """
    registry = Plugins()
    built_in = {name: cls for name, (cls, plugin) in registry.filters.items()
                if registry.loaded[plugin].dist == "sluice"}
    hooks_only = {name for name, cls in built_in.items() if not any(overrides(cls, p) for p in PHASES)}
    covered = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(built_in) - hooks_only <= covered, f"no battery for {sorted(set(built_in) - hooks_only - covered)}"
    assert {"alerts", "registration"} <= hooks_only  # the check above cannot pass by finding no phases


# -- filters that change what passes, each as the contract allows ---------------

class Shouts(Filter):
    """Changes body sizes both ways, as the contract says to: it drops
    Content-Length in the headers phases, so sluice frames the body anew."""

    name = "shouts"

    async def on_request_headers(self, ctx, request):
        request.headers.remove("content-length")

    async def on_request_body(self, ctx, chunk, end):
        return chunk.upper() + (b"!" if end else b"")

    async def on_response_headers(self, ctx, response):
        response.headers.remove("content-length")

    async def on_response_body(self, ctx, chunk, end):
        return chunk + chunk if chunk else chunk


class Stamps(Filter):
    """Per-request state, weakly referenceable, released with its exchange;
    declared after the router (it reads the route), so it sits there."""

    name = "stamps"
    after = ("router",)

    class State:
        def __init__(self):
            self.route = None

    def new_state(self):
        return self.State()

    async def on_request_headers(self, ctx, request):
        ctx.state(self).route = ctx.route.name if ctx.route is not None else None

    async def on_response_headers(self, ctx, response):
        response.headers.set("x-stamp", str(ctx.state(self).route))


class Quota(Filter):
    """Admits one request per proxy, then answers 429 with a flag of its own."""

    name = "quota"

    def __init__(self, config):
        super().__init__(config)
        self.left = 1

    async def on_request_headers(self, ctx, request):
        if self.left:
            self.left -= 1
            return None
        return LocalReply(429, "over quota\n", flag="RL")


class Awaits(Filter):
    """Every phase yields to the loop (as one doing I/O would), on_complete
    included: the core then runs on_complete shielded, and cancellation
    reaches the others mid-phase."""

    name = "awaits"

    async def on_request_headers(self, ctx, request):
        await trio.sleep(0)

    async def on_request_body(self, ctx, chunk, end):
        await trio.sleep(0)

    async def on_request_trailers(self, ctx, trailers):
        await trio.sleep(0)

    async def on_response_headers(self, ctx, response):
        await trio.sleep(0)

    async def on_response_body(self, ctx, chunk, end):
        await trio.sleep(0)

    async def on_response_trailers(self, ctx, trailers):
        await trio.sleep(0)

    async def on_complete(self, ctx):
        await trio.sleep(0)


class RefusesBodies(Filter):
    """Answers from a request body phase, once the head has gone upstream."""

    name = "refuses_bodies"

    async def on_request_body(self, ctx, chunk, end):
        return LocalReply(413, "no bodies here\n")


class ReplacesPosts(Filter):
    """Answers in place of the upstream's response to a POST."""

    name = "replaces_posts"

    async def on_response_headers(self, ctx, response):
        if ctx.request.method == "POST" and ctx.endpoint is not None:
            return LocalReply(503, "not today\n", flag="RP")


class Buffers(Filter):
    """Asks for whole bodies (the core's buffer limits then answer 413 and
    502) and resizes them, which buffering allows with no header work."""

    name = "buffers"

    async def on_request_headers(self, ctx, request):
        ctx.buffer_request_body()
        ctx.buffer_response_body()

    async def on_request_body(self, ctx, chunk, end):
        return chunk + b"+"

    async def on_response_body(self, ctx, chunk, end):
        return chunk[: len(chunk) // 2]


test_resizing_filter = contract.battery(Shouts, plugins=["router", "balancer"])
test_answering_from_a_body_phase = contract.battery(RefusesBodies, plugins=["router", "balancer"])
test_answering_instead_of_the_upstream = contract.battery(ReplacesPosts, plugins=["router", "balancer"])
test_buffering_filter = contract.battery(Buffers, plugins=["router", "balancer"])
test_awaiting_filter = contract.battery(Awaits, plugins=["router", "balancer"])
# Answering instead of the scenario's upstream is the filter's right, whatever its flag.
test_refusing_filter = contract.battery(Quota, plugins=["router", "balancer"])
test_stateful_filter_after_the_router = contract.battery(Stamps, plugins=["router", "balancer"])


# -- broken filters: each fails by the rule it breaks ----------------------------

class Raises(Filter):
    name = "raises"

    async def on_request_headers(self, ctx, request):
        raise RuntimeError("a bug in a request phase")


class Sleeps(Filter):
    name = "sleeps"

    async def on_request_headers(self, ctx, request):
        time.sleep(0.3)  # blocks every exchange of the worker
        return CONTINUE


class Spins(Filter):
    name = "spins"

    async def on_response_headers(self, ctx, response):
        until = time.thread_time() + 0.15
        while time.thread_time() < until:  # 150 ms of CPU-bound work on the loop, however loaded the machine
            pass


class Hoards(Filter):
    name = "hoards"

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    async def on_request_headers(self, ctx, request):
        self.seen.append(ctx)


class Resizes(Filter):
    """Grows each response body but leaves its Content-Length as it was."""

    name = "resizes"

    async def on_response_body(self, ctx, chunk, end):
        return chunk + b"!" if end else chunk


class CompleteRaises(Filter):
    name = "complete_raises"

    async def on_complete(self, ctx):
        raise ValueError("a bug in on_complete")


class KeepsState(Stamps):
    """Keeps every request's state object in a list of its own."""

    name = "keeps_state"

    def __init__(self, config):
        super().__init__(config)
        self.kept = []

    async def on_request_headers(self, ctx, request):
        self.kept.append(ctx.state(self))


class ResizesRequest(Filter):
    """Grows the request body but leaves its Content-Length as it was."""

    name = "resizes_request"

    async def on_request_body(self, ctx, chunk, end):
        return chunk + b"!" if end else chunk


class Mixes(Filter):
    """Keeps the request's id on the instance, so the next request's
    response carries it: state crossing requests."""

    name = "mixes"
    last_id = None

    async def on_request_headers(self, ctx, request):
        self.previous, self.last_id = self.last_id, request.headers.get("x-contract-id")

    async def on_response_headers(self, ctx, response):
        if self.previous is not None:
            response.headers.set("x-contract-id", self.previous)


class HeadsTwice(Filter):
    """Runs its own response head phase again from the body phase."""

    name = "heads_twice"

    async def on_response_headers(self, ctx, response):
        ctx.state(self)

    async def on_response_body(self, ctx, chunk, end):
        if end:
            await self.on_response_headers(ctx, ctx.response)


class CompletesEarly(Filter):
    """Runs its own cleanup from a response phase: on_complete then runs twice."""

    name = "completes_early"

    async def on_response_headers(self, ctx, response):
        await self.on_complete(ctx)

    async def on_complete(self, ctx):
        pass


@pytest.mark.parametrize(("broken", "scenario", "rule", "detail"), [
    (Raises, "get", contract.RAISED, r"on_request_headers raised RuntimeError\('a bug in a request phase'\)"),
    (Sleeps, "get", contract.BLOCKED, r"a step of task '[^']+' took \d+ ms, \d+ ms of it on the CPU "
                                      r"\(block_threshold 100 ms\)"),
    (Spins, "get", contract.BLOCKED, r"a step of task '[^']+' took \d+ ms, 1\d\d ms of it on the CPU"),
    (Hoards, "get", contract.RELEASED, r"2 of the scenario's 2 request contexts are still alive"),
    (Hoards, "concurrent", contract.RELEASED, r"Hoards.seen grew by 20 over 20 exchanges"),
    # The core refuses to send more than the Content-Length: the client sees the connection cut.
    (Resizes, "get", contract.FRAMING, r"GET /__contract/get\?q=1: the (proxy )?(connection )?closed"),
    (CompleteRaises, "post", contract.RAISED, r"on_complete raised ValueError\('a bug in on_complete'\)"),
    (KeepsState, "get", contract.RELEASED, r"2 per-request state objects \(Stamps.State\) are still alive"),
    (ResizesRequest, "post", contract.FRAMING,
     r"exchange #\d+: a body phase changed the body's size but not its Content-Length: POST /__contract/post"),
    (Mixes, "keep-alive", contract.ISOLATED, r"keep-alive exchange 1 got the response of exchange 0"),
    (HeadsTwice, "get", contract.HEAD_ONCE, r"on_response_headers ran 2 times for exchange #\d+: GET /__contract/get"),
    (CompletesEarly, "post", contract.ONCE, r"on_complete ran 2 times for exchange #\d+: POST /__contract/post"),
], ids=["raises", "sleeps", "spins", "hoards", "hoards-concurrent", "resizes", "complete-raises",
                          "keeps-state", "resizes-request", "mixes", "heads-twice",
                          "completes-twice"])
def test_a_broken_filter_fails_by_the_rule_it_breaks(broken, scenario, rule, detail):
    with pytest.raises(contract.ContractViolation) as failed:
        contract.check(broken, scenario, plugins=["router", "balancer"])
    message = str(failed.value)
    assert message.startswith(f"filter {broken.name!r} broke the contract in scenario {scenario!r}:"), message
    assert re.search(f"\n  - {re.escape(rule)}: {detail}", message), message


def test_a_filter_refusing_the_batterys_requests_is_told_to_pass_request_headers():
    """Without its key, api_key answers 401 to everything: the battery says
    its requests never reach the upstream, instead of passing vacuously."""
    keys = {"battery": hashlib.sha256(b"k-battery").hexdigest()}
    with pytest.raises(contract.ContractViolation) as failed:
        contract.check("api_key", "upstream-refused", settings={"keys": keys}, plugins=["router", "balancer", "auth"])
    assert re.search(f"{re.escape(contract.DESIGNED)}: a plain GET got 401, not the origin's 200 "
                     r"\(answered by api_key\): .*request_headers",
                     str(failed.value)), failed.value


def test_a_plugins_suite_collects_the_battery_under_its_own_name_and_can_xfail_a_scenario(tmp_path):
    """As a plugin author runs it: pytest in another process, on a file of theirs."""
    (tmp_path / "test_mine.py").write_text(
        "from sluice import Filter\n"
        "from sluice.testing import contract\n"
        "class Uploads(Filter):\n"
        "    name = 'uploads'\n"
        "    async def on_request_body(self, ctx, chunk, end):\n"
        "        raise RuntimeError('no uploads')\n"
        "test_uploads = contract.battery(Uploads, plugins=['router', 'balancer'],\n"
        "                                xfail={'post': 'it raises on a body'})\n")
    ran = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-k", "get or post",
                          "test_mine.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "PASSED test_mine.py::test_uploads[get]" in ran.stdout, ran.stdout + ran.stderr
    assert "XFAIL test_mine.py::test_uploads[post]" in ran.stdout, ran.stdout + ran.stderr
    assert ran.returncode == 0, ran.stdout + ran.stderr
    collected = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                                "test_mine.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert [line.split("::")[1] for line in collected.stdout.splitlines() if "::" in line] == [
        f"test_uploads[{name}]" for name in contract.SCENARIOS], collected.stdout


def test_battery_and_check_take_one_set_of_options_and_refuse_a_misspelt_one():
    """Both take ``contract.Options``' keywords, checked before anything runs."""
    for misspelt in (lambda: contract.battery(Raises, setings={}), lambda: contract.check(Raises, "get", setings={})):
        with pytest.raises(TypeError, match="unexpected keyword argument 'setings'"):
            misspelt()
    assert contract.Options(request_headers={"a": 1}).request_headers == [("a", "1")]


def test_xfail_names_only_scenarios_the_battery_has():
    with pytest.raises(ValueError, match="xfail names unknown scenarios \\['posts'\\]"):
        contract.battery(Raises, xfail={"posts": "a typo"})
