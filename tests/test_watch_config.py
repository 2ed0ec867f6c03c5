"""server.watch_config's watcher: a stat on the event loop, one reload per settled change."""

from __future__ import annotations

import os

import pytest
import trio

from sluice.control import watch


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(watch, "EVERY", 0.02)
    monkeypatch.setattr(watch, "SETTLE", 0.3)


async def _reloads_after(path, change, nursery) -> list[float]:
    """Start watching ``path``, make ``change``, return the reload times (seconds after it)."""
    times: list[float] = []
    nursery.start_soon(watch.watch_config, str(path), lambda: times.append(trio.current_time() - start))
    await trio.sleep(0.05)  # the watcher's first look
    start = trio.current_time()
    await change()
    with trio.fail_after(5):
        while not times:
            await trio.sleep(0.01)
    await trio.sleep(0.6)  # long enough for a second reload to show, if there were one
    return times


async def test_a_burst_of_writes_is_one_reload_after_it_settles(quick, tmp_path, nursery):
    path = tmp_path / "sluice.toml"
    path.write_text("a")

    async def burst():
        for i in range(5):  # an editor writing, truncating, writing again over 0.2 s
            path.write_text("b" * (i + 2))
            await trio.sleep(0.05)

    times = await _reloads_after(path, burst, nursery)
    assert len(times) == 1
    assert times[0] >= 0.2 + 0.3 - 0.05  # after the last write and the settle time


@pytest.mark.parametrize("how", ["rename", "symlink"])
async def test_a_file_replaced_is_a_change(quick, tmp_path, nursery, how):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "sluice.toml").write_text("x")
    (tmp_path / "v2" / "sluice.toml").write_text("x")  # same size: only the inode differs
    if how == "rename":
        path = tmp_path / "v1" / "sluice.toml"
    else:  # a Kubernetes ConfigMap volume: config -> ..data/sluice.toml, ..data -> v1 swapped for v2
        (tmp_path / "..data").symlink_to("v1")
        path = tmp_path / "sluice.toml"
        path.symlink_to("..data/sluice.toml")

    async def replace():
        if how == "rename":
            os.replace(tmp_path / "v2" / "sluice.toml", path)
        else:
            (tmp_path / "..data.new").symlink_to("v2")
            os.replace(tmp_path / "..data.new", tmp_path / "..data")

    assert len(await _reloads_after(path, replace, nursery)) == 1
