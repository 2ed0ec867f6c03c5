"""The sluice command as users run it: subprocesses, real signals, curl."""

from __future__ import annotations

import signal
import textwrap
import threading
import time
from importlib.metadata import entry_points

from .proc import Running, children, curl, free_port, poll, sluice


def write(tmp_path, text: str):
    path = tmp_path / "sluice.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_embedded_default_answers_through_the_proxy():
    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}") as proxy:
        r = curl("-i", f"http://127.0.0.1:{port}/hello")
        proxy.wait_for_output('"path": "/hello"')  # the access log line, on stdout
    assert "HTTP/1.1 200 OK" in r.stdout
    assert "via: 1.1 sluice" in r.stdout
    assert "hello from the sluice demo upstream" in r.stdout


def test_one_line_reverse_proxy_and_clean_exit():
    upstream_port, port = free_port(), free_port()
    with Running("--listen", f"127.0.0.1:{upstream_port}") as origin:  # the demo as an origin
        proxy = Running("--listen", f"127.0.0.1:{port}", "--upstream", origin.url,
                        "--plugins", "router,balancer")
        r = curl(f"http://127.0.0.1:{port}/via-one-line")
        assert proxy.stop() == 0
    assert '"target": "/via-one-line"' in r.stdout
    assert "proxy.via" not in r.stdout
    assert '"via": "1.1 sluice, 1.1 sluice"' in r.stdout  # two hops


def test_unknown_plugin_is_named_with_the_available_ones():
    r = sluice("run", "--listen", "127.0.0.1:1", "--upstream", "http://127.0.0.1:2", "--plugins", "router,nope")
    assert r.returncode == 2
    assert "unknown plugin 'nope'" in r.stderr
    installed = sorted(ep.name for ep in entry_points(group="sluice"))  # every plugin of the tree, and any other
    assert {"router", "auth", "tls"} <= set(installed)
    assert f"available: {', '.join(installed)}\n" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_balancer_plugin_says_which_plugin_to_enable():
    r = sluice("run", "--listen", "127.0.0.1:1", "--upstream", "http://127.0.0.1:2", "--plugins", "access_log,router")
    assert r.returncode == 2
    assert "clusters.default.policy" in r.stderr
    assert "provided by plugin 'balancer', which is not enabled; add 'balancer' to --plugins" in r.stderr


def test_check_prints_the_effective_chain(tmp_path):
    path = write(tmp_path, """
        [[listeners]]
        name = "public"
        address = "127.0.0.1:8080"
        filters = ["access_log", "api_key", "router"]

        [clusters.api]
        endpoints = ["127.0.0.1:9000", { address = "127.0.0.1:9001", weight = 3 }]
        policy = "weighted_round_robin"

        [[routes]]
        match = { prefix = "/" }
        cluster = "api"

        [filters.api_key]
        keys = { ci = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" }
    """)
    r = sluice("check", str(path))
    assert r.returncode == 0, r.stderr
    assert "listener public:" in r.stdout
    assert "1. access_log [complete]" in r.stdout
    assert "2. api_key [request_headers]" in r.stdout
    assert "3. router [request_headers]" in r.stdout
    assert "route routes[0]: prefix=/ -> cluster api" in r.stdout
    assert "cluster api: weighted_round_robin -> 127.0.0.1:9000, 127.0.0.1:9001 w=3" in r.stdout


def test_bad_config_errors_name_every_key(tmp_path):
    path = write(tmp_path, """
        [[listeners]]
        address = "nowhere"
        filters = ["router", "gzip"]

        [clusters.api]
        endpoints = ["127.0.0.1:9000", "not-an-address"]
        retries = 3
    """)
    r = sluice("check", str(path))
    assert r.returncode == 2
    assert "listeners[0].address: not a host:port" in r.stderr
    assert "clusters.api.endpoints[1]: not a host:port" in r.stderr
    assert "clusters.api.retries: unknown key" in r.stderr


def test_two_listeners_may_not_share_a_name(tmp_path):
    path = write(tmp_path, """
        [[listeners]]
        name = "public"
        address = "127.0.0.1:8080"

        [[listeners]]
        name = "public"
        address = "127.0.0.1:8081"
    """)
    r = sluice("check", str(path))
    assert r.returncode == 2
    assert "listeners[1].name: 'public' names listeners[0] already" in r.stderr


def test_unknown_filter_in_a_chain_is_named(tmp_path):
    path = write(tmp_path, """
        [[listeners]]
        address = "127.0.0.1:8080"
        filters = ["router", "gzip"]
    """)
    r = sluice("check", str(path))
    assert r.returncode == 2
    assert "listeners[0].filters[1]: unknown filter 'gzip'" in r.stderr


def test_plugins_lists_what_each_provides_with_settings():
    r = sluice("plugins")
    assert r.returncode == 0, r.stderr
    for name in ("router", "balancer", "auth", "tls", "access_log"):
        assert f"{name}  (sluice, sluice.plugins.{name})" in r.stdout
    assert "policy least_request" in r.stdout
    assert "  policy round_robin: Each eligible endpoint in turn, ignoring weights.\n    (no settings)" in r.stdout
    assert "    decay: float (default 10.0)" in r.stdout  # ewma's settings
    assert "transport tls" in r.stdout
    assert "    path: str | None (default None)" in r.stdout  # access_log's settings
    assert "    keys: dict[str, str] (default {})" in r.stdout  # api_key's (or keys_file), without pydantic's metadata
    assert "      ca: Path | None (default None)" in r.stdout  # the tls transport's cluster side
    assert "filter router: Matches routes" in r.stdout


def test_graceful_drain_finishes_in_flight_requests(tmp_path):
    port = free_port()
    slow = free_port()
    # A slow origin: the demo behind a proxy would be fast, so use curl against
    # a sluice whose upstream is a listening socket that answers after 1 s.
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", slow))
    server.listen()

    in_flight = threading.Event()

    def answer_late():
        conn, _ = server.accept()
        conn.recv(65536)
        in_flight.set()
        time.sleep(1.0)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=answer_late, daemon=True).start()
    proxy = Running("--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{slow}",
                    "--plugins", "router,balancer")
    result = {}
    client = threading.Thread(target=lambda: result.update(r=curl("-i", f"http://127.0.0.1:{port}/")))
    client.start()
    assert in_flight.wait(10)  # the request has reached the upstream
    proxy.signal(signal.SIGTERM)
    # New connections are refused once the listener closes, which a loaded machine may take
    # a moment to reach: poll for it, while the in-flight request still waits on the origin.
    refused = poll(lambda: (r := curl(f"http://127.0.0.1:{port}/", timeout=2)).returncode in (7, 52, 56) and r,
                   timeout=0.9, what="new connections refused while draining", proxy=proxy)
    client.join()
    assert proxy.wait(10) == 0  # exits by itself once drained
    server.close()
    assert result["r"].stdout.splitlines()[-1] == "late"  # the in-flight request finished
    assert "connection: close" in result["r"].stdout.lower()  # and was told the connection ends
    assert refused.returncode != 0  # no new connections while draining


def test_workers_share_the_port_and_are_replaced_when_they_die():
    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}", "--workers", "2") as proxy:
        time.sleep(0.5)
        workers = children(proxy.pid)
        assert len(workers) == 2
        for _ in range(10):
            assert "demo upstream" in curl(f"http://127.0.0.1:{port}/").stdout
        import os

        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (set(children(proxy.pid)) & {workers[0]} or len(children(proxy.pid)) < 2):
            time.sleep(0.1)
        assert len(children(proxy.pid)) == 2 and workers[0] not in children(proxy.pid)
        time.sleep(0.5)
        assert "demo upstream" in curl(f"http://127.0.0.1:{port}/").stdout
        assert proxy.stop() == 0


def test_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = sluice("run", "--listen", f"127.0.0.1:{port}", "--upstream", "http://127.0.0.1:9",
                   "--plugins", "router,balancer")
    assert r.returncode == 2
    assert f"listeners[0].address: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_python_dash_m_works():
    r = sluice("--help")
    assert r.returncode == 0 and "run" in r.stdout and "plugins" in r.stdout


def test_check_says_which_listeners_speak_http2(tmp_path):
    path = write(tmp_path, """
        [[listeners]]
        name = "h2c"
        address = "127.0.0.1:8080"
        filters = ["router"]
        http2 = true

        [[listeners]]
        name = "plain"
        address = "127.0.0.1:8081"
        filters = ["router"]

        [clusters.api]
        endpoints = ["127.0.0.1:9000"]

        [[routes]]
        match = { prefix = "/" }
        cluster = "api"
    """)
    r = sluice("check", str(path))
    assert r.returncode == 0, r.stderr
    assert "listener h2c +h2c (prior knowledge):" in r.stdout and "listener plain:" in r.stdout


def test_embedded_default_checks_its_plugins_before_listening():
    r = sluice("run", "--plugins", "access_log,router")  # no balancer for the demo cluster
    assert r.returncode == 2
    assert "add 'balancer' to --plugins" in r.stderr
    assert "listening" not in r.stderr


def test_the_demo_origin_survives_a_slow_client():
    import re
    import socket

    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}") as proxy:
        proxy.wait_for_output("demo upstream on")
        demo = next(re.search(r"demo upstream on http://(\S+)", line).group(1)
                    for line in proxy.stderr if "demo upstream on" in line)
        host, demo_port = demo.rsplit(":", 1)
        with socket.create_connection((host, int(demo_port))) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
            slow.settimeout(15)
            assert slow.recv(100) == b""  # the demo gives up on it (after its 10 s head timeout)
        assert "demo upstream" in curl(f"http://127.0.0.1:{port}/").stdout
        assert proxy.proc.poll() is None


def test_a_file_that_is_not_toml_is_a_clear_error(tmp_path):
    for name, content in (("broken.toml", b"[listeners\n"), ("latin1.toml", b'x = "\xff"\n')):
        path = tmp_path / name
        path.write_bytes(content)
        r = sluice("check", str(path))
        assert r.returncode == 2 and f"{path}: not valid TOML" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_one_line_mode_serves_http2_with_a_flag():
    port = free_port()
    with Running("--listen", f"127.0.0.1:{port}", "--http2") as proxy:  # the embedded demo behind it
        r = curl("--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}", f"{proxy.url}/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n2 200"), r.stdout
