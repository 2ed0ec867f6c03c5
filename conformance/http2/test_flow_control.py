"""Flow control (RFC 9113 5.2, 6.9): the proxy sends no more DATA than the client's
windows allow, keeps to its own, and refuses windows past 2^31-1.
"""

from hyperframe.frame import WindowUpdateFrame

from .. import targets
from ..h2client import ErrorCodes, SettingCodes, raw_frame
from ..recorder import respond
from .checks import assert_connection_error, assert_stream_error
from .test_framing import WINDOW_UPDATE


def test_response_data_waits_for_the_clients_window(h2, recorder):
    """RFC 9113 6.9.1: with a stream window of 10 the proxy sends 10 bytes, then waits for
    WINDOW_UPDATE before the rest."""
    from ..h2client import H2Client

    body = b"0123456789" * 10
    recorder.queue(respond(body=body))
    with H2Client(h2, settings={SettingCodes.INITIAL_WINDOW_SIZE: 10}, auto_window=False) as client:
        client.handshake()
        stream_id = client.request("/app/window")
        stream = client.streams[stream_id]
        client.read_until(lambda: stream.headers is not None and len(stream.body) >= 10)
        client.ping()
        assert stream.body == body[:10] and not stream.ended, client.describe()
        client.send(WindowUpdateFrame(stream_id, window_increment=len(body)))
        client.response(stream_id)
    assert stream.body == body and stream.status == 200, client.describe()


def test_a_connection_window_past_2_31_is_a_flow_control_error(client):
    """RFC 9113 6.9.1: a WINDOW_UPDATE that takes the connection window over 2^31-1 is a
    connection error FLOW_CONTROL_ERROR."""
    client.send(raw_frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")))
    assert_connection_error(client, ErrorCodes.FLOW_CONTROL_ERROR)


def test_a_stream_window_past_2_31_is_a_stream_error(client, recorder):
    """RFC 9113 6.9.1: on a stream it is a stream error FLOW_CONTROL_ERROR."""
    stream_id = client.request("/app/overflow", method="POST", end_stream=False)
    client.send(raw_frame(WINDOW_UPDATE, 0, stream_id, (2**31 - 1).to_bytes(4, "big")))
    assert_stream_error(client, stream_id, ErrorCodes.FLOW_CONTROL_ERROR)


def test_data_past_the_granted_window_is_a_flow_control_error(client, recorder):
    """RFC 9113 6.9.1: a sender must not exceed the window its peer granted. The bytes sent
    here exceed the stream's window by 1 KiB; unless the proxy granted more before they
    arrived (then no error is due), it answers FLOW_CONTROL_ERROR on the stream or the
    connection. A proxy whose window is larger than the body limit answers 413 and closes
    the stream first; frames on a stream it closed are then to be ignored (5.1)."""
    stream_id = client.request("/app/flood", method="POST", end_stream=False)
    window = min(client.stream_window(stream_id), client.send_window)
    client.send(*client.data_frames(stream_id, b"x" * (window + 1024), end_stream=False))
    stream = client.streams[stream_id]
    try:
        client.read_until(lambda: stream.reset is not None or client.goaway is not None, timeout=3)
    except TimeoutError:
        granted = min(client.stream_window(stream_id), client.send_window)
        assert granted >= window + 1024, f"no error, granted only {granted}{client.describe()}"
        return
    if stream.status == 413:
        assert window + 1024 > targets.MAX_BODY_BYTES, client.describe()
        return
    code = stream.reset if stream.reset is not None else client.goaway.error_code
    assert code == ErrorCodes.FLOW_CONTROL_ERROR, client.describe()
