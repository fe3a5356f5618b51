"""Sharded extraction: contiguous sample shards, one model replica per worker, one Zarr store.

A shard's whole storage units (Zarr chunks, or Zarr shards) are written by the worker that runs it; the
rows of units that straddle a shard boundary come back to the coordinator, which writes them (so no
unit ever has two writers).
Shards run on a ``dask.distributed`` client, or one after another in this process (a resume
without a cluster). A finished shard is recorded in the metadata and never runs again.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .engine import check_ids, forward_batches
from .errors import JobCancelled
from .models import load_model
from .request import Request
from .storage.layout import storage_unit
from .storage.stats import HookStats
from .storage.store import ExtractionStore

_REPLICAS: dict[str, Any] = {}  # one loaded model per worker process


def plan_shards(offsets: np.ndarray, n_shards: int) -> list[dict]:
    """Contiguous sample ranges of about equal token counts."""
    n_samples, total = len(offsets) - 1, int(offsets[-1])
    cuts = {0, n_samples}
    for k in range(1, n_shards):
        cuts.add(int(np.searchsorted(offsets, k * total / n_shards)))
    cuts = sorted(c for c in cuts if 0 <= c <= n_samples)
    return [{"index": i, "first": a, "stop": b, "tokens": [int(offsets[a]), int(offsets[b])], "status": "pending",
             "runs": 0} for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


class ShardWriter:
    """Writes the whole chunks inside a shard's token range; keeps the straddling rows as edges."""

    def __init__(self, arrays: dict, chunk: int, start: int, stop: int):
        self.arrays, self.chunk = arrays, chunk
        lo, hi = -(-start // chunk) * chunk, stop // chunk * chunk
        self.lo, self.hi = (lo, hi) if lo < hi else (stop, stop)
        self.pos = start
        self.buffer: dict[str, np.ndarray | None] = {hp: None for hp in arrays}
        self.edges: dict[str, list[tuple[int, np.ndarray]]] = {hp: [] for hp in arrays}

    def put(self, rows: dict[str, np.ndarray]) -> None:
        for hp, block in rows.items():
            old = self.buffer[hp]
            self.buffer[hp] = block if old is None or not len(old) else np.concatenate([old, block])
        end = self.pos + len(next(iter(self.buffer.values())))
        while self.pos < end:
            if self.pos < self.lo:  # head edge
                cut = min(self.lo, end)
            elif self.pos < self.hi:  # whole chunks
                cut = min(self.hi, end // self.chunk * self.chunk)
                if cut <= self.pos:
                    break
            else:  # tail edge
                cut = end
            for hp in self.arrays:
                part, self.buffer[hp] = self.buffer[hp][: cut - self.pos], self.buffer[hp][cut - self.pos:]
                if self.lo <= self.pos < self.hi:
                    self.arrays[hp][self.pos:cut] = part
                else:
                    self.edges[hp].append((self.pos, part))
            self.pos = cut


def run_shard(location: str, storage_options: dict | None, request: dict, shard: dict, job_id: str,
              before_batch: Callable | None = None, on_batch: Callable[[int], None] | None = None,
              check: Callable[[], None] | None = None) -> dict:
    """Extract one shard into the store; return its edge rows and statistics. Runs on a worker or here."""
    capture_spec = Request(**request)  # the request without its dataset: the tokens are in the store
    spec = capture_spec.model_spec
    key = spec.model_dump_json()
    if key not in _REPLICAS:
        _REPLICAS.clear()
        _REPLICAS[key] = load_model(spec)
    loaded = _REPLICAS[key]
    if check is None and on_batch is None:  # on a dask worker: cancel and progress through the scheduler
        from distributed import Event, Queue

        cancel, progress_queue = Event(f"mistudio-cancel-{job_id}"), Queue(f"mistudio-progress-{job_id}")

        def check() -> None:
            if cancel.is_set():
                raise JobCancelled("cancelled by the user")

        def on_batch(samples: int) -> None:
            progress_queue.put((shard["index"], samples))
    store = ExtractionStore.open(location, storage_options=storage_options, writable=True)
    ids, offsets = store.input_ids(), store.sample_offsets()
    check_ids(ids, loaded)
    arrays = {f"activations/{hp}": store.activations(hp) for hp in capture_spec.hook_points}
    writer = ShardWriter(arrays, storage_unit(next(iter(arrays.values())))[0], *shard["tokens"])
    stats = {hp: HookStats.empty() for hp in capture_spec.hook_points}
    started = time.perf_counter()
    for first, stop, rows, batch_stats in forward_batches(loaded, ids, offsets, capture_spec, shard["first"],
                                                          shard["stop"], check, before_batch):
        writer.put(rows)
        for hp, delta in batch_stats.items():
            HookStats.merge(stats[hp], delta, int(offsets[first]))  # rows are tokens here (no exclude_special)
        if on_batch is not None:
            on_batch(stop - first)
    assert writer.pos == shard["tokens"][1], "shard rows were not all placed"
    return {"index": shard["index"], "edges": writer.edges, "stats": stats,
            "seconds": time.perf_counter() - started}


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
            if shard["status"] != "done":
                shard["status"] = "pending"
        self.store.update(shards=self.shards)
        self.samples_done = sum(s["stop"] - s["first"] for s in self.shards if s["status"] == "done")
        self.started = time.perf_counter()
        self.tokens_at_start = sum(s["tokens"][1] - s["tokens"][0] for s in self.shards if s["status"] == "done")

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
        """Write a finished shard's edge rows (this process is their only writer) and record it."""
        for path, pieces in result["edges"].items():
            arr = self.store.array(path)
            for start, rows in pieces:
                arr[start:start + len(rows)] = rows
        shard = self.shards[result["index"]]
        shard.update(status="done", stats=result["stats"], seconds=result["seconds"])
        prefix = 0
        for s in self.shards:
            if s["status"] != "done":
                break
            prefix = s["stop"]
        totals = {hp: HookStats.empty() for hp in result["stats"]}
        for s in self.shards:
            for hp, acc in (s.get("stats") or {}).items() if s["status"] == "done" else []:
                HookStats.merge(totals[hp], acc)
        self.store.update(shards=self.shards, statistics={hp: HookStats.summary(a) for hp, a in totals.items()},
                          progress={"samples_committed": prefix, "tokens_committed": int(self.offsets[prefix])})

    def run(self, client=None) -> dict:
        pending = [s for s in self.shards if s["status"] != "done"]
        for shard in pending:
            shard["runs"] = shard.get("runs", 0) + 1
        self.store.update(shards=self.shards)
        errors = self._run_on(client, pending) if client is not None else self._run_here(pending)
        if errors:
            raise next((e for e in errors if isinstance(e, JobCancelled)), errors[0])
        elapsed = time.perf_counter() - self.started
        tokens = int(self.offsets[-1]) - self.tokens_at_start
        return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0}

    def _run_here(self, pending: list[dict]) -> list[BaseException]:
        for shard in pending:
            try:
                self._finish(run_shard(*self._args(shard), on_batch=self._advance, check=self.check))
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
                if future.status == "finished":
                    self._finish(future.result())
                else:
                    exc = future.exception()
                    shard["status"] = "failed"
                    shard["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    self.store.update(shards=self.shards)
                    errors.append(exc)
        return errors
