"""Feature statistics of a store's committed rows (:mod:`.featstats`), in the pass that writes it and after.

The rows are read back from the store in blocks of a fixed grid (:func:`block_rows`): the extraction's own pass
(:class:`StatisticsFeed`, a thread that follows the commit mark) and any later pass (:func:`accumulate`) feed the
accumulator the same values in the same blocks, so they give bit-equal statistics. A snapshot of the state is
saved under ``statistics/<key>/`` every :data:`SNAPSHOT_SECONDS` and when the job stops, at a grid point ``R``
at or below the commit mark; whoever continues (a resumed job, a read of a stopped one) loads it and reads rows
``R`` onwards again: exact, whatever the kill left.

A key is a stored hook point (raw neurons, dense rows) or ``<hook point>.latents`` (an SAE's latents, sparse
rows: the (indices, values) slots with a non-zero value).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import zarr

from ..errors import InputError
from .featstats import CSR, FeatureStatsAccumulator
from .layout import array_codecs, whole_blocks
from .reads import CheckedArray
from .store import open_group

if TYPE_CHECKING:
    from .store import ExtractionStore

log = logging.getLogger(__name__)

GROUP = "statistics"  # statistics/<key>/: attrs {"rows": R, "snapshot": name}, one subgroup per snapshot
SNAPSHOT_SECONDS = 60.0
SNAPSHOT_CHUNK_BYTES = 4 * 2**20  # a snapshot array's chunk: whole rows, about this many bytes
BLOCK_BYTES = 8 << 20  # stored bytes a block of the grid reads (whole storage chunks, at least one)
LATENTS = ".latents"
DIGEST = "digest"  # a snapshot's and its pointer's attributes carry a digest of themselves
MAX_BLOCK_ROWS = 1 << 30


def _store(source: Any) -> "ExtractionStore":
    return getattr(source, "store", source)  # an Extraction or its store


def keys(store: "ExtractionStore") -> list[str]:
    """Every key statistics can be kept for: the stored hook points, then each SAE's latents."""
    record = store.record
    return list(record.hook_points) + [f"{hp}{LATENTS}" for hp in record.latents]


def check_key(store: "ExtractionStore", key: str) -> str:
    if key not in keys(store):
        raise InputError(f"hook point {key!r} is not in extraction {store.record.id}: it has {keys(store)}",
                         param="hook_point")
    return key


def width(store: "ExtractionStore", key: str) -> int:
    """Features of ``key``: the hook point's width, or the SAE's d_sae."""
    if key.endswith(LATENTS):
        return int(store.record.latents[key.removesuffix(LATENTS)].d_sae)
    return int(store.activations(key).shape[1])


def _arrays(store: "ExtractionStore", key: str) -> list[str]:
    if key.endswith(LATENTS):
        base = f"latents/{key.removesuffix(LATENTS)}"
        return [f"{base}/indices", f"{base}/values"]
    return [f"activations/{key}"]


def block_rows(store: "ExtractionStore", key: str) -> int:
    """Rows per block of the grid: the saved snapshot's, else whole storage chunks, about :data:`BLOCK_BYTES` of
    stored values."""
    try:
        attrs = dict(store.group[f"{GROUP}/{key}"].attrs)
        step = attrs["block_rows"]
        if _intact(attrs) and isinstance(step, int) and 0 < step <= MAX_BLOCK_ROWS:
            return step
    except Exception:  # noqa: BLE001 - no snapshot yet: the grid is chosen now
        pass
    arrays = [store.array(path) for path in _arrays(store, key)]
    unit = int(arrays[0].chunks[0])
    row_bytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in arrays)
    return unit * max(1, BLOCK_BYTES // max(1, unit * row_bytes))


def read_block(store: "ExtractionStore", key: str, start: int, stop: int, mark: int) -> Any:
    """Rows ``[start, stop)`` of ``key`` as the accumulator takes them (checked reads below ``mark``)."""
    if not key.endswith(LATENTS):
        return CheckedArray(store.activations(key), store.location, mark)[start:stop]
    index, values = (CheckedArray(store.array(path), store.location, mark)[start:stop]
                     for path in _arrays(store, key))
    fired = values != 0  # an empty slot holds 0
    offsets = np.concatenate([[0], np.cumsum(fired.sum(axis=1))]).astype(np.int64)
    return CSR(offsets, index[fired].astype(np.int64), values[fired])


def _documents(offsets: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.searchsorted(offsets, np.arange(start, stop), side="right") - 1


def feed(acc: FeatureStatsAccumulator, store: "ExtractionStore", key: str, start: int, stop: int, mark: int,
         rows_per_block: int | None = None, offsets: np.ndarray | None = None) -> int:
    """Add rows ``[start, stop)`` in blocks of the grid (``start`` on it); returns ``stop``."""
    step = rows_per_block or block_rows(store, key)
    offsets = store.activation_offsets() if offsets is None else offsets
    for a in range(start, stop, step):
        b = min(a + step, stop)
        acc.update(a, read_block(store, key, a, b, mark), _documents(offsets, a, b))
    return stop


def compute(source: Any, key: str, *, chunk_rows: int | None = None, **options: Any):
    """The :class:`~.featstats.FeatureStatistics` of every committed row of ``key`` (see :func:`accumulate`)."""
    return accumulate(source, key, chunk_rows=chunk_rows, **options).result()


def accumulate(source: Any, key: str, *, chunk_rows: int | None = None, device: str = "cpu",
               **options: Any) -> FeatureStatsAccumulator:
    """An accumulator fed with every committed row of ``key`` (``source``: an Extraction or its store), one
    block at a time (memory: a block and the accumulator). With default ``options`` and ``chunk_rows``, it
    continues the saved snapshot when there is one (the rows after it are read). ``chunk_rows``: other blocks
    (results may differ from the grid's in the last bits of the sums)."""
    store = _store(source)
    check_key(store, key)
    mark = int(store.record.progress.tokens_committed)
    start, acc = 0, None
    if not options and chunk_rows is None:
        saved = load(store, key, mark)
        if saved is not None:
            start, state = saved
            acc = FeatureStatsAccumulator.from_state_dict(state, device=device)
    if acc is None:
        acc = FeatureStatsAccumulator(width(store, key), device=device, **options)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise InputError(f"«chunk_rows={chunk_rows!r}» is not a positive number of rows: «pass chunk_rows=4096»",
                         param="chunk_rows")
    feed(acc, store, key, start, mark, mark, chunk_rows)
    return acc


# -- snapshots ------------------------------------------------------------------------------------------------
def load(store: "ExtractionStore", key: str, mark: int) -> tuple[int, dict] | None:
    """The saved snapshot of ``key``: ``(rows it covers, state)``, the rows at or below ``mark``; None when there
    is none, or it does not read (its arrays are checksummed: a damaged one is ignored, and recomputed)."""
    try:
        group = store.group[f"{GROUP}/{key}"]
        rows, name = int(group.attrs["rows"]), str(group.attrs["snapshot"])
        snap = group[name]
        if not (_intact(dict(group.attrs)) and _intact(dict(snap.attrs))) or int(snap.attrs["rows"]) != rows \
                or rows > mark:
            return None  # edited or torn attributes (counts, bin exponents, the grid): recomputed, never trusted
        arrays = {n: CheckedArray(snap[n], store.location, snap[n].shape[0] if snap[n].ndim else 0)[...]
                  for n in snap.array_keys()}
    except Exception:  # noqa: BLE001 - absent or damaged: the rows are read again instead
        return None
    return rows, {**{k: v for k, v in snap.attrs.items() if k not in ("rows", DIGEST)}, **arrays}


def save(store: "ExtractionStore", key: str, rows: int, acc: FeatureStatsAccumulator, step: int) -> None:
    """Save the state covering rows ``[0, rows)``: a new subgroup written whole, then the pointer to it, then
    the previous one removed (a crash at any point leaves one whole snapshot). ``step``: the grid's block rows,
    kept with it (whoever continues reads the same blocks)."""
    if store.guarded:  # never recreate a store deleted under the job
        store.check_same()
    state = acc.state_dict()
    parent = open_group(store.location, store.storage_options, "a", f"{GROUP}/{key}", zarr_format=3)
    before = parent.attrs.get("snapshot")
    name = f"r{rows}"
    if name == before:
        return
    _write(parent.create_group(name, overwrite=True), state, rows)
    parent.attrs.update(_sealed({"rows": rows, "snapshot": name, "block_rows": step}))
    if before:
        try:
            del parent[before]
        except Exception as exc:  # noqa: BLE001 - a stale snapshot left is harmless: the pointer names the new one
            log.debug("mistudio: stale statistics snapshot %s/%s left: %s", key, before, exc)


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """A snapshot array's chunks: whole rows, about :data:`SNAPSHOT_CHUNK_BYTES` each."""
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return (max(1, min(shape[0], SNAPSHOT_CHUNK_BYTES // max(row, 1))),) + tuple(max(1, n) for n in shape[1:])


def _write(snap: zarr.Group, state: dict, rows: int) -> None:
    for n, value in state.items():
        if isinstance(value, np.ndarray):  # every chunk written: one of fill values would read back as missing
            snap.create_array(n, data=value, chunks=_chunks(value.shape, value.itemsize),
                              config={"write_empty_chunks": True}, **array_codecs(True))
    snap.attrs.update(_sealed({**{k: v for k, v in state.items() if not isinstance(v, np.ndarray)}, "rows": rows}))


def _digest(attrs: dict) -> str:
    plain = json.dumps({k: v for k, v in attrs.items() if k != DIGEST}, sort_keys=True,
                       default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return hashlib.sha256(plain.encode()).hexdigest()[:32]


def _sealed(attrs: dict) -> dict:
    """``attrs`` with a digest of themselves: the arrays of a snapshot are checksummed, and so are its numbers."""
    return {**attrs, DIGEST: _digest(attrs)}


def _intact(attrs: dict) -> bool:
    return attrs.get(DIGEST) == _digest(attrs)


@functools.lru_cache(maxsize=1)
def _snapshot_shapes() -> tuple[dict[str, tuple[tuple, tuple, int]], dict[str, int]]:
    """A snapshot's arrays as {name: (shape of 1 feature, shape of 2, itemsize)} and its metadata files'
    bytes ({path: bytes}, from a snapshot of one feature written the way :func:`save` writes it)."""
    one, two = FeatureStatsAccumulator(1).state_dict(), FeatureStatsAccumulator(2).state_dict()
    arrays = {n: (v.shape, two[n].shape, v.itemsize) for n, v in one.items() if isinstance(v, np.ndarray)}
    with tempfile.TemporaryDirectory() as folder:
        parent = zarr.open_group(store=folder, path="s", mode="w", zarr_format=3)
        parent.attrs.update({"rows": 10**9, "snapshot": "r1000000000", "block_rows": 10**9})
        _write(parent.create_group("r1000000000"), one, 10**9)
        metadata = {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
                    for d, _, names in os.walk(folder) for f in names if f == "zarr.json"}
    return arrays, metadata


def snapshot_bytes(d: int, block: int = 1) -> int:
    """Bytes a saved snapshot of ``d`` features takes on a disk of ``block``-byte blocks (1: the files' own
    bytes): each chunk file (edge chunks full size, with their crc32c) and metadata file rounded up to whole
    blocks (the metadata also consolidated in the store's zarr.json); on a disk, each folder a block (an array's,
    its ``c/``, a 2-D array's chunk rows' ``c/<i>/``)."""
    arrays, metadata = _snapshot_shapes()
    folder = block if block > 1 else 0
    total = sum(whole_blocks(n, block) for n in metadata.values()) + 3 * folder  # the key's group, the snapshot's, statistics/
    total += sum(metadata.values())  # and again in the store's zarr.json (consolidated): bytes of a file counted there
    for one, two, itemsize in arrays.values():
        shape = (one[0] + (two[0] - one[0]) * (d - 1),) + one[1:]
        chunks = _chunks(shape, itemsize)
        per_column = int(np.prod([-(-n // c) for n, c in zip(shape[1:], chunks[1:])], dtype=np.int64))
        rows = max(1, -(-shape[0] // chunks[0]))  # ranges: empty until the first block, then a row or a few
        chunk = itemsize * int(np.prod(chunks, dtype=np.int64)) + 4
        total += rows * per_column * whole_blocks(chunk, block) + 2 * folder + (rows * folder if len(shape) > 1 else 0)
    return total


# -- in the extraction's pass ---------------------------------------------------------------------------------
class StatisticsFeed:
    """Statistics of ``keys`` kept in step with the commit mark: a thread reads each block of the grid once the
    mark passes its end and feeds it to the key's accumulator (on ``device``: the model's, so a GPU run counts
    on the GPU), saving snapshots every :data:`SNAPSHOT_SECONDS`. ``close`` catches up and saves: to the end of
    the rows when the extraction is complete, else to the last grid point under the mark.

    A failure here never fails the extraction: it is logged, and the statistics are computed on first read."""

    def __init__(self, store: "ExtractionStore", keys: list[str], mark: int, device: Any = "cpu"):
        self.store = store
        self.offsets = store.activation_offsets()
        self.accs: dict[str, FeatureStatsAccumulator] = {}
        self.done: dict[str, int] = {}  # rows each accumulator covers
        self.step = {key: block_rows(store, key) for key in keys}
        for key in keys:
            saved = load(store, key, mark)
            if saved is not None:
                try:
                    self.accs[key] = FeatureStatsAccumulator.from_state_dict(saved[1], device=device)
                    self.done[key] = saved[0]
                    continue
                except InputError as exc:  # a state of other parameters: started over
                    log.warning("mistudio: statistics of %s start over: %s", key, exc)
            self.accs[key] = FeatureStatsAccumulator(width(store, key), device=device)
            self.done[key] = 0
        self.mark = mark
        self.saved = dict(self.done)
        self.error: BaseException | None = None
        self._closing: str | None = None  # "finish": catch up first; "stop": at once
        self._last_save = time.monotonic()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="mistudio-statistics", daemon=True)
        self._thread.start()

    def advance(self, mark: int) -> None:
        """The commit mark moved to ``mark``."""
        with self._wake:
            self.mark = mark
            self._wake.notify_all()

    def close(self, complete: bool, save: bool = True) -> None:
        """Stop the thread and save every key's snapshot (with ``save``). When ``complete`` (every row
        committed), first catch up with the mark, the last partial block included; else stop after the block
        being read (a cancel does not wait for the statistics: a resume continues them)."""
        with self._wake:
            self._closing = "finish" if complete else "stop"
            self._wake.notify_all()
        self._thread.join()
        if self.error is not None or not save:
            return
        try:
            if complete:
                for key, acc in self.accs.items():
                    self.done[key] = feed(acc, self.store, key, self.done[key], self.mark, self.mark, self.step[key],
                                          self.offsets)
            self._save_all()
        except Exception as exc:  # noqa: BLE001 - the rows are safe; statistics will be computed on first read
            self._failed(exc)

    def _blocks_ready(self) -> Iterator[tuple[str, int, int]]:
        for key, done in self.done.items():
            stop = done + self.step[key]
            if stop <= self.mark:
                yield key, done, stop

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closing and not any(True for _ in self._blocks_ready()):
                        self._wake.wait(1.0)
                    closing = self._closing
                if closing == "stop":
                    return
                for key, start, stop in list(self._blocks_ready()):
                    self.done[key] = feed(self.accs[key], self.store, key, start, stop, self.mark, self.step[key],
                                          self.offsets)
                if time.monotonic() - self._last_save > SNAPSHOT_SECONDS:
                    self._save_all()
                if closing and not any(True for _ in self._blocks_ready()):
                    return
        except Exception as exc:  # noqa: BLE001 - logged; the extraction goes on
            self._failed(exc)

    def _save_all(self) -> None:
        for key, acc in self.accs.items():
            if self.done[key] != self.saved[key]:
                save(self.store, key, self.done[key], acc, self.step[key])
                self.saved[key] = self.done[key]
        self._last_save = time.monotonic()

    def _failed(self, exc: BaseException) -> None:
        self.error = exc
        log.warning("mistudio: the feature statistics of %s stopped (%s: %s); they will be computed from the "
                    "stored rows when first read", self.store.location, type(exc).__name__, exc)
