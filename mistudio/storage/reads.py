"""Checked reads: a view of a stored array that never reads a missing or damaged storage unit as data.

Zarr reads a missing chunk as the fill value, silently. Below a store's commit mark every storage unit must
exist, so a checked read refuses to fill there, and every decode error (checksum, truncation, bad JSON) becomes a
:class:`~mistudio.errors.StoreCorrupted` that names the store, the array, the chunk and the file. Row slices of a
local store in the writer's own layout are decoded by :mod:`.codec` directly (one copy, crc32c checked).
"""
from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

import numpy as np
from zarr.abc.store import SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..errors import InputError, StoreCorrupted
from .codec import Damaged, Fallback, FastReader, Geometry, check_index
from .layout import numpy_dtype, unit_key, unit_name, unit_rows, units

# errors a damaged chunk or metadata file raises while decoding (codecs, numpy, JSON); not IndexError
DECODE_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError, EOFError)


def damage(arr: Any, unit: tuple[int, ...], exc: BaseException) -> str:
    """Why a unit cannot be decoded; in a shard, which inner chunks fail (each read alone), else its index."""
    if arr.shards is None:
        return f"the chunk cannot be decoded ({exc})"
    rows, inner = unit_rows(arr, unit), arr.chunks[0]
    bad = []
    for start in range(rows.start, rows.stop, inner):
        try:
            arr[start:min(start + inner, rows.stop)]
        except DECODE_ERRORS:
            bad.append(start // inner)
    if not bad or len(bad) == -(-(rows.stop - rows.start) // inner):
        return f"the shard (its index, or every chunk in it) cannot be decoded ({exc})"
    names = ", ".join(f"({i}, 0)" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    first = bad[0] * inner
    return f"inner chunk(s) {names} of the shard (rows {first}-{first + inner}) cannot be decoded ({exc})"


def missing_units(arr: Any, candidates: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The units among ``candidates`` whose object is absent (one concurrent existence query each)."""
    store = arr.store_path.store

    async def exists() -> list[bool]:
        return await asyncio.gather(*(store.exists(unit_key(arr, u)) for u in candidates))

    return [u for u, present in zip(candidates, sync(exists()) if candidates else []) if not present]


def irregular_unit(arr: Any, candidates: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The first unit among ``candidates`` of a local store whose file is there but is not a regular file (a FIFO
    or a device would block or never end a read; a folder cannot be one): Zarr is never handed it."""
    root = getattr(arr.store_path.store, "root", None)
    if root is None:
        return None
    for unit in candidates:
        try:
            mode = os.stat(os.path.join(str(root), unit_key(arr, unit).lstrip("/")), follow_symlinks=False).st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            return unit
    return None


class CheckedArray:
    """A read-only view of one stored array that never reads a missing or damaged chunk as data.

    Slicing (``a[i:j]``, ``a[i:j, f]``, ``a[:, f]``, ``a[rows]``) returns numpy arrays like Zarr does;
    storage units below ``mark`` must exist, and decode errors become :class:`StoreCorrupted`.
    Rows at or above ``mark`` (not yet committed) read as Zarr gives them. ``.zarr`` is the raw array.
    Rows below ``mark`` of a local store in the writer's own layout are read from the files directly
    (:mod:`.codec`: one copy, every index entry and crc32c checked, the shard still being filled read at its
    places); everything else (a remote store) through Zarr, with missing units refused and decode errors named.
    """

    def __init__(self, arr: Any, location: str, mark: int):
        self.zarr = arr
        self.location = location
        self.mark = int(mark)
        self._fast = FastReader.open(arr, self.mark)
        remote = Geometry.of(arr, local=False) if self._fast is None and arr.shards is not None else None
        self._remote = remote if remote is not None and remote.root is None else None  # its shard indexes checked
        self._indexes_checked: set[int] = set()
        stored_as = arr.attrs.get("mistudio_dtype") if hasattr(arr, "attrs") else None
        self._view = numpy_dtype(stored_as) if stored_as == "bfloat16" else None  # bfloat16 stored as uint16

    def __repr__(self) -> str:
        return f"<CheckedArray {self.zarr.path} shape={self.shape} dtype={self.dtype} chunks={self.chunks}>"

    shape = property(lambda self: self.zarr.shape)
    dtype = property(lambda self: self._view if self._view is not None else self.zarr.dtype)
    chunks = property(lambda self: self.zarr.chunks)
    shards = property(lambda self: self.zarr.shards)
    ndim = property(lambda self: self.zarr.ndim)
    size = property(lambda self: self.zarr.size)
    nbytes = property(lambda self: self.zarr.nbytes)
    metadata = property(lambda self: self.zarr.metadata)
    attrs = property(lambda self: self.zarr.attrs)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self[...]
        return values if dtype is None else values.astype(dtype, copy=False)

    def _row_span(self, key: Any) -> tuple[int, int]:
        """Smallest ``[first, stop)`` row range a selection touches (over-covering is harmless)."""
        first = key[0] if isinstance(key, tuple) and key else key
        n = self.shape[0]
        if first is Ellipsis or (isinstance(key, tuple) and not key):
            return 0, n
        if isinstance(first, slice):
            rows = range(*first.indices(n))
            return (min(rows[0], rows[-1]), max(rows[0], rows[-1]) + 1) if len(rows) else (0, 0)
        if isinstance(first, (int, np.integer)):
            row = int(first) + n if first < 0 else int(first)
            return row, row + 1
        idx = np.asarray(first)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if not idx.size:
            return 0, 0
        idx = np.where(idx < 0, idx + n, idx)
        return int(idx.min()), int(idx.max()) + 1

    def _fail(self, unit: tuple[int, ...], what: str) -> StoreCorrupted:
        return StoreCorrupted(self.location, what, self.zarr.path, unit, f"{self.location}/{unit_key(self.zarr, unit)}")

    def read_into(self, out: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` into ``out`` (checked like a slice); on a local store in the writer's layout,
        whole chunks are read straight into ``out`` (no intermediate copy). Returns ``out``."""
        return self._read(slice(start, stop), out)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._read(key, None)

    def _read(self, key: Any, out: np.ndarray | None) -> np.ndarray:
        if self._view is None:
            if out is not None and out.dtype != self.zarr.dtype:  # a float32 buffer shared with a float16 store
                out[...] = self._read_stored(key, None)  # read checked, then widened
                return out
            return self._read_stored(key, out)
        if out is not None and out.dtype != self._view:  # e.g. a float32 buffer shared with a float16 store
            out[...] = self._read_stored(key, None).view(self._view)  # widened exactly, value by value
            return out
        stored = self._read_stored(key, None if out is None else out.view(self.zarr.dtype))
        return stored.view(self._view) if out is None else out

    def _check_indexes(self, first: int, stop: int) -> None:
        """The shards of a remote store holding rows ``[first, stop)`` below the mark: their indexes as the writer
        writes them (each entry whole, in order, back to back; no empty entry below the mark). Zarr would read an
        empty entry as zeros and a swapped one as other rows."""
        g, store = self._remote, self.zarr.store_path.store
        for unit in range(first // g.unit_rows, -(-stop // g.unit_rows)):
            if unit in self._indexes_checked:
                continue
            key = unit_key(self.zarr, g.unit_key(unit))
            size = int(sync(store.getsize(key)))
            raw = sync(store.get(key, default_buffer_prototype(), SuffixByteRequest(g.index_bytes)))
            try:
                offsets = check_index(raw.to_bytes() if raw is not None else b"", size, g)
            except ValueError as exc:
                raise self._fail(g.unit_key(unit), f"the shard cannot be decoded: {exc}") from None
            committed = -(-(min(self.mark, (unit + 1) * g.unit_rows) - unit * g.unit_rows) // g.chunk_rows)
            empty = [i for i in range(committed) if offsets[i] is None]
            if empty:
                raise self._fail(g.unit_key(unit), f"its index says inner chunk {empty[0]} was never written, "
                                                   f"although rows below {self.mark} are committed")
            if unit * g.unit_rows + g.unit_rows <= self.mark:
                self._indexes_checked.add(unit)

    def _read_stored(self, key: Any, out: np.ndarray | None) -> np.ndarray:
        first, stop = self._row_span(key)
        if self._fast is not None and stop <= self.mark:
            try:
                try:
                    return self._fast.read(key, out)
                except Fallback:
                    if stop <= first:
                        raise
                    # a selection the fast path does not cut itself: its rows read checked, then selected here,
                    # so no read below the mark reaches Zarr (which checks each chunk's crc32c only)
                    values = _select(self._fast, key, self.shape[0])
                    if out is None:
                        return values
                    out[...] = values
                    return out
            except Fallback:
                pass
            except Damaged as exc:
                what = (f"the {unit_name(self.zarr)} is missing although rows below {self.mark} are committed"
                        if exc.missing else exc.what)
                raise self._fail(exc.unit, what) from None
        irregular = irregular_unit(self.zarr, units(self.zarr, first, stop))
        if irregular is not None:
            raise self._fail(irregular, f"the {unit_name(self.zarr)} is not a regular file")
        missing = missing_units(self.zarr, units(self.zarr, first, min(stop, self.mark)))
        if missing:
            raise self._fail(missing[0], f"the {unit_name(self.zarr)} is missing although rows below {self.mark} "
                                         "are committed")
        if self._remote is not None:
            self._check_indexes(first, min(stop, self.mark))
        try:
            if out is None:
                return self.zarr[key]
            out[...] = self.zarr[key]
            return out
        except DECODE_ERRORS as exc:
            for unit in units(self.zarr, first, stop):  # find the unit that fails, to name it
                try:
                    self.zarr[unit_rows(self.zarr, unit)]
                except DECODE_ERRORS as unit_exc:
                    if unit_rows(self.zarr, unit).stop > self.mark:  # the unit being written: not damage
                        raise InputError(
                            f"rows {first:,} to {stop:,} of {self.zarr.path} reach past the {self.mark:,} rows "
                            "committed so far, in a part of the store its job is still writing (or stopped "
                            f"writing): read the committed rows, e.g. [:{self.mark}]") from None
                    raise self._fail(unit, damage(self.zarr, unit, unit_exc)) from exc
            raise  # no unit fails alone: not damage (e.g. a bad selection)


def _select(fast: FastReader, key: Any, n: int) -> np.ndarray:
    """Any selection of rows below the mark: the rows it touches gathered through the checked path (whole rows, a
    chunk in memory at a time), then the selection applied to them by numpy (its own rules: an index on each axis
    picks points, a slice and an index make a grid)."""
    rows, cols = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
    if rows is Ellipsis:  # every row: the key applies as it is
        return fast.read(slice(0, n))[key]
    if isinstance(rows, slice):
        idx, relative = np.arange(*rows.indices(n)), slice(None)
    elif isinstance(rows, (int, np.integer)):
        idx, relative = np.asarray([int(rows) + n if rows < 0 else int(rows)]), 0
    else:
        given = np.asarray(rows)
        if given.dtype == bool and given.shape != (n,):  # as numpy: a mask is one flag a row
            raise IndexError(f"a boolean index of shape {given.shape} for {n} rows")
        flat = np.flatnonzero(given) if given.dtype == bool else given.ravel()
        idx = np.where(flat < 0, flat + n, flat)
        relative = np.arange(len(idx)).reshape(given.shape if given.dtype != bool else (len(idx),))
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    gathered = fast.read(idx) if idx.size else np.empty((0, *fast.shape[1:]), fast.dtype)
    return gathered[(relative, *cols)]
