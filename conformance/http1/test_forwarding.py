"""What the proxy adds: Via (RFC 9110 7.6.3), X-Forwarded-*, and a request id."""

import pytest

from ..checks import forward
from ..client import request
from ..recorder import respond

VIA = [
    pytest.param(None, "1.1 sluice", id="added"),
    pytest.param("1.0 fred", "1.0 fred, 1.1 sluice", id="appended"),
    pytest.param(
        "1.0 fred, 1.1 p.example", "1.0 fred, 1.1 p.example, 1.1 sluice", id="appended-to-list"
    ),
]


def _via(value: str | None) -> tuple[tuple[str, str], ...]:
    return () if value is None else (("Via", value),)


@pytest.mark.parametrize(("incoming", "expected"), VIA)
def test_via_on_request(target, recorder, incoming, expected):
    sent = request(headers=_via(incoming))
    forwarded, _ = forward(target.address, recorder, sent)
    assert forwarded.joined("via") == expected, forwarded.raw_head


@pytest.mark.parametrize(("incoming", "expected"), VIA)
def test_via_on_response(target, recorder, incoming, expected):
    recorder.queue(respond(headers=_via(incoming)))
    _, response = forward(target.address, recorder, request())
    assert response.joined("via") == expected, response.raw_head


@pytest.mark.parametrize(
    "incoming",
    [
        pytest.param((), id="absent"),
        pytest.param((("X-Forwarded-For", "10.0.0.1"),), id="spoofed"),
        pytest.param(
            (("X-Forwarded-For", "10.0.0.1, 10.0.0.2"), ("X-Forwarded-For", "10.0.0.3")),
            id="spoofed-repeated",
        ),
    ],
)
def test_x_forwarded_for_is_the_client(target, recorder, incoming):
    forwarded, _ = forward(target.address, recorder, request(headers=incoming))
    assert forwarded.get_all("x-forwarded-for") == ["127.0.0.1"], forwarded.raw_head


def test_x_forwarded_proto_and_host(target, recorder):
    forwarded, _ = forward(target.address, recorder, request(host="app.example:8080"))
    assert forwarded.get_all("x-forwarded-proto") == ["http"], forwarded.raw_head
    assert forwarded.get_all("x-forwarded-host") == ["app.example:8080"], forwarded.raw_head


def test_request_id_generated_when_absent(target, recorder):
    first, _ = forward(target.address, recorder, request())
    recorder.reset()
    second, _ = forward(target.address, recorder, request())
    ids = [r.get_all("x-request-id") for r in (first, second)]
    assert all(len(i) == 1 and i[0] for i in ids), ids
    assert ids[0] != ids[1], ids


def test_request_id_passed_through(target, recorder):
    forwarded, _ = forward(
        target.address, recorder, request(headers=(("X-Request-Id", "abc-123"),))
    )
    assert forwarded.get_all("x-request-id") == ["abc-123"], forwarded.raw_head
