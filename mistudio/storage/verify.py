"""``verify``: a whole store scanned without changing it, and ``quick_check``, its cheap form.

Below a store's commit mark every storage unit (a chunk, or a shard in a sharded array: format version 2) must
exist and decode (which checks its crc32c) and, in a store with chunk records (:mod:`.positions`), every chunk must
be the one recorded for its place; the metadata must be coherent with the arrays.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from .codec import Damaged, FastReader, Geometry
from .layout import foreign_encoding, has_checksum, storage_unit, unit_key, unit_name, unit_rows, units
from .metadata import END_STATES, LIVE_STATES
from .positions import ATTRIBUTE, recorded
from ..errors import StoreCorrupted
from .reads import DECODE_ERRORS, CheckedArray, damage, missing_units
from .featindex import FeatureIndex
from .store import open_group

OPTIONAL_TOKEN_ARRAYS = ("role", "positions")  # chat data; windowed documents


def commit_mark(meta: dict) -> int:
    """Tokens below which every row is final: all of them once COMPLETED, else ``progress.tokens_committed``."""
    progress = meta.get("progress", {}) or {}
    if meta.get("status") == "COMPLETED":
        return int(progress.get("tokens_total", 0))
    return int(progress.get("tokens_committed", 0))


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
        self.dtype: str | None = None  # the store's params.dtype, once its metadata is read

    def problem(self, what: str, array: str | None = None, chunk: tuple | None = None, file: str | None = None):
        self.report.problems.append(Problem(what, array, chunk, file))

    def run(self) -> VerifyReport:
        group_file = f"{self.location}/zarr.json"
        try:
            group = open_group(self.location, self.storage_options)
            meta = group.attrs.get("mistudio")
        except StoreCorrupted as exc:
            self.problem(exc.what, file=group_file)
            return self.report
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
        self.dtype = (meta.get("params") or {}).get("dtype")  # what the values were stored as (None: not said)
        self.report.status, self.report.commit_mark = status, commit_mark(meta)
        if status not in LIVE_STATES + END_STATES:
            self.problem(f"unknown status {status!r}", file=group_file)
        if progress.get("tokens_total") is None:
            if status == "COMPLETED":
                self.problem("status is COMPLETED but no arrays were ever allocated", file=group_file)
            return
        self.check_progress(group, meta, group_file)
        recorded = (meta.get("storage") or {}).get("checksum")
        if recorded is not None and self.report.checksums is not None and recorded != self.report.checksums:
            self.problem(f"the metadata says checksum={recorded} but the arrays say {self.report.checksums}",
                         file=group_file)

    def check_progress(self, group: zarr.Group, meta: dict, group_file: str) -> None:
        progress, mark = meta["progress"], self.report.commit_mark
        n_tokens, n_samples = int(progress["tokens_total"]), int(progress.get("samples_total", -1))
        done, committed = int(progress.get("samples_committed", 0)), int(progress.get("tokens_committed", 0))
        width = (meta.get("model") or {}).get("hidden_size")
        storage = meta.get("storage") or {}
        recorded_input = storage.get("n_input_tokens")  # None in a store from before it (written back as null)
        n_input = n_tokens if recorded_input is None else int(recorded_input)  # model input; n_tokens: activation rows
        try:
            present = set(group["tokens"].array_keys())
        except (KeyError, FileNotFoundError, StoreCorrupted, *DECODE_ERRORS):
            present = set()
        expected = {"tokens/input_ids": ((n_input,), None), "tokens/sample_offsets": ((n_samples + 1,), None),
                    "tokens/sample_index": ((n_samples,), None), "tokens/special": ((n_input,), None),
                    **{f"tokens/{n}": ((n_input,), None) for n in OPTIONAL_TOKEN_ARRAYS if n in present},
                    **{f"activations/{hp}": ((n_tokens, width), mark) for hp in meta.get("hook_points", [])}}
        for hp, info in (meta.get("latents") or {}).items():
            expected[f"latents/{hp}/indices"] = ((n_tokens, int(info["width"])), mark)
            expected[f"latents/{hp}/values"] = ((n_tokens, int(info["width"])), mark)
        if "special" not in present and recorded_input is None:
            del expected["tokens/special"]  # a store from before tokens/special
        if "activation_offsets" in present or storage.get("exclude_special"):
            expected["tokens/activation_offsets"] = ((n_samples + 1,), None)
        flags = []
        for path, (shape, below) in expected.items():
            arr = self.open(group, path, shape)
            if arr is not None:
                flags.append(has_checksum(arr))
                if self.same_store(arr, storage.get("chunk_records")):
                    self.scan(arr, arr.shape[0] if below is None else below)
        self.report.checksums = all(flags) if flags else None
        if self.report.decoded and not any(p.array and p.array.startswith("latents/") for p in self.report.problems):
            for hp, info in (meta.get("latents") or {}).items():
                self.check_feature_index(group, hp, info, mark, n_tokens, meta.get("status") == "COMPLETED")
        if meta.get("status") == "COMPLETED" and done != n_samples:
            self.problem(f"status is COMPLETED but only {done} of {n_samples} samples are committed", file=group_file)
        if not (0 <= done <= n_samples and 0 <= committed <= n_tokens):
            self.problem(f"progress is out of range: {done} of {n_samples} samples, {committed} of {n_tokens} tokens",
                         file=group_file)
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

    def check_feature_index(self, group: zarr.Group, hp: str, info: dict, mark: int, n_rows: int,
                            complete: bool) -> None:
        """Every written block of an SAE's by-feature index equals the one its rows give (recomputed here); a
        COMPLETED store has every block indexed."""
        d_sae, block_rows, width = int(info["d_sae"]), int(info["block_rows"]), int(info["width"])
        base, entries = f"latents/{hp}", block_rows * width
        n_blocks = -(-n_rows // block_rows)
        arrays = {name: self.open(group, f"{base}/{name}", shape) for name, shape in (
            ("feature_offsets", (n_blocks, d_sae + 3)), ("feature_rows", (n_blocks * entries,)),
            ("feature_values", (n_blocks * entries,)))}
        if any(a is None for a in arrays.values()):
            return
        offsets = CheckedArray(arrays["feature_offsets"], self.location, n_blocks)
        index = CheckedArray(group[f"{base}/indices"], self.location, mark)
        values = CheckedArray(group[f"{base}/values"], self.location, mark)
        for block in range(-(-mark // block_rows)):
            first, stop = block * block_rows, min((block + 1) * block_rows, mark)
            try:
                row = offsets[block]
            except StoreCorrupted as exc:
                if complete or "missing" not in exc.what:
                    self.problem(exc.what, exc.array, exc.chunk, exc.file)
                continue
            covered = int(row[d_sae + 1])
            if covered == 0 and not complete:
                continue
            ahead = not complete and covered > stop - first  # indexed past the mark (stopped before the mark moved)
            if ahead:
                covered = stop - first  # its rows past the mark are not committed: check the entries of those below
            try:
                want = FeatureIndex.build(index[first:first + covered].view(index.zarr.dtype),
                                          values[first:first + covered].view(values.zarr.dtype), block, block_rows,
                                          width, d_sae, arrays["feature_values"].dtype)
                got = [CheckedArray(arrays[n], self.location, n_blocks * entries)[block * entries:(block + 1) * entries]
                       for n in ("feature_rows", "feature_values")]
            except StoreCorrupted as exc:
                self.problem(exc.what, exc.array, exc.chunk, exc.file)
                continue
            if ahead:
                row, got = _committed_entries(row, got, covered, d_sae)
            whole = min(block_rows, n_rows - first)
            if complete and covered != whole:
                self.problem(f"the by-feature index of block {block} covers {covered} of its {whole} rows",
                             f"{base}/feature_offsets", (block, 0))
            elif row is None or not (np.array_equal(row, want[0]) and np.array_equal(got[0], want[1])
                                     and np.array_equal(got[1].view(np.uint8), want[2].view(np.uint8))):
                self.problem(f"the by-feature index of block {block} does not match its rows",
                             f"{base}/feature_offsets", (block, 0))

    def open(self, group: zarr.Group, path: str, shape: tuple) -> zarr.Array | None:
        """The array at ``path`` if its metadata reads and its shape matches ``shape`` (None: any size)."""
        file = f"{self.location}/{path}/zarr.json"
        try:
            arr = group[path]
        except (KeyError, FileNotFoundError):
            self.problem("the array is missing", path, file=file)
            return None
        except StoreCorrupted as exc:
            self.problem(exc.what, path, file=exc.file)
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
        problem = foreign_encoding(arr, path, self.dtype)
        if problem is not None:
            self.problem(problem, path, file=file)
            return None
        return arr

    def same_store(self, arr: zarr.Array, key: str | None) -> bool:
        """Whether the array's chunk records are this store's (``key``: the one its metadata names); else a
        problem says the array comes from another store (its chunks are then not scanned against them)."""
        g = Geometry.of(arr)
        own = arr.attrs.get(ATTRIBUTE) if g is not None and g.crc and recorded(arr.path) else None
        if own == key or g is None or not g.crc or not recorded(arr.path):
            return True
        if own is None:
            why = "it has no chunk records, although this store keeps them"
        elif key is None:
            why = "it has chunk records, although this store (from before them) keeps none"
        else:
            why = f"its chunk records are under the key {own!r}, not this store's {key!r}"
        self.problem(f"the array's folder comes from another store (or another copy of one): {why}; put this "
                     "store's own folder back from a copy of it, or re-extract (retry)", arr.path,
                     file=f"{self.location}/{arr.path}/zarr.json")
        return False

    def scan(self, arr: zarr.Array, mark: int) -> None:
        """Every storage unit below ``mark``: present, a regular file, its index (shards) sound, and (when
        decoding) every chunk decodable, which checks its crc32c. A unit count the files cannot back (a crafted
        or damaged ``zarr.json``) is reported without walking the claimed units."""
        rows_per_unit = storage_unit(arr)[0]
        n_units = -(-min(mark, arr.shape[0]) // rows_per_unit)
        present = self.present(arr)
        if present is not None and n_units > present + 1:
            self.problem(f"{n_units:,} {unit_name(arr)}s hold the rows below the commit mark {mark:,}, but the "
                         f"array's folder holds {present:,} files", arr.path,
                         file=f"{self.location}/{arr.path}/zarr.json")
            return
        g = Geometry.of(arr)
        if g is not None:
            reader = FastReader(g, mark)
            for unit in range(n_units):
                try:
                    size = reader.check_unit(unit, decode=self.report.decoded)
                except Damaged as exc:
                    what = f"the {unit_name(arr)} is missing (rows below {mark} are committed)" if exc.missing \
                        else exc.what
                    self.problem(what, arr.path, exc.unit, f"{self.location}/{unit_key(arr, exc.unit)}")
                    continue
                self.report.chunks_checked += 1
                self.report.bytes_checked += size
            return
        found = units(arr, 0, mark)
        missing = set(missing_units(arr, found))
        store = arr.store_path.store
        checked = CheckedArray(arr, self.location, mark)  # a remote shard's index checked as reads check it
        for unit in found:
            file = f"{self.location}/{unit_key(arr, unit)}"
            if unit in missing:
                what = f"the {unit_name(arr)} is missing (rows below {mark} are committed)"
                self.problem(what, arr.path, unit, file)
                continue
            self.report.chunks_checked += 1
            self.report.bytes_checked += int(sync(store.getsize(unit_key(arr, unit))))
            if self.report.decoded:
                rows = unit_rows(arr, unit)
                try:
                    checked[rows.start:min(rows.stop, mark)]  # a unit of the rows below the mark
                except StoreCorrupted as exc:
                    self.problem(exc.what, arr.path, unit, file)
                except (*DECODE_ERRORS, MemoryError, OverflowError) as exc:
                    self.problem(damage(arr, unit, exc), arr.path, unit, file)

    def present(self, arr: zarr.Array) -> int | None:
        """How many unit files a local array's folder holds (None for remote stores)."""
        root = getattr(arr.store_path.store, "root", None)
        if root is None:
            return None
        folder = os.path.join(str(root), arr.path)
        return sum(1 for _, _, files in os.walk(folder) for name in files
                   if name != "zarr.json" and not name.startswith("."))


def _committed_entries(row: np.ndarray, got: list, rows: int, d_sae: int) -> tuple[np.ndarray | None, list]:
    """A by-feature index block that covers rows past the commit mark, cut to its entries of the first ``rows``
    rows: (offsets row, [entry rows, entry values]) as :meth:`FeatureIndex.build` gives them for those rows alone,
    padded alike; None for the row when its offsets are out of order (then it cannot be cut)."""
    bounds = np.asarray(row[:d_sae + 1], np.int64)
    entries = len(got[0])
    if bounds[0] != 0 or np.any(np.diff(bounds) < 0) or bounds[-1] > entries:
        return None, got
    keep = np.zeros(entries, bool)
    keep[:bounds[-1]] = (got[0][:bounds[-1]] >= 0) & (got[0][:bounds[-1]] < rows)
    before = np.concatenate([[0], np.cumsum(keep)])
    cut = np.zeros_like(row)
    cut[:d_sae + 1] = before[bounds]
    cut[d_sae + 1], cut[d_sae + 2] = rows, row[d_sae + 2]
    kept = int(keep.sum())
    entry_rows, entry_values = np.full(entries, -1, got[0].dtype), np.zeros(entries, got[1].dtype)
    entry_rows[:kept], entry_values[:kept] = got[0][keep], got[1][keep]
    return cut, [entry_rows, entry_values]
