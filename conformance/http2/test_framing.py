"""Frames and the connection preface (RFC 9113 3.4, 4, 5.4, 6): what a frame may carry,
on which stream, at what size. A frame that breaks these rules is a connection error:
GOAWAY with the code the RFC names, then the connection closes.
"""

import socket

import pytest
from hyperframe.frame import PingFrame, SettingsFrame

from ..h2client import ErrorCodes, SettingCodes, raw_frame, request_fields
from .checks import assert_connection_error, assert_usable

# Frame types (RFC 9113 6) and flags, for hand-packed frames.
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8


def test_the_server_preface_is_a_settings_frame(client):
    """RFC 9113 3.4: the server's connection preface is a SETTINGS frame, sent first."""
    assert client.server_settings is not None


def test_a_request_is_answered(client, recorder):
    stream = client.response(client.request("/app/hello"))
    assert (stream.status, stream.body) == (200, b"ok"), client.describe()
    [forwarded] = recorder.wait_for(1)
    assert forwarded.line == "GET /app/hello HTTP/1.1"
    assert forwarded.get_all("host") == ["proxy.test"]  # RFC 9113 8.3.1: from :authority


def test_a_bad_preface_closes_the_connection(h2, recorder):
    """RFC 9113 3.4: an invalid preface is a connection error PROTOCOL_ERROR. The GOAWAY is
    optional (the peer may not speak HTTP/2 at all), and a listener that also serves HTTP/1.1
    may answer it as one; either way the connection closes and nothing is forwarded."""
    sent = b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + SettingsFrame(0).serialize()
    with socket.create_connection(h2, timeout=5) as sock:
        sock.sendall(sent)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert b" 200 " not in received and b"Traceback" not in received, received
    assert recorder.received() == b""


def test_ping_is_answered_with_the_same_payload(client):
    """RFC 9113 6.7: a PING gets a PING with ACK and the same 8 bytes."""
    client.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")


def test_frames_of_an_unknown_type_are_ignored(client, recorder):
    """RFC 9113 4.1, 5.5: unknown frame types are ignored and discarded (on stream 0 here:
    on an idle stream 5.1 could read as a PROTOCOL_ERROR, and nginx does)."""
    client.send(raw_frame(0xFA, 0xFF, 0, b"whatever"))  # hyperframe packs a length of 0
    assert_usable(client)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(raw_frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00"), ErrorCodes.FRAME_SIZE_ERROR,
                     id="settings-not-a-multiple-of-6"),  # 6.5
        pytest.param(raw_frame(SETTINGS, 0, 1, b""), ErrorCodes.PROTOCOL_ERROR,
                     id="settings-on-a-stream"),  # 6.5
        pytest.param(raw_frame(SETTINGS, 1, 0, b"\x00\x04\x00\x00\x00\x01"), ErrorCodes.FRAME_SIZE_ERROR,
                     id="settings-ack-with-payload"),  # 6.5
        pytest.param(raw_frame(SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x02"), ErrorCodes.PROTOCOL_ERROR,
                     id="enable-push-2"),  # 6.5.2
        pytest.param(raw_frame(SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), ErrorCodes.FLOW_CONTROL_ERROR,
                     id="initial-window-over-2^31-1"),  # 6.5.2
        pytest.param(raw_frame(SETTINGS, 0, 0, b"\x00\x05\x00\x00\x10\x00"), ErrorCodes.PROTOCOL_ERROR,
                     id="max-frame-size-under-16384"),  # 6.5.2
        pytest.param(raw_frame(PING, 0, 0, b"1234567"), ErrorCodes.FRAME_SIZE_ERROR,
                     id="ping-of-7-bytes"),  # 6.7
        pytest.param(raw_frame(PING, 0, 1, b"12345678"), ErrorCodes.PROTOCOL_ERROR,
                     id="ping-on-a-stream"),  # 6.7
        pytest.param(raw_frame(DATA, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR,
                     id="data-on-stream-0"),  # 6.1
        pytest.param(raw_frame(HEADERS, END_HEADERS, 0, b"\x82"), ErrorCodes.PROTOCOL_ERROR,
                     id="headers-on-stream-0"),  # 6.2
        pytest.param(raw_frame(RST_STREAM, 0, 0, b"\x00\x00\x00\x08"), ErrorCodes.PROTOCOL_ERROR,
                     id="rst-stream-on-stream-0"),  # 6.4
        pytest.param(raw_frame(GOAWAY, 0, 1, b"\x00" * 8), ErrorCodes.PROTOCOL_ERROR,
                     id="goaway-on-a-stream"),  # 6.8
        pytest.param(raw_frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), ErrorCodes.PROTOCOL_ERROR,
                     id="window-update-of-0-on-the-connection"),  # 6.9
        pytest.param(raw_frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"), ErrorCodes.FRAME_SIZE_ERROR,
                     id="window-update-of-3-bytes"),  # 6.9
        pytest.param(raw_frame(CONTINUATION, END_HEADERS, 1, b"\x82"), ErrorCodes.PROTOCOL_ERROR,
                     id="continuation-without-headers"),  # 6.10
    ],
)
def test_a_bad_frame_is_a_connection_error(client, recorder, frame, code):
    client.send(frame)
    assert_connection_error(client, code)


def test_a_frame_over_max_frame_size_is_a_frame_size_error(client, recorder):
    """RFC 9113 4.2: a frame over SETTINGS_MAX_FRAME_SIZE (16384 unless the server raised it)
    carrying a field block is a connection error FRAME_SIZE_ERROR."""
    limit = client.server_settings.get(SettingCodes.MAX_FRAME_SIZE, 16384)
    block = client.encode(request_fields("/app/big", extra=(("x-big", "b" * limit),)))
    client.send(raw_frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert_connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)
    assert recorder.received() == b""


def test_padding_longer_than_the_payload_is_a_protocol_error(client, recorder):
    """RFC 9113 6.1: a Pad Length that is not less than the payload is PROTOCOL_ERROR."""
    client.send(client.headers(1, request_fields("/app/pad", method="POST"), end_stream=False))
    client.send(raw_frame(DATA, PADDED | END_STREAM, 1, b"\x05abc"))
    assert_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


def test_a_field_block_cut_by_another_frame_is_a_protocol_error(client, recorder):
    """RFC 9113 6.10, 4.3: a HEADERS frame without END_HEADERS must be followed by
    CONTINUATION frames of the same stream and nothing else."""
    block = client.encode(request_fields("/app/cut"))
    client.send(raw_frame(HEADERS, END_STREAM, 1, block[:3]))
    client.send(PingFrame(0, opaque_data=b"12345678"))
    assert_connection_error(client, ErrorCodes.PROTOCOL_ERROR)
    assert recorder.received() == b""


def test_a_client_goaway_ends_the_connection_quietly(client, recorder):
    """RFC 9113 6.8: after the client's GOAWAY the proxy finishes and closes; a clean close
    (its own GOAWAY NO_ERROR, or none) is the answer."""
    stream = client.response(client.request("/app/before"))
    assert stream.status == 200
    client.send(raw_frame(GOAWAY, 0, 0, b"\x00\x00\x00\x01\x00\x00\x00\x00"))
    client.wait_closed(timeout=10)
    if client.goaway is not None:
        assert client.goaway.error_code == ErrorCodes.NO_ERROR, client.describe()
