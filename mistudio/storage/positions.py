"""Chunk records: each committed chunk's crc32c bound to its place, so that a unit file in the wrong place (two
shards swapped, a shard of another hook point, a shard or a chunk file copied in from another store) is refused
instead of read as other rows' values.

A chunk's crc32c (Zarr's, in the file, which any Zarr reader checks) covers its bytes, not where they are. A store
with records says so in its metadata (``storage.chunk_records``: the store's key, random at allocation), and each
recorded array in its ``zarr.json`` attributes (``mistudio_chunk_records``: the same key). Such an array's folder
holds ``.mistudio-chunks``: per chunk, in row order, 4 little-endian bytes, the crc32c of (key, array path, chunk
number, the chunk's crc32c); the file is made at its full size, zeros where no chunk is recorded yet. A chunk is
recorded when it is written whole (the store's writer: with the chunk, flushed with it) or, for rows Zarr wrote (token
arrays, distributed runs), from its file before the commit mark moves over it; only chunks wholly below the mark are
checked (the one the mark cuts may still be written again). Stores without a key (written before records, or remote)
read and verify as they always did; a resume keeps them so.
"""
from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np

from .files import fsync_dir, sync_data

RECORDS_FILE = ".mistudio-chunks"
ATTRIBUTE = "mistudio_chunk_records"
RECORD_BYTES = 4
RECORDED_PREFIXES = ("tokens/", "activations/")  # and latents/<hook point>/{indices,values}; the by-feature index
# arrays are not recorded: verify rebuilds them from their rows and compares


def new_key() -> str | None:
    """A new store's key (None: a store without chunk records)."""
    return secrets.token_hex(8)


def recorded(path: str) -> bool:
    """Whether an array at ``path`` keeps chunk records in a store that has them."""
    path = path.strip("/")
    return path.startswith(RECORDED_PREFIXES) or (path.startswith("latents/") and
                                                  path.rsplit("/", 1)[-1] in ("indices", "values"))


class ChunkRecords:
    """The records of one array (a :class:`~.codec.Geometry` with crc32c, and the key its ``zarr.json`` names)."""

    def __init__(self, g: Any, key: str):
        self.g, self.key = g, key
        self.file = g.root / RECORDS_FILE
        self.prefix = f"{key}\0{g.arr.path.strip('/')}\0".encode()
        self.dirty = self.written = False  # records put and not yet flushed; the file was made by a put
        self._known: bytes | None = None  # the file as a reader last read it (it is read once, not per chunk)

    @classmethod
    def of(cls, g: Any) -> "ChunkRecords | None":
        key = g.arr.attrs.get(ATTRIBUTE) if g is not None and g.crc else None
        return cls(g, str(key)) if key else None

    def entry(self, chunk: int, crc: int) -> int:
        import google_crc32c

        return google_crc32c.value(self.prefix + int(chunk).to_bytes(8, "little") + int(crc).to_bytes(4, "little"))

    def final(self, mark: int) -> int:
        """How many chunks lie wholly below ``mark`` (all of them once it reaches the last row)."""
        g = self.g
        return -(-g.shape[0] // g.chunk_rows) if mark >= g.shape[0] else max(0, mark) // g.chunk_rows

    def put_many(self, first: int, crcs: list[int]) -> None:
        """Write the records of chunks ``first``, ``first + 1``, ... (their crc32c: ``crcs``), flushed to the disk
        before this returns."""
        self._write(first, np.array([self.entry(first + i, crc) for i, crc in enumerate(crcs)], "<u4").tobytes())
        self.sync()

    def put(self, chunk: int, crc: int) -> None:
        """Write the record of chunk number ``chunk`` (its crc32c: ``crc``); :meth:`sync` flushes it."""
        self._write(chunk, int(self.entry(chunk, crc)).to_bytes(RECORD_BYTES, "little"))

    def _write(self, first: int, entries: bytes) -> None:
        """Write ``entries`` (records of chunks ``first``, ``first + 1``, ...) at their places in the file."""
        if not self.file.exists():
            self._create()
        fd = os.open(self.file, os.O_WRONLY)
        try:
            done = 0
            while done < len(entries):
                done += os.pwrite(fd, entries[done:], first * RECORD_BYTES + done)
        finally:
            os.close(fd)
        self.dirty = True

    def _create(self) -> None:
        """Make the file at its full size, zeros (no record) for every chunk, so that each record written later
        overwrites bytes already on the disk: flushing it then writes a block, not the file's size (a journal
        commit per flush on most file systems). Put in place by a hard link, so that writers racing to create it
        (a distributed run's processes) never zero each other's records."""
        n_chunks = -(-self.g.shape[0] // self.g.chunk_rows)
        tmp = self.file.with_name(f"{RECORDS_FILE}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(bytes(n_chunks * RECORD_BYTES))
                f.flush()
                sync_data(f.fileno())
            os.link(tmp, self.file)
            self.written = True
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def sync(self) -> None:
        """Flush the records :meth:`put` wrote to the disk (and the file's folder entry when it is new)."""
        if not self.dirty:
            return
        fd = os.open(self.file, os.O_RDONLY)
        try:
            sync_data(fd)
        finally:
            os.close(fd)
        if self.written:
            fsync_dir(str(self.file.parent))
        self.dirty = self.written = False

    def stored(self, chunk: int) -> bytes:
        """The record at chunk number ``chunk``'s place as the file holds it: 4 bytes, zeros where none was written
        yet, fewer when the file is missing or ends before it. The file is read once, and again only for a record
        not seen (as read, it may be older than the commit mark of an in-progress store)."""
        at = chunk * RECORD_BYTES
        raw = b"" if self._known is None else self._known[at:at + RECORD_BYTES]
        if len(raw) != RECORD_BYTES or raw == bytes(RECORD_BYTES):
            try:
                with open(self.file, "rb") as f:
                    self._known = f.read()
            except FileNotFoundError:
                self._known = b""
            raw = self._known[at:at + RECORD_BYTES]
        return raw

    def missing(self, chunk: int, crc: int) -> bool:
        """Whether chunk number ``chunk`` has no record (none written, the file missing or cut short, or zeroed):
        not one that names other data."""
        raw = self.stored(chunk)
        return len(raw) != RECORD_BYTES or (raw == bytes(RECORD_BYTES) and self.entry(chunk, crc) != 0)

    def misplaced(self, chunk: int, crc: int) -> str | None:
        """Why chunk number ``chunk`` (of the array), whose sound crc32c is ``crc``, is not the one recorded for its
        place; None when it is."""
        name = f"{self.g.arr.path.strip('/')}/{RECORDS_FILE}"
        if self.missing(chunk, crc):
            return (f"has no record of its checksum in {name} (that file is missing, cut short or zeroed), so it "
                    f"cannot be told from another place's data; {REFIX}")
        if int.from_bytes(self.stored(chunk), "little") == self.entry(chunk, crc):
            return None
        return (f"holds another place's data: its crc32c checksum is sound, but it is not the one {name} "
                "records for this place (the file was swapped with another, copied in from another array or "
                f"another store, or rewritten after it was committed; or {RECORDS_FILE} itself was damaged, cut "
                f"short or partly overwritten); {REFIX}")


FIX = "put the right file back from a copy of this store made before the files were moved, or re-extract (retry)"
REFIX = (f"{FIX}; if only {RECORDS_FILE} was lost or damaged and every data file is in its place, `mistudio verify "
         "<id> --rerecord` (ws.rerecord(id)) records them again")
