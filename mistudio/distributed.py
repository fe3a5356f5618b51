"""Sharded extraction: contiguous sample shards, one model replica per worker, one Zarr store.

A shard's whole storage units (Zarr chunks, or Zarr shards) are written by the worker that runs it; the
rows of units that straddle a shard boundary come back to the coordinator, which writes them (so no
unit ever has two writers). With SAEs, each worker loads them beside its model replica, encodes in the same
forward, and writes the latents' units the same way and the by-feature index of the blocks that lie wholly in
its shard (a block's index is units of its own); the coordinator indexes the blocks that straddle shards once
their rows are in, merges the shards' hook and latent statistics, and keeps the feature statistics in step with
the committed prefix of shards (a ``StatisticsFeed``, as a local run keeps them in step with its commit mark).
Shards run on a ``dask.distributed`` client, or one after another in this process (a resume
without a cluster). A finished shard is recorded in the metadata and never runs again.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Callable

import numpy as np

from .engine import Latents, check_ids, forward_batches
from .errors import JobCancelled
from .models import load_model
from .plan import latents_fired, load_saes
from .request import Request
from .saes import SAE
from .storage.featfeed import StatisticsFeed
from .storage.featindex import FeatureIndex
from .storage.layout import latent_index_dtype, storage_unit
from .storage.codec import Damaged, Geometry, check_recorded, record_chunks
from .storage.files import fsync_dir, sync_data
from .storage.positions import ChunkRecords
from .storage.reads import CheckedArray
from .storage.stats import HookStats, LatentStats
from .storage.store import ExtractionStore

_REPLICAS: dict[str, Any] = {}  # one loaded model per worker process
_SAES: dict[tuple[str, str], SAE] = {}  # its SAEs, beside it: (hook point, folder) -> the SAE on its device

log = logging.getLogger("mistudio")


def replica(request: Request):
    """This process's model replica of ``request``'s model (loaded once; another model replaces it)."""
    key = request.model_spec.model_dump_json()
    if key not in _REPLICAS:
        _REPLICAS.clear()
        _SAES.clear()
        _REPLICAS[key] = load_model(request.model_spec)
    return _REPLICAS[key]


def replica_saes(request: Request, loaded, recorded: dict | None = None) -> dict[str, SAE]:
    """``request``'s SAEs on the replica's device, loaded once per process; with ``recorded`` (the store's
    ``latents``) each must be the one the store was made with (``load_saes`` refuses another, as a local run)."""
    out = {}
    for point, folder in (request.saes or {}).items():
        held, was = _SAES.get((point, folder)), (recorded or {}).get(point)
        if held is None or (was is not None and was.fingerprint and was.fingerprint != held.fingerprint):
            held = load_saes(request.model_copy(update={"saes": {point: folder}}), loaded.input_device,
                             recorded)[point]
            _SAES[(point, folder)] = held
        out[point] = held
    for key in [key for key in _SAES if key not in set((request.saes or {}).items())]:
        del _SAES[key]  # SAEs of earlier requests are let go: one set per process, beside the model
    return out


def measure_latents(request: dict, ids: np.ndarray, offsets: np.ndarray,
                    points: list[str]) -> dict[str, np.ndarray]:
    """On a worker: how many latents of each SAE in ``points`` fired on each token of the first batch (the probe
    ``plan.latent_widths`` makes of ReLU, JumpReLU and gated SAEs), with the worker's replicas."""
    req = Request(**request)
    loaded = replica(req)
    return latents_fired(loaded, replica_saes(req, loaded), req, ids, offsets, points)


def measure_on(client, job_id: str, check: Callable[[], None]) -> Callable[..., dict[str, np.ndarray]]:
    """A ``measure`` for ``plan.latent_widths`` that runs the probe as one task on ``client`` (the coordinator
    never loads the model), calling ``check()`` while it waits (cancel, timeout)."""
    def measure(request: Request, ids: np.ndarray, offsets: np.ndarray, points: list[str]) -> dict[str, np.ndarray]:
        future = client.submit(measure_latents, request.model_dump(exclude={"dataset"}), ids, offsets, points,
                               key=f"mistudio-{job_id}-latent-widths-{uuid.uuid4().hex[:8]}", pure=False)
        try:
            while not future.done():
                check()
                time.sleep(0.05)
        except BaseException:
            future.cancel()
            raise
        return future.result()
    return measure


def plan_shards(offsets: np.ndarray, n_shards: int) -> list[dict]:
    """Contiguous sample ranges of about equal token counts."""
    n_samples, total = len(offsets) - 1, int(offsets[-1])
    cuts = {0, n_samples}
    for k in range(1, n_shards):
        cuts.add(int(np.searchsorted(offsets, k * total / n_shards)))
    cuts = sorted(c for c in cuts if 0 <= c <= n_samples)
    return [{"index": i, "first": a, "stop": b, "tokens": [int(offsets[a]), int(offsets[b])], "status": "pending",
             "runs": 0} for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


class _Rows:
    """One array's rows of a shard: its whole storage units written, the straddling rows kept as edges."""

    def __init__(self, arr: Any, unit: int, start: int, stop: int):
        self.arr, self.unit = arr, unit
        lo, hi = -(-start // unit) * unit, stop // unit * unit
        self.lo, self.hi = (lo, hi) if lo < hi else (stop, stop)
        self.pos = start
        self.buffer: np.ndarray | None = None
        self.edges: list[tuple[int, np.ndarray]] = []

    def put(self, block: np.ndarray) -> None:
        self.buffer = block if self.buffer is None or not len(self.buffer) else np.concatenate([self.buffer, block])
        end = self.pos + len(self.buffer)
        while self.pos < end:
            if self.pos < self.lo:  # head edge
                cut = min(self.lo, end)
            elif self.pos < self.hi:  # whole units
                cut = min(self.hi, end // self.unit * self.unit)
                if cut <= self.pos:
                    break
            else:  # tail edge
                cut = end
            part, self.buffer = self.buffer[: cut - self.pos], self.buffer[cut - self.pos:]
            if self.lo <= self.pos < self.hi:
                self.arr[self.pos:cut] = part
            else:
                self.edges.append((self.pos, part))
            self.pos = cut


class ShardWriter:
    """Writes the whole storage units inside a shard's row range, each array on its own unit grid (activations,
    SAE latents); keeps the straddling rows as edges, for the coordinator. ``units``: rows per unit of each array
    (default: its Zarr shard, else its chunk)."""

    def __init__(self, arrays: dict, start: int, stop: int, units: dict[str, int] | None = None):
        units = units or {path: storage_unit(arr)[0] for path, arr in arrays.items()}
        self.rows = {path: _Rows(arr, units[path], start, stop) for path, arr in arrays.items()}

    @property
    def pos(self) -> int:
        """Rows placed (written or kept as edges) in every array."""
        return min(r.pos for r in self.rows.values())

    @property
    def edges(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        return {path: r.edges for path, r in self.rows.items()}

    def put(self, rows: dict[str, np.ndarray]) -> None:
        for path, block in rows.items():
            self.rows[path].put(block)


def write_block_index(store: ExtractionStore, hook_point: str, info: Any, block: int, index: np.ndarray,
                      values: np.ndarray) -> None:
    """Write the by-feature index of one block of ``hook_point``'s latents from its rows (as stored): its
    entries (one Zarr shard per block), then its ``feature_offsets`` row (a chunk per block), last, as
    ``FeatureIndex`` does. Each block's index is its own storage units: whoever holds its rows writes it."""
    base = f"latents/{hook_point}"
    offsets_arr, rows_arr, values_arr = (store.array(f"{base}/{n}") for n in
                                         ("feature_offsets", "feature_rows", "feature_values"))
    offsets, rows, vals = FeatureIndex.build(index, values, block, info.block_rows, info.width, info.d_sae,
                                             values_arr.dtype)
    entries = info.block_rows * info.width
    rows_arr[block * entries:(block + 1) * entries] = rows
    values_arr[block * entries:(block + 1) * entries] = vals
    offsets_arr[block] = offsets


class BlockIndexer:
    """A shard's share of one SAE's by-feature index: the blocks that lie wholly inside its rows ``[start,
    stop)``, each written once its rows are in. A block that straddles two shards is the coordinator's."""

    def __init__(self, store: ExtractionStore, hook_point: str, info: Any, n_rows: int, start: int, stop: int):
        self.store, self.hook_point, self.info = store, hook_point, info
        step = info.block_rows
        self.block = -(-start // step)  # the first block starting in the shard
        self.end = -(-n_rows // step) if stop >= n_rows else stop // step  # blocks before it end in the shard
        self.pos, self.n_rows = start, n_rows
        self.pieces: list[tuple[np.ndarray, np.ndarray]] = []

    def put(self, index: np.ndarray, values: np.ndarray) -> None:
        step = self.info.block_rows
        skip = max(0, min(len(index), self.block * step - self.pos))  # rows before the first whole block
        self.pos += len(index)
        if skip < len(index):
            self.pieces.append((index[skip:], values[skip:]))
        while self.block < self.end:
            first, stop = self.block * step, min((self.block + 1) * step, self.n_rows)
            if self.pos < stop:
                return
            index, values = (np.concatenate([p[i] for p in self.pieces]) for i in (0, 1))
            write_block_index(self.store, self.hook_point, self.info, self.block, index[:stop - first],
                              values[:stop - first])
            self.pieces = [(index[stop - first:], values[stop - first:])]
            self.block += 1


def straddling_blocks(info: Any, shards: list[dict], n_rows: int) -> dict[int, list[int]]:
    """The blocks of an SAE's index that no shard holds whole: block -> the shards whose rows it takes."""
    step, out = info.block_rows, {}
    for shard in shards:
        start, stop = shard["tokens"]
        for block in range(start // step, -(-stop // step)):
            first, last = block * step, min((block + 1) * step, n_rows)
            if first < start or last > stop:
                out.setdefault(block, []).append(shard["index"])
    return out


def run_shard(location: str, storage_options: dict | None, request: dict, shard: dict, job_id: str,
              before_batch: Callable | None = None, on_batch: Callable[[int], None] | None = None,
              check: Callable[[], None] | None = None) -> dict:
    """Extract one shard into the store (activations, SAE latents and the by-feature index of the blocks it
    holds whole); return its edge rows and statistics. Runs on a worker or here."""
    capture_spec = Request(**request)  # the request without its dataset: the tokens are in the store
    loaded = replica(capture_spec)
    if check is None and on_batch is None:  # on a dask worker: cancel and progress through the scheduler
        from distributed import Event, Queue

        cancel, progress_queue = Event(f"mistudio-cancel-{job_id}"), Queue(f"mistudio-progress-{job_id}")

        def check() -> None:
            if cancel.is_set():
                raise JobCancelled("cancelled by the user")

        def on_batch(samples: int) -> None:
            progress_queue.put((shard["index"], samples))
    store = ExtractionStore.open(location, storage_options=storage_options, writable=True)
    record = store.record
    ids, offsets = store.input_ids(), store.sample_offsets()
    check_ids(ids, loaded)
    saes = replica_saes(capture_spec, loaded, record.latents) if record.latents else {}
    latents = {hp: Latents(saes[hp], info.width, latent_index_dtype(info.d_sae))
               for hp, info in record.latents.items()}
    paths = [f"activations/{hp}" for hp in capture_spec.hook_points]
    paths += [f"latents/{hp}/{name}" for hp in latents for name in ("indices", "values")]
    start, stop = shard["tokens"]
    writer = ShardWriter({path: store.array(path) for path in paths}, start, stop)
    n_rows = int(offsets[-1])
    indexers = {hp: BlockIndexer(store, hp, info, n_rows, start, stop) for hp, info in record.latents.items()}
    stats = {hp: HookStats.empty() for hp in capture_spec.hook_points}
    latent_stats = {hp: LatentStats.empty() for hp in latents}
    started = time.perf_counter()
    try:
        _extract_shard(loaded, ids, offsets, capture_spec, shard, check, before_batch, latents, writer, indexers,
                       stats, latent_stats, on_batch)
    except JobCancelled:  # an answer, not a failure: the shard stays to do (no worker traceback in the logs)
        return {"index": shard["index"], "cancelled": True}
    assert writer.pos == stop, "shard rows were not all placed"
    plain = {hp: HookStats.plain(acc) for hp, acc in stats.items()}  # kept in the store's metadata (JSON)
    return {"index": shard["index"], "edges": writer.edges, "stats": plain, "latent_stats": latent_stats,
            "seconds": time.perf_counter() - started}


def _extract_shard(loaded, ids, offsets, capture_spec: Request, shard: dict, check, before_batch, latents: dict,
                   writer: ShardWriter, indexers: dict, stats: dict, latent_stats: dict, on_batch) -> None:
    """The batches of one shard into its writer, its SAE indexers and its statistics."""
    for first, stop_sample, rows, batch_stats in forward_batches(loaded, ids, offsets, capture_spec,
                                                                 shard["first"], shard["stop"], check,
                                                                 before_batch, latents=latents):
        writer.put(rows)
        for hp, indexer in indexers.items():
            indexer.put(rows[f"latents/{hp}/indices"], rows[f"latents/{hp}/values"])
        for hp, acc in stats.items():
            HookStats.merge(acc, batch_stats[hp], int(offsets[first]))  # rows are tokens (no exclude_special)
        for hp, acc in latent_stats.items():
            LatentStats.merge(acc, batch_stats[f"{hp}.latents"])
        if on_batch is not None:
            on_batch(stop_sample - first)


class ShardedRun:
    """The coordinator: plans or reloads shards, runs the pending ones, writes edges, records progress."""

    def __init__(self, store: ExtractionStore, request: Request, job_id: str,
                 check: Callable[[], None], progress: Callable[[dict], None], n_shards: int,
                 before_batch: Callable | None = None):
        self.store, self.request, self.job_id = store, request, job_id
        self.check, self.progress, self.before_batch = check, progress, before_batch
        self.offsets = store.sample_offsets()
        meta = store.meta
        self.shards = meta.get("shards") or plan_shards(self.offsets, n_shards)
        for shard in self.shards:
            if shard["status"] != "done" or not self._own_chunks(shard):
                shard["status"] = "pending"
        self.store.update(shards=self.shards)
        self.samples_done = sum(s["stop"] - s["first"] for s in self.shards if s["status"] == "done")
        self.started = time.perf_counter()
        self.tokens_at_start = sum(s["tokens"][1] - s["tokens"][0] for s in self.shards if s["status"] == "done")
        self.feed: StatisticsFeed | None = None

    def _own_chunks(self, shard: dict) -> bool:
        """Whether a shard finished in an earlier run still holds, above the commit mark (below it the resume has
        checked already), the chunks recorded for its rows: one whose files were moved, lost or replaced since is
        run again rather than trusted. Checks the chunks wholly inside its rows (4 bytes read a chunk)."""
        lo, hi = shard["tokens"]
        if hi <= self.store.record.committed_tokens():
            return True
        for path in self._arrays_of_rows():
            records = ChunkRecords.of(Geometry.of(self.store.array(path)))
            if records is None:
                continue
            try:
                check_recorded(records, hi, -(-lo // records.g.chunk_rows))
            except Damaged as exc:
                log.warning("mistudio: shard %s of %s is run again: %s %s", shard["index"], self.store.location,
                            path, exc.what)
                return False
        return True

    def _args(self, shard: dict) -> tuple:
        return (self.store.location, self.store.storage_options, self.request.model_dump(exclude={"dataset"}),
                shard, self.job_id, self.before_batch)

    def _advance(self, samples: int) -> None:
        self.samples_done += samples
        total = len(self.offsets) - 1
        done_tokens = int(self.offsets[min(self.samples_done, total)])  # approximate: shards finish out of order
        elapsed = time.perf_counter() - self.started
        rate = max(0, done_tokens - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0
        self.progress({"samples_done": self.samples_done, "samples_total": total, "tokens_done": done_tokens,
                       "tokens_total": int(self.offsets[-1]), "tokens_per_s": rate,
                       "eta_s": (int(self.offsets[-1]) - done_tokens) / rate if rate else None,
                       "batch_size": self.request.batch_size, "shards": len(self.shards)})

    def _finish(self, result: dict) -> None:
        """Write a finished shard's edge rows (this process is their only writer), the by-feature index of the
        blocks it completes with its neighbours, and record it."""
        for path, pieces in result["edges"].items():
            arr = self.store.array(path)
            for start, rows in pieces:
                arr[start:start + len(rows)] = rows
        shard = self.shards[result["index"]]
        self._sync_rows(*shard["tokens"])
        shard.update(status="done", stats=result["stats"], latent_stats=result.get("latent_stats") or {},
                     seconds=result["seconds"])
        self._record_chunks(shard)
        self._index_straddling({result["index"]})
        prefix = 0
        for s in self.shards:
            if s["status"] != "done":
                break
            prefix = s["stop"]
        done = [s for s in self.shards if s["status"] == "done"]
        totals = {hp: HookStats.empty() for hp in result["stats"]}
        latent_totals = {hp: LatentStats.empty() for hp in self.store.record.latents}
        for s in done:
            for hp, acc in (s.get("stats") or {}).items():
                HookStats.merge(totals[hp], acc)
            for hp, acc in (s.get("latent_stats") or {}).items():
                LatentStats.merge(latent_totals[hp], acc)
        sections = {"latent_statistics": {hp: LatentStats.summary(a) for hp, a in latent_totals.items()}} \
            if latent_totals else {}
        self.store.update(shards=self.shards, statistics={hp: HookStats.summary(a) for hp, a in totals.items()},
                          progress={"samples_committed": prefix, "tokens_committed": int(self.offsets[prefix])},
                          **sections)
        if self.feed is not None:
            self.feed.advance(int(self.offsets[prefix]))

    def _arrays_of_rows(self) -> list[str]:
        """The arrays a shard writes rows of: every hook point's activations, and its SAE latents."""
        record = self.store.record
        return [f"activations/{hp}" for hp in record.hook_points] + \
            [f"latents/{hp}/{name}" for hp in record.latents for name in ("indices", "values")]

    def _sync_rows(self, lo: int, hi: int) -> None:
        """Flush to the disk every unit file holding rows ``[lo, hi)`` (a worker wrote them through Zarr, which
        does not flush; the edge rows this process just wrote too) and the folders their names are in, before the
        commit mark may move over them: a power cut then loses no committed row, as with the local writer. A
        remote store's writes are durable when they return."""
        for path in self._arrays_of_rows():
            g = Geometry.of(self.store.array(path))
            if g is None:
                continue
            folders = {str(g.root)}
            for unit in range(lo // g.unit_rows, -(-hi // g.unit_rows)):
                file = g.unit_file(unit)
                fd = os.open(file, os.O_RDONLY)
                try:
                    sync_data(fd)
                finally:
                    os.close(fd)
                folders.update(str(folder) for folder in file.parents if g.root in folder.parents)
            for folder in sorted(folders, key=len, reverse=True):  # deepest first: a new folder's entry after it
                fsync_dir(folder)

    def _record_chunks(self, shard: dict) -> None:
        """Write the chunk records (a store that keeps them) of the chunks whose rows are all written now that
        ``shard`` is done (its rows, joined with those of the done shards next to it), before anything reads them."""
        lo, hi = shard["tokens"]
        done = [s["tokens"] for s in self.shards if s["status"] == "done"]
        ends, starts = {b: a for a, b in done}, {a: b for a, b in done}
        first, stop = lo, hi
        while first in ends and ends[first] < first:
            first = ends[first]
        while stop in starts and starts[stop] > stop:
            stop = starts[stop]
        for path in self._arrays_of_rows():
            records = ChunkRecords.of(Geometry.of(self.store.array(path)))
            if records is not None:
                step = records.g.chunk_rows
                record_chunks(records, max(-(-first // step), lo // step), min(records.final(stop), -(-hi // step)),
                              stop)

    def _index_straddling(self, finished: set[int] | None = None) -> None:
        """Index the blocks of SAE latents that straddle shards once every shard they take rows from is done
        (their rows are edges, written here): those that ``finished`` shards complete, or all (a resume: the
        coordinator may have stopped between a shard's edges and their index)."""
        n_rows = int(self.offsets[-1])
        status = {s["index"]: s["status"] for s in self.shards}
        for hp, info in self.store.record.latents.items():
            indices, values = (self.store.array(f"latents/{hp}/{n}") for n in ("indices", "values"))
            for block, owners in straddling_blocks(info, self.shards, n_rows).items():
                if all(status[i] == "done" for i in owners) and (finished is None or finished & set(owners)):
                    first, stop = block * info.block_rows, min((block + 1) * info.block_rows, n_rows)
                    rows = [CheckedArray(arr, self.store.location, stop)[first:stop].view(arr.dtype)
                            for arr in (indices, values)]
                    write_block_index(self.store, hp, info, block, *rows)

    def run(self, client=None) -> dict:
        """Run the pending shards (on ``client``, else here, one after another); the feature statistics follow
        the committed prefix on a thread here, as a local run's follow its commit mark (the same blocks, in the
        same order: the same numbers)."""
        pending = [s for s in self.shards if s["status"] != "done"]
        for shard in pending:
            shard["runs"] = shard.get("runs", 0) + 1
        self.store.update(shards=self.shards)
        self._index_straddling()
        points = self.request.statistics_points
        mark = int(self.store.record.progress.tokens_committed)
        self.feed = StatisticsFeed(self.store, points, mark) if points else None
        try:
            errors = self._run_on(client, pending) if client is not None else self._run_here(pending)
        finally:
            if self.feed is not None:
                self.feed.close(complete=all(s["status"] == "done" for s in self.shards))
        if errors:
            raise next((e for e in errors if isinstance(e, JobCancelled)), errors[0])
        elapsed = time.perf_counter() - self.started
        tokens = int(self.offsets[-1]) - self.tokens_at_start
        return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0}

    def _cancelled(self, shard: dict) -> list[BaseException]:
        """A shard stopped by a cancel: recorded as such (to do on resume, not failed)."""
        shard["status"] = "cancelled"
        shard.pop("error", None)
        self.store.update(shards=self.shards)
        return [JobCancelled("cancelled by the user")]

    def _run_here(self, pending: list[dict]) -> list[BaseException]:
        for shard in pending:
            try:
                result = run_shard(*self._args(shard), on_batch=self._advance, check=self.check)
                if result.get("cancelled"):
                    return self._cancelled(shard)
                self._finish(result)
            except BaseException as exc:  # noqa: BLE001 - recorded, then raised by run()
                shard["status"] = "failed"
                shard["error"] = f"{type(exc).__name__}: {exc}"[:300]
                self.store.update(shards=self.shards)
                return [exc]
        return []

    def _run_on(self, client, pending: list[dict]) -> list[BaseException]:
        from distributed import Event, Queue

        cancel, queue = Event(f"mistudio-cancel-{self.job_id}", client=client), \
            Queue(f"mistudio-progress-{self.job_id}", client=client)
        cancel.clear()
        futures = {client.submit(run_shard, *self._args(s), key=f"mistudio-{self.job_id}-shard{s['index']}-"
                                 f"run{s['runs']}", pure=False): s for s in pending}
        errors: list[BaseException] = []
        remaining = set(futures)
        while remaining:
            try:
                self.check()
            except BaseException as exc:  # noqa: BLE001 - stop every worker, then report
                cancel.set()
                errors.append(exc)
                self.check = lambda: None
            done = {f for f in remaining if f.done()}
            remaining -= done
            if not done:
                time.sleep(0.1)
            while queue.qsize():
                self._advance(queue.get()[1])
            for future in done:
                shard = futures[future]
                if future.status == "finished" and future.result().get("cancelled"):
                    errors += self._cancelled(shard)
                elif future.status == "finished":
                    self._finish(future.result())
                else:
                    exc = future.exception()
                    shard["status"] = "failed"
                    shard["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    self.store.update(shards=self.shards)
                    errors.append(exc)
        return errors
