import errno

import pytest

from helpers.files import DiskFullError, atomic_write, read_json, write_json


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})

    def crash(f):
        f.write(b'{"v": 2, "trunc')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_disk_full_is_a_clear_error(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="disk full while writing .*b.bin.*free some space"):
        atomic_write(tmp_path / "b.bin", full)
    assert list(tmp_path.iterdir()) == []
