"""Writing files so that a crash or a power cut leaves the old content or the new, never a mix: a temporary file
in the same folder, written, flushed to the disk (fsync), renamed over the name, and the folder's entry synced."""
from __future__ import annotations

import os
import tempfile


def sync_data(fd: int) -> None:
    """Make a file's data durable (``fdatasync`` where there is one)."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def fsync_dir(folder: str) -> None:
    """Make the folder's entries (a new or renamed file) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform without directory handles: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, durable: bool = True) -> tuple[int, int]:
    """Replace ``path`` with ``data`` whole (a link at ``path`` is replaced, never followed); returns the (device,
    inode) of the file written, which ``path`` names from then on unless something else replaces it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        written = os.fstat(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(folder)
    return written.st_dev, written.st_ino
