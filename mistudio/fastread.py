"""Fast local reads of committed row slices, for :class:`~mistudio.integrity.CheckedArray`.

On a local store in a layout the writer encodes itself (``store._fast_layout``: little-endian bytes,
optional crc32c per chunk, full-width chunks, shard index at the end with its crc32c), the rows of
``a[i:j]`` / ``a[i:j, cols]`` are read here from the unit files with ``os.preadv``: a chunk that the slice
covers whole is read straight into the output array, any other into a scratch buffer and copied from there;
its crc32c is checked first. Damage raises :class:`Damaged` (the caller turns it into ``StoreCorrupted``);
anything else unusual (an empty chunk in a shard index, a selection this module does not handle) raises
:class:`Fallback`, and the caller reads through Zarr instead.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

EMPTY = 2**64 - 1  # an absent chunk in a shard index


class Fallback(Exception):
    """Read this selection through Zarr."""


class Damaged(Exception):
    """A storage unit below the commit mark is missing or cannot be decoded."""

    def __init__(self, unit: tuple[int, ...], what: str, missing: bool = False):
        super().__init__(what)
        self.unit, self.what, self.missing = unit, what, missing


class FastReader:
    """Reads rows of one local array whose files :func:`mistudio.store.write_unit` could have written."""

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
        from .store import _fast_layout  # store imports integrity, which imports this module

        layout = _fast_layout(arr)
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
    def read(self, key: Any) -> np.ndarray:
        first, stop, col = self.selection(key)
        width = self.shape[1:] if col is None else np.empty((0, self.shape[1]), self.dtype)[:, col].shape[1:]
        out = np.empty((stop - first, *width), self.dtype)
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
