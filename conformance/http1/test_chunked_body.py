"""Chunked request bodies from the security review (RFC 9112 7.1): malformed chunk lines are
refused at once, and a body that breaks after the upstream has already answered still
leaves the client with an answer.

More bad chunk-size lines are in test_smuggling.py.
"""

import time

import pytest

from ..checks import assert_refused_mid_body, describe
from ..client import RawClient
from ..recorder import Reply, respond
from ..wire import PeerClosed

_NGINX_LF = pytest.mark.quirk("nginx", "accepts a bare LF as a chunk line terminator")
_AT_ONCE = 1.0  # seconds; far below header_read (2 s) and the idle timeout (5 s)

HEAD = b"POST /app/chunked HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(b"5;a\rb\r\nhello\r\n0\r\n\r\n", id="bare-cr-in-extension"),
        pytest.param(b"5\nhello\n0\n\n", id="lf-only-lines", marks=_NGINX_LF),
    ],
)
def test_bad_chunk_line_is_refused_at_once(target, recorder, chunks):
    """Everything needed to refuse is in hand: waiting for more bytes (until a timeout) only
    keeps a connection and an upstream request open for nothing."""
    _, elapsed = assert_refused_mid_body(target.address, recorder, HEAD + chunks)
    assert elapsed < _AT_ONCE, f"the 400 took {elapsed:.2f}s{describe(HEAD + chunks)}"


_NGINX_ZEROS = pytest.mark.quirk(
    "nginx", "reads a zero-padded chunk size of any length: the body is valid to it"
)
_LARGE = 2_000_000  # an answer that takes many writes to relay


@pytest.mark.parametrize("answer", [5, _LARGE], ids=["small-answer", "large-answer"])
@pytest.mark.parametrize("when", ["with-the-head", "after-the-answer"])
@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(b"10000000000000005\r\nhello\r\n0\r\n\r\n", id="size-2**64+5"),
        pytest.param(b"5".zfill(26) + b"\r\nhello\r\n0\r\n\r\n", id="size-26-digits", marks=_NGINX_ZEROS),
    ],
)
def test_bad_body_after_an_early_answer_still_gets_one(target, recorder, chunks, when, answer):
    """The upstream answers as soon as it has the head; the body is malformed. The client gets
    the upstream's whole answer or a 400, then a close: never nothing, never a cut answer. (Once
    the answer has started, the rest of the upload no longer matters.)"""
    body = bytes(i % 251 for i in range(answer))
    recorder.queue(Reply(respond(body=body).data, early=True))
    with RawClient(target.address) as client:
        if when == "with-the-head":
            client.send(HEAD + chunks)
        else:
            client.send(HEAD)
            recorder.wait_for(1, complete=False)
            time.sleep(0.2)  # the answer is on its way back through the proxy
            client.send(chunks)
        try:
            response = client.read_response("POST")
        except PeerClosed as exc:
            pytest.fail(f"no whole answer: {exc}{describe(HEAD + chunks)}")
        assert (response.status, response.body) == (200, body) or response.status == 400, (
            describe(HEAD + chunks, response)
        )
        rest, _ = client.wait_closed()
    assert rest == b"", f"more bytes after the {response.status}: {rest[:200]!r}"
