"""The byte format of one storage unit, both ways: :func:`write_unit` encodes a unit's file, :class:`FastReader`
decodes rows out of unit files. Nothing else knows a byte offset.

The format is Zarr v3's, for the layouts the writer produces itself (:func:`fast_layout`: a local store,
little-endian bytes, optional crc32c per chunk, full-width chunks; sharded arrays with the shard index at the end,
crc32c'd). An unsharded chunk's file is its rows (the last chunk padded with the fill value, 0) then its crc32c.
A shard's file is its inner chunks, each encoded so, then an index of ``(offset, length)`` uint64 pairs per inner
chunk (``EMPTY`` for one never written) and the index's crc32c. Any Zarr v3 reader reads these files.

Reading: the rows of ``a[i:j]`` / ``a[i:j, cols]`` are read from the unit files with ``os.preadv``: a chunk that
the slice covers whole straight into the output array, any other into a scratch buffer and copied from there;
its crc32c is checked first. Damage raises :class:`Damaged` (the caller turns it into ``StoreCorrupted``);
anything else unusual (an empty chunk in a shard index, a selection this module does not handle) raises
:class:`Fallback`, and the caller reads through Zarr instead.
"""
from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import numpy as np

from .layout import EMPTY, storage_unit


# -- encoding ---------------------------------------------------------------------------------------
def fast_layout(arr: Any) -> tuple[int, bool] | None:
    """(rows per inner chunk, crc32c per chunk) when this module may encode and decode ``arr``'s files itself:
    a local store, little-endian bytes, optional crc32c, full-width chunks, shard index at the end with
    crc32c. None: let Zarr write."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.storage import LocalStore

    def plain(codecs) -> bool | None:  # crc32c or not; None when anything else is there
        first = codecs[0] if codecs else None
        if not isinstance(first, BytesCodec) or getattr(first.endian, "value", "little") != "little":
            return None
        rest = list(codecs[1:])
        return None if rest not in ([], [Crc32cCodec()]) else bool(rest)

    if (not isinstance(arr.store_path.store, LocalStore) or np.dtype(arr.dtype).byteorder == ">"
            or arr.fill_value != 0):
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


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def write_unit(arr: Any, start: int, stop: int, blocks: list[np.ndarray]) -> None:
    """Write rows ``[start, stop)`` of ``arr``, given as consecutive row ``blocks``, as one storage unit: ``start``
    is where a unit (a shard, or a chunk of an unsharded array) begins, and ``stop`` at most where it ends.

    On a local store the unit's file is encoded here exactly as Zarr's codecs encode it (inner chunks with
    their crc32c, the last one padded with the fill value, then the shard index with its crc32c, absent
    chunks marked empty) and streamed from the blocks without copying them into a temporary file renamed
    into place: it replaces the unit, rows after ``stop`` included. Elsewhere (a remote store, other codecs)
    Zarr writes it, reading and merging what the unit holds. Never two writes of one unit at once."""
    import google_crc32c

    unit = storage_unit(arr)[0]
    layout = fast_layout(arr)
    if layout is None or start % unit or not 0 < stop - start <= unit:
        arr[start:stop] = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return
    inner_rows, crc = layout
    row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    rows = inner_rows if arr.shards is not None else unit  # rows per encoded chunk
    key = arr.metadata.encode_chunk_key((start // unit,) + (0,) * (arr.ndim - 1))
    path = arr.store_path.store.root / arr.path / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    index, offset = [], 0
    pieces = iter(np.ascontiguousarray(b) for b in blocks)
    current = next(pieces)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for first in range(0, unit, rows):
            if first >= stop - start:  # a chunk not written: empty in the index
                index.append((2**64 - 1, 2**64 - 1))
                continue
            need, checksum = min(rows, stop - start - first), 0
            pad = np.zeros((rows - need, *arr.shape[1:]), dtype=arr.dtype)  # the fill value, 0
            while need:
                if not len(current):
                    current = next(pieces)
                take, current = current[:need], current[need:]
                _write_all(fd, take)
                checksum = google_crc32c.extend(checksum, take.reshape(-1)) if crc else 0
                need -= len(take)
            if len(pad):
                _write_all(fd, pad)
                checksum = google_crc32c.extend(checksum, pad.reshape(-1)) if crc else 0
            if crc:
                _write_all(fd, np.uint32(checksum).astype("<u4").tobytes())
            index.append((offset, rows * row_bytes + 4 * crc))
            offset += index[-1][1]
        if arr.shards is not None:
            table = np.asarray(index, dtype="<u8").tobytes()
            _write_all(fd, table + np.uint32(google_crc32c.value(table)).astype("<u4").tobytes())
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


# -- decoding ---------------------------------------------------------------------------------------
class Fallback(Exception):
    """Read this selection through Zarr."""


class Damaged(Exception):
    """A storage unit below the commit mark is missing or cannot be decoded."""

    def __init__(self, unit: tuple[int, ...], what: str, missing: bool = False):
        super().__init__(what)
        self.unit, self.what, self.missing = unit, what, missing


class FastReader:
    """Reads rows of one local array whose files :func:`write_unit` could have written."""

    def __init__(self, arr: Any, inner_rows: int, crc: bool):
        self.arr, self.crc = arr, crc
        self.root = arr.store_path.store.root / arr.path
        self.dtype = np.dtype(arr.dtype)
        self.shape = tuple(arr.shape)
        self.sharded = arr.shards is not None
        self.unit_rows = (arr.shards or arr.chunks)[0]
        self.chunk_rows = inner_rows if self.sharded else self.unit_rows  # rows per encoded chunk
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.data_bytes = self.chunk_rows * self.row_bytes
        self.chunk_bytes = self.data_bytes + 4 * crc
        self.per_shard = self.unit_rows // self.chunk_rows
        self.index_bytes = 16 * self.per_shard + 4
        self._local = threading.local()

    @classmethod
    def open(cls, arr: Any) -> FastReader | None:
        layout = fast_layout(arr)
        return None if layout is None or arr.ndim not in (1, 2) else cls(arr, *layout)

    def unit_key(self, unit: int) -> tuple[int, ...]:
        return (unit,) + (0,) * (len(self.shape) - 1)

    def unit_file(self, unit: int):
        return self.root / self.arr.metadata.encode_chunk_key(self.unit_key(unit))

    # -- selection -----------------------------------------------------------------------------------
    def selection(self, key: Any) -> tuple[int, int, Any]:
        """(first row, stop row, column index or None) of a row-slice selection; Fallback for anything else."""
        rows, cols = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if rows is Ellipsis and not cols:
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
        """The rows of a row-slice selection, into ``out`` when given (C-contiguous, of the right shape and
        dtype: whole chunks are read straight into it)."""
        first, stop, col = self.selection(key)
        width = self.shape[1:] if col is None else np.empty((0, self.shape[1]), self.dtype)[:, col].shape[1:]
        if out is None:
            out = np.empty((stop - first, *width), self.dtype)
        elif out.shape != (stop - first, *width) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise Fallback
        for unit in range(first // self.unit_rows, -(-stop // self.unit_rows)):
            self.read_unit(unit, first, stop, col, out)
        return out

    def read_unit(self, unit: int, first: int, stop: int, col: Any, out: np.ndarray) -> None:
        """Copy rows ``[first, stop)`` that lie in storage unit ``unit`` into ``out`` (row ``first`` at 0)."""
        path = self.unit_file(unit)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise Damaged(self.unit_key(unit), "missing", missing=True) from None
        try:
            size = os.fstat(fd).st_size
            base = unit * self.unit_rows
            chunks = range((max(first, base) - base) // self.chunk_rows,
                           -(-(min(stop, base + self.unit_rows) - base) // self.chunk_rows))
            offsets = self.shard_index(fd, unit, size, chunks) if self.sharded else None
            if not self.sharded and size != self.chunk_bytes:
                raise Damaged(self.unit_key(unit),
                              f"the chunk cannot be decoded (file is {size} bytes, not {self.chunk_bytes})")
            for c in chunks:
                start = base + c * self.chunk_rows  # first row of this encoded chunk
                lo, hi = max(first, start), min(stop, start + self.chunk_rows)
                whole = col is None and lo == start and hi - lo == self.chunk_rows
                target = out[lo - first:hi - first].reshape(-1).view(np.uint8) if whole else self.scratch()
                trailer = np.empty(4, np.uint8)
                buffers = [target, trailer] if self.crc else [target]
                got = os.preadv(fd, buffers, 0 if offsets is None else offsets[c])
                if got != self.chunk_bytes:
                    raise self.chunk_error(unit, c, f"the file ends {self.chunk_bytes - got} bytes early")
                if self.crc and _crc32c(target) != int(trailer.view("<u4")[0]):
                    raise self.chunk_error(unit, c, "crc32c checksum mismatch")
                if not whole:
                    rows = target.view(self.dtype).reshape(self.chunk_rows, *self.shape[1:])[lo - start:hi - start]
                    out[lo - first:hi - first] = rows if col is None else rows[:, col]
        finally:
            os.close(fd)

    def shard_index(self, fd: int, unit: int, size: int, chunks: range) -> dict[int, int]:
        """Offsets of the shard's inner chunks, from its index (checked: crc32c; sizes and bounds of ``chunks``)."""
        key = self.unit_key(unit)
        if size < self.index_bytes:
            raise Damaged(key, f"the shard (its index) cannot be decoded (file is {size} bytes)")
        raw = os.pread(fd, self.index_bytes, size - self.index_bytes)
        table = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
        if _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise Damaged(key, "the shard (its index) cannot be decoded (index crc32c checksum mismatch)")
        table = table[chunks.start:chunks.stop]
        if np.any(table == EMPTY):
            raise Fallback  # an inner chunk that was never written: Zarr reads it as the fill value
        if np.any(table[:, 1] != self.chunk_bytes) or np.any(table[:, 0] + table[:, 1] > size - self.index_bytes):
            raise Damaged(key, "the shard (its index) cannot be decoded (entries out of the file's bounds)")
        return {c: int(o) for c, o in zip(chunks, table[:, 0])}

    def chunk_error(self, unit: int, chunk: int, why: str) -> Damaged:
        if not self.sharded:
            return Damaged(self.unit_key(unit), f"the chunk cannot be decoded ({why})")
        row = unit * self.unit_rows + chunk * self.chunk_rows
        inner = unit * self.per_shard + chunk
        return Damaged(self.unit_key(unit), f"inner chunk(s) ({inner}, 0) of the shard "
                                            f"(rows {row}-{row + self.chunk_rows}) cannot be decoded ({why})")

    def scratch(self) -> np.ndarray:
        """A per-thread buffer of one chunk's data bytes (reused: no page faults per read)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty(self.data_bytes, np.uint8)
        return buf


def _crc32c(data: Any) -> int:
    import google_crc32c

    return google_crc32c.value(data)  # bytes or a contiguous uint8 array (it refuses memoryviews)
