"""The one way a file or a directory is put in place: written under a temporary name in the same directory,
flushed to the disk (fsync: the file, or every file and folder of a directory), renamed onto its final name
(`os.replace`, atomic on POSIX), then the parent directory fsynced so the rename itself survives a power cut.
A reader sees the old content or the new, never a half-written file; a failure removes the temporary and
leaves the final name as it was.

    atomic_write_text(path, text)         a text file
    atomic_write_bytes(path, data)        a binary file
    with atomic_path(path) as tmp: ...    anything written at `tmp` (a file, or a directory the block makes)
    durable_replace(tmp, path)            the last step alone: fsync `tmp`, rename it onto `path`, fsync the parent
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

# fsync of a directory is refused by some file systems (and is meaningless there): not an error
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EISDIR}


def fsync_dir(path) -> None:
    """fsync a directory's own entry list (what makes a rename or a new file in it durable)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path) -> None:
    """fsync a file, or every file and every folder of a directory (itself included); links are not followed."""
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        fsync_file(path)
        return
    for root, dirs, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(os.path.join(root, name))
        fsync_dir(root)


def remove(path) -> None:
    """Delete a file or a directory tree; nothing if absent."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def durable_replace(tmp, path) -> Path:
    """Put the complete `tmp` (a file or a directory) in place of `path`: fsync it, rename it, fsync the parent.
    A directory already at `path` is deleted first (a rename cannot replace a non-empty directory): between the
    two steps only `tmp` holds the content, so a resume must look for it (as the callers' stale-temporary
    cleanups do)."""
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def temporary_name(path, tmp_name: str | None = None) -> Path:
    """The temporary beside `path`: `tmp_name` in the same directory, by default `<name>.tmp`."""
    path = Path(path)
    return path.with_name(tmp_name or f"{path.name}.tmp")


@contextlib.contextmanager
def atomic_path(path, tmp_name: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`tmp_name`, default `<name>.tmp`; a stale one from a crash is
    removed first) for the block to write a file or make a directory at; when the block ends normally the
    temporary is fsynced and renamed onto `path` (`durable_replace`); when it raises, the temporary is removed
    and `path` is untouched."""
    path = Path(path)
    tmp = temporary_name(path, tmp_name)
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    try:
        durable_replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def atomic_write_bytes(path, data: bytes, tmp_name: str | None = None) -> Path:
    """Write `data` to `path` atomically and durably (see the module's docstring)."""
    with atomic_path(path, tmp_name) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path, text: str, encoding: str = "utf-8", tmp_name: str | None = None) -> Path:
    """Write `text` to `path` atomically and durably (see the module's docstring)."""
    return atomic_write_bytes(path, text.encode(encoding), tmp_name)
