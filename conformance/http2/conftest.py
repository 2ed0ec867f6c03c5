"""Fixtures for the HTTP/2 suite: `h2` is the target's h2c address, `client` a connected,
handshaken `H2Client` on it. Nothing is skipped: a target that does not speak h2c on its h2
port fails every test.
"""

from __future__ import annotations

import pytest

from ..h2client import H2Client
from ..targets import Target


@pytest.fixture
def h2(target: Target) -> tuple[str, int]:
    """The target's h2c address (a target without one fails the test)."""
    assert target.h2_address is not None, f"{target.name} has no h2 listener: {target.h2_missing}"
    return target.h2_address


@pytest.fixture
def client(h2) -> H2Client:
    """A connection to the target's h2 port, past the exchange of SETTINGS."""
    with H2Client(h2) as connection:
        connection.handshake()
        yield connection
