"""Field blocks and HPACK (RFC 9113 4.3, RFC 7541): a block that cannot be decoded is a
connection error COMPRESSION_ERROR; the decoding context outlives a stream reset; and the
decoded size is bounded (SETTINGS_MAX_HEADER_LIST_SIZE, 10.5.1).
"""

import pytest

from ..checks import settle
from ..h2client import ErrorCodes, SettingCodes, raw_frame, request_fields
from .checks import assert_connection_error, assert_still_serving
from .test_framing import END_HEADERS, END_STREAM, HEADERS

_BASE = bytes([0x82, 0x86, 0x84])  # :method GET, :scheme http, :path / (static table)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(_BASE + b"\xbe", id="index-past-both-tables"),  # 62: dynamic table empty
        pytest.param(_BASE + b"\x80", id="index-0"),  # RFC 7541 6.1
        pytest.param(b"\x3f\xe2\x1f" + _BASE, id="table-size-update-over-the-setting"),  # to 4097
        pytest.param(_BASE + b"\x40\x81\xff\x01x", id="huffman-padding-over-7-bits",
                     marks=pytest.mark.quirk("nginx", "GOAWAY PROTOCOL_ERROR")),  # RFC 7541 5.2
        pytest.param(_BASE + b"\x40\x0a" + b"x" * 3, id="string-cut-short",
                     marks=pytest.mark.quirk("nginx", "GOAWAY FRAME_SIZE_ERROR")),
    ],
)
def test_an_undecodable_block_is_a_compression_error(client, recorder, block):
    """RFC 9113 4.3: a decoding error in a field block is a connection error COMPRESSION_ERROR."""
    client.send(raw_frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    assert_connection_error(client, ErrorCodes.COMPRESSION_ERROR)
    settle()
    assert recorder.received() == b""


def test_the_decoding_context_survives_a_reset_stream(client, recorder):
    """RFC 9113 4.3: a block is decoded even when its stream is refused, so the next block,
    which refers to entries the refused one added, still decodes."""
    refused = request_fields("/app/x", extra=(("x-shared", "s" * 20), ("Upper", "bad")))
    client.send(client.headers(client.new_stream_id(), refused))
    client.response(1)  # refused one way or another
    stream = client.response(client.request("/app/next", extra=(("x-shared", "s" * 20),)))
    assert stream.status == 200 and client.goaway is None, client.describe()
    assert recorder.wait_for(1)[-1].get("x-shared") == "s" * 20


def test_an_hpack_bomb_is_refused(client, recorder):
    """RFC 9113 10.5.1, RFC 7541 7.3: one 4 KiB dynamic-table entry referred to 2,000 times
    decodes to 8 MB. The proxy refuses it (431, RST_STREAM or GOAWAY), forwards nothing, and
    goes on serving."""
    entry = ("x-bomb", "b" * 4000)
    first = client.encode(request_fields("/app/bomb", extra=(entry,)))
    index = bytes([0x80 | 62])  # the entry just added
    client.send(raw_frame(HEADERS, END_HEADERS | END_STREAM, 1, first + index * 2000))
    client.new_stream_id()
    try:
        client.response(1)
    except AssertionError:
        pass  # closed, after a GOAWAY or not: also a refusal
    if client.goaway is None and not client.closed:
        assert client.streams[1].status == 431 or client.streams[1].reset is not None, client.describe()
    settle()
    assert recorder.received() == b"", f"forwarded {len(recorder.received())} bytes"
    assert_still_serving(client.sock.getpeername())


@pytest.mark.quirk("nginx", "does not send SETTINGS_MAX_HEADER_LIST_SIZE")
def test_max_header_list_size_is_advertised(client):
    """RFC 9113 6.5.2, 10.5.1: a proxy that limits the field section says so up front."""
    assert SettingCodes.MAX_HEADER_LIST_SIZE in client.server_settings, client.server_settings
