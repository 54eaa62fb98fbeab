"""iqe.atomic: the target holds the old bytes or the new ones, never a partial write."""

from __future__ import annotations

import os

import pytest

from iqe.atomic import atomic_open, atomic_write_text


def test_replace_and_no_temporaries(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failure_keeps_old_content(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="^boom$"):
        with atomic_open(target) as fh:
            fh.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_written_files_get_normal_permissions(tmp_path):
    from iqe.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        new = atomic_write_text(tmp_path / "new.json", "{}")
        assert new.stat().st_mode & 0o777 == 0o644  # like open(..., "w"), not mkstemp's private 0600
        (tmp_path / "kept").write_text("x")
        os.chmod(tmp_path / "kept", 0o640)
        atomic_write_text(tmp_path / "kept", "y")
        assert (tmp_path / "kept").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
