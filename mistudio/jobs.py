"""Extraction jobs: background worker, state machine, cancel, retry, resume, OOM backoff, heartbeat."""
from __future__ import annotations

import gc
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from . import engine
from .specs import JobRequest, ModelSpec
from .data import plan_order, tokenize
from .errors import JobCancelled, JobTimeout, StoreBusy, classify, is_oom
from .distributed import ShardedRun
from .models import check_layers, describe_model, load_config, load_model, load_tokenizer, n_layers_of
from .store import END_STATES, LIVE_STATES, ExtractionStore

if TYPE_CHECKING:
    from .workspace import Workspace

log = logging.getLogger("mistudio")
HEARTBEAT_S = 2.0
MAX_OOM_RETRIES = 3
Listener = Callable[[dict], None]


def now() -> float:
    return time.time()


def _proc_start(pid: int) -> str | None:
    """The kernel's start tick of a process (guards against pid reuse), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def owner() -> dict:
    """Who runs a job: pid, host, process start, for the heartbeat."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid())}


def process_alive(heartbeat: dict, stale_after_s: float = 60.0) -> bool:
    """Is the process that wrote ``heartbeat`` still running? Same host: by pid; other host: by freshness."""
    if not heartbeat:
        return False
    if heartbeat.get("host") != socket.gethostname():
        return now() - float(heartbeat.get("time", 0)) < stale_after_s
    pid = int(heartbeat.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = heartbeat.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)


class Observable:
    """Keeps event listeners (widgets, tqdm bars, tests): plain callables taking one event dict."""

    _listeners: list[Listener]

    def subscribe(self, listener: Listener) -> Listener:
        """Call ``listener(event_dict)`` for every event; returns it, for ``unsubscribe``."""
        self._listeners.append(listener)
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


class Job(Observable):
    """Handle on one extraction job. Live in this process while it runs; otherwise reads its store."""

    def __init__(self, workspace: "Workspace", store: ExtractionStore, request: JobRequest | None = None):
        self.workspace = workspace
        self.store = store
        self.request = request
        self.id: str = store.meta["id"]
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._listeners: list[Listener] = []
        self._progress: dict = {}
        self._active = False
        self._deadline: float | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.status})"

    # -- observing --------------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return self.store.meta if self._active else self.store.refresh()

    @property
    def status(self) -> str:
        return self.meta["status"]

    @property
    def error(self) -> dict | None:
        return self.meta.get("error")

    @property
    def progress(self) -> dict:
        """Samples/tokens done and total, tokens/s and ETA (live), else the committed marks."""
        if self._active and self._progress:
            return dict(self._progress)
        saved = self.meta.get("progress", {})
        return {"samples_done": saved.get("samples_committed", 0), "samples_total": saved.get("samples_total"),
                "tokens_done": saved.get("tokens_committed", 0), "tokens_total": saved.get("tokens_total"),
                "tokens_per_s": self.meta.get("timings", {}).get("tokens_per_s"), "eta_s": None}

    @property
    def done(self) -> bool:
        return self.status in END_STATES

    def wait(self, timeout: float | None = None) -> "Job":
        """Block until the job ends (or ``timeout`` seconds pass); returns self."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if not self._active and self.status in END_STATES:
                break
            if not self._active and not self.workspace.owned_elsewhere(self.store.meta):
                break  # nobody runs it: waiting would be forever
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._done.wait(0.2 if left is None else min(0.2, left))
        return self

    def extraction(self):
        """The store as an :class:`~mistudio.extraction.Extraction` (any status)."""
        from .extraction import Extraction

        return Extraction(self.store)

    # -- acting -----------------------------------------------------------------------------------
    def cancel(self) -> "Job":
        """Stop within one batch, keep what was committed, end CANCELLED (a queued job never starts)."""
        if self._active or not self._done.is_set():
            self._cancel.set()
        return self

    def retry(self, **overrides: Any) -> "Job":
        """A new job and store with this one's parameters and ``overrides``, linked by ``retry_of``."""
        return self.workspace.retry(self.id, **overrides)

    def resume(self, batch_size: int | None = None, cluster: Any = None) -> "Job":
        """Continue in this store after its committed mark (optionally with another batch size or cluster)."""
        return self.workspace.resume(self.id, batch_size=batch_size, cluster=cluster)

    # -- running (worker thread) ------------------------------------------------------------------
    def emit(self, event: str, **payload: Any) -> None:
        record = {"event": event, "job_id": self.id, "time": now(), **payload}
        for listener in list(self._listeners) + list(self.workspace._listeners):
            try:
                listener(record)
            except Exception:  # a broken listener must never break the job
                log.exception("mistudio listener %r failed on %s event", listener, event)

    def _set_state(self, status: str, **sections: Any) -> None:
        previous = self.store.meta.get("status")
        self.store.update(status=status, heartbeat={**owner(), "time": now()}, **sections)
        self.emit("state", status=status, previous=previous)

    def _check(self) -> None:
        """Raise if the job must stop. Called before every block of every batch: keep it cheap."""
        if self._cancel.is_set():
            raise JobCancelled("cancelled by the user")
        if self._deadline is not None and now() > self._deadline:
            raise JobTimeout(f"The job ran past its time limit of {self.request.timeout_s:g} s.")

    def _on_progress(self, progress: dict) -> None:
        self._progress = progress
        self.emit("progress", **progress)

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                self.store.update(heartbeat={**owner(), "time": now()})
            except Exception:  # a full disk must not kill the job from this thread
                log.exception("mistudio heartbeat write failed for %s", self.id)

    def run(self, model_cache: "ModelCache") -> None:
        """The job's whole life, on the worker thread. Never raises."""
        self._active = True
        stop_beat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop_beat,), daemon=True, name="mistudio-heartbeat")
        beat.start()
        try:
            self._run(model_cache)
        except JobCancelled:
            self._set_state("CANCELLED", timings={"finished": now()})
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a FAILED record
            self._fail(exc)
        finally:
            stop_beat.set()
            beat.join()
            self._end()

    def _end(self) -> None:
        """Leave the runner's live set before anyone waiting is woken (so a resume right after works)."""
        runner = self.workspace.runner
        with runner.lock:
            runner.active.pop(self.id, None)
        self._active = False
        self._done.set()

    def _fail(self, exc: BaseException) -> None:
        record = classify(exc, self.store.meta.get("params", {}))
        if record["error_type"] == "UNKNOWN":
            log.error("mistudio job %s failed", self.id, exc_info=exc)
        committed = self.store.meta.get("progress", {}).get("samples_committed", 0)
        record.update(retry_available=True, resume_available=bool(committed) or self.store.is_allocated,
                      cancel_available=False, failed_at=now())
        self._set_state("FAILED", error=record, timings={"finished": now()})
        self.emit("failed", **record)

    def _run(self, model_cache: "ModelCache") -> None:
        assert self.request is not None
        req = self.request
        self._check()
        started = now()
        self._deadline = started + req.timeout_s if req.timeout_s else None
        self._set_state("LOADING", timings={"started": started}, error=None)
        config = load_config(req.model)
        check_layers(req.capture.layers, n_layers_of(config))
        sharded = req.cluster is not None or "shards" in self.store.meta
        if sharded:  # the coordinator needs the tokenizer and the facts, not the weights
            loaded, facts, tokenizer = None, describe_model(req.model), load_tokenizer(req.model)
        else:
            loaded = model_cache.get(req.model)
            facts, tokenizer = loaded.describe(), loaded.tokenizer
        self.store.update(model={**facts, "revision": req.model.revision})
        self._check()
        if not self.store.is_allocated:
            tokenized = tokenize(req.dataset, tokenizer, facts["vocab_size"], req.capture.oov_policy)
            self._check()
            order = plan_order(tokenized.lengths)
            hook_dims = {hp: facts["hidden_size"] for hp in req.capture.hook_points()}
            self.store.allocate([tokenized.ids[i] for i in order], tokenized.rows[order], hook_dims,
                                req.capture.dtype, req.capture.chunk_mb)
            self.store.update(dataset={"report": tokenized.report()})
        if sharded:
            self._set_state("EXTRACTING")
            workers = len(req.cluster.scheduler_info()["workers"]) if req.cluster is not None else 1
            figures = ShardedRun(self.store, req.model, req.capture, self.id, self._check, self._on_progress,
                                 n_shards=max(1, 2 * workers), before_batch=req.before_batch).run(req.cluster)
            return self._complete(figures)
        attempts = list(self.store.meta.get("attempts", []))
        capture = req.capture
        while True:
            start = int(self.store.meta["progress"]["samples_committed"])
            self._set_state("EXTRACTING")
            try:
                figures = engine.run(loaded, self.store, capture, start_sample=start, check=self._check,
                                     progress=self._on_progress, before_batch=req.before_batch)
                break
            except Exception as exc:
                oom_retries = sum(1 for a in attempts if a.get("auto_retry"))
                if not (is_oom(exc) and req.auto_retry_on_oom and capture.batch_size > 1
                        and oom_retries < MAX_OOM_RETRIES):
                    raise
                smaller = capture.batch_size // 2
                attempts.append({"auto_retry": True, "error_type": "OOM", "batch_size": capture.batch_size,
                                 "next_batch_size": smaller, "at": now(), "error_message": str(exc)[:300],
                                 "samples_committed": self.store.meta["progress"]["samples_committed"]})
                self.store.update(attempts=attempts, params={"batch_size": smaller}, auto_retried=True)
                self.emit("retry", attempt=oom_retries + 1, error_type="OOM", batch_size=smaller,
                          previous_batch_size=capture.batch_size)
                capture = capture.model_copy(update={"batch_size": smaller})
                self.request = req = replace(req, capture=capture)
                free_memory()
        self._complete(figures)

    def _complete(self, figures: dict) -> None:
        self._set_state("SAVING")
        progress = self.store.meta["progress"]  # the local writer committed all; a sharded run marks it here
        self.store.update(progress={"samples_committed": progress["samples_total"],
                                    "tokens_committed": progress["tokens_total"]})
        self.store.update(timings={"finished": now(), "tokens_per_s": figures["tokens_per_s"],
                                   "extract_seconds": figures["seconds"]})
        self.store.update(status="COMPLETED", heartbeat={**owner(), "time": now()})
        self.store.consolidate()
        meta = self.store.meta
        self.emit("state", status="COMPLETED", previous="SAVING")
        self.emit("completed", n_samples=meta["progress"]["samples_total"], n_tokens=meta["progress"]["tokens_total"],
                  tokens_per_s=figures["tokens_per_s"], seconds=figures["seconds"])


def free_memory() -> None:
    """Give cached accelerator memory back after an OOM, before trying a smaller batch."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if getattr(torch, "mps", None) and torch.backends.mps.is_available():
            torch.mps.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


class ModelCache:
    """Keeps the last loaded model so back-to-back jobs on the same model load it once."""

    def __init__(self):
        self._spec: ModelSpec | None = None
        self._loaded = None

    def get(self, spec: ModelSpec):
        if self._spec != spec:
            self.clear()
            self._loaded = load_model(spec)
            self._spec = spec
        return self._loaded

    def clear(self) -> None:
        self._spec, self._loaded = None, None
        free_memory()


class Runner:
    """One background worker thread per workspace folder: jobs run one at a time, in submit order."""

    def __init__(self, name: str):
        self.queue: queue.Queue[Job] = queue.Queue()
        self.models = ModelCache()
        self.active: dict[str, Job] = {}  # queued or running in this process, by id
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name=f"mistudio-jobs:{name}", daemon=True)
        self.thread.start()

    def enqueue(self, job: Job) -> None:
        with self.lock:
            self.active[job.id] = job
        self.queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job._cancel.is_set():
                try:
                    job._set_state("CANCELLED", timings={"finished": now()})
                finally:
                    job._end()
            else:
                job.run(self.models)


def ensure_free(store: ExtractionStore, runner: Runner) -> None:
    """Refuse to write a store that a live job owns, here or in another process."""
    meta = store.refresh()
    if meta.get("id") in runner.active:
        raise StoreBusy(f"extraction {meta['id']} is {meta.get('status')} in this kernel: wait for it or cancel it "
                        f"first (ws.cancel({meta['id']!r}))")
    if meta.get("status") in LIVE_STATES and process_alive(meta.get("heartbeat", {})):
        hb = meta.get("heartbeat", {})
        raise StoreBusy(f"extraction {meta['id']} is {meta.get('status')} in another process (pid {hb.get('pid')} on "
                        f"{hb.get('host')}): wait for it, or cancel it from there")
