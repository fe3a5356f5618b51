"""Training loader: every stored token once per epoch, shuffled, resumable, sharded over DataLoader workers.

The plan of an epoch is a permutation of the stores' chunks (deterministic by ``(seed, epoch)``); a
background thread reads them in that order into free rows of the buffer while the training step runs,
and each batch is drawn at random from the shuffle buffer of ``buffer_tokens`` rows. So the loader holds
at most ``buffer_tokens`` + one chunk rows in the shuffle buffer, plus ``prefetch`` chunks read ahead and
one being written, whatever the store's size; batches move row numbers, never rows, until the gather.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .stats import cached_feature_stats
from ..engine import tensor_of
from ..errors import InputError

if TYPE_CHECKING:
    from ..extraction import Extraction

STORE_SHIFT = 40  # a token id in the buffer is (store << 40) | token index
NORMALIZE = (None, "mean_std", "unit_norm")


class ActivationLoader(IterableDataset):
    """Batches of stored activations for training; see :func:`loader`."""

    def __init__(self, extractions: "Extraction | Sequence[Extraction]", hook_points: str | Sequence[str],
                 batch_size: int = 4096, shuffle: bool = True, seed: int = 0, exclude_special: bool = False,
                 dtype: str = "float32", device: str = "cpu", drop_last: bool = False, num_workers: int = 0,
                 buffer_tokens: int | None = None, normalize: str | None = None, with_index: bool = False,
                 prefetch: int = 2):
        self.extractions = list(extractions) if isinstance(extractions, (list, tuple)) else [extractions]
        self.single = isinstance(hook_points, str)
        self.hook_points = [hook_points] if self.single else list(hook_points)
        if not self.extractions or not self.hook_points:
            raise InputError("the loader needs at least one extraction and one hook point")
        if batch_size < 1 or num_workers < 0 or prefetch < 1:
            raise InputError(f"batch_size and prefetch must be >= 1 and num_workers >= 0 "
                             f"(got {batch_size}, {prefetch}, {num_workers})")
        if normalize not in NORMALIZE:
            raise InputError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise InputError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
        self.widths = {hp: int(self.extractions[0].activations(hp).shape[1]) for hp in self.hook_points}
        for ext in self.extractions[1:]:
            widths = {hp: int(ext.activations(hp).shape[1]) for hp in self.hook_points}
            if widths != self.widths:
                raise InputError(f"extraction {ext.id} has widths {widths}, the first one {self.widths}: "
                                 "stores loaded together need the same hook points and widths")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.dtype, self.device, self.num_workers, self.prefetch = dtype, device, num_workers, prefetch
        self.normalize, self.with_index, self.exclude_special = normalize, with_index, exclude_special
        self.limits = [ext.committed_tokens() for ext in self.extractions]  # a snapshot of the commit marks
        self.chunk_rows = [int(ext.activations(self.hook_points[0]).chunks[0]) for ext in self.extractions]
        self.chunks = np.array([(s, a, min(a + self.chunk_rows[s], limit)) for s, limit in enumerate(self.limits)
                                for a in range(0, limit, self.chunk_rows[s])], dtype=np.int64).reshape(-1, 3)
        self.max_chunk = max(self.chunk_rows)
        default = max(8 * batch_size, 16 * self.max_chunk)
        self.buffer_tokens = max(batch_size, buffer_tokens if buffer_tokens is not None else default)
        self._special = [self._special_source(ext) for ext in self.extractions] if exclude_special else None
        self._norm = [self._norm_factors(ext) for ext in self.extractions] if normalize else None
        self.epoch = 0
        self._spare_pool: dict | None = None
        self._arrays: list[dict] | None = None

    # -- configuration helpers -----------------------------------------------------------------------
    @staticmethod
    def _special_source(ext: "Extraction") -> np.ndarray | str | None:
        """"none" when the store's rows hold no special token (made with ``exclude_special=True``), None when
        the store has ``tokens/special`` (a row per token), else the tokenizer's special ids."""
        tokens = ext.store.group["tokens"]
        if "activation_offsets" in tokens:
            return "none"
        if "special" in tokens:
            return None
        return np.array(sorted(ext.tokenizer.all_special_ids), dtype=np.int64)

    def _norm_factors(self, ext: "Extraction") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{hook point: (shift, scale)}: per-feature when feature_stats are cached, else the scalar statistics."""
        out = {}
        for hp in self.hook_points:
            cached = cached_feature_stats(ext, hp)
            if cached is not None:
                mean, std = cached.mean, cached.std
            else:
                stats = ext.record.statistics.get(hp)
                if stats is None or stats.mean is None:
                    raise InputError(f"extraction {ext.id} has no statistics for {hp} to normalize with")
                mean, std = np.float64(stats.mean), np.float64(stats.std)
            if self.normalize == "mean_std":
                shift, scale = mean, np.where(std > 0, std, 1.0)
            else:  # unit_norm: one factor, so that the mean squared L2 norm of a row is 1
                mean_sq_norm = float(np.sum(std ** 2 + mean ** 2)) * (1 if np.ndim(mean) else self.widths[hp])
                shift, scale = np.float64(0.0), np.float64(np.sqrt(mean_sq_norm) or 1.0)
            out[hp] = (np.asarray(shift, np.float32), np.asarray(scale, np.float32))
        return out

    # -- reading -------------------------------------------------------------------------------------
    def read(self, store: int, start: int, stop: int, keep_special: bool = False) -> tuple[np.ndarray, dict]:
        """Rows ``[start, stop)`` of one store: (buffer ids, {hook point: rows}), filtered and normalized."""
        ext = self.extractions[store]
        if self._arrays is None:  # ext.activations(hp) once per store and hook point, not per chunk
            self._arrays = [{hp: e.activations(hp) for hp in self.hook_points} for e in self.extractions]
        rows = {hp: array[start:stop] for hp, array in self._arrays[store].items()}
        ids = np.arange(start, stop, dtype=np.int64) | (store << STORE_SHIFT)
        if self._special is not None and not keep_special and not isinstance(self._special[store], str):
            group = ext.store.group["tokens"]
            special = self._special[store]
            mask = group["special"][start:stop].astype(bool) if special is None else \
                np.isin(group["input_ids"][start:stop], special)
            if mask.any():
                ids, rows = ids[~mask], {hp: r[~mask] for hp, r in rows.items()}
        if self._norm is not None:
            rows = {hp: (r.astype(np.float32) - self._norm[store][hp][0]) / self._norm[store][hp][1]
                    for hp, r in rows.items()}
        return ids, rows

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter()`` plays (then it counts on: e, e+1, ...)."""
        self.epoch = int(epoch)

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator:
        epoch, self.epoch = self.epoch, self.epoch + 1
        info = get_worker_info()
        if info is None and self.num_workers > 0:
            return _WorkerPool(self, epoch)
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return LoaderIterator(self, epoch, worker, n_workers, to_device=info is None)

    # Stores are reopened by location in a spawned worker (a forked one inherits them).
    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_spare_pool": None, "_arrays": None}
        state["extractions"] = [(type(ext), ext.location, ext.store.storage_options) for ext in self.extractions]
        return state

    def __setstate__(self, state: dict) -> None:
        state["extractions"] = [cls.open(loc, opts) for cls, loc, opts in state["extractions"]]
        self.__dict__.update(state)


class _FreeRows:
    """The buffer's unused rows: the reader thread takes some for each chunk, the consumer gives them back."""

    def __init__(self, capacity: int):
        self.rows, self.count = np.arange(capacity), capacity
        self.cond = threading.Condition()

    def take(self, k: int, stop: threading.Event) -> np.ndarray | None:
        with self.cond:
            while self.count < k:
                if stop.is_set():
                    return None
                self.cond.wait(0.1)
            self.count -= k
            return self.rows[self.count:self.count + k].copy()

    def give(self, rows: np.ndarray) -> None:
        with self.cond:
            self.rows[self.count:self.count + len(rows)] = rows
            self.count += len(rows)
            self.cond.notify()


def _read_ahead(loader: ActivationLoader, chunks: np.ndarray, pool: dict, pool_ids: np.ndarray, free: _FreeRows,
                out: queue.Queue, stop: threading.Event) -> None:
    """Background thread: read ``chunks`` in order into free buffer rows, and hand each chunk's rows to ``out``."""
    for s, a, b in chunks:
        try:
            ids, rows = loader.read(int(s), int(a), int(b))
            item: Any = free.take(len(ids), stop)
            if item is None:
                return
            pool_ids[item] = ids
            for hp, r in rows.items():
                pool[hp][item] = r
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer
            item = exc
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if stop.is_set() or isinstance(item, BaseException):
            return


class LoaderIterator:
    """One epoch of one worker's share. ``state_dict()`` / ``load_state_dict()`` resume it identically."""

    def __init__(self, loader: ActivationLoader, epoch: int, worker: int = 0, n_workers: int = 1,
                 to_device: bool = True):
        self.loader, self.to_device = loader, to_device
        self.torch_dtype = getattr(torch, loader.dtype)
        self.threshold = loader.buffer_tokens if loader.shuffle else loader.batch_size
        # the consumer holds < threshold + 1 chunk rows; the reader up to prefetch + 1 chunks more
        self.capacity = self.threshold + (loader.prefetch + 2) * loader.max_chunk
        pool_dtype = np.float32 if loader.normalize else None
        shapes = {hp: ((self.capacity, d), pool_dtype or np.result_type(*(e.activations(hp).dtype
                                                                          for e in loader.extractions)))
                  for hp, d in loader.widths.items()}
        spare = loader._spare_pool  # the last finished epoch's buffer: already in memory, no page faults
        loader._spare_pool = None
        if spare is None or {hp: (a.shape, a.dtype) for hp, a in spare.items()} != shapes:
            spare = {hp: np.empty(shape, dtype) for hp, (shape, dtype) in shapes.items()}
        self.pool = spare
        self.pool_ids = np.empty(self.capacity, np.int64)
        # Rows stay where the reader wrote them; ``live[:n]`` lists the shuffle buffer's rows in buffer
        # order, so taking a batch moves 8-byte row numbers, never rows.
        self.live = np.empty(self.capacity, np.int64)
        self.peak_rows = 0  # the most rows the shuffle buffer ever held
        self._thread: threading.Thread | None = None
        self._plan(epoch, worker, n_workers)

    def _plan(self, epoch: int, worker: int, n_workers: int) -> None:
        self._stop_reader()
        self.epoch, self.worker, self.n_workers = epoch, worker, n_workers
        loader = self.loader
        order = np.random.default_rng([loader.seed, epoch]).permutation(loader.n_chunks) if loader.shuffle \
            else np.arange(loader.n_chunks)
        self.my_chunks = order[worker::n_workers]
        self.rng = np.random.default_rng([loader.seed, epoch, worker, 1])  # draws batches from the buffer
        self.next_chunk = 0  # chunks of my_chunks already in the buffer
        self.n = 0
        self.free = _FreeRows(self.capacity)
        self.batches = 0

    # -- reader thread -------------------------------------------------------------------------------
    def _start_reader(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.loader.prefetch)
        self._stop = threading.Event()
        chunks = self.loader.chunks[self.my_chunks[self.next_chunk:]]
        self._thread = threading.Thread(target=_read_ahead, args=(self.loader, chunks, self.pool, self.pool_ids,
                                                                  self.free, self._queue, self._stop),
                                        daemon=True, name="mistudio-loader")
        self._thread.start()

    def _stop_reader(self, wait: bool = True) -> None:
        if self._thread is not None:
            self._stop.set()
            if wait:  # it may be writing buffer rows: let it finish before they are reused
                self._thread.join()
            self._thread = None

    def _release(self) -> None:
        """End of epoch: stop reading and hand the buffer to the loader's next epoch."""
        self._stop_reader()
        if self.pool is not None:
            self.loader._spare_pool, self.pool = self.pool, None

    def close(self) -> None:
        """Stop reading ahead (also done when the iterator is garbage collected)."""
        self._stop_reader()

    def __del__(self) -> None:
        self._stop_reader(wait=False)

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self):
        while True:
            exhausted = self.next_chunk >= len(self.my_chunks)
            if self.n >= self.threshold or (exhausted and self.n and not (self.drop and self.n < self.bs)):
                return self._emit(min(self.loader.batch_size, self.n))
            if exhausted:
                self._release()
                raise StopIteration
            if self._thread is None:
                self._start_reader()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._stop_reader()
                raise item
            self._add(item)
            self.next_chunk += 1

    @property
    def bs(self) -> int:
        return self.loader.batch_size

    @property
    def drop(self) -> bool:
        return self.loader.drop_last

    def _add(self, rows: np.ndarray) -> None:
        """A chunk's buffer rows (written by the reader) join the shuffle buffer."""
        self.live[self.n:self.n + len(rows)] = rows
        self.n += len(rows)
        self.peak_rows = max(self.peak_rows, self.n)

    def _emit(self, take: int):
        n = self.n
        idx = self.rng.choice(n, size=take, replace=False) if self.loader.shuffle else np.arange(take)
        taken = self.live[idx]
        out = {hp: p[taken] for hp, p in self.pool.items()}
        ids = self.pool_ids[taken]
        if self.loader.shuffle:  # fill the holes below n - take with the tail rows not taken
            tail = np.arange(n - take, n)
            holes, fill = idx[idx < n - take], tail[~np.isin(tail, idx)]
        else:  # keep stored order: shift the rest down
            holes, fill = slice(0, n - take), slice(take, n)
        self.live[holes] = self.live[fill]
        self.n = n - take
        self.free.give(taken)
        self.batches += 1
        return self._to_batch(ids, out)

    def _to_batch(self, ids: np.ndarray, rows: dict[str, np.ndarray]):
        device = self.loader.device if self.to_device else "cpu"
        tensors = {hp: tensor_of(r).to(device=device, dtype=self.torch_dtype) for hp, r in rows.items()}
        if self.loader.with_index:
            tensors["store"] = torch.from_numpy(ids >> STORE_SHIFT)
            tensors["token_index"] = torch.from_numpy(ids & ((1 << STORE_SHIFT) - 1))
            return tensors
        return tensors[self.loader.hook_points[0]] if self.loader.single else tensors

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where this epoch stands: plan, buffer (as token ids), batch RNG. Small: 8 bytes per buffered row."""
        return {"epoch": self.epoch, "worker": self.worker, "n_workers": self.n_workers, "seed": self.loader.seed,
                "limits": list(self.loader.limits), "next_chunk": self.next_chunk, "batches": self.batches,
                "buffer_ids": self.pool_ids[self.live[:self.n]], "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (same stores, commit marks, seed and settings)."""
        if state["seed"] != self.loader.seed or list(state["limits"]) != list(self.loader.limits):
            raise InputError("this state was taken with another seed or other commit marks: make the loader with "
                             f"seed={state['seed']} over stores committed to {state['limits']}")
        self._plan(state["epoch"], state["worker"], state["n_workers"])
        self.loader.epoch = max(self.loader.epoch, state["epoch"] + 1)
        self.next_chunk, self.batches = int(state["next_chunk"]), int(state["batches"])
        self.rng.bit_generator.state = state["rng"]
        ids = np.asarray(state["buffer_ids"], dtype=np.int64)
        rows_at = self.free.take(len(ids), threading.Event())
        self._add(rows_at)
        self.pool_ids[rows_at] = ids
        store, token = ids >> STORE_SHIFT, ids & ((1 << STORE_SHIFT) - 1)
        for s in np.unique(store).tolist():  # re-read the buffered rows, one chunk at a time
            rows = self.loader.chunk_rows[s]
            for c in np.unique(token[store == s] // rows).tolist():
                where = np.flatnonzero((store == s) & (token // rows == c))
                a, b = c * rows, min(c * rows + rows, self.loader.limits[s])
                _, got = self.loader.read(s, a, b, keep_special=True)
                for hp in self.pool:
                    self.pool[hp][rows_at[where]] = got[hp][token[where] - a]


class _WorkerPool:
    """One epoch over ``num_workers`` DataLoader worker processes, each reading its own chunks."""

    def __init__(self, loader: ActivationLoader, epoch: int):
        worker_copy = copy.copy(loader)
        worker_copy.num_workers, worker_copy.epoch, worker_copy._spare_pool = 0, epoch, None
        self.device = loader.device
        self._it = iter(DataLoader(worker_copy, batch_size=None, num_workers=loader.num_workers,
                                   pin_memory=str(loader.device).startswith("cuda")))

    def __iter__(self) -> "_WorkerPool":
        return self

    def __next__(self):
        batch = next(self._it)
        if isinstance(batch, dict):
            return {k: v.to(self.device) if k not in ("store", "token_index") else v for k, v in batch.items()}
        return batch.to(self.device)

    def state_dict(self) -> dict:
        raise NotImplementedError("resume works with num_workers=0: the loader's own background thread already "
                                  "reads ahead, so workers are rarely needed")


def loader(extractions: "Extraction | Sequence[Extraction]", hook_points: str | Sequence[str],
           batch_size: int = 4096, shuffle: bool = True, seed: int = 0, exclude_special: bool = False,
           dtype: str = "float32", device: str = "cpu", drop_last: bool = False, num_workers: int = 0,
           buffer_tokens: int | None = None, normalize: str | None = None, with_index: bool = False,
           prefetch: int = 2) -> ActivationLoader:
    """A training loader over one or several extractions (same hook points and widths).

    Yields ``(batch, d)`` tensors for one hook point, dicts {hook point: tensor} for a list (plus
    ``store`` and ``token_index`` with ``with_index=True``). Every committed token exactly once per
    epoch; order fixed by ``(seed, epoch)``: each ``iter()`` plays the next epoch, ``set_epoch(e)``
    picks one. With ``shuffle``, chunk order is permuted and batches are drawn at random from a buffer
    of ``buffer_tokens`` rows (default: max(8 batches, 16 chunks)). ``exclude_special`` drops the
    tokenizer's special tokens (``tokens/special`` when the store has it). ``normalize``:
    ``"mean_std"`` = (x - mean) / std, per feature when :meth:`Extraction.feature_stats` is cached in
    the store, else the scalar statistics in the metadata; ``"unit_norm"`` = x divided by one
    dataset-wide factor so that the mean squared L2 norm of a row is 1. ``num_workers > 0`` reads in
    DataLoader worker processes, each with its own chunks (no state_dict then). In your own
    ``DataLoader(loader, batch_size=None, ...)`` call ``set_epoch`` every epoch. In-progress stores
    are read up to their commit mark when the loader is made.
    """
    return ActivationLoader(extractions, hook_points, batch_size=batch_size, shuffle=shuffle, seed=seed,
                            exclude_special=exclude_special, dtype=dtype, device=device, drop_last=drop_last,
                            num_workers=num_workers, buffer_tokens=buffer_tokens, normalize=normalize,
                            with_index=with_index, prefetch=prefetch)
