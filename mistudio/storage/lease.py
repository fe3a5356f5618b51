"""One writer per store, across processes: the writer lease.

Whoever writes a store (a job, from the moment it is queued until it ends) or deletes it holds its lease; a
second resume, or a delete of a store being resumed, is refused with a message naming the holder (process, host,
since when, what for). On a local store the lease is an OS lock (``flock``) on ``<store>/.mistudio-lease``: the
system frees it when the holder dies, however it dies, so an INTERRUPTED store is recovered at once. On an
fsspec store it is that object, holding the owner, a nonce and an expiry that the holder's heartbeat renews;
an expired lease may be taken over.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
import uuid
from datetime import datetime
from typing import Any

from ..errors import RETRY_EXTRACTION, StoreBusy, StoreLost

FILE = ".mistudio-lease"
EXPIRES_S = 90.0  # a remote lease not renewed for this long is free (heartbeats renew it every few seconds)


def _owner(purpose: str, job_id: str | None) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "purpose": purpose,
            "job": job_id, "nonce": uuid.uuid4().hex}


def describe(owner: dict | None) -> str:
    """The holder in words: 'pid 123 on host h since 10:32:05 (resume)'."""
    if not owner:
        return "another process (its lease names no owner yet)"
    since = datetime.fromtimestamp(float(owner.get("since", 0))).strftime("%Y-%m-%d %H:%M:%S")
    what = f" ({owner['purpose']})" if owner.get("purpose") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')} since {since}{what}"


def _busy(store_id: str, owner: dict | None) -> StoreBusy:
    return StoreBusy(f"extraction {store_id} is being written by {describe(owner)}: only one process writes a "
                     "store at a time. Wait for it to end or cancel it there; if that process is gone, try again "
                     "(its lease is freed when it exits)")


class WriterLease:
    """The lease on one store, held by this process until :meth:`release`."""

    def __init__(self, location: str, store_id: str, fs: Any = None, path: str | None = None):
        self.location, self.store_id = location, store_id
        self.fs, self.path = fs, path  # remote: the filesystem and the lease object's path
        self.owner: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self.owner is not None

    # -- taking it --------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, location: str, store_id: str, purpose: str, job_id: str | None = None,
                storage_options: dict | None = None) -> "WriterLease":
        """Take the lease of the store at ``location`` or raise :class:`StoreBusy` naming its holder
        (:class:`StoreLost` when the store is not there)."""
        if "://" not in location or location.startswith("file://"):
            lease = cls(location.removeprefix("file://"), store_id)
            lease._acquire_local(_owner(purpose, job_id))
        else:
            import fsspec

            fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
            lease = cls(location, store_id, fs, f"{root.rstrip('/')}/{FILE}")
            lease._acquire_remote(_owner(purpose, job_id))
        return lease

    def _acquire_local(self, owner: dict) -> None:
        file = os.path.join(self.location, FILE)
        try:
            fd = _open_plain(file, os.O_RDWR | os.O_CREAT)
        except FileNotFoundError:
            raise StoreLost(f"the store {self.location} is gone (deleted or moved): nothing to write") from None
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = _read_owner_fd(fd)
            for _ in range(50):  # taken this instant: its holder writes its name right after the lock
                if held_by:
                    break
                time.sleep(0.01)
                held_by = _read_owner_fd(fd)
            os.close(fd)
            raise _busy(self.store_id, held_by) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd, self.owner = fd, owner
        if not os.path.isdir(self.location) or os.stat(file).st_ino != os.fstat(fd).st_ino:
            self.release()  # the store was deleted or replaced while we waited for its lock
            raise StoreLost(f"the store {self.location} was deleted or replaced: nothing to write")

    def _acquire_remote(self, owner: dict) -> None:
        if not self.fs.exists(self.path.rsplit("/", 1)[0]):
            raise StoreLost(f"the store {self.location} is gone (deleted or moved): nothing to write")
        current = self._read_remote()
        if current is not None and float(current.get("expires", 0)) > time.time():
            raise _busy(self.store_id, current)
        self.fs.pipe_file(self.path, json.dumps({**owner, "expires": time.time() + EXPIRES_S}).encode())
        time.sleep(0.2)  # two takers at once: the last write wins, and the other one reads it back below
        current = self._read_remote()
        if current is None or current.get("nonce") != owner["nonce"]:
            raise _busy(self.store_id, current)
        self.owner = owner

    def _read_remote(self) -> dict | None:
        try:
            value = json.loads(self.fs.cat_file(self.path))
            return value if isinstance(value, dict) else None
        except (FileNotFoundError, ValueError):
            return None

    # -- holding it -------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`StoreLost` unless this process still holds the lease (every metadata write asks)."""
        if self.owner is None:
            raise StoreLost(f"the lease on {self.location} was released: this job may not write it any more")
        if self.fs is None:
            try:
                same = os.stat(os.path.join(self.location, FILE)).st_ino == os.fstat(self._fd).st_ino
            except OSError:
                same = False
            if not same:
                raise StoreLost(f"the store {self.location} was deleted or replaced while its job ran: this job "
                                "stopped without touching it; " + RETRY_EXTRACTION)
            return
        current = self._read_remote()
        if current is None or current.get("nonce") != self.owner["nonce"]:
            raise StoreLost(f"the lease on {self.location} was taken by {describe(current)} (this process did not "
                            "renew it in time): this job stopped without writing more; resume it when that ends")

    def renew(self) -> None:
        """Extend a remote lease (the heartbeat calls this); a local lock needs nothing."""
        if self.fs is not None and self.owner is not None:
            self.check()
            self.fs.pipe_file(self.path, json.dumps({**self.owner, "expires": time.time() + EXPIRES_S}).encode())

    def release(self) -> None:
        """Let go (idempotent). A local lease file stays (empty of meaning once unlocked)."""
        if self.owner is None:
            return
        try:
            if self.fs is None:
                os.close(self._fd)
            elif (self._read_remote() or {}).get("nonce") == self.owner["nonce"]:
                self.fs.rm_file(self.path)
        except OSError:
            pass  # gone with its store
        finally:
            self.owner, self._fd = None, None


def _open_plain(file: str, flags: int) -> int:
    """Open a lease file that must be a plain file: never following a link, never blocking on a FIFO; anything
    else in its place is :class:`StoreBusy` naming it and the fix."""
    try:
        fd = os.open(file, flags | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise StoreBusy(_not_plain(file, {errno.ELOOP: "a symbolic link", errno.EISDIR: "a folder"}.get(
                exc.errno, "not a plain file"))) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreBusy(_not_plain(file, "not a plain file (a FIFO, a socket or a device)"))
    os.set_blocking(fd, True)
    return fd


def _not_plain(file: str, what: str) -> str:
    return (f"{file} is {what}: a store's lease file must be a plain file. Remove it (`rm -r '{file}'`) and try "
            "again; nothing else in the store is touched")


def held_here(owner: dict) -> bool:
    """Whether a lease's owner is this process."""
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _read_owner_fd(fd: int) -> dict | None:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"null")
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def holder(location: str, storage_options: dict | None = None) -> dict | None:
    """Who holds the store's lease now (None: nobody), without taking it. Locally: a lock test."""
    if "://" not in location or location.startswith("file://"):
        import fcntl

        file = os.path.join(location.removeprefix("file://"), FILE)
        try:
            fd = _open_plain(file, os.O_RDONLY)
        except (OSError, StoreBusy):  # none, or not a plain file: no writer can hold a lock on it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it exclusively
        except BlockingIOError:
            return _read_owner_fd(fd) or {}
        finally:
            os.close(fd)
    import fsspec

    fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
    try:
        value = json.loads(fs.cat_file(f"{root.rstrip('/')}/{FILE}"))
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) and float(value.get("expires", 0)) > time.time() else None
