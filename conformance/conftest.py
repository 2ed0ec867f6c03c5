"""Fixtures for the proxy conformance suites.

- `recorder`: the recording upstream, shared by the session and reset for every test.
- `target`: the proxy under test (sluice by default; `--conformance-target nginx` or
  SLUICE_CONFORMANCE_TARGET=nginx for comparison), one process per session in front of the
  recorder, restarted if a test kills it. sluice runs once per HTTP/1.1 codec (h11 and
  httptools): every test runs against both.

A known difference of another proxy from sluice's promises is declared on the test with
`@pytest.mark.quirk("nginx", "why")`; it turns into a non-strict xfail for that target only.
"""

from __future__ import annotations

import os

import pytest

from .recorder import Recorder
from .targets import NAMES, Target


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--conformance-target",
        choices=NAMES,
        default=os.environ.get("SLUICE_CONFORMANCE_TARGET", "sluice"),
        help="proxy the conformance suites run against (env SLUICE_CONFORMANCE_TARGET)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "quirk(target, reason): known difference of that target; xfail when run against it",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "http1_codec" in metafunc.fixturenames:
        sluice = metafunc.config.getoption("--conformance-target") == "sluice"
        metafunc.parametrize("http1_codec", ["h11", "httptools"] if sluice else [None], scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    name = config.getoption("--conformance-target")
    for item in items:
        for mark in item.iter_markers("quirk"):
            if mark.args[0] == name:
                item.add_marker(pytest.mark.xfail(reason=f"{name}: {mark.args[1]}", strict=False))


@pytest.fixture(scope="session")
def _recorder() -> Recorder:
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture(scope="session")
def _target(request: pytest.FixtureRequest, _recorder: Recorder, tmp_path_factory, http1_codec) -> Target:
    name = request.config.getoption("--conformance-target")
    target = Target(name, tmp_path_factory.mktemp(name), _recorder.port, http1_codec)
    target.start()
    yield target
    target.stop()


@pytest.fixture
def recorder(_recorder: Recorder) -> Recorder:
    _recorder.settle()  # the previous test's stragglers arrive first
    _recorder.reset()
    yield _recorder
    _recorder.reset()  # releases replies still hanging


@pytest.fixture
def target(_target: Target, recorder: Recorder) -> Target:
    if not _target.alive():  # an earlier test killed it; that test has already failed
        _target.stop()
        _target.start()
    yield _target
    if not _target.alive():
        pytest.fail(f"{_target.name} died during this test:\n{_target.output()}", pytrace=False)
