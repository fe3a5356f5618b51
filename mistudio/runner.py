"""The job runner: one worker thread per workspace folder, the live set, the model cache, and a job's life.

A job's life, on the worker thread: QUEUED → LOADING → EXTRACTING → SAVING → COMPLETED, or FAILED /
CANCELLED from any live state. Every state is written to the job's store (guarded: a store deleted or
replaced under the job fails it instead of being recreated) and sent to the job's listeners.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
from dataclasses import replace
from functools import partial

from . import engine
from .data import plan_order, tokenize
from .distributed import ShardedRun
from .errors import JobCancelled, JobTimeout, StoreLost, classify, disk_full_cause, is_oom
from .jobs import Job
from .liveness import heartbeat
from .metadata import ExtractionMeta, Status, new_nonce, now
from .models import (check_layers, describe_model, free_memory, load_config, load_model, load_tokenizer,
                     n_layers_of)
from .specs import ModelSpec

log = logging.getLogger("mistudio")
HEARTBEAT_S = 2.0
MAX_OOM_RETRIES = 3


class ModelCache:
    """Keeps the last loaded model so back-to-back jobs on the same model load it once."""

    def __init__(self):
        self._spec: ModelSpec | None = None
        self._loaded = None

    def get(self, spec: ModelSpec):
        if self._spec != spec:
            if self._loaded is not None:  # a full gc pass costs ~0.5 s: only when a model is let go
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
        self.models = ModelCache()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._live: dict[str, Job] = {}  # queued or running in this process, by id
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"mistudio-jobs:{name}", daemon=True)
        self._thread.start()

    def enqueue(self, job: Job) -> None:
        """Take the job: it is live in this process from now until it ends."""
        with self._lock:
            if job.id in self._live:
                raise RuntimeError(f"job {job.id} is already queued or running")
            self._live[job.id] = job
        job.started_here()
        job.emit("state", status=Status.QUEUED.value, previous=None)
        self._queue.put(job)

    def live_job(self, extraction_id: str) -> Job | None:
        """The job with this id if it is queued or running in this process."""
        with self._lock:
            return self._live.get(extraction_id)

    def live_ids(self) -> set[str]:
        with self._lock:
            return set(self._live)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                _Execution(job, self.models).run()
            finally:  # leave the live set before anyone waiting is woken (so a resume right after works)
                with self._lock:
                    self._live.pop(job.id, None)
                job.finished()


class _Planning:
    """Tokenize and order the dataset on a thread (its own tokenizer), while the caller loads the weights."""

    def __init__(self, request, vocab_size: int | None):
        self.request, self.vocab_size = request, vocab_size
        self.outcome: tuple | None = None
        self.tokenizer = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mistudio-tokenize", daemon=True)
        if vocab_size is not None:  # else the vocabulary is known only once the weights are in: tokenize then
            self._thread.start()

    def _work(self) -> None:
        try:
            self.tokenizer = load_tokenizer(self.request.model)
            tokenized = tokenize(self.request.dataset, self.tokenizer, self.vocab_size,
                                 self.request.capture.oov_policy, window=self.request.capture.window)
            self.outcome = (tokenized, plan_order(tokenized.lengths))
        except BaseException as exc:  # noqa: BLE001 - raised on the job's thread by result()
            self.error = exc

    def result(self, check, vocab_size: int):
        """(tokenized, order), waiting for the thread with ``check()`` between waits (cancel, timeout); its
        error is raised here. Tokenized again here if the model's vocabulary is not the one assumed."""
        while self._thread.is_alive():
            self._thread.join(0.05)
            check()
        if self.vocab_size != vocab_size:
            self.vocab_size, self.error = vocab_size, None
            self._work()
        if self.error is not None:
            raise self.error
        return self.outcome


class _Execution:
    """One run of one job, on the worker thread: every state change of its store happens here."""

    def __init__(self, job: Job, models: ModelCache):
        self.job, self.models = job, models
        self.store = job.store
        self.request = job.request
        self.deadline: float | None = None
        self.lost: StoreLost | None = None

    # -- state ------------------------------------------------------------------------------------
    def set_state(self, status: Status, **sections) -> None:
        previous = self.store.record.status
        self.store.update(status=status, heartbeat=heartbeat(), **sections)
        self.job.emit("state", status=status.value, previous=previous.value)

    def check(self) -> None:
        """Raise if the job must stop. Called before every block of every batch: keep it cheap."""
        if self.lost is not None:
            raise self.lost
        if self.job.cancel_requested:
            raise JobCancelled("cancelled by the user")
        if self.deadline is not None and now() > self.deadline:
            raise JobTimeout(f"The job ran past its time limit of {self.request.timeout_s:g} s.")

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                self.store.update(heartbeat=heartbeat())
            except StoreLost as exc:
                self.lost = exc  # the job stops at its next check
                return
            except Exception:  # a full disk must not kill the job from this thread
                log.exception("mistudio heartbeat write failed for %s", self.job.id)

    # -- life -------------------------------------------------------------------------------------
    def run(self) -> None:
        """The job's whole life. Never raises."""
        stop_beat = threading.Event()
        beat = threading.Thread(target=self._beat, args=(stop_beat,), daemon=True, name="mistudio-heartbeat")
        try:
            if self.store.record.nonce is None:  # a store from before nonces: give it one now
                self.store.update(nonce=new_nonce())
            self.store.guarded = True
            self.store.check_same()
            beat.start()
            if self.job.cancel_requested:
                raise JobCancelled("cancelled before it started")
            self._run()
        except JobCancelled:
            self._end(partial(self.set_state, Status.CANCELLED, timings={"finished": now()}))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a FAILED record
            self._end(partial(self._fail, exc))
        finally:
            stop_beat.set()
            if beat.is_alive():
                beat.join()

    def _end(self, write_end_state) -> None:
        """Write the end state. If that fails (store deleted or replaced, disk full), the job still ends
        FAILED, in memory: a lost store is never recreated."""
        try:
            write_end_state()
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, StoreLost):
                log.exception("mistudio could not record the end of job %s", self.job.id)
            self._fail_in_memory(exc)

    def _error(self, exc: BaseException, resumable: bool) -> dict:
        """The failure's error record: its class in plain words, and what the user can do next."""
        error = classify(exc, self.store.record.params, self._disk())
        error.setdefault("resume_available", resumable)
        error.update(retry_available=True, cancel_available=False, failed_at=now())
        return error

    def _fail_in_memory(self, exc: BaseException) -> None:
        record = self.store.record
        error = self._error(exc, resumable=False)
        self.job.keep_in_memory(ExtractionMeta.model_validate({**record.to_json(), "status": "FAILED", "error": error}))
        self.job.emit("state", status="FAILED", previous=record.status.value)
        self.job.emit("failed", **error)

    def _disk(self) -> tuple[str, int | None, int | None]:
        """Where the store lives, bytes free there, and bytes its job still has to write."""
        location = self.store.location
        free = None
        if "://" not in location or location.startswith("file://"):
            try:
                free = shutil.disk_usage(location.removeprefix("file://")).free
            except OSError:
                pass
        record = self.store.record
        needed = None
        if record.progress.tokens_total is not None:
            itemsize = 4 if record.params.get("dtype") == "float32" else 2
            width = sum(int(record.model.get("hidden_size") or 0) for _ in record.hook_points)
            needed = (record.progress.tokens_total - record.progress.tokens_committed) * width * itemsize
        return location, free, needed

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, StoreLost):
            raise exc
        error = self._error(exc, resumable=bool(self.store.record.progress.samples_committed)
                            or self.store.is_allocated)
        if error["error_type"] == "UNKNOWN":
            log.error("mistudio job %s failed", self.job.id, exc_info=exc)
        self.set_state(Status.FAILED, error=error, timings={"finished": now()})
        self.job.emit("failed", **error)

    def _run(self) -> None:
        req = self.request
        assert req is not None
        started = now()
        self.deadline = started + req.timeout_s if req.timeout_s else None
        self.set_state(Status.LOADING, timings={"started": started}, error=None)
        config = load_config(req.model)
        check_layers(req.capture.layers, n_layers_of(config))
        sharded = req.cluster is not None or "shards" in self.store.meta
        # the dataset is tokenized on a thread while the weights load (the tokenizer loads fast, weights slowly)
        planning = None if self.store.is_allocated else _Planning(req, getattr(config, "vocab_size", None))
        if sharded:  # the coordinator needs the tokenizer and the facts, not the weights
            loaded, facts = None, describe_model(req.model)
        else:
            loaded = self.models.get(req.model)
            facts = loaded.describe()
        self.store.update(model={**facts, "revision": req.model.revision})
        self.check()
        if planning is not None:
            tokenized, order = planning.result(self.check, facts["vocab_size"])
            self.check()
            capture = req.capture
            hook_dims = {hp: facts["hidden_size"] for hp in capture.hook_points()}
            roles = None if tokenized.roles is None else [tokenized.roles[i] for i in order]
            self.store.allocate([tokenized.ids[i] for i in order], tokenized.rows[order], hook_dims,
                                capture.dtype, capture.chunk_mb, checksum=capture.checksum, shard_mb=capture.shard_mb,
                                special_ids=planning.tokenizer.all_special_ids, exclude_special=capture.exclude_special,
                                roles=roles, window=capture.window, stride=capture.stride)
            self.store.update(dataset={"report": tokenized.report()})
        if req.capture.batch_size == "auto":
            self._choose_batch_size(loaded)
        if sharded:
            self.set_state(Status.EXTRACTING)
            workers = len(req.cluster.scheduler_info()["workers"]) if req.cluster is not None else 1
            figures = ShardedRun(self.store, req.model, req.capture, self.job.id, self.check,
                                 self.job.report_progress, n_shards=max(1, 2 * workers),
                                 before_batch=req.before_batch).run(req.cluster)
            return self._complete(figures)
        self._complete(self._extract_with_backoff(loaded))

    def _choose_batch_size(self, loaded) -> None:
        """batch_size="auto": trial forwards pick it; the choice and its reason go to the metadata."""
        from .autobatch import choose_batch_size

        req = self.request
        try:
            choice = choose_batch_size(loaded, self.store.input_ids(), self.store.sample_offsets(), req.capture,
                                       req.before_batch)
        except Exception:
            self.store.update(params={"batch_size": 1})  # what failed: the error's advice reads a number
            raise
        self.store.update(params={"batch_size": choice["chosen"], "batch_size_auto": choice})
        self.request = replace(req, capture=req.capture.model_copy(update={"batch_size": choice["chosen"]}))
        self.job.request = self.request
        self.check()

    def _extract_with_backoff(self, loaded) -> dict:
        """Extract from the commit mark; on OOM (if the user opted in) halve the batch and go on."""
        req = self.request
        attempts = list(self.store.record.attempts)
        capture = req.capture
        while True:
            start = self.store.record.progress.samples_committed
            self.set_state(Status.EXTRACTING)
            try:
                return engine.run(loaded, self.store, capture, start_sample=start, check=self.check,
                                  progress=self.job.report_progress, before_batch=req.before_batch)
            except Exception as exc:
                if disk_full_cause(exc) is not None:
                    raise
                oom_retries = sum(1 for a in attempts if a.get("auto_retry"))
                budget = capture.max_batch_tokens  # a token budget is halved instead of the batch size
                size_name, size = ("max_batch_tokens", budget) if budget else ("batch_size", capture.batch_size)
                if not (is_oom(exc) and req.auto_retry_on_oom and size > 1 and oom_retries < MAX_OOM_RETRIES):
                    raise
                smaller = size // 2
                attempts.append({"auto_retry": True, "error_type": "OOM", size_name: size,
                                 f"next_{size_name}": smaller, "at": now(), "error_message": str(exc)[:300],
                                 "samples_committed": self.store.record.progress.samples_committed})
                self.store.update(attempts=attempts, params={size_name: smaller}, auto_retried=True)
                self.job.emit("retry", attempt=oom_retries + 1, error_type="OOM", batch_size=smaller,
                              previous_batch_size=size, halved=size_name)  # with a budget: tokens
                capture = capture.model_copy(update={size_name: smaller})
                self.request = req = replace(req, capture=capture)
                self.job.request = req
                free_memory()

    def _complete(self, figures: dict) -> None:
        self.set_state(Status.SAVING)
        progress = self.store.record.progress  # the local writer committed all; a sharded run marks it here
        self.store.update(progress={"samples_committed": progress.samples_total,
                                    "tokens_committed": progress.tokens_total})
        self.store.update(timings={"finished": now(), "tokens_per_s": figures["tokens_per_s"],
                                   "extract_seconds": figures["seconds"]})
        self.set_state(Status.COMPLETED)
        self.store.consolidate()
        progress = self.store.record.progress
        self.job.emit("completed", n_samples=progress.samples_total, n_tokens=progress.tokens_total,
                      tokens_per_s=figures["tokens_per_s"], seconds=figures["seconds"])
