"""Files written whole or not at all: the data reaches the disk (fsync) before the rename makes it visible."""

import os

import pytest

from lightning_frozenbn.files import write_atomically


def test_the_temporary_file_is_synced_before_it_is_renamed_onto_the_target(tmp_path, monkeypatch):
    """A rename without fsync can leave an empty or partial file at the target after a power loss or a
    kernel crash: the rename is journalled before the data. The order of the two calls is what matters."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src))) or replace(src, dst))
    target = tmp_path / "state.ckpt"
    write_atomically(target, lambda f: f.write(b"payload"))
    assert target.read_bytes() == b"payload"
    assert [kind for kind, _ in events] == ["fsync", "replace"]
    assert events[0][1] == events[1][1]  # the file synced is the file renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.ckpt"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.ckpt"
    target.write_bytes(b"old")

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fails)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.ckpt"]
