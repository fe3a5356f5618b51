"""Store integrity: checked reads, a full ``verify`` and a cheap ``quick_check``.

Zarr reads a missing chunk as the fill value, silently. Below a store's commit mark every storage
unit (a chunk, or a shard in a sharded array: format version 2) must exist, so a checked read refuses to fill
there, and every decode error (checksum, truncation, bad JSON) becomes a :class:`StoreCorrupted`
that names the store, the array, the chunk and the file.
"""
from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from .errors import StoreCorrupted
from .fastread import Damaged, Fallback, FastReader
from .metadata import END_STATES, LIVE_STATES

TOKEN_ARRAYS = ("input_ids", "sample_offsets", "sample_index")
OPTIONAL_TOKEN_ARRAYS = ("role", "positions")  # chat data; windowed documents
# errors a damaged chunk or metadata file raises while decoding (codecs, numpy, JSON); not IndexError
DECODE_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, UnicodeDecodeError, EOFError)


def commit_mark(meta: dict) -> int:
    """Tokens below which every row is final: all of them once COMPLETED, else ``progress.tokens_committed``."""
    progress = meta.get("progress", {}) or {}
    if meta.get("status") == "COMPLETED":
        return int(progress.get("tokens_total", 0))
    return int(progress.get("tokens_committed", 0))


def storage_unit(arr: zarr.Array) -> tuple[int, ...]:
    """The shape of one stored object: the shard when the array is sharded, else the chunk."""
    return arr.shards or arr.chunks


def _unit_name(arr: zarr.Array) -> str:
    return "chunk" if arr.shards is None else "shard"


def has_checksum(arr: zarr.Array) -> bool:
    return any(isinstance(c, Crc32cCodec) for c in arr.compressors)


def _key(arr: zarr.Array, index: tuple[int, ...]) -> str:
    """The store key of one storage unit (``activations/layers.1.residual/c/3/0``)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key(index)}"


def _units(arr: zarr.Array, first_row: int, stop_row: int) -> list[tuple[int, ...]]:
    """Indices of the storage units holding rows ``[first_row, stop_row)``, every unit along the other axes."""
    unit = storage_unit(arr)
    stop_row = min(stop_row, arr.shape[0])
    if stop_row <= first_row:
        return []
    rows = range(first_row // unit[0], math.ceil(stop_row / unit[0]))
    others = [range(math.ceil(s / u)) for s, u in zip(arr.shape[1:], unit[1:])]
    return [(i, *rest) for i in rows for rest in itertools.product(*others)]


def _unit_rows(arr: zarr.Array, index: tuple[int, ...]) -> slice:
    rows = storage_unit(arr)[0]
    return slice(index[0] * rows, min((index[0] + 1) * rows, arr.shape[0]))


def _damage(arr: zarr.Array, unit: tuple[int, ...], exc: BaseException) -> str:
    """Why a unit cannot be decoded; in a shard, which inner chunks fail (each read alone), else its index."""
    if arr.shards is None:
        return f"the chunk cannot be decoded ({exc})"
    rows, inner = _unit_rows(arr, unit), arr.chunks[0]
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


def _missing(arr: zarr.Array, units: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The units among ``units`` whose object is absent from the store (one concurrent existence query each)."""
    store = arr.store_path.store

    async def exists() -> list[bool]:
        return await asyncio.gather(*(store.exists(_key(arr, u)) for u in units))

    return [u for u, present in zip(units, sync(exists()) if units else []) if not present]


class CheckedArray:
    """A read-only view of one stored array that never reads a missing or damaged chunk as data.

    Slicing (``a[i:j]``, ``a[i:j, f]``, ``a[:, f]``, ``a[rows]``) returns numpy arrays like Zarr does;
    storage units below ``mark`` must exist, and decode errors become :class:`StoreCorrupted`.
    Rows at or above ``mark`` (not yet committed) read as Zarr gives them. ``.zarr`` is the raw array.
    Row slices below ``mark`` of a local store in the writer's own layout are read from the files directly
    (:mod:`mistudio.fastread`: one copy, crc32c checked), everything else through Zarr.
    """

    def __init__(self, arr: zarr.Array, location: str, mark: int):
        self.zarr = arr
        self.location = location
        self.mark = int(mark)
        self._fast = FastReader.open(arr)

    def __repr__(self) -> str:
        return f"<CheckedArray {self.zarr.path} shape={self.shape} dtype={self.dtype} chunks={self.chunks}>"

    shape = property(lambda self: self.zarr.shape)
    dtype = property(lambda self: self.zarr.dtype)
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
        return StoreCorrupted(self.location, what, self.zarr.path, unit, f"{self.location}/{_key(self.zarr, unit)}")

    def __getitem__(self, key: Any) -> np.ndarray:
        first, stop = self._row_span(key)
        if self._fast is not None and stop <= self.mark:
            try:
                return self._fast.read(key)
            except Fallback:
                pass
            except Damaged as exc:
                what = (f"the {_unit_name(self.zarr)} is missing although rows below {self.mark} are committed"
                        if exc.missing else exc.what)
                raise self._fail(exc.unit, what) from None
        missing = _missing(self.zarr, _units(self.zarr, first, min(stop, self.mark)))
        if missing:
            raise self._fail(missing[0], f"the {_unit_name(self.zarr)} is missing although rows below {self.mark} "
                                         "are committed")
        try:
            return self.zarr[key]
        except DECODE_ERRORS as exc:
            for unit in _units(self.zarr, first, stop):  # find the unit that fails, to name it
                try:
                    self.zarr[_unit_rows(self.zarr, unit)]
                except DECODE_ERRORS as unit_exc:
                    raise self._fail(unit, _damage(self.zarr, unit, unit_exc)) from exc
            raise  # no unit fails alone: not damage (e.g. a bad selection)


@dataclass
class Problem:
    """One thing wrong in a store: what, and where (array, chunk index, file) when known."""

    what: str
    array: str | None = None
    chunk: tuple[int, ...] | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (self.array, f"chunk {self.chunk}" if self.chunk is not None else None,
                                     f"({self.file})" if self.file else None) if p)
        return f"{where}: {self.what}" if where else self.what


@dataclass
class VerifyReport:
    """The result of :func:`verify` or :func:`quick_check`; ``ok`` when no problem was found."""

    location: str
    problems: list[Problem] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0
    decoded: bool = True
    checksums: bool | None = None
    status: str | None = None
    commit_mark: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.location}: {'OK' if self.ok else f'DAMAGED, {len(self.problems)} problem(s)'}"
        how = "decoded" if self.decoded else "present (not decoded)"
        checks = {True: "checksums on", False: "no checksums: flipped bits cannot be detected", None: "checksums ?"}
        lines = [head, f"  status {self.status}, rows below {self.commit_mark} committed; {self.chunks_checked} chunks "
                       f"({self.bytes_checked / 1e6:.1f} MB) {how}; {checks[self.checksums]}"]
        return "\n".join(lines + [f"  - {str(p).replace(self.location + '/', '')}" for p in self.problems])


def verify(location: str, storage_options: dict | None = None, decode: bool = True) -> VerifyReport:
    """Scan a store, changing nothing: metadata consistency, and every storage unit below the commit mark
    present and (with ``decode``) decodable, which checks its checksum."""
    return _Scan(location, storage_options, decode).run()


def quick_check(store: Any, storage_options: dict | None = None) -> VerifyReport:
    """Cheap check (no decoding): readable metadata and every storage unit below the mark present.

    ``store`` is an ``ExtractionStore`` or a location."""
    if hasattr(store, "location"):
        store, storage_options = store.location, store.storage_options
    return verify(str(store), storage_options, decode=False)


class _Scan:
    def __init__(self, location: str, storage_options: dict | None, decode: bool):
        self.location = location.rstrip("/")
        self.storage_options = storage_options
        self.report = VerifyReport(self.location, decoded=decode)

    def problem(self, what: str, array: str | None = None, chunk: tuple | None = None, file: str | None = None):
        self.report.problems.append(Problem(what, array, chunk, file))

    def run(self) -> VerifyReport:
        group_file = f"{self.location}/zarr.json"
        try:
            group = zarr.open_group(store=self.location, mode="r", storage_options=self.storage_options,
                                    use_consolidated=False)
            meta = group.attrs.get("mistudio")
        except FileNotFoundError as exc:
            self.problem(f"the group metadata is missing ({exc})", file=group_file)
            return self.report
        except DECODE_ERRORS as exc:
            self.problem(f"the group metadata cannot be read ({type(exc).__name__}: {exc})", file=group_file)
            return self.report
        if not isinstance(meta, dict) or not isinstance(meta.get("progress", {}), dict):
            self.problem("attrs['mistudio'] is missing or not a mapping", file=group_file)
            return self.report
        try:
            self.check(group, meta, group_file)
        except (TypeError, ValueError, KeyError, IndexError) as exc:  # JSON that reads, with values that do not fit
            self.problem(f"attrs['mistudio'] is malformed ({type(exc).__name__}: {exc})", file=group_file)
        return self.report

    def check(self, group: zarr.Group, meta: dict, group_file: str) -> None:
        status, progress = meta.get("status"), meta.get("progress", {})
        self.report.status, self.report.commit_mark = status, commit_mark(meta)
        if status not in LIVE_STATES + END_STATES:
            self.problem(f"unknown status {status!r}", file=group_file)
        if progress.get("tokens_total") is None:
            if status == "COMPLETED":
                self.problem("status is COMPLETED but no arrays were ever allocated", file=group_file)
            return
        self.check_progress(group, meta)
        recorded = (meta.get("storage") or {}).get("checksum")
        if recorded is not None and self.report.checksums is not None and recorded != self.report.checksums:
            self.problem(f"the metadata says checksum={recorded} but the arrays say {self.report.checksums}",
                         file=group_file)

    def check_progress(self, group: zarr.Group, meta: dict) -> None:
        progress, mark = meta["progress"], self.report.commit_mark
        n_tokens, n_samples = int(progress["tokens_total"]), int(progress.get("samples_total", -1))
        done, committed = int(progress.get("samples_committed", 0)), int(progress.get("tokens_committed", 0))
        width = (meta.get("model") or {}).get("hidden_size")
        storage = meta.get("storage") or {}
        n_input = int(storage.get("n_input_tokens", n_tokens))  # tokens (model input); n_tokens counts activation rows
        try:
            present = set(group["tokens"].array_keys())
        except (KeyError, FileNotFoundError, *DECODE_ERRORS):
            present = set()
        expected = {"tokens/input_ids": ((n_input,), None), "tokens/sample_offsets": ((n_samples + 1,), None),
                    "tokens/sample_index": ((n_samples,), None), "tokens/special": ((n_input,), None),
                    **{f"tokens/{n}": ((n_input,), None) for n in OPTIONAL_TOKEN_ARRAYS if n in present},
                    **{f"activations/{hp}": ((n_tokens, width), mark) for hp in meta.get("hook_points", [])}}
        if "special" not in present and "n_input_tokens" not in storage:
            del expected["tokens/special"]  # a store from before tokens/special
        if "activation_offsets" in present or storage.get("exclude_special"):
            expected["tokens/activation_offsets"] = ((n_samples + 1,), None)
        flags = []
        for path, (shape, below) in expected.items():
            arr = self.open(group, path, shape)
            if arr is not None:
                flags.append(has_checksum(arr))
                self.scan(arr, arr.shape[0] if below is None else below)
        self.report.checksums = all(flags) if flags else None
        if meta.get("status") == "COMPLETED" and done != n_samples:
            self.problem(f"status is COMPLETED but only {done} of {n_samples} samples are committed")
        if not (0 <= done <= n_samples and 0 <= committed <= n_tokens):
            self.problem(f"progress is out of range: {done} of {n_samples} samples, {committed} of {n_tokens} tokens")
            return
        offset_arrays = [p for p in ("tokens/sample_offsets", "tokens/activation_offsets") if p in expected]
        if not self.report.decoded or any(p.array in offset_arrays for p in self.report.problems):
            return
        offsets = group["tokens/sample_offsets"][:]
        rows = group["tokens/activation_offsets"][:] if "tokens/activation_offsets" in expected else offsets
        if offsets[0] != 0 or offsets[-1] != n_input or np.any(np.diff(offsets) < 0):
            self.problem(f"sample offsets are not monotonic from 0 to {n_input} tokens", "tokens/sample_offsets")
        elif rows[0] != 0 or rows[-1] != n_tokens or np.any((np.diff(rows) < 0) | (np.diff(rows) > np.diff(offsets))):
            self.problem(f"activation offsets are not monotonic from 0 to tokens_total={n_tokens}, at most one row "
                         "per token", "tokens/activation_offsets")
        elif int(rows[done]) != committed:
            self.problem(f"progress is incoherent: {done} committed samples end at token {int(rows[done])}, "
                         f"not at tokens_committed={committed}")

    def open(self, group: zarr.Group, path: str, shape: tuple) -> zarr.Array | None:
        """The array at ``path`` if its metadata reads and its shape matches ``shape`` (None: any size)."""
        file = f"{self.location}/{path}/zarr.json"
        try:
            arr = group[path]
        except (KeyError, FileNotFoundError):
            self.problem("the array is missing", path, file=file)
            return None
        except DECODE_ERRORS as exc:
            self.problem(f"the array metadata cannot be read ({type(exc).__name__}: {exc})", path, file=file)
            return None
        if not isinstance(arr, zarr.Array):
            self.problem("a group where an array should be", path, file=file)
            return None
        if len(arr.shape) != len(shape) or any(e is not None and a != e for a, e in zip(arr.shape, shape)):
            self.problem(f"shape {tuple(arr.shape)} does not match the metadata's "
                         f"{tuple('d' if e is None else e for e in shape)}", path, file=file)
            return None
        return arr

    def scan(self, arr: zarr.Array, mark: int) -> None:
        """Every storage unit below ``mark``: present, and (when decoding) decodable."""
        units = _units(arr, 0, mark)
        missing = set(_missing(arr, units))
        store = arr.store_path.store
        for unit in units:
            file = f"{self.location}/{_key(arr, unit)}"
            if unit in missing:
                what = f"the {_unit_name(arr)} is missing (rows below {mark} are committed)"
                self.problem(what, arr.path, unit, file)
                continue
            self.report.chunks_checked += 1
            self.report.bytes_checked += int(sync(store.getsize(_key(arr, unit))))
            if self.report.decoded:
                try:
                    arr[_unit_rows(arr, unit)]
                except DECODE_ERRORS as exc:
                    self.problem(_damage(arr, unit, exc), arr.path, unit, file)
