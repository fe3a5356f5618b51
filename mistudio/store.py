"""One self-describing Zarr store per extraction, and the single writer thread that fills it."""
from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import pydantic
import zarr

from . import metadata
from .data import ROLE_CODES, window_positions
from .errors import InputError, MistudioError, StoreCorrupted, StoreLost
from .integrity import DECODE_ERRORS, CheckedArray, storage_unit
from .metadata import ExtractionMeta

SHARD_MB = 32.0  # default shard size of activation arrays (CaptureSpec.shard_mb); see benchmarks/RESULTS.md
WRITE_WORKERS = max(1, min(4, os.cpu_count() or 1))  # threads writing disjoint storage units at once


def chunk_rows(width: int, itemsize: int, chunk_mb: float) -> int:
    """Rows per chunk so that a chunk holds about ``chunk_mb`` MB, a multiple of 64 rows."""
    rows = int(chunk_mb * 2**20 / max(1, width * itemsize))
    return max(64, rows // 64 * 64)


def shard_rows(rows_per_chunk: int, row_bytes: int, shard_mb: float, n_tokens: int) -> int | None:
    """Rows per shard (a multiple of the chunk holding about ``shard_mb`` MB), or None for an unsharded array:
    when ``shard_mb`` is 0, or when the array fits in one shard (a small store keeps one file per chunk)."""
    if not shard_mb:
        return None
    per_shard = int(shard_mb * 2**20 // max(1, rows_per_chunk * row_bytes))
    rows = per_shard * rows_per_chunk
    return rows if per_shard > 1 and n_tokens > rows else None


def array_codecs(checksum: bool) -> dict:
    """How every array's chunks are encoded (``create_array`` keywords): raw bytes, plus a crc32c
    checksum per chunk unless ``checksum`` is False. The one place that chooses codecs."""
    from zarr.codecs import Crc32cCodec

    return {"compressors": [Crc32cCodec()] if checksum else None}


# an all-zero chunk is still written, so that a missing chunk always means damage
WRITE_CONFIG = {"write_empty_chunks": True}


class ExtractionStore:
    """A Zarr group: ``attrs['mistudio']`` metadata, ``tokens/*`` and ``activations/<hook point>``.

    The metadata is an :class:`~mistudio.metadata.ExtractionMeta`; ``update`` is its only writer. A store
    that a job writes is *guarded*: every write first checks that the store on disk is still the one this
    object opened (same nonce), so a deleted or replaced store fails the job instead of being recreated.
    """

    def __init__(self, location: str, group: zarr.Group, storage_options: dict | None = None,
                 record: ExtractionMeta | None = None):
        self.location = location
        self.group = group
        self.storage_options = storage_options
        self._lock = threading.RLock()
        self._record = record or metadata.parse(group.attrs.get("mistudio"))
        self.guarded = False

    @classmethod
    def create(cls, location: str, meta: ExtractionMeta, storage_options: dict | None = None) -> "ExtractionStore":
        """A new store holding only its metadata (arrays come with :meth:`allocate`).

        It appears whole or not at all: a local store is built under a hidden temporary name and renamed
        into place; a remote one is created with its attributes in one write. Nobody (a ``cleanup`` in
        another process, say) ever sees a store folder without its metadata.
        """
        attrs = {"mistudio": meta.to_json()}
        if "://" in location and not location.startswith("file://"):
            zarr.create_group(store=zarr.storage.FsspecStore.from_url(location, storage_options=storage_options),
                              zarr_format=3, attributes=attrs)
        else:
            path = location.removeprefix("file://")
            parent, name = os.path.split(path)
            tmp = os.path.join(parent, f".creating-{name}-{meta.nonce or metadata.new_nonce()}")
            try:
                zarr.create_group(store=tmp, zarr_format=3, attributes=attrs)
                os.rename(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return cls.open(location, storage_options, writable=True)

    @classmethod
    def open(cls, location: str, storage_options: dict | None = None, writable: bool = False) -> "ExtractionStore":
        """Open an existing store; damaged group metadata raises :class:`StoreCorrupted` naming the file."""
        file = f"{location.rstrip('/')}/zarr.json"
        try:
            group = zarr.open_group(store=location, mode="r+" if writable else "r", storage_options=storage_options,
                                    use_consolidated=False)
            meta = group.attrs.get("mistudio")
        except FileNotFoundError:
            raise
        except DECODE_ERRORS as exc:
            raise StoreCorrupted(location, f"its group metadata cannot be read ({type(exc).__name__}: {exc})",
                                 file=file) from exc
        if meta is None:
            raise ValueError(f"{location} is a Zarr group but not a mistudio extraction (no 'mistudio' attributes)")
        if not isinstance(meta, dict):
            raise StoreCorrupted(location, "attrs['mistudio'] is not a mapping", file=file)
        try:
            record = metadata.parse(meta)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise StoreCorrupted(location, f"attrs['mistudio'] is not valid metadata ({problems})", file=file) from exc
        return cls(location, group, storage_options, record)

    @property
    def name(self) -> str:
        """The store's folder name without ``.zarr``: its id in the workspace it was found in."""
        return self.location.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")

    # -- metadata -------------------------------------------------------------------------------
    @property
    def record(self) -> ExtractionMeta:
        """The typed metadata as this object last wrote or read it (a copy)."""
        with self._lock:
            return self._record.model_copy(deep=True)

    @property
    def meta(self) -> dict:
        """The metadata as a plain dict (JSON types), as this object last wrote or read it."""
        with self._lock:
            return self._record.to_json()

    def _read_disk(self) -> ExtractionMeta:
        group = zarr.open_group(store=self.location, mode="r", storage_options=self.storage_options,
                                use_consolidated=False)
        return metadata.parse(group.attrs.get("mistudio"))

    def refresh(self) -> dict:
        """Re-read the metadata from storage (another process may have written it)."""
        record = self._read_disk()
        with self._lock:
            self._record = record
            return record.to_json()

    def check_same(self) -> None:
        """Raise :class:`StoreLost` if the store on disk is gone or is not the one this object opened."""
        try:
            nonce = self._read_disk().nonce
        except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.GroupNotFoundError) as exc:
            why = exc or type(exc).__name__
            raise StoreLost(f"the store {self.location} was deleted or damaged while its job ran ({why}); "
                            "what it held is gone: retry the extraction") from exc
        if nonce != self._record.nonce:
            raise StoreLost(f"the store {self.location} was replaced by another store while its job ran: "
                            "this job stopped without touching it; retry the extraction")

    def update(self, **sections: Any) -> dict:
        """Replace top-level metadata sections (``progress=...``) and write them; dict sections merge."""
        with self._lock:
            if self.guarded:
                self.check_same()
            record = metadata.merged(self._record, sections)
            self.group.attrs.update({"mistudio": record.to_json()})
            self._record = record
            return record.to_json()

    # -- arrays ---------------------------------------------------------------------------------
    @property
    def is_allocated(self) -> bool:
        return "tokens" in self.group and "sample_offsets" in self.group["tokens"]

    def allocate(self, ids: list[np.ndarray], rows: np.ndarray, hook_dims: dict[str, int], dtype: str,
                 chunk_mb: float, checksum: bool | None = None, shard_mb: float | None = None, *,
                 special_ids: Sequence[int] = (), exclude_special: bool = False,
                 roles: list[np.ndarray] | None = None, window: int | None = None, stride: int | None = None) -> None:
        """Create every array, sized now, and write the token plan in stored order: ids, offsets, rows,
        ``special`` (ids in ``special_ids``), ``activation_offsets`` (each sample's activation rows: all its
        tokens, or its non-special ones with ``exclude_special``: written only then), ``role`` (chat data) and
        ``positions`` (each token's position in the window that owns it, with ``window``).

        ``checksum`` (default: the ``checksum`` parameter of the metadata, else True) adds a crc32c per chunk.
        ``shard_mb`` (default: the metadata's ``shard_mb`` parameter, else :data:`SHARD_MB`; 0: never) groups
        the chunks of each activation array into shards of about that size (format version 2); an array
        that fits in one shard stays unsharded (format version 1)."""
        if checksum is None:
            checksum = bool(self._record.params.get("checksum", True))
        if shard_mb is None:
            shard_mb = float(self._record.params.get("shard_mb", SHARD_MB))
        codecs = array_codecs(checksum)
        lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
        special = np.isin(flat, np.asarray(list(special_ids), dtype=np.int64))
        kept = ~special if exclude_special else np.ones(len(flat), dtype=bool)
        act_offsets = np.concatenate([[0], np.cumsum(kept)])[offsets].astype(np.int64)
        n_rows = int(act_offsets[-1])
        if n_rows == 0:
            raise InputError("exclude_special=True leaves no token to extract: every token is a special token; "
                             "pass exclude_special=False")
        plan = {"input_ids": flat, "sample_offsets": offsets, "sample_index": rows.astype(np.int64), "special": special}
        if exclude_special:  # rows differ from tokens only then
            plan["activation_offsets"] = act_offsets
        if roles is not None:
            plan["role"] = (np.concatenate(roles) if roles else np.zeros(0)).astype(np.int8)
        if window is not None:
            plan["positions"] = np.concatenate([window_positions(n, window, stride) for n in lengths])
        tokens = self.group.require_group("tokens")
        for name, data in plan.items():
            per_token = name not in ("sample_offsets", "sample_index", "activation_offsets")
            arr = tokens.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(max(1, min(len(data), 2**20)),),
                                      dimension_names=("token",) if per_token else ("sample",),
                                      config=WRITE_CONFIG, overwrite=True, **codecs)
            arr[:] = data
        acts = self.group.require_group("activations")
        itemsize = np.dtype(dtype).itemsize
        rows_per_chunk = chunk_rows(max(hook_dims.values()), itemsize, chunk_mb)
        per_shard = shard_rows(rows_per_chunk, max(hook_dims.values()) * itemsize, shard_mb, n_rows)
        for hook_point, width in hook_dims.items():
            acts.create_array(hook_point, shape=(n_rows, width), chunks=(rows_per_chunk, width), dtype=dtype,
                              shards=(per_shard, width) if per_shard else None, config=WRITE_CONFIG,
                              fill_value=0, dimension_names=("token", "feature"), overwrite=True, **codecs)
        storage = {"checksum": checksum, "exclude_special": exclude_special, "n_input_tokens": len(flat),
                   **({"shard_rows": per_shard} if per_shard else {})}
        if window is not None:
            storage.update(window=window, stride=stride)
        if roles is not None:
            storage["role_codes"] = dict(ROLE_CODES)
        self.update(format_version=2 if per_shard else 1,
                    progress={"samples_total": len(ids), "tokens_total": n_rows, "samples_committed": 0,
                              "tokens_committed": 0, "chunk_rows": rows_per_chunk},
                    hook_points=list(hook_dims), storage=storage)

    def array(self, path: str) -> zarr.Array:
        """The raw Zarr array at ``path`` (``tokens/input_ids``), set up for writing; a missing array or
        damaged ``zarr.json`` raises :class:`StoreCorrupted` naming the file."""
        file = f"{self.location.rstrip('/')}/{path}/zarr.json"
        try:
            return self.group[path].with_config(WRITE_CONFIG)
        except (KeyError, FileNotFoundError) as exc:
            raise StoreCorrupted(self.location, "the array is missing", path, file=file) from exc
        except DECODE_ERRORS as exc:
            raise StoreCorrupted(self.location, f"its metadata cannot be read ({type(exc).__name__}: {exc})", path,
                                 file=file) from exc

    def tokens(self, name: str) -> CheckedArray:
        """A checked read-only view of ``tokens/<name>`` (written in full at allocation)."""
        arr = self.array(f"tokens/{name}")
        return CheckedArray(arr, self.location, arr.shape[0])

    def input_ids(self) -> np.ndarray:
        return self.tokens("input_ids")[:]

    def sample_offsets(self) -> np.ndarray:
        return self.tokens("sample_offsets")[:]

    def sample_index(self) -> np.ndarray:
        return self.tokens("sample_index")[:]

    def activation_offsets(self) -> np.ndarray:
        """Activation-row range of each stored sample (``tokens/activation_offsets``; stores from before it
        have a row per token, so their sample offsets)."""
        if "activation_offsets" in self.group["tokens"]:
            return self.tokens("activation_offsets")[:]
        return self.sample_offsets()

    def activations(self, hook_point: str) -> zarr.Array:
        """The raw (writable, unchecked) Zarr array of one hook point; readers use ``Extraction.activations``."""
        return self.array(f"activations/{hook_point}")

    def consolidate(self) -> None:
        """Write consolidated metadata once, at the end, for fast `xarray.open_zarr`."""
        import warnings

        with warnings.catch_warnings():  # zarr notes consolidation is not in the v3 spec; xarray reads it fine
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(self.group.store)


class HookStats:
    """Accumulators of one hook point over committed rows: mean/std/max-abs/zero-fraction (exact), per-token L2
    norm quantiles (from a fixed log-spaced histogram, mergeable, within about 5%), and outlier tokens: those
    whose norm is over ``OUTLIER_FACTOR`` × the median norm of the rows committed up to their batch (a running
    median), counted, with the first ``MAX_OUTLIERS`` as ``[activation row, norm]``."""

    KEYS = ("count", "sum", "sum_sq", "max_abs", "zeros", "norm_hist", "n_outliers", "outliers")
    NORM_EDGES = np.logspace(-3, 7, 10 * 24 + 1)  # 24 bins a decade, 1e-3 .. 1e7; under/overflow bins at the ends
    QUANTILES = (0.5, 0.9, 0.99, 0.999)
    OUTLIER_FACTOR = 100.0
    MAX_OUTLIERS = 100  # the list is in the metadata, rewritten at every commit
    _CANDIDATES = 256  # per batch: rows over 10x the batch's median norm, the largest first

    @staticmethod
    def empty() -> dict:
        return {"count": 0, "sum": 0.0, "sum_sq": 0.0, "max_abs": 0.0, "zeros": 0,
                "norm_hist": [0] * (len(HookStats.NORM_EDGES) + 1), "n_outliers": 0, "outliers": []}

    @staticmethod
    def of_tensor(values) -> dict:
        """One batch's accumulators of ``values`` (rows, d), computed by torch where the values are; outlier
        candidates are ``[row in the batch, norm]``, judged when the batch is merged."""
        return HookStats.from_device(values.numel(), HookStats.device_sums(values).tolist(),
                                     HookStats.device_norms(values).cpu().numpy())

    @staticmethod
    def device_norms(values):
        """The L2 norm of each row of ``values`` (rows, d), as float32 where they are (no sync)."""
        import torch

        return torch.linalg.vector_norm(values.float().reshape(len(values), -1), dim=-1)

    @staticmethod
    def device_sums(values):
        """(sum, sum of squares, max abs, zeros) of ``values`` as one float64 tensor where they are (no sync)."""
        import torch

        f = values.float().reshape(-1)
        if not f.numel():
            return torch.zeros(4, dtype=torch.float64, device=f.device)
        return torch.stack([f.sum(dtype=torch.float64), torch.dot(f, f).double(), f.abs().max().double(),
                            (f == 0).sum().double()])

    @staticmethod
    def from_device(count: int, sums: list[float], norms: np.ndarray) -> dict:
        """The accumulators from ``count``, the values of :meth:`device_sums` and the row norms (on the host):
        outlier candidates are ``[row in the batch, norm]``, judged when the batch is merged."""
        norms = np.asarray(norms, dtype=np.float64)
        if not count:
            return HookStats.empty()
        total, sum_sq, max_abs, zeros = sums
        hist = np.bincount(np.searchsorted(HookStats.NORM_EDGES, norms, side="left"),
                           minlength=len(HookStats.NORM_EDGES) + 1)
        top = np.argsort(-norms, kind="stable")[:HookStats._CANDIDATES]
        over = top[norms[top] > 10 * np.median(norms)]
        return {"count": int(count), "sum": total, "sum_sq": sum_sq, "max_abs": max_abs, "zeros": int(zeros),
                "norm_hist": hist.tolist(), "n_outliers": 0, "outliers": [],
                "candidates": [[int(r), float(norms[r])] for r in over]}

    @staticmethod
    def merge(acc: dict, delta: dict, first_row: int = 0) -> None:
        """Add ``delta`` (a batch whose first activation row is ``first_row``, or another accumulator) to ``acc``."""
        for key in ("count", "sum", "sum_sq", "zeros", "n_outliers"):
            acc[key] += delta.get(key, 0)
        acc["max_abs"] = max(acc["max_abs"], delta["max_abs"])
        hist = delta.get("norm_hist") or [0] * len(acc["norm_hist"])
        acc["norm_hist"] = [a + b for a, b in zip(acc["norm_hist"], hist)]
        found = list(delta.get("outliers", []))
        if delta.get("candidates"):
            limit = HookStats.OUTLIER_FACTOR * HookStats.quantile(acc["norm_hist"], 0.5)
            found += sorted([first_row + r, n] for r, n in delta["candidates"] if n > limit)
            acc["n_outliers"] += len(found) - len(delta.get("outliers", []))
        acc["outliers"] = acc["outliers"] + found[: max(0, HookStats.MAX_OUTLIERS - len(acc["outliers"]))]

    @staticmethod
    def quantile(hist: list[int], q: float) -> float:
        """The ``q`` quantile of the norms in ``hist``: the geometric middle of the bin it falls in."""
        total = sum(hist)
        if not total:
            return 0.0
        k = int(np.searchsorted(np.cumsum(hist), q * total))
        edges = HookStats.NORM_EDGES
        if k == 0:
            return float(edges[0])
        if k >= len(edges):
            return float(edges[-1])
        return float(math.sqrt(edges[k - 1] * edges[k]))

    @staticmethod
    def summary(acc: dict) -> dict:
        n = acc["count"]
        mean = acc["sum"] / n if n else 0.0
        var = max(0.0, acc["sum_sq"] / n - mean * mean) if n else 0.0
        median = HookStats.quantile(acc["norm_hist"], 0.5)
        return {**acc, "mean": mean, "std": math.sqrt(var), "frac_zeros": acc["zeros"] / n if n else 0.0,
                "norm_quantiles": {str(q): HookStats.quantile(acc["norm_hist"], q) for q in HookStats.QUANTILES},
                "outlier_threshold": HookStats.OUTLIER_FACTOR * median}


def _fast_layout(arr: zarr.Array) -> tuple[int, bool] | None:
    """(rows per inner chunk, crc32c per chunk) when :func:`write_unit` may encode ``arr``'s files itself:
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


def write_unit(arr: zarr.Array, start: int, stop: int, blocks: list[np.ndarray]) -> None:
    """Write rows ``[start, stop)`` of ``arr``, given as consecutive row ``blocks``, as one storage unit: ``start``
    is where a unit (a shard, or a chunk of an unsharded array) begins, and ``stop`` at most where it ends.

    On a local store the unit's file is encoded here exactly as Zarr's codecs encode it (inner chunks with
    their crc32c, the last one padded with the fill value, then the shard index with its crc32c, absent
    chunks marked empty) and streamed from the blocks without copying them into a temporary file renamed
    into place: it replaces the unit, rows after ``stop`` included. Elsewhere (a remote store, other codecs)
    Zarr writes it, reading and merging what the unit holds. Never two writes of one unit at once."""
    import google_crc32c

    unit = storage_unit(arr)[0]
    layout = _fast_layout(arr)
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


class ChunkWriter:
    """The store's only writer: a thread that takes rows in stored order and writes whole storage units.

    Rows arrive per batch (``put``), with the batch's statistics. A storage unit (a shard, or a chunk of
    an unsharded array) is written once it is complete, by a small pool of threads that write disjoint
    units at once (never two writes of one unit). The commit mark then moves to the last batch that ends
    inside the contiguous written region, and ``progress.samples_committed``/``tokens_committed`` and the
    statistics are recorded. ``flush`` (end, cancel, failure) also writes the last, partial unit. Everything
    below the mark is final; a resumed job restarts at it: the committed rows of a unit that the mark cuts
    are read back, so that the unit is written whole again.

    Memory: the rows of the unit being filled, plus the units being written (at most about
    ``workers`` of them, and one per hook point), so roughly unit bytes × (hook points + workers).
    """

    _FLUSH = object()
    _STOP = object()

    def __init__(self, store: ExtractionStore, start_sample: int, queue_depth: int = 2,
                 workers: int = WRITE_WORKERS):
        self.store = store
        self.offsets = store.activation_offsets()  # rows, not tokens: special tokens may have none
        self.hook_points = list(store.meta["hook_points"])
        self.arrays = {hp: store.activations(hp) for hp in self.hook_points}
        first = self.arrays[self.hook_points[0]]
        self.unit, self.n_tokens = storage_unit(first)[0], first.shape[0]
        saved = store.meta.get("statistics", {}) if start_sample else {}  # exact up to the commit mark
        self.stats = {hp: {k: saved.get(hp, {}).get(k, v) for k, v in HookStats.empty().items()}
                      for hp in self.hook_points}
        self.batches: deque[tuple[int, dict]] = deque()  # (end sample, statistics) of uncommitted batches
        self.committed_sample = self.received_sample = start_sample
        mark = int(self.offsets[start_sample])
        self.base = mark // self.unit * self.unit  # first row not yet handed to a whole-unit write
        self.received = self.written = mark  # rows received; rows below ``written`` are on disk
        self.pieces: dict[str, list[np.ndarray]] = {hp: [] for hp in self.hook_points}  # rows [base, received)
        if mark > self.base:  # the mark cuts a unit: its committed rows come back, to write it whole
            for hp, arr in self.arrays.items():
                self.pieces[hp].append(CheckedArray(arr, store.location, mark)[self.base:mark])
        self.inflight: deque[tuple[int, list[Future]]] = deque()  # (unit stop row, writes), in row order
        self.max_inflight = max(1, -(-workers // len(self.hook_points)))  # units in flight at once
        self.error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mistudio-write")
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._thread = threading.Thread(target=self._loop, name="mistudio-writer", daemon=True)
        self._thread.start()

    # -- producer side ---------------------------------------------------------------------------
    def put(self, n_samples: int, rows: dict[str, np.ndarray], stats: dict[str, dict]) -> None:
        """Queue the rows and statistics of the next ``n_samples`` samples (blocks while the writer is behind).
        The writer keeps the arrays until their unit is written: do not change them afterwards."""
        self._raise()
        self._queue.put((n_samples, (rows, stats)))

    def flush(self) -> None:
        """Write and commit everything queued, including a partial last unit."""
        done = threading.Event()
        self._queue.put((self._FLUSH, done))
        while not done.wait(0.05):
            if not self._thread.is_alive():
                break
        self._raise()

    def close(self, flush: bool = True) -> None:
        """Stop the thread; with ``flush`` write what is queued first. No write is left running."""
        try:
            if flush and self._thread.is_alive() and self.error is None:
                self.flush()
        finally:
            self._queue.put((self._STOP, None))
            self._thread.join()
            self._pool.shutdown(wait=True)
        self._raise()

    def _raise(self) -> None:
        if isinstance(self.error, (MistudioError, OSError)):
            raise self.error  # a lost store or a full disk keeps its type: the job reports it as such
        if self.error is not None:
            raise RuntimeError(f"the store writer failed: {self.error}") from self.error

    # -- writer thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item, payload = self._queue.get()
            if item is self._STOP:
                return
            if self.error is not None:
                if item is self._FLUSH:
                    payload.set()
                continue  # drain: the producer sees the error on its next call
            try:
                if item is self._FLUSH:
                    self._flush()
                    payload.set()
                else:
                    self._append(item, *payload)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self.error = exc
                self._wait_all()
                if item is self._FLUSH:
                    payload.set()

    def _append(self, n_samples: int, rows: dict[str, np.ndarray], stats: dict[str, dict]) -> None:
        for hp in self.hook_points:
            self.pieces[hp].append(rows[hp])
        self.received_sample += n_samples
        self.batches.append((self.received_sample, stats))
        self.received = int(self.offsets[self.received_sample])
        while self.received - self.base >= self.unit or (self.received == self.n_tokens > self.base):
            stop = min(self.base + self.unit, self.n_tokens)
            self._submit(self.base, stop)
            self._drop_below(stop)
        self._harvest(wait=False)

    def _flush(self) -> None:
        """Write the partial unit too (its rows stay buffered: a later whole write replaces it), wait, commit."""
        if self.received > self.base:
            self._submit(self.base, self.received)
        self._harvest(wait=True)

    def _submit(self, start: int, stop: int) -> None:
        while len(self.inflight) >= self.max_inflight:
            self._harvest(wait=True, one=True)
        if self.store.guarded:  # never recreate a store deleted under the job
            self.store.check_same()
        writes = [self._pool.submit(write_unit, self.arrays[hp], start, stop, self._rows(hp, start, stop))
                  for hp in self.hook_points]
        self.inflight.append((stop, writes))

    def _rows(self, hp: str, start: int, stop: int) -> list[np.ndarray]:
        """Views of the buffered rows ``[start, stop)`` of one hook point (buffered rows begin at ``base``)."""
        out, pos = [], self.base
        for piece in self.pieces[hp]:
            lo, hi = max(start, pos), min(stop, pos + len(piece))
            if lo < hi:
                out.append(piece[lo - pos:hi - pos])
            pos += len(piece)
        return out

    def _drop_below(self, stop: int) -> None:
        for hp in self.hook_points:
            self.pieces[hp] = self._rows(hp, stop, self.received)
        self.base = stop

    def _harvest(self, wait: bool, one: bool = False) -> None:
        """Take finished writes in row order (a failed one raises), move ``written``, commit."""
        while self.inflight and (wait or all(f.done() for f in self.inflight[0][1])):
            stop, writes = self.inflight.popleft()
            for write in writes:
                write.result()
            self.written = max(self.written, stop)
            if one:
                break
        self._commit()

    def _wait_all(self) -> None:
        """After a failure: let the writes in flight end (a later writer must never race them)."""
        for _, writes in self.inflight:
            for write in writes:
                try:
                    write.result()
                except BaseException:  # noqa: BLE001 - the first error is the one reported
                    pass
        self.inflight.clear()

    def _commit(self) -> None:
        new_sample = self.committed_sample
        while self.batches and self.offsets[self.batches[0][0]] <= self.written:
            first_row = int(self.offsets[new_sample])  # the batch starts where the previous one ended
            new_sample, stats = self.batches.popleft()
            for hp in self.hook_points:
                HookStats.merge(self.stats[hp], stats[hp], first_row)
        if new_sample == self.committed_sample:
            return
        self.committed_sample = new_sample
        progress = {"samples_committed": new_sample, "tokens_committed": int(self.offsets[new_sample])}
        self.store.update(progress=progress,
                          statistics={hp: HookStats.summary(acc) for hp, acc in self.stats.items()})
