"""core/files.py: the one atomic, durable write (temporary beside the target, fsync, rename, fsync of the parent)."""

import os

import pytest

from nemo_sdsearch.core import files
from nemo_sdsearch.core.files import atomic_path, atomic_write_bytes, atomic_write_text, durable_replace


@pytest.fixture
def fsyncs(monkeypatch):
    """The real os.fsync, counted: (the fds' paths, as far as /proc tells them)."""
    seen = []
    real = os.fsync

    def counting(fd):
        try:
            seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            seen.append(fd)
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", counting)
    return seen


def test_text_and_bytes_are_written_and_no_temporary_is_left(tmp_path, fsyncs):
    target = tmp_path / "state.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second ü")
    assert target.read_text(encoding="utf-8") == "second ü"
    atomic_write_bytes(tmp_path / "blob", b"\x00\x01")
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "state.json"]
    # each write: the file, then its directory (the rename)
    assert str(tmp_path) in fsyncs and len(fsyncs) >= 6


def test_the_file_and_the_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                       real_fsync(fd)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                           real_replace(a, b)))
    atomic_write_text(tmp_path / "x", "data", tmp_name="x.partial")
    tmp, final = str(tmp_path / "x.partial"), str(tmp_path / "x")
    assert events == [("fsync", tmp), ("replace", tmp, final), ("fsync", str(tmp_path))]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, fsyncs):
    target = tmp_path / "latest"
    atomic_write_text(target, "step_000001")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("step_0000")          # half written
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "step_000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    with pytest.raises(KeyboardInterrupt):       # not only Exceptions
        with atomic_path(tmp_path / "new") as tmp:
            tmp.write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_stale_temporary_from_a_crash_is_replaced(tmp_path):
    (tmp_path / "a.json.tmp").write_text("left by a killed run")
    with atomic_path(tmp_path / "a.json") as tmp:
        assert not tmp.exists()
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_directory_is_fsynced_file_by_file_and_renamed_into_place(tmp_path, fsyncs):
    final = tmp_path / "checkpoints" / "step_000002"
    final.mkdir(parents=True)
    (final / "old.pt").write_text("an earlier save of the same step")
    with atomic_path(final, ".tmp_step_000002") as tmp:
        assert tmp == tmp_path / "checkpoints" / ".tmp_step_000002"
        (tmp / "sub").mkdir(parents=True)
        (tmp / "state.pt").write_bytes(b"weights")
        (tmp / "sub" / "more.bin").write_bytes(b"more")
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_000002"]
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == ["state.pt", "sub", "sub/more.bin"]
    tmp = str(tmp_path / "checkpoints" / ".tmp_step_000002")
    # every file and folder of the temporary before the rename, the parent after it
    assert {f"{tmp}/state.pt", f"{tmp}/sub/more.bin", f"{tmp}/sub", tmp} <= set(fsyncs[:-1])
    assert fsyncs[-1] == str(tmp_path / "checkpoints")


def test_a_failed_directory_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "out") as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_durable_replace_renames_a_finished_temporary(tmp_path, fsyncs):
    (tmp_path / "model-00001.safetensors.tmp").write_bytes(b"shard")
    durable_replace(tmp_path / "model-00001.safetensors.tmp", tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert fsyncs == [str(tmp_path / "model-00001.safetensors.tmp"), str(tmp_path)]


def test_a_file_system_that_refuses_directory_fsync_is_not_an_error(tmp_path, monkeypatch):
    import errno

    real = os.fsync

    def refuse_dirs(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", refuse_dirs)
    atomic_write_text(tmp_path / "x", "ok")
    assert (tmp_path / "x").read_text() == "ok"
