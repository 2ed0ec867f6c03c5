"""HTTP/2 hardening (issue 7 part 5; RFC 9113 10.5): floods of cheap frames, streams
opened and reset at once, field blocks without end, more streams than allowed, a client
that never opens its window. Each ends in a bounded refusal (GOAWAY, RST_STREAM, a close)
and the proxy goes on serving: never a traceback, never a stuck task.
"""

import time

import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from .. import targets
from ..h2client import ErrorCodes, H2Client, SettingCodes, request_fields
from ..recorder import respond
from .checks import assert_still_serving

MAX_CONCURRENT_STREAMS = 100  # sluice's default (issue 7: 100)
_FLOOD_SECONDS = 10.0


def _flood(client: H2Client, frame: bytes, count: int) -> None:
    """Sends `frame` `count` times in batches, reading as it goes, until the proxy closes;
    the proxy may also simply keep up (answering every one)."""
    batch = frame * 1000
    deadline = time.monotonic() + _FLOOD_SECONDS
    try:
        for _ in range(count // 1000):
            client.send(batch)
            try:
                while client.read_frame(timeout=0.001 if time.monotonic() < deadline else 1) is not None:
                    if len(client.received) > 200:
                        del client.received[:100]  # keep the log short, not the flood
            except TimeoutError:
                pass  # nothing more to read now: the flood goes on (it used to end here,
                # after one batch the proxy may rightly tolerate)
    except OSError:
        pass


def _ended(client: H2Client) -> None:
    """The proxy ends the connection within a few seconds. Its GOAWAY is not required: with
    flood bytes unread, closing resets the connection, and the reset can overtake it."""
    try:
        client.wait_closed(timeout=5)
    except OSError:
        client.closed = True


def _ended_with_goaway(client: H2Client) -> None:
    """The proxy ends the connection (GOAWAY first, any code), within a few seconds."""
    _ended(client)
    assert client.goaway is not None, f"no GOAWAY{client.describe()}"


@pytest.mark.quirk("nginx", "closes the connection without a GOAWAY")
def test_rapid_reset_gets_goaway(client, recorder, target):
    """CVE-2023-44487: streams opened and reset at once, 10,000 of them, never more than one
    open. The proxy must end the connection (GOAWAY) long before that, and forward few."""
    block = client.encode(request_fields("/app/reset"))
    sent = 0
    try:
        for sid in range(1, 20001, 2):
            client.send(HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]),
                        RstStreamFrame(sid, error_code=ErrorCodes.CANCEL))
            sent += 1
            if sid % 200 == 1 and client.read_frame(timeout=0.001) is None:
                break
    except (TimeoutError, OSError):
        pass
    _ended_with_goaway(client)
    assert len(recorder.requests) < 1000, f"{len(recorder.requests)} of {sent} reached upstream"
    assert_still_serving(target.h2_address)


@pytest.mark.parametrize("size", [
    pytest.param(1024, id="1KiB-frames"),
    pytest.param(0, id="empty-frames"),
])
def test_continuation_flood_is_cut_off(client, recorder, target, size):
    """CVE-2024-27316: a field block that never ends, in CONTINUATION frames (with data, or
    empty so that no size limit is reached). The proxy caps the block across the frames and
    ends the connection; nothing is forwarded."""
    filler = client.encode([("x-f", "f" * 1000)]) if size else b""
    client.send(HeadersFrame(1, data=client.encode(request_fields("/app/flood"))))
    frame = ContinuationFrame(1, data=filler).serialize()
    _flood(client, frame, 20000 if size else 200000)
    _ended(client)
    assert not recorder.requests, recorder.requests[:1]
    assert_still_serving(target.h2_address)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 0}).serialize(), id="settings"),
        pytest.param(PingFrame(0, opaque_data=b"floodflo").serialize(), id="ping"),
    ],
)
def test_settings_and_ping_floods_are_bounded(client, target, frame):
    """CVE-2019-9515 / 9512: each SETTINGS or PING asks for an answer; 100,000 of them sent
    back to back. Other clients are served meanwhile, and the proxy ends the connection
    (as Envoy does past 1,000 queued control frames): an answer to every one is no bound."""
    _flood(client, frame, 100000)
    assert_still_serving(target.h2_address)
    _ended(client)


def test_streams_over_the_limit_are_refused_and_the_others_answered(client, recorder):
    """RFC 9113 5.1.2: streams past SETTINGS_MAX_CONCURRENT_STREAMS are refused with
    RST_STREAM REFUSED_STREAM, and the allowed ones are answered on the same connection."""
    limit = client.server_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
    assert limit is not None, f"no SETTINGS_MAX_CONCURRENT_STREAMS{client.describe()}"
    if limit > 200:
        pytest.skip(f"limit {limit}: too many upstream connections for this check")
    opened = [client.request(f"/app/open{i}", method="POST", end_stream=False) for i in range(limit)]
    extra = [client.request(f"/app/extra{i}", method="POST", end_stream=False) for i in range(10)]
    client.read_until(lambda: all(client.streams[i].reset is not None for i in extra), timeout=10)
    codes = {client.streams[i].reset for i in extra}
    assert codes == {ErrorCodes.REFUSED_STREAM}, client.describe()
    for stream_id in opened:
        client.send(*client.data_frames(stream_id, b"body"))
    try:
        client.read_until(lambda: all(client.streams[i].done for i in opened), timeout=15)
    finally:
        statuses = [client.streams[i].status for i in opened]
        answered = sum(s == 200 for s in statuses)
        assert answered == limit, f"{answered} of {limit} answered: {statuses}{client.describe()}"
    assert client.goaway is None, client.describe()


def test_sluice_allows_100_concurrent_streams(client, target):
    if target.name != "sluice":
        pytest.skip("sluice's own default")
    assert client.server_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS) == MAX_CONCURRENT_STREAMS


def test_a_client_that_never_opens_its_window_is_timed_out(h2, recorder, target):
    """A client with a window of 0 never lets the answer through. After the idle timeout the
    proxy gives up on the stream (RST_STREAM) or the connection (GOAWAY, close)."""
    recorder.queue(respond(body=b"x" * 1000))
    with H2Client(h2, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}, auto_window=False) as client:
        client.handshake()
        stream_id = client.request("/app/shut")
        stream = client.streams[stream_id]
        start = time.monotonic()
        try:
            client.read_until(lambda: stream.reset is not None or client.goaway is not None,
                              timeout=targets.IDLE + 5)
        except AssertionError:
            pass  # closed without GOAWAY: given up too
        elapsed = time.monotonic() - start
        assert stream.body == b"", client.describe()
        assert stream.reset is not None or client.goaway is not None or client.closed, (
            f"still waiting after {elapsed:.1f}s{client.describe()}"
        )
    assert_still_serving(h2)
