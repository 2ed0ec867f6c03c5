"""sluice.filestamp: every way a followed file is replaced counts as a change, and only once."""

from __future__ import annotations

import os

from sluice.filestamp import FileStamp


def test_each_kind_of_replacement_is_one_change(tmp_path):
    path = tmp_path / "keys"
    path.write_text("one")
    other = tmp_path / "other"
    other.write_text("x")
    stamp = FileStamp([path, other])
    assert not stamp.changed()

    path.write_text("two!")  # written in place, new size
    assert stamp.changed() and not stamp.changed()

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, new mtime
    assert stamp.changed() and not stamp.changed()

    new = tmp_path / "keys.new"
    new.write_text("two!")
    os.utime(new, ns=(st.st_atime_ns, path.stat().st_mtime_ns))  # same size and mtime: only the inode differs
    os.replace(new, path)
    assert stamp.changed() and not stamp.changed()

    other.unlink()  # the second file gone, then back
    assert stamp.changed() and not stamp.changed()
    other.write_text("x")
    assert stamp.changed()


def test_a_symlink_swap_counts_like_a_kubernetes_secret_update(tmp_path):
    for name, text in (("v1", "old"), ("v2", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keys").write_text(text)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "keys").symlink_to("..data/keys")
    stamp = FileStamp([tmp_path / "keys"])
    (tmp_path / "..data.tmp").symlink_to("v2")
    os.replace(tmp_path / "..data.tmp", tmp_path / "..data")
    assert stamp.changed() and not stamp.changed()


def test_looks_at_most_every_interval(tmp_path):
    path = tmp_path / "cert.pem"
    path.write_text("a")
    stamp = FileStamp([path], every=3600)
    path.write_text("bb")
    assert not stamp.changed()  # too soon: not even a stat
    stamp._looked -= 3600
    assert stamp.changed()
