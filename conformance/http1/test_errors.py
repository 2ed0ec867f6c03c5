"""The error table: what the client gets when no upstream answer can be had."""

import time

import pytest

from .. import targets
from ..checks import assert_clean_error, assert_nothing_forwarded
from ..client import RawClient, request
from ..recorder import CLOSE, GARBAGE, HANG


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/nowhere", 404, id="no-route"),
        pytest.param(
            "/dead/x",
            503,
            id="connect-refused",
            marks=pytest.mark.quirk("nginx", "answers 502 when the upstream refuses"),
        ),
    ],
)
def test_not_forwarded(target, recorder, path, status):
    sent = request(target=path)
    with RawClient(target.address) as client:
        client.send(sent)
        assert_clean_error(client.read_response(), status, sent)
    assert_nothing_forwarded(recorder, sent)


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        pytest.param(CLOSE, 502, id="upstream-closes"),
        pytest.param(
            GARBAGE,
            502,
            id="upstream-garbage",
            marks=pytest.mark.quirk("nginx", "relays a non-HTTP reply as an HTTP/0.9 body"),
        ),
        pytest.param(HANG, 504, id="upstream-silent"),
    ],
)
def test_upstream_failure(target, recorder, reply, status):
    recorder.default = reply  # every attempt, in case the proxy retries
    sent = request()
    start = time.monotonic()
    with RawClient(target.address) as client:
        client.send(sent)
        response = client.read_response()
    elapsed = time.monotonic() - start
    assert_clean_error(response, status, sent)
    if status == 504:
        assert targets.RESPONSE_TIMEOUT - 0.3 <= elapsed <= targets.RESPONSE_TIMEOUT + 2, elapsed
