"""The etcd v3 client (``sluice.plugins.etcd``) against a real etcd: keys, watches, leases.

The session's etcd is shared (each test under its own prefix); the tests that stop etcd
start their own, so that the others never see it go.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from sluice.plugins.etcd import (
    Disconnected,
    EtcdClient,
    EtcdCompacted,
    EtcdRequestError,
    EtcdUnavailable,
    Events,
    LeaseExpired,
    Reconnected,
    Resync,
)
from sluice.plugins.etcd.client import tls_context
from sluice.plugins.etcd.codec import b64, prefix_end

from .servers import free_port
from .servers.etcd import etcd_server_process

DEADLINE = 10  # seconds any single wait in these tests may take


async def next_update(updates, timeout: float = DEADLINE):
    with trio.fail_after(timeout):
        return await updates.receive()


async def test_prefix_range_and_revision(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        await etcd.put(etcd_prefix[:-1] + "-outside", b"not mine")
        await etcd.put(etcd_prefix + "a", b"1")
        binary = bytes(range(256))  # not UTF-8: base64 on the wire, bytes back
        last = await etcd.put(etcd_prefix + "b", binary)
        revision, kvs = await etcd.get_prefix(etcd_prefix)
        assert revision >= last
        assert [(kv.key, kv.value) for kv in kvs] == [
            ((etcd_prefix + "a").encode(), b"1"), ((etcd_prefix + "b").encode(), binary)]
        assert kvs[1].mod_revision == last
        assert await etcd.delete(etcd_prefix + "a") == 1
        assert await etcd.get(etcd_prefix + "a") is None
        assert (await etcd.get(etcd_prefix + "b")).value == binary
        assert await etcd.delete_prefix(etcd_prefix) == 1
        assert (await etcd.get_prefix(etcd_prefix))[1] == []


def test_prefix_end():
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


async def test_errors_are_typed(etcd_server):
    async with EtcdClient(etcd_server.url) as etcd:
        with pytest.raises(EtcdRequestError) as refused:
            await etcd.put(b"", b"no key")
        assert refused.value.code == 3 and "key is not provided" in refused.value.message
        with pytest.raises(LeaseExpired):
            await etcd.lease_keepalive_once(0x1234567)  # never granted


async def test_unreachable_etcd_is_unavailable_within_the_timeout():
    # A listener that accepts and never answers: httpx would wait forever without the bound.
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda stream: trio.sleep_forever(), [listener])
        async with EtcdClient(f"http://127.0.0.1:{port}", timeout=0.5) as etcd:
            began = trio.current_time()
            with pytest.raises(EtcdUnavailable, match="no answer within 0.5s"):
                await etcd.get_prefix("/x/")
            assert trio.current_time() - began < 2
        nursery.cancel_scope.cancel()
    async with EtcdClient(f"http://127.0.0.1:{free_port()}", timeout=0.5) as etcd:  # nobody listens
        with pytest.raises(EtcdUnavailable):
            await etcd.put("/x", "y")


async def test_watch_delivers_changes_in_order(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        revision, _ = await etcd.get_prefix(etcd_prefix)  # watching from after it: no race with its creation
        async with etcd.watch_prefix(etcd_prefix, start_revision=revision + 1) as updates:
            await etcd.put(etcd_prefix[:-1] + "-outside", b"x")
            put = await etcd.put(etcd_prefix + "a", b"1")
            deleted = None
            update = await next_update(updates)
            assert isinstance(update, Events) and update.revision == put
            assert [(e.type, e.kv.key, e.kv.value) for e in update.events] == [
                ("put", (etcd_prefix + "a").encode(), b"1")]
            await etcd.delete(etcd_prefix + "a")
            update = await next_update(updates)
            deleted = update.events[0]
            assert (deleted.type, deleted.kv.key, deleted.kv.value) == ("delete", (etcd_prefix + "a").encode(), b"")


async def test_a_quiet_watch_is_renewed_silently_and_misses_nothing(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        revision, _ = await etcd.get_prefix(etcd_prefix)
        async with etcd.watch_prefix(etcd_prefix, start_revision=revision + 1, idle_timeout=0.2) as updates:
            await etcd.put(etcd_prefix + "a", b"1")
            assert [e.kv.value for e in (await next_update(updates)).events] == [b"1"]
            with trio.move_on_after(1):  # five idle renewals: none is reported, nothing repeats
                assert await updates.receive() is None, "an update from a quiet prefix"
            await etcd.put(etcd_prefix + "b", b"2")
            assert [e.kv.value for e in (await next_update(updates)).events] == [b"2"]


async def test_watch_from_a_revision_replays_history(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        first = await etcd.put(etcd_prefix + "a", b"1")
        await etcd.put(etcd_prefix + "a", b"2")
        async with etcd.watch_prefix(etcd_prefix, start_revision=first) as updates:
            values = []
            while len(values) < 2:
                values += [e.kv.value for e in (await next_update(updates)).events]
            assert values == [b"1", b"2"]


async def test_compaction_forces_a_resync_the_caller_is_told_of(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        early = await etcd.put(etcd_prefix + "gone", b"1")
        await etcd.put(etcd_prefix + "kept", b"2")
        await etcd.delete(etcd_prefix + "gone")
        latest = await etcd.put(etcd_prefix + "new", b"3")
        await etcd.compact(latest)
        with pytest.raises(EtcdRequestError):  # the history really is gone
            await etcd._call("/v3/kv/range", {"key": "eA==", "revision": str(early)})
        async with etcd.watch_prefix(etcd_prefix, start_revision=early) as updates:
            update = await next_update(updates)
            assert isinstance(update, Resync) and update.revision >= latest
            assert {kv.key.decode()[len(etcd_prefix):]: kv.value for kv in update.kvs} == {"kept": b"2", "new": b"3"}
            after = await etcd.put(etcd_prefix + "after", b"4")
            update = await next_update(updates)
            assert isinstance(update, Events) and update.revision == after


async def test_watch_survives_an_etcd_restart_without_missing_a_write(tmp_path):
    server = etcd_server_process(tmp_path)
    # The same store, reachable on another client port only: what it writes, the watch can
    # learn only by watching again from its last revision + 1 once etcd is back where it was.
    hidden = etcd_server_process(tmp_path, peer=server.peer_port)
    await trio.to_thread.run_sync(server.start)
    try:
        async with EtcdClient(server.url, timeout=2) as etcd:
            async with etcd.watch_prefix("/svc/", start_revision=2, max_backoff=0.5) as updates:
                await etcd.put("/svc/a", b"before")
                assert [e.kv.value for e in (await next_update(updates)).events] == [b"before"]
                await trio.to_thread.run_sync(server.stop)
                with pytest.raises(EtcdUnavailable):
                    await etcd.put("/svc/b", b"while down")
                assert isinstance(await next_update(updates), Disconnected)  # told once, not per retry
                await trio.to_thread.run_sync(hidden.start)
                async with EtcdClient(hidden.url, timeout=2) as writer:
                    await writer.put("/svc/b", b"during 1")
                    await writer.delete("/svc/a")
                await trio.to_thread.run_sync(hidden.stop)
                with trio.move_on_after(0.3):
                    assert await updates.receive() is None, "an update with etcd down"
                await trio.to_thread.run_sync(server.start)  # same ports, same data
                await etcd.put("/svc/c", b"after")
                assert await next_update(updates) == Reconnected()
                seen = []
                while len(seen) < 3:
                    seen += [(e.type, e.kv.key, e.kv.value) for e in (await next_update(updates)).events]
                assert seen == [("put", b"/svc/b", b"during 1"), ("delete", b"/svc/a", b""),
                                ("put", b"/svc/c", b"after")]  # in order, and no repeat of "before"
                print(f"etcd restart: ready again in {server.started_in:.2f}s")
    finally:
        await trio.to_thread.run_sync(hidden.stop)
        await trio.to_thread.run_sync(server.stop)


async def test_lease_is_revoked_when_the_block_ends(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        async with etcd.lease(30) as lease:
            await etcd.put(etcd_prefix + "me", b"here", lease=lease.id)
            assert (await etcd.get(etcd_prefix + "me")).lease == lease.id
        assert await etcd.get(etcd_prefix + "me") is None
        with pytest.raises(LeaseExpired):
            await etcd.lease_keepalive_once(lease.id)


HOLDER = textwrap.dedent("""
    import sys, trio
    from sluice.plugins.etcd import EtcdClient

    async def main(url, key):
        async with EtcdClient(url) as etcd, etcd.lease(2) as lease:
            await etcd.put(key, b"alive", lease=lease.id)
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main, *sys.argv[1:])
""")


async def test_a_killed_holder_s_key_vanishes_within_the_ttl(etcd_server, etcd_prefix):
    key = etcd_prefix + "instance"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, etcd_server.url, key],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await trio.to_thread.run_sync(holder.stdout.readline)
        assert line == "ready\n", holder.stderr.read() if holder.poll() is not None else line
        async with EtcdClient(etcd_server.url) as etcd:
            await trio.sleep(3)  # longer than the TTL: only the keepalives keep it
            assert (await etcd.get(key)).value == b"alive"
            os.kill(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            with trio.fail_after(2 + 1.5):  # the TTL, plus etcd's expiry check
                while await etcd.get(key) is not None:
                    await trio.sleep(0.05)
            print(f"lease key gone {time.monotonic() - killed:.2f}s after the holder was killed (TTL 2s)")
    finally:
        holder.kill()
        holder.wait(5)
        holder.stdout.close()
        holder.stderr.close()


async def test_compacted_error_type_on_a_compacted_read(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        early = await etcd.put(etcd_prefix + "a", b"1")
        latest = await etcd.put(etcd_prefix + "a", b"2")
        await etcd.compact(latest)
        with pytest.raises(EtcdCompacted):
            await etcd._call("/v3/kv/range", {"key": "YQ==", "revision": str(early)})


async def test_a_lease_revoked_elsewhere_interrupts_its_block(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        with trio.fail_after(DEADLINE), pytest.RaisesGroup(LeaseExpired):
            async with etcd.lease(2) as lease:
                await etcd.put(etcd_prefix + "me", b"here", lease=lease.id)
                await etcd.lease_revoke(lease.id)  # as etcd does when the TTL runs out unrefreshed
                await trio.sleep_forever()  # the next keepalive (within TTL/3) ends this
        assert await etcd.get(etcd_prefix + "me") is None


async def fake_gateway(nursery, answers: list[bytes]) -> str:
    """An HTTP server that answers the n-th request with ``answers[n]`` (the last one repeats),
    then closes: what a broken gateway or a stranger on etcd's port might send."""
    requests = []

    async def answer(stream):
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:  # all of it: closing on unread bytes would reset the connection
            body += await stream.receive_some(65536)
        requests.append(received)
        body = answers[min(len(requests), len(answers)) - 1]
        await stream.send_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/json\r\n\r\n" + body)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_malformed_answers_are_request_errors(nursery):
    url = await fake_gateway(nursery, [b'{"header": {}, "kvs": [{"key": "!!not base64!!"}]}', b"<html>oops</html>",
                                       b'{"header": {"revision": "twelve"}}', b"[1, 2]"])
    async with EtcdClient(url, timeout=2) as etcd:
        with pytest.raises(EtcdRequestError, match="malformed answer"):
            await etcd.get_prefix("/x/")
        with pytest.raises(EtcdRequestError, match="not JSON"):
            await etcd.get_prefix("/x/")
        with pytest.raises(EtcdRequestError, match="malformed answer"):
            await etcd.put("/x", "y")
        with pytest.raises(EtcdRequestError):
            await etcd.put("/x", "y")


async def test_a_watch_outlives_garbage_on_its_stream(nursery):
    good = (b'{"result": {"header": {"revision": "7"}, "created": true}}\n'
            b'{"result": {"header": {"revision": "8"}, "events": [{"kv": {"key": "L2EvYg==", "value": "MQ==",'
            b' "mod_revision": "8"}}]}}\n')
    url = await fake_gateway(nursery, [b"this is not json\n", b'{"result": {"events": [{"kv": 5}]}}\n', good])
    async with EtcdClient(url, timeout=2) as etcd, etcd.watch_prefix("/a/", start_revision=5) as updates:
        assert "not JSON" in (await next_update(updates)).reason  # Disconnected, once for both failures
        assert await next_update(updates) == Reconnected()
        update = await next_update(updates)
        assert update == Events(8, [update.events[0]]) and update.events[0].kv.key == b"/a/b"


async def test_a_mirror_holds_the_whole_prefix_after_each_change(etcd_server, etcd_prefix):
    async with EtcdClient(etcd_server.url) as etcd:
        await etcd.put(etcd_prefix + "a", b"1")
        async with etcd.mirror_prefix(etcd_prefix) as states:
            def content(state):
                return {key.decode()[len(etcd_prefix):]: kv.value for key, kv in state.kvs.items()}

            first = await next_update(states)
            assert content(first) == {"a": b"1"} and not first.resynced and first.stale is None
            await etcd.put(etcd_prefix + "b", b"2")
            assert content(await next_update(states)) == {"a": b"1", "b": b"2"}
            deleted = await etcd.delete(etcd_prefix + "a")
            state = await next_update(states)
            assert content(state) == {"b": b"2"} and deleted == 1


async def test_a_mirror_is_rebuilt_after_a_compaction_and_says_when_it_is_stale(nursery):
    def kv(key: bytes, value: bytes, revision: int) -> str:
        return json.dumps({"key": b64(key), "value": b64(value), "mod_revision": str(revision)})

    url = await fake_gateway(nursery, [
        f'{{"header": {{"revision": "5"}}, "kvs": [{kv(b"/p/a", b"1", 4)}, {kv(b"/p/b", b"2", 5)}]}}'.encode(),
        b'{"result": {"header": {}, "created": true}}\n{"result": {"canceled": true, "compact_revision": "8"}}\n',
        f'{{"header": {{"revision": "9"}}, "kvs": [{kv(b"/p/c", b"3", 9)}]}}'.encode(),
        b"garbage\n",
    ])
    async with EtcdClient(url, timeout=2) as etcd, etcd.mirror_prefix("/p/") as states:
        first = await next_update(states)
        assert (first.revision, sorted(first.kvs)) == (5, [b"/p/a", b"/p/b"])
        rebuilt = await next_update(states)
        assert (rebuilt.revision, sorted(rebuilt.kvs), rebuilt.resynced) == (9, [b"/p/c"], True)
        stale = await next_update(states)
        assert stale.kvs == rebuilt.kvs and "not JSON" in stale.stale


# -- a hung member, and TLS ----------------------------------------------------------------------


async def test_a_hung_member_is_noticed_by_the_check_and_the_watch_resumes(tmp_path):
    """SIGSTOP: the process holds its sockets and answers nothing, the watch stream stays open.
    The check (a count every 0.3 s, 1 s to answer) says so within seconds, not idle_timeout."""
    server = etcd_server_process(tmp_path)
    await trio.to_thread.run_sync(server.start)
    try:
        async with EtcdClient(server.url, timeout=1) as etcd:
            async with etcd.watch_prefix("/svc/", start_revision=2, max_backoff=0.5, check_interval=0.3) as updates:
                await etcd.put("/svc/a", b"before")
                assert [e.kv.value for e in (await next_update(updates)).events] == [b"before"]
                os.kill(server.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                try:
                    update = await next_update(updates)
                    noticed = time.monotonic() - stopped
                    assert isinstance(update, Disconnected) and "stopped answering" in update.reason
                    assert noticed < 3  # check_interval + timeout, and some slack (the idle timeout: 60)
                    print(f"etcd SIGSTOPped: Disconnected after {noticed:.2f}s (check 0.3s + timeout 1s)")
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                await etcd.put("/svc/b", b"after")
                assert await next_update(updates) == Reconnected()
                update = await next_update(updates)
                assert [(e.kv.key, e.kv.value) for e in update.events] == [(b"/svc/b", b"after")]
    finally:
        await trio.to_thread.run_sync(server.stop)


def tls_files(tmp_path) -> dict[str, str]:
    """A CA (trustme), the server's certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import trustme

    ca = trustme.CA()
    files = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "cert", "key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(files["ca"])
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    client = ca.issue_cert("sluice-client.test")
    client.cert_chain_pems[0].write_to_path(files["client_cert"])
    client.private_key_pem.write_to_path(files["client_key"])
    return files


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory):
    """An etcd of this module's own on https, asking clients for a certificate (mutual TLS)."""
    root = tmp_path_factory.mktemp("etcd-tls")
    files = tls_files(root)
    server = etcd_server_process(root, tls=files)
    server.start()
    try:
        yield server, files
    finally:
        server.stop()


async def test_https_with_a_client_certificate(etcd_tls):
    server, files = etcd_tls
    assert server.url.startswith("https://")
    mutual = tls_context(files["ca"], files["client_cert"], files["client_key"])
    async with EtcdClient(server.url, timeout=2, tls=mutual) as etcd:
        revision = await etcd.put("/tls/a", b"1")
        assert (await etcd.get("/tls/a")).value == b"1"
        async with etcd.watch_prefix("/tls/", start_revision=revision, check_interval=0.2) as updates:
            assert [e.kv.value for e in (await next_update(updates)).events] == [b"1"]
    async with EtcdClient(server.url, timeout=2, tls=tls_context(files["ca"])) as anonymous:
        with pytest.raises(EtcdUnavailable):  # no client certificate: etcd ends the handshake
            await anonymous.get("/tls/a")
    async with EtcdClient(server.url, timeout=2) as untrusting:
        with pytest.raises(EtcdUnavailable, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs
            await untrusting.get("/tls/a")


def test_tls_files_that_do_not_load_are_named(tmp_path):
    files = tls_files(tmp_path)
    with pytest.raises(ValueError, match="nowhere.pem: not a readable PEM CA file"):
        tls_context(str(tmp_path / "nowhere.pem"))
    with pytest.raises(ValueError, match="ca.pem: not a readable PEM certificate"):
        tls_context(files["ca"], files["ca"])  # a certificate without its key
    with pytest.raises(ValueError, match="a key without its certificate"):
        tls_context(files["ca"], None, files["client_key"])
