"""Extended CONNECT (RFC 8441): how a server offers it, and what stays malformed.

A server that carries WebSockets over HTTP/2 says so with SETTINGS_ENABLE_CONNECT_PROTOCOL
= 1 (section 3). The ``:protocol`` pseudo-header belongs to a CONNECT alone, and a CONNECT
that carries it also carries ``:scheme`` and ``:path`` (section 4); anything else is a
malformed request (RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR or a 400, never forwarded.
"""

import pytest

from ..h2client import SettingCodes
from .checks import assert_malformed

_NGINX_NO_8441 = pytest.mark.quirk("nginx", "1.22 does not implement RFC 8441")

WEBSOCKET = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
             (":path", "/app/chat"), (":authority", "proxy.test"), ("sec-websocket-version", "13")]


@_NGINX_NO_8441
def test_the_server_offers_extended_connect(client):
    """RFC 8441 3: SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 in the server's SETTINGS."""
    assert client.server_settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1, client.describe()


def test_protocol_without_connect_is_malformed(client, recorder):
    """RFC 8441 4: a request with ``:protocol`` whose method is not CONNECT is malformed."""
    fields = [(":method", "GET"), (":protocol", "websocket"), (":scheme", "http"),
              (":path", "/app/chat"), (":authority", "proxy.test")]
    stream_id = client.new_stream_id()
    client.send(client.headers(stream_id, fields, end_stream=True))
    assert_malformed(client, stream_id, recorder)


@pytest.mark.parametrize("missing", [":path", ":scheme"])
def test_an_extended_connect_without_path_or_scheme_is_malformed(client, recorder, missing):
    """RFC 8441 4: an extended CONNECT carries ``:scheme`` and ``:path``, as other requests do."""
    stream_id = client.new_stream_id()
    fields = [f for f in WEBSOCKET if f[0] != missing]
    client.send(client.headers(stream_id, fields, end_stream=False))
    assert_malformed(client, stream_id, recorder)
