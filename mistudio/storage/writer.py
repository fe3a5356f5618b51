"""The store's only writer: a thread that takes rows in stored order, writes them chunk by chunk, and moves the
commit mark over every chunk that is on the disk."""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from ..errors import RETRY_EXTRACTION, MistudioError, StoreLost
from .codec import Geometry, UnitWriter
from .featfeed import StatisticsFeed
from .featindex import FeatureIndex
from .layout import storage_unit
from .reads import CheckedArray
from .stats import HookStats, LatentStats
from .store import ExtractionStore

MAX_PENDING = 3  # writes queued per array before the writer waits (memory: a few chunks per array)


class _Stream:
    """One array's rows on their way to the disk, in row order.

    On a local store in a layout :mod:`.codec` encodes itself, rows go to the disk one chunk at a time: a chunk file,
    or an inner chunk appended to its shard file (flushed to the disk before it counts as written). Elsewhere
    (a remote store) Zarr writes whole units. Writes of one array run one after another on its own thread; arrays
    are written in parallel."""

    def __init__(self, store: ExtractionStore, path: str, start_row: int):
        self.arr = store.array(path)
        self.path = path
        self.location = store.location
        self.folder = os.path.join(store.location, path)  # the array's folder (local stores)
        self.n_rows = int(self.arr.shape[0])
        geometry = Geometry.of(self.arr)
        self.unit_writer = UnitWriter(self.arr, geometry) if geometry is not None else None
        self.step = geometry.chunk_rows if geometry is not None else storage_unit(self.arr)[0]  # rows a write
        self.base = start_row // self.step * self.step  # first row not yet handed to a whole write
        self.pieces: list[np.ndarray] = []  # buffered rows [base, received)
        self.written = self.base  # rows below are on the disk
        self.partial = False  # the last write was a flush's partial chunk: it is written again when complete
        self.pending: deque[tuple[int, Future]] = deque()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mistudio-write-{path}")
        if start_row > self.base:  # the mark cuts a chunk: its committed rows come back, to write it whole
            rows = CheckedArray(self.arr, store.location, start_row)[self.base:start_row]
            self.pieces.append(rows.view(self.arr.dtype))  # as stored (bfloat16's bits as uint16)
        if self.unit_writer is not None:
            self.unit_writer.start(self.base)

    def add(self, rows: np.ndarray) -> None:
        self.pieces.append(rows)

    def submit(self, received: int, flush: bool = False) -> None:
        """Hand every whole chunk below ``received`` to the write thread (and with ``flush`` the partial one)."""
        while received - self.base >= self.step or (received == self.n_rows > self.base) or (
                flush and received > self.base):
            stop = min(self.base + self.step, received, self.n_rows)
            views = self._views(self.base, stop, received)
            whole = stop - self.base == self.step or stop == self.n_rows
            while len(self.pending) >= MAX_PENDING:
                self._take_one()
            self.pending.append((stop, self.executor.submit(self._write, self.base, stop, views, self.partial)))
            self.partial = not whole
            if not whole:  # a flush's partial chunk: its rows stay buffered for the whole write later
                return
            self.pieces = self._views(stop, received, received)
            self.base = stop

    def _views(self, start: int, stop: int, received: int) -> list[np.ndarray]:
        out, pos = [], self.base
        for piece in self.pieces:
            lo, hi = max(start, pos), min(stop, pos + len(piece))
            if lo < hi:
                out.append(piece[lo - pos:hi - pos])
            pos += len(piece)
        return out

    def _write(self, start: int, stop: int, views: list[np.ndarray], again: bool) -> None:
        try:
            self._write_unit(start, stop, views, again)
        except FileNotFoundError as exc:
            if os.path.isdir(self.folder):
                raise
            raise StoreLost(f"the store {self.location} was deleted or moved while its job wrote {self.path} "
                            f"({exc.filename or exc} is gone); what it held is gone: " + RETRY_EXTRACTION) from exc

    def _write_unit(self, start: int, stop: int, views: list[np.ndarray], again: bool) -> None:
        if self.unit_writer is None:
            self.arr[start:stop] = views[0] if len(views) == 1 else np.concatenate(views)
            return
        if again:  # the chunk a flush wrote partially holds committed rows: written whole in a copy
            self.unit_writer.start(start)
        whole = stop - start == self.step or stop == self.n_rows
        self.unit_writer.append(start // self.step, views, final=whole)
        self.unit_writer.sync()

    def _take_one(self) -> None:
        stop, future = self.pending.popleft()
        future.result()
        self.written = max(self.written, stop)

    def harvest(self, wait: bool) -> None:
        """Take finished writes in row order (a failed one raises) and move ``written``."""
        while self.pending and (wait or self.pending[0][1].done()):
            self._take_one()

    def close(self, clean: bool) -> None:
        """End the writes: with ``clean`` the open shard gets its index; else it is left to a resume to rebuild."""
        for _, future in self.pending:  # a later writer must never race a write still running
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - the first error is the one reported
                clean = False
        self.pending.clear()
        if self.unit_writer is not None:
            finish = self.unit_writer.close if clean else self.unit_writer.abandon
            self.executor.submit(finish).result()
        self.executor.shutdown(wait=True)


class ChunkWriter:
    """The store's only writer: a thread that takes rows in stored order and writes them a chunk at a time.

    Rows arrive per batch (``put``), with the batch's statistics. Each array writes each chunk as soon as its rows
    are in (an unsharded array's chunk file, or an inner chunk appended to its shard), on a thread of its own;
    the commit mark then moves to the last batch that ends inside the region every array has on the disk, and
    ``progress.samples_committed``/``tokens_committed`` and the statistics are recorded. So a crash loses at most
    the chunk being filled per array, and "saved" never lags more. ``flush`` (end, cancel, failure) also writes
    the partial last chunk. Everything below the mark is final; a resumed job restarts at it: the committed rows
    of the chunk the mark cuts are read back, so that the chunk is written whole again.

    A batch is taken once the previous one is on the disk (its chunks written and committed), while the model
    computes the next: so the mark trails the rows computed by at most one batch and the chunk being filled.

    Memory: per array, the chunk being filled and a few chunks being written.
    """

    _FLUSH = object()
    _STOP = object()

    def __init__(self, store: ExtractionStore, start_sample: int, statistics: Sequence[str] = (),
                 device: Any = "cpu"):
        self.store = store
        self.offsets = store.activation_offsets()  # rows, not tokens: special tokens may have none
        record = store.record
        self.hook_points = list(record.hook_points)
        mark = int(self.offsets[start_sample])
        paths = [f"activations/{hp}" for hp in self.hook_points]
        paths += [f"latents/{hp}/{name}" for hp in record.latents for name in ("indices", "values")]
        self.streams = {path: _Stream(store, path, mark) for path in paths}
        self.indexes = {hp: FeatureIndex(store, hp, info.d_sae, info.block_rows, mark)
                        for hp, info in record.latents.items()}
        self.n_tokens = next(iter(self.streams.values())).n_rows
        saved = store.meta.get("statistics", {}) if start_sample else {}  # exact up to the commit mark
        self.stats = {hp: {k: saved.get(hp, {}).get(k, v) for k, v in HookStats.empty().items()}
                      for hp in self.hook_points}
        saved = store.meta.get("latent_statistics", {}) if start_sample else {}
        self.latent_stats = {hp: {k: saved.get(hp, {}).get(k, v) for k, v in LatentStats.empty().items()}
                             for hp in record.latents}
        self.feed = StatisticsFeed(store, list(statistics), mark, device) if statistics else None
        self.batches: deque[tuple[int, dict]] = deque()  # (end sample, statistics) of uncommitted batches
        self.committed_sample = self.received_sample = start_sample
        self.received = mark
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._taken = self._given = 0  # batches the writer has finished, batches handed to it
        self._finished = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="mistudio-writer", daemon=True)
        self._thread.start()

    # -- producer side ---------------------------------------------------------------------------
    def put(self, n_samples: int, rows: dict[str, np.ndarray], stats: dict[str, dict]) -> None:
        """Hand over the rows and statistics of the next ``n_samples`` samples, once the previous batch is on the
        disk (blocks while the writer is behind). The writer keeps the arrays until they are written: do not
        change them afterwards."""
        with self._finished:
            while self._taken < self._given and self.error is None and self._thread.is_alive():
                self._finished.wait(0.05)
        self._raise()
        self._given += 1
        self._queue.put((n_samples, (rows, stats)))

    def flush(self) -> None:
        """Write and commit everything queued, including a partial last chunk."""
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
            for stream in self.streams.values():
                stream.close(clean=self.error is None)
            for index in self.indexes.values():
                try:
                    index.close()
                except BaseException as exc:  # noqa: BLE001 - reported like a write
                    self.error = self.error or exc
            if self.feed is not None:  # caught up and saved, unless the store itself failed
                self.feed.close(complete=self.committed_sample == len(self.offsets) - 1, save=self.error is None)
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
                if item is self._FLUSH:
                    payload.set()
            if item is not self._FLUSH:
                with self._finished:
                    self._taken += 1
                    self._finished.notify_all()

    def _append(self, n_samples: int, rows: dict[str, np.ndarray], stats: dict[str, dict]) -> None:
        self.received_sample += n_samples
        self.batches.append((self.received_sample, stats))
        self.received = int(self.offsets[self.received_sample])
        if self.store.guarded:  # never recreate a store deleted under the job
            self.store.check_same()
        for path, stream in self.streams.items():
            stream.add(rows[path])
            stream.submit(self.received)
        for hp, index in self.indexes.items():
            index.add(rows[f"latents/{hp}/indices"], rows[f"latents/{hp}/values"], self.received)
        self._harvest(wait=True)  # this batch's whole chunks on the disk and committed before the next batch

    def _flush(self) -> None:
        """Write the partial chunks too (their rows stay buffered: a later whole write replaces them), commit."""
        if self.store.guarded:
            self.store.check_same()
        for stream in self.streams.values():
            stream.submit(self.received, flush=True)
        for index in self.indexes.values():
            index.add(np.zeros((0, index.width), index.indices_arr.dtype), np.zeros((0, index.width),
                                                                                   index.values_arr.dtype),
                      self.received, flush=True)
        self._harvest(wait=True)

    def _harvest(self, wait: bool) -> None:
        for stream in self.streams.values():
            stream.harvest(wait)
        self._commit()

    def _commit(self) -> None:
        written = min(stream.written for stream in self.streams.values())
        new_sample = self.committed_sample
        while self.batches and self.offsets[self.batches[0][0]] <= written:
            first_row = int(self.offsets[new_sample])  # the batch starts where the previous one ended
            new_sample, stats = self.batches.popleft()
            for hp, acc in self.stats.items():
                HookStats.merge(acc, stats[hp], first_row)
            for hp, acc in self.latent_stats.items():
                LatentStats.merge(acc, stats[f"{hp}.latents"])
        if new_sample == self.committed_sample:
            return
        self.committed_sample = new_sample
        progress = {"samples_committed": new_sample, "tokens_committed": int(self.offsets[new_sample])}
        self.store.update(progress=progress,
                          statistics={hp: HookStats.summary(acc) for hp, acc in self.stats.items()},
                          latent_statistics={hp: LatentStats.summary(acc) for hp, acc in self.latent_stats.items()})
        if self.feed is not None:
            self.feed.advance(progress["tokens_committed"])
