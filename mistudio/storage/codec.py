"""The byte format of one storage unit, both ways: :class:`UnitWriter` encodes a unit's file chunk by chunk,
:class:`FastReader` decodes rows out of unit files and trusts no byte of them. Nothing else knows a byte offset.

The format is Zarr v3's, for the layouts this module handles itself (:func:`fast_layout`: a local store,
little-endian bytes, optional crc32c per chunk, full-width chunks; sharded arrays with the shard index at the end,
crc32c'd). An unsharded chunk's file is its rows (the last chunk padded with the fill value, 0) then its crc32c.
A shard's file is its inner chunks, each encoded so, back to back in chunk order, then an index of ``(offset,
length)`` uint64 pairs per inner chunk (``EMPTY`` for one not written) and the index's crc32c. Any Zarr v3 reader
reads these files.

Writing streams a shard: each inner chunk is appended to the shard file as soon as its rows are in (and flushed
to the disk before the commit mark moves over it); the index is written when the shard closes. A shard still
being filled has no index yet: its chunks below the commit mark are read at their place (chunk ``i`` at
``i × chunk bytes``) and checked by their own crc32c.

Reading checks everything before using it: every unit a regular file; a shard's index by its crc32c, then every
entry (each chunk whole, in chunk order, back to back, the index right after them: the only layout the writer
and Zarr produce), no empty entry below the commit mark, the file's length; each chunk's crc32c, and in a store
with chunk records (:mod:`.positions`) that a chunk wholly below the mark is the one recorded for its place.
Damage raises :class:`Damaged` (the caller turns it into ``StoreCorrupted``); anything else unusual (a selection
this module does not handle, a layout it does not know) raises :class:`Fallback`, and the caller reads through Zarr
instead.
"""
from __future__ import annotations

import os
import stat
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .files import fsync_dir, sync_data
from .layout import CHECKSUM_BYTES, EMPTY, SHARD_INDEX_ENTRY, storage_unit
from .positions import ChunkRecords


def fast_layout(arr: Any) -> tuple[int, bool] | None:
    """(rows per inner chunk, crc32c per chunk) when this module may encode and decode ``arr``'s files itself:
    a local store in the writer's layout (:func:`written_layout`). None: let Zarr do it."""
    from zarr.storage import LocalStore

    return written_layout(arr) if isinstance(arr.store_path.store, LocalStore) else None


def written_layout(arr: Any) -> tuple[int, bool] | None:
    """(rows per inner chunk, crc32c per chunk) of an array in the writer's layout, on any store: little-endian
    bytes, optional crc32c, full-width chunks, shard index at the end with crc32c. None: another layout."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    def plain(codecs) -> bool | None:  # crc32c or not; None when anything else is there
        first = codecs[0] if codecs else None
        if not isinstance(first, BytesCodec) or getattr(first.endian, "value", "little") != "little":
            return None
        rest = list(codecs[1:])
        return None if rest not in ([], [Crc32cCodec()]) else bool(rest)

    if np.dtype(arr.dtype).byteorder == ">" or arr.fill_value != 0:
        return None
    codecs = arr.metadata.codecs
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        shard = codecs[0]
        crc = plain(shard.codecs)
        if crc is None or plain(shard.index_codecs) is not True or shard.index_location.value != "end":
            return None
        chunk = shard.chunk_shape
    else:
        crc, chunk = plain(codecs), arr.chunks
    if crc is None or storage_unit(arr)[1:] != arr.shape[1:] or tuple(chunk[1:]) != arr.shape[1:]:
        return None
    return chunk[0], crc


class Geometry:
    """Where things are in one array's unit files (a fast layout)."""

    def __init__(self, arr: Any, inner_rows: int, crc: bool):
        self.arr, self.crc = arr, crc
        root = getattr(arr.store_path.store, "root", None)  # None: a remote store (only its indexes are checked)
        self.root = Path(root) / arr.path if root is not None else None
        self.dtype = np.dtype(arr.dtype)
        self.shape = tuple(arr.shape)
        self.sharded = arr.shards is not None
        self.unit_rows = (arr.shards or arr.chunks)[0]
        self.chunk_rows = inner_rows if self.sharded else self.unit_rows  # rows per encoded chunk
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.data_bytes = self.chunk_rows * self.row_bytes
        self.chunk_bytes = self.data_bytes + CHECKSUM_BYTES * crc
        self.per_shard = self.unit_rows // self.chunk_rows
        self.index_bytes = SHARD_INDEX_ENTRY * self.per_shard + CHECKSUM_BYTES

    @classmethod
    def of(cls, arr: Any, local: bool = True) -> "Geometry | None":
        """The array's geometry when it is in the writer's layout (``local``: on a local store only)."""
        layout = fast_layout(arr) if local else written_layout(arr)
        return None if layout is None or arr.ndim not in (1, 2) else cls(arr, *layout)

    def unit_key(self, unit: int) -> tuple[int, ...]:
        return (unit,) + (0,) * (len(self.shape) - 1)

    def unit_file(self, unit: int) -> Path:
        return self.root / self.arr.metadata.encode_chunk_key(self.unit_key(unit))

    @property
    def n_units(self) -> int:
        return -(-self.shape[0] // self.unit_rows)


# -- encoding ----------------------------------------------------------------------------------------------------
def _write_all(fd: int, data: Any, at: int | None = None) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        done = os.write(fd, view) if at is None else os.pwrite(fd, view, at)
        view = view[done:]
        if at is not None:
            at += done


def encode_chunk(pieces: list[np.ndarray], g: Geometry) -> list[np.ndarray]:
    """The buffers of one encoded chunk from consecutive row ``pieces`` (no copy of them): its rows, the padding
    up to a whole chunk (the fill value, 0), its crc32c."""
    import google_crc32c

    parts = [np.ascontiguousarray(p, dtype=g.dtype).reshape(-1).view(np.uint8) for p in pieces if len(p)]
    n_rows = sum(len(p) for p in pieces)
    if n_rows > g.chunk_rows:
        raise ValueError(f"{n_rows} rows do not fit one chunk of {g.chunk_rows}")
    if n_rows < g.chunk_rows:
        parts.append(np.zeros((g.chunk_rows - n_rows) * g.row_bytes, np.uint8))
    if g.crc:
        checksum = 0
        for part in parts:
            checksum = google_crc32c.extend(checksum, part)
        parts.append(np.frombuffer(np.uint32(checksum).astype("<u4").tobytes(), np.uint8))
    return parts


class UnitWriter:
    """Writes one array's units chunk by chunk, in row order (one thread at a time per array).

    An unsharded chunk is its own file, written under a temporary name, flushed and renamed into place. A shard
    file is opened once and each inner chunk appended to it; the index is written when the shard closes. Every
    file is flushed to the disk (and a new file's folder entry synced) before :meth:`sync` returns, so that the
    commit mark may move over what was written.

    A chunk that already holds committed rows (the last one a flush wrote partially, or the one a resume's mark
    cuts) is never overwritten in place: its shard is copied up to that chunk into a new file, the chunk written
    there whole, and the new file renamed over the old one. A crash at any moment leaves every committed row in
    one of the two files."""

    def __init__(self, arr: Any, g: Geometry):
        self.arr, self.g = arr, g
        self.unit: int | None = None  # the shard open for appending
        self.fd = -1
        self.chunks = 0  # inner chunks in the open shard
        self.replaces: Path | None = None  # the open file is a copy that replaces this one at its next chunk
        self.tmp: Path | None = None
        self.dirty = False
        self.new_folders: set[str] = set()
        self.records = ChunkRecords.of(g)  # a store with chunk records: each whole chunk's is written with it

    def start(self, row: int) -> None:
        """Continue at ``row`` (a chunk boundary). Chunks before ``row`` in its shard stay: the shard is copied up
        to ``row`` and the copy takes its place when the next chunk is written."""
        g = self.g
        if row % g.chunk_rows:
            raise ValueError(f"writing must start at a chunk boundary, not row {row}")
        unit, keep = row // g.unit_rows, (row % g.unit_rows) // g.chunk_rows
        if not g.sharded or keep == 0:
            self.close()
            return
        source = self.tmp if self.unit == unit and self.tmp is not None else g.unit_file(unit)
        if self.unit == unit and self.tmp is None:
            self._finish_open(index=False)  # the open shard itself becomes the source of the copy
        with open(source, "rb") as old:
            info = os.fstat(old.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size < keep * g.chunk_bytes:
                raise Damaged(g.unit_key(unit), f"the shard holds fewer than its {keep} committed chunks")
            path = g.unit_file(unit)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            left = keep * g.chunk_bytes
            while left:
                block = old.read(min(left, 1 << 22))
                if not block:
                    raise Damaged(g.unit_key(unit), "the shard ended while its committed chunks were copied")
                _write_all(fd, np.frombuffer(block, np.uint8))
                left -= len(block)
        if self.tmp is not None and self.tmp != tmp:  # an earlier copy that never took its place
            self._drop_copy()
        self.unit, self.fd, self.chunks, self.tmp, self.replaces = unit, fd, keep, tmp, path
        self.dirty = True

    def append(self, chunk: int, pieces: list[np.ndarray], final: bool = False) -> None:
        """Encode chunk number ``chunk`` (of the array) from consecutive row ``pieces`` (a whole chunk, or the
        array's last, or a flush's partial one, padded) and write it where it belongs. ``final``: the chunk is
        whole (or the array's last), as it will stay once committed: its chunk record is written too."""
        g = self.g
        parts = encode_chunk(pieces, g)
        if final and self.records is not None:
            self.records.put(chunk, int(parts[-1].view("<u4")[0]))
        if not g.sharded:
            path = g.unit_file(chunk)
            self._folder(path)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for part in parts:
                    _write_all(fd, part)
                sync_data(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self.new_folders.add(str(path.parent))
            return
        unit, slot = divmod(chunk, g.per_shard)
        if unit != self.unit:
            self.close()
            path = g.unit_file(unit)
            self._folder(path)
            if os.path.lexists(path):  # an earlier run's file (it may hold committed rows): replaced, not truncated
                tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
                self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.tmp, self.replaces = tmp, path
            else:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self.unit, self.chunks = unit, 0
            self.new_folders.add(str(path.parent))
        if slot != self.chunks:
            raise ValueError(f"chunk {slot} of shard {unit} comes after {self.chunks} chunks: chunks go in order")
        at = slot * g.chunk_bytes
        for part in parts:
            _write_all(self.fd, part, at)
            at += len(part)
        self.chunks += 1
        self.dirty = True
        if self.replaces is not None:  # the copy holds every committed chunk and this one: it takes the place
            sync_data(self.fd)
            os.replace(self.tmp, self.replaces)
            self.new_folders.add(str(self.replaces.parent))
            self.tmp = self.replaces = None
        if self.chunks == g.per_shard or unit * g.unit_rows + self.chunks * g.chunk_rows >= g.shape[0]:
            self.close()  # full (or the array's last): its index goes on

    def replace_unit(self, unit: int, rows: np.ndarray) -> None:
        """Write a whole unit (a shard: all its inner chunks and its index; or a chunk) from ``rows`` into a new
        file, flushed, and rename it over the old one: readers see the old unit or the new, whole."""
        g = self.g
        if not g.sharded:
            self.append(unit, [rows])
            return
        if self.unit == unit:
            self.abandon()
        path = g.unit_file(unit)
        self._folder(path)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.unit, self.fd, self.chunks = unit, fd, 0
            for c in range(-(-len(rows) // g.chunk_rows)):
                at = c * g.chunk_bytes
                for part in encode_chunk([rows[c * g.chunk_rows:(c + 1) * g.chunk_rows]], g):
                    _write_all(fd, part, at)
                    at += len(part)
                self.chunks += 1
            self._finish_open(index=True)
        except BaseException:
            if self.fd >= 0:
                os.close(self.fd)
            self.unit, self.fd, self.chunks = None, -1, 0
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        fsync_dir(str(path.parent))

    def close(self) -> None:
        """Write the open shard's index (its chunks, EMPTY for the rest), flush it and close it."""
        if self.unit is None:
            return
        if self.tmp is not None:  # a copy that never got its chunk: the original stays as it is
            self._drop_copy()
            return
        self._finish_open(index=True)

    def _finish_open(self, index: bool) -> None:
        import google_crc32c

        g = self.g
        if index:
            table = np.full((g.per_shard, 2), EMPTY, dtype="<u8")
            table[:self.chunks, 0] = np.arange(self.chunks, dtype=np.uint64) * np.uint64(g.chunk_bytes)
            table[:self.chunks, 1] = g.chunk_bytes
            raw = table.tobytes()
            _write_all(self.fd, np.frombuffer(raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes(),
                                              np.uint8), self.chunks * g.chunk_bytes)
            os.ftruncate(self.fd, self.chunks * g.chunk_bytes + g.index_bytes)
        sync_data(self.fd)
        os.close(self.fd)
        self.unit, self.fd, self.chunks, self.dirty = None, -1, 0, False
        for folder in self.new_folders:
            fsync_dir(folder)
        self.new_folders.clear()

    def _drop_copy(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)
        self.unit, self.fd, self.chunks, self.tmp, self.replaces, self.dirty = None, -1, 0, None, None, False

    def sync(self) -> None:
        """Flush what was written since the last call (file data, and new files' folder entries) to the disk."""
        if self.dirty and self.fd >= 0:
            sync_data(self.fd)
        if self.records is not None:
            self.records.sync()
        for folder in self.new_folders:
            fsync_dir(folder)
        self.dirty = False
        self.new_folders.clear()

    def abandon(self) -> None:
        """Close the open shard without an index (a failure: a resume rebuilds it from its committed chunks)."""
        if self.tmp is not None:
            self._drop_copy()
        elif self.fd >= 0:
            os.close(self.fd)
        self.unit, self.fd, self.chunks, self.dirty = None, -1, 0, False

    def _folder(self, path: Path) -> None:
        """Make the chunk-key folders between the array's folder and ``path``, never the array's folder or a folder
        above it: a store deleted or moved while its job writes is not made again at its old path (the write fails
        with FileNotFoundError instead)."""
        if path.parent.is_dir():
            return
        folder = self.g.root
        for part in path.parent.relative_to(folder).parts:
            folder = folder / part
            try:
                folder.mkdir()  # not parents=True: a vanished parent is FileNotFoundError
            except FileExistsError:
                continue
            fsync_dir(str(folder.parent))


# -- decoding ----------------------------------------------------------------------------------------------------
class Fallback(Exception):
    """Read this selection through Zarr."""


class Damaged(Exception):
    """A storage unit below the commit mark is missing or cannot be decoded."""

    def __init__(self, unit: tuple[int, ...], what: str, missing: bool = False):
        super().__init__(what)
        self.unit, self.what, self.missing = unit, what, missing


def _without_ellipsis(cols: tuple, ndim: int) -> tuple:
    """The column part of a selection without its Ellipsis, when that stands for no axis or the remaining ones (a
    2-D array's ``a[rows, ...]``, ``a[rows, ..., 3]``); as given otherwise."""
    plain = tuple(c for c in cols if c is not Ellipsis)
    return plain if len(cols) - len(plain) <= 1 and len(plain) <= ndim - 1 else cols


def check_index(raw: bytes, size: int, g: Geometry) -> list[int | None]:
    """The chunk offsets of a shard from its index (``raw``: the index bytes with their crc32c), every entry
    checked: each chunk whole (``chunk bytes`` long), in chunk order, back to back from byte 0, the index right
    after the last one (``size``: the file's length). ``None`` for a chunk not written. ValueError says what is
    wrong (the caller names the place)."""
    if len(raw) != g.index_bytes or _crc32c(raw[:-CHECKSUM_BYTES]) != int.from_bytes(raw[-CHECKSUM_BYTES:], "little"):
        raise ValueError("its index fails its crc32c checksum")
    table = np.frombuffer(raw[:-CHECKSUM_BYTES], "<u8").reshape(-1, 2)
    offsets: list[int | None] = []
    end = 0
    for i, (offset, length) in enumerate(table.tolist()):
        if offset == EMPTY and length == EMPTY:
            offsets.append(None)
            continue
        if length != g.chunk_bytes:
            raise ValueError(f"its index gives inner chunk {i} {length} bytes, not the {g.chunk_bytes} of a chunk")
        if offset != end:
            raise ValueError(f"its index puts inner chunk {i} at byte {offset}, not at {end} (chunks are stored in "
                             "order, back to back)")
        offsets.append(offset)
        end += length
    if end + g.index_bytes != size:
        raise ValueError(f"the file is {size} bytes but its index accounts for {end + g.index_bytes}")
    return offsets


class FastReader:
    """Reads rows of one local array in a fast layout (see the module's docstring), below a commit mark."""

    def __init__(self, g: Geometry, mark: int):
        self.g, self.mark = g, int(mark)
        self.shape, self.dtype = g.shape, g.dtype
        self.records = ChunkRecords.of(g)  # a store with chunk records: each chunk's place is checked too
        self.final_chunks = self.records.final(self.mark) if self.records is not None else 0
        self._local = threading.local()

    @classmethod
    def open(cls, arr: Any, mark: int) -> FastReader | None:
        g = Geometry.of(arr)
        return None if g is None else cls(g, mark)

    # -- selection -----------------------------------------------------------------------------------
    def selection(self, key: Any) -> tuple[int, int, Any]:
        """(first row, stop row, column index or None) of a row-slice selection; Fallback for anything else."""
        rows, cols = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        cols = _without_ellipsis(cols, len(self.shape))
        if rows is Ellipsis and len(cols) <= len(self.shape) - 1:  # a[..., c] is a[:, c]; a[...] is a[:]
            rows = slice(None)
        if not isinstance(rows, slice) or rows.step not in (None, 1) or len(cols) > len(self.shape) - 1:
            raise Fallback
        first, stop, _ = rows.indices(self.shape[0])
        if stop <= first:
            raise Fallback
        if not cols or (isinstance(cols[0], slice) and cols[0] == slice(None)):
            return first, stop, None
        col = cols[0]
        if not isinstance(col, (slice, int, np.integer)):
            col = np.asarray(col)
            if col.ndim != 1 or col.dtype.kind not in "iub":
                raise Fallback
        try:
            np.empty((0, self.shape[1]), self.dtype)[:, col]  # out of range: let Zarr raise its own error
        except (IndexError, ValueError, TypeError):
            raise Fallback from None
        return first, stop, col

    # -- reading -------------------------------------------------------------------------------------
    def read(self, key: Any, out: np.ndarray | None = None) -> np.ndarray:
        """The rows of a selection, into ``out`` when given (C-contiguous, of the right shape and dtype: whole
        chunks are read straight into it). Rows may be a slice, an int, a list or array of ints, or a mask;
        columns a slice, an int or a list of ints."""
        rows = key[0] if isinstance(key, tuple) else key
        if isinstance(rows, slice) and rows.step not in (None, 1):  # every k-th row: gathered chunk by chunk
            rows = np.arange(*rows.indices(self.shape[0]))
            key = (rows, *key[1:]) if isinstance(key, tuple) else rows
            if out is not None:
                out[...] = self._gather(key, grid=True)
                return out
            return self._gather(key, grid=True)
        if isinstance(rows, (int, np.integer)) or (not isinstance(rows, slice) and rows is not Ellipsis):
            if out is not None:
                raise Fallback
            return self._gather(key)
        first, stop, col = self.selection(key)
        width = self.shape[1:] if col is None else np.empty((0, self.shape[1]), self.dtype)[:, col].shape[1:]
        if out is None:
            out = np.empty((stop - first, *width), self.dtype)
        elif out.shape != (stop - first, *width) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise Fallback
        g = self.g
        for unit in range(first // g.unit_rows, -(-stop // g.unit_rows)):
            self.read_unit(unit, first, stop, col, out)
        return out

    def check_unit(self, unit: int, decode: bool) -> int:
        """Check one storage unit below the mark as a read would (a regular file; a shard's index; with
        ``decode`` every chunk below the mark read and its crc32c checked), reading into a scratch buffer only;
        returns the file's size. Damage raises :class:`Damaged`."""
        g = self.g
        first, stop = unit * g.unit_rows, min((unit + 1) * g.unit_rows, self.mark, g.shape[0])
        key, path = g.unit_key(unit), g.unit_file(unit)
        try:
            info = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise Damaged(key, "missing", missing=True) from None
        if not stat.S_ISREG(info.st_mode):
            raise Damaged(key, f"the {'shard' if g.sharded else 'chunk'} is not a regular file")
        if info.st_size < g.chunk_bytes:  # before a scratch chunk is allocated: a crafted shape claims terabytes
            raise Damaged(key, f"the {'shard' if g.sharded else 'chunk'} cannot be decoded: the file is "
                               f"{info.st_size:,} bytes, less than the {g.chunk_bytes:,} of one chunk of its "
                               "zarr.json's shape")
        if decode:
            sink = np.empty((min(stop - first, g.chunk_rows), *self.shape[1:]), self.dtype)
            for a in range(first, stop, g.chunk_rows):
                b = min(a + g.chunk_rows, stop)
                self.read_unit(unit, a, b, None, sink[:b - a])
        else:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if g.sharded:
                    offsets = self.chunk_offsets(fd, unit, info.st_size)
                    needed = -(-(stop - first) // g.chunk_rows)
                    if any(o is None for o in offsets[:needed]):
                        raise self.chunk_error(unit, offsets[:needed].index(None), "its index marks it empty "
                                               f"although rows below the commit mark {self.mark} are in it")
                    if max(o for o in offsets[:needed]) + g.chunk_bytes > info.st_size:
                        raise Damaged(key, f"the shard cannot be decoded: the file is {info.st_size} bytes, too "
                                           f"short for its {needed} committed chunks")
                elif info.st_size != g.chunk_bytes:
                    raise Damaged(key, f"the chunk cannot be decoded (file is {info.st_size} bytes, not "
                                       f"{g.chunk_bytes})")
            finally:
                os.close(fd)
        return info.st_size

    def _gather(self, key: Any, grid: bool = False) -> np.ndarray:
        """Rows chosen by index (an int, ints, a mask): each chunk holding some is read once, checked. ``grid``:
        the rows came from a slice, so a list of columns makes a grid with them (numpy's rule for a slice and an
        index), read a chunk at a time like the rest."""
        rows, cols = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        cols = _without_ellipsis(cols, len(self.shape))
        if not grid and any(not isinstance(c, (slice, int, np.integer)) for c in cols):
            raise Fallback  # an index on both axes picks points (numpy's rule): the caller selects whole rows
        scalar = isinstance(rows, (int, np.integer))
        idx = np.asarray([rows] if scalar else rows)
        if idx.dtype == bool:
            if idx.shape != (self.shape[0],):
                raise Fallback
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise Fallback
        n = self.shape[0]
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise Fallback  # out of range: Zarr raises its own IndexError
        step = self.g.chunk_rows
        if idx.size == 0:
            return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *cols)]
        chunk_of = idx // step
        order = np.argsort(chunk_of, kind="stable")  # the rows grouped by chunk: one chunk in memory at a time
        starts = np.flatnonzero(np.diff(chunk_of[order], prepend=-1))
        out = None
        for begin, end in zip(starts.tolist(), [*starts[1:].tolist(), len(idx)]):
            lo = int(chunk_of[order[begin]]) * step
            block = self.read((slice(lo, min(lo + step, n)), *cols))
            if out is None:
                out = np.empty((len(idx), *block.shape[1:]), block.dtype)
            where = order[begin:end]
            out[where] = block[idx[where] - lo]
        return out[0] if scalar else out

    def read_unit(self, unit: int, first: int, stop: int, col: Any, out: np.ndarray) -> None:
        """Copy rows ``[first, stop)`` that lie in storage unit ``unit`` into ``out`` (row ``first`` at 0)."""
        g = self.g
        key = g.unit_key(unit)
        path = g.unit_file(unit)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in opens at once, then is refused
        except FileNotFoundError:
            raise Damaged(key, "missing", missing=True) from None
        except IsADirectoryError:
            raise Damaged(key, f"the {'shard' if g.sharded else 'chunk'} is a folder, not a file") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Damaged(key, f"the {'shard' if g.sharded else 'chunk'} is not a regular file")
            size = info.st_size
            base = unit * g.unit_rows
            chunks = range((max(first, base) - base) // g.chunk_rows,
                           -(-(min(stop, base + g.unit_rows) - base) // g.chunk_rows))
            offsets = self.chunk_offsets(fd, unit, size) if g.sharded else None
            if not g.sharded and size != g.chunk_bytes:
                raise Damaged(key, f"the chunk cannot be decoded (file is {size} bytes, not {g.chunk_bytes})")
            for c in chunks:
                start = base + c * g.chunk_rows  # first row of this encoded chunk
                at = 0 if offsets is None else offsets[c]
                if at is None:
                    raise self.chunk_error(unit, c, "its index marks it empty although rows below the commit mark "
                                                    f"{self.mark} are in it")
                lo, hi = max(first, start), min(stop, start + g.chunk_rows)
                whole = col is None and lo == start and hi - lo == g.chunk_rows
                target = out[lo - first:hi - first].reshape(-1).view(np.uint8) if whole else self.scratch()
                trailer = np.empty(4, np.uint8)
                buffers = [target, trailer] if g.crc else [target]
                got = os.preadv(fd, buffers, at)
                if got != g.chunk_bytes:
                    raise self.chunk_error(unit, c, f"the file ends {g.chunk_bytes - got} bytes early")
                if g.crc and _crc32c(target) != int(trailer.view("<u4")[0]):
                    raise self.chunk_error(unit, c, "crc32c checksum mismatch")
                if unit * g.per_shard + c < self.final_chunks:
                    wrong = self.records.misplaced(unit * g.per_shard + c, int(trailer.view("<u4")[0]))
                    if wrong is not None:
                        raise self.chunk_error(unit, c, wrong, decoded=True)
                if not whole:
                    rows = target.view(self.dtype).reshape(g.chunk_rows, *self.shape[1:])[lo - start:hi - start]
                    out[lo - first:hi - first] = rows if col is None else rows[:, col]
        finally:
            os.close(fd)

    def chunk_offsets(self, fd: int, unit: int, size: int) -> list[int | None]:
        """Where each inner chunk of a shard is: from its checked index, or, for the shard the commit mark is in
        while it is still being filled (no index yet), at its place (chunk ``i`` at ``i × chunk bytes``)."""
        g = self.g
        key = g.unit_key(unit)
        open_shard = unit * g.unit_rows < self.mark < min((unit + 1) * g.unit_rows, g.shape[0])
        if size >= g.index_bytes:
            raw = os.pread(fd, g.index_bytes, size - g.index_bytes)
            try:
                return check_index(raw, size, g)
            except ValueError as exc:
                if not open_shard:
                    raise Damaged(key, f"the shard cannot be decoded: {exc}") from None
        elif not open_shard:
            raise Damaged(key, f"the shard cannot be decoded: the file is {size} bytes, too short for its index "
                               f"({g.index_bytes} bytes)")
        return [c * g.chunk_bytes for c in range(g.per_shard)]  # being filled: chunks at their places

    def chunk_error(self, unit: int, chunk: int, why: str, decoded: bool = False) -> Damaged:
        """Damage of one chunk; ``decoded``: it decodes, and ``why`` says what else is wrong with it."""
        g = self.g
        if not g.sharded:
            return Damaged(g.unit_key(unit), f"the chunk {why}" if decoded else f"the chunk cannot be decoded ({why})")
        row = unit * g.unit_rows + chunk * g.chunk_rows
        inner = unit * g.per_shard + chunk
        where = f"({inner}, 0) of the shard (rows {row}-{row + g.chunk_rows})"
        return Damaged(g.unit_key(unit), f"inner chunk {where} {why}" if decoded
                       else f"inner chunk(s) {where} cannot be decoded ({why})")

    def scratch(self) -> np.ndarray:
        """A per-thread buffer of one chunk's data bytes (reused: no page faults per read)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty(self.g.data_bytes, np.uint8)
        return buf


def record_chunks(records: ChunkRecords, first: int, stop: int, mark: int) -> None:
    """Write the chunk records of chunks ``[first, stop)`` of an array (wholly below ``mark``) from the crc32c in
    their files (rows Zarr wrote), flushed to the disk."""
    crcs = stored_crcs(records, first, stop, mark)
    if crcs:
        records.put_many(first, crcs)


def _trailers(g: Geometry, reader: "FastReader", first: int, stop: int) -> Iterator[tuple[int, int, bytes]]:
    """(unit, chunk number, the crc32c bytes its file holds: fewer when the file ends early) of chunks
    ``[first, stop)``; a unit file that is not there raises :class:`Damaged` (missing)."""
    for unit in range(first // g.per_shard, -(-stop // g.per_shard)):
        try:
            fd = os.open(g.unit_file(unit), os.O_RDONLY)
        except FileNotFoundError:
            raise Damaged(g.unit_key(unit), "missing", missing=True) from None
        try:
            offsets = reader.chunk_offsets(fd, unit, os.fstat(fd).st_size) if g.sharded else [0]
            for chunk in range(max(first, unit * g.per_shard), min(stop, (unit + 1) * g.per_shard)):
                at = offsets[chunk - unit * g.per_shard]
                yield unit, chunk, os.pread(fd, CHECKSUM_BYTES, at + g.data_bytes) if at is not None else b""
        finally:
            os.close(fd)


def stored_crcs(records: ChunkRecords, first: int, stop: int, mark: int) -> list[int]:
    """The crc32c each of chunks ``[first, stop)`` of an array (wholly below ``mark``) holds in its file (OSError
    when a chunk is not on the disk)."""
    g, crcs = records.g, []
    try:
        for _, chunk, trailer in _trailers(g, FastReader(g, mark), first, stop):
            if len(trailer) != CHECKSUM_BYTES:
                raise OSError(f"chunk {chunk} of {g.arr.path} is not on the disk: it cannot be recorded")
            crcs.append(int.from_bytes(trailer, "little"))
    except Damaged as exc:  # a unit file not there (a damaged shard index stays Damaged)
        if not exc.missing:
            raise
        raise OSError(f"a file of {g.arr.path} is not on the disk ({exc.what}): its chunks cannot be "
                      "recorded") from None
    return crcs


def check_recorded(records: ChunkRecords, mark: int, first: int = 0) -> None:
    """Raise :class:`Damaged` for the first chunk from number ``first`` on, wholly below ``mark``, that its file
    does not hold, or whose crc32c, as its file holds it, is not the one recorded for its place: what a resume
    checks before it writes over a store (4 bytes read a chunk, not the chunk: a chunk's own bytes are checked when
    it is read)."""
    g, reader = records.g, FastReader(records.g, mark)
    for unit, chunk, trailer in _trailers(g, reader, first, records.final(mark)):
        if len(trailer) != CHECKSUM_BYTES:
            raise reader.chunk_error(unit, chunk - unit * g.per_shard, "the file ends early")
        wrong = records.misplaced(chunk, int.from_bytes(trailer, "little"))
        if wrong is not None:
            raise reader.chunk_error(unit, chunk - unit * g.per_shard, wrong, decoded=True)


def record_committed(arrays: Any, old_mark: int, new_mark: int) -> None:
    """Record the chunks of ``arrays`` (Zarr arrays) that the commit mark's move from ``old_mark`` to ``new_mark``
    puts wholly below it (nothing for arrays without records)."""
    for arr in arrays:
        records = ChunkRecords.of(Geometry.of(arr))
        if records is not None:
            record_chunks(records, records.final(old_mark), records.final(new_mark), new_mark)


def _crc32c(data: Any) -> int:
    import google_crc32c

    return google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)
