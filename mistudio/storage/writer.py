"""The store's only writer: a thread that takes rows in stored order, writes whole storage units, and moves the
commit mark."""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import MistudioError
from .codec import write_unit
from .layout import storage_unit
from .reads import CheckedArray
from .stats import HookStats
from .store import ExtractionStore

WRITE_WORKERS = max(1, min(4, os.cpu_count() or 1))  # threads writing disjoint storage units at once


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
