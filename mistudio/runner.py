"""The job runner: one worker thread per workspace folder, the live set, the model cache, and a job's life.

A job's life, on the worker thread: QUEUED → LOADING → EXTRACTING → SAVING → COMPLETED, or FAILED /
CANCELLED from any live state. Every state is written to the job's store (guarded: a store deleted or
replaced under the job fails it instead of being recreated) and sent to the job's listeners.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import threading
import weakref
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

from . import engine
from .autobatch import choose_batch_size
from .distributed import ShardedRun, measure_on
from .errors import (InputError, JobCancelled, JobInterrupted, JobTimeout, StoreLost, classify, disk_full_cause,
                     is_oom)
from .models import describe_model, free_memory, load_config, load_model, load_tokenizer, n_layers_of
from .fingerprints import check_same_model, fingerprint
from .plan import latent_infos, latent_widths, load_saes, make_plan
from .request import Request
from .specs import ModelSpec, parse_layers
from .storage.liveness import heartbeat
from .storage.metadata import END_STATES, ExtractionMeta, Status, new_nonce, now

log = logging.getLogger("mistudio")
HEARTBEAT_S = 2.0
MAX_OOM_RETRIES = 3


def _check_same_precision(record, computes_in: str | None) -> None:
    """A resumed store's rows to come are computed in the precision of those stored (a resume pins 'auto' to it:
    this catches what else could differ), or the job fails saying so, its rows unchanged."""
    stored_in, committed = record.model.dtype, record.progress.samples_committed
    precisions = ("float32", "float16", "bfloat16")
    if committed and stored_in in precisions and computes_in in precisions and stored_in != computes_in:
        raise InputError(f"extraction {record.id} holds {committed:,} samples computed in {stored_in}, and this run "
                         f"would compute in {computes_in}: one store holds one precision (it is unchanged). Retry it to "
                         f"compute every sample in {computes_in}, or resume where the model loads in {stored_in}",
                         param="model_dtype")


class ModelCache:
    """Keeps the last loaded model so back-to-back jobs on the same model load it once: the same spec *and* the
    same files (a folder re-saved in place is loaded again). ``fingerprint`` is the loaded model's."""

    def __init__(self):
        self._key: tuple | None = None
        self._loaded = None
        self.fingerprint: dict | None = None

    def get(self, spec: ModelSpec):
        current = fingerprint(spec)  # None: a Hub model not downloaded yet (hashed once loaded)
        if current is None or self._key != (spec, current["weights"], current["config"], current["tokenizer"]):
            if self._loaded is not None:  # a full gc pass costs ~0.5 s: only when a model is let go
                self.clear()
            self._loaded = load_model(spec)
            current = current or fingerprint(spec)
            self.fingerprint = current
            self._key = None if current is None else (spec, current["weights"], current["config"],
                                                      current["tokenizer"])
        return self._loaded

    def clear(self) -> None:
        self._key, self._loaded, self.fingerprint = None, None, None
        free_memory()


_RUNNERS: "weakref.WeakSet[Runner]" = weakref.WeakSet()
_AT_EXIT = threading.Lock()
_registered = False
if hasattr(os, "register_at_fork"):  # a forked child (a DataLoader worker made while a job ran) has the parent's
    os.register_at_fork(after_in_child=_RUNNERS.clear)  # runners but not their threads: none of its jobs run there


def _at_exit() -> None:
    """At the interpreter's exit, before thread pools shut down: the jobs still queued or running are waited
    for (Python's convention for background work: what ``concurrent.futures`` does), said on one line; Ctrl-C
    cancels them cleanly and says how to resume. In a Jupyter kernel (shut down or restarted) they are stopped
    at once, with what they computed committed, and end FAILED/INTERRUPTED (the Studio's restart banner offers to
    resume them) instead of being killed mid-write. A forked child waits only for jobs it started itself."""
    jobs = _live_jobs()
    if not jobs:
        return
    ids = ", ".join(job.id for job in jobs)
    if "ipykernel" in sys.modules:  # no one to wait for: stop at the next block, FAILED/INTERRUPTED, resumable
        for job in jobs:
            if hasattr(job, "interrupt"):
                job.interrupt("its Jupyter kernel was shut down or restarted")
            else:  # a training run: cancelled, resumable from its checkpoint
                job.cancel()
        for job in jobs:
            job.wait(30)
        return
    try:  # a Ctrl-C as soon as the line is out is a clean cancel too
        print(f"mistudio: waiting for {len(jobs)} job(s) to finish before exiting ({ids}); press Ctrl-C to cancel "
              "(what is saved is kept)", file=sys.stderr, flush=True)
        while jobs:  # a job that ends may submit another (a listener's follow-up): it is waited for too
            for job in jobs:
                job.wait()
            jobs = _live_jobs()
    except KeyboardInterrupt:
        _cancel_all(_live_jobs() or jobs)


def _live_jobs() -> list:
    return [job for runner in list(_RUNNERS) for job in runner.live_jobs()]


def _cancel_all(jobs: list) -> None:
    for job in jobs:
        job.cancel()
    for job in jobs:
        try:
            job.wait(60)
        except KeyboardInterrupt:  # Ctrl-C again: the cancels are under way; still say how to resume
            pass
    for job in jobs:
        if str(job.status) != "COMPLETED":
            root = getattr(getattr(job, "actions", None), "root", None)
            where = f"ms.Workspace({str(root)!r})" if root is not None else "ms.Workspace(...)"
            print(f"mistudio: job {job.id} is {job.status}; what was saved is kept: resume it with "
                  f"{where}.resume({job.id!r})", file=sys.stderr, flush=True)


class Runner:
    """One background worker thread per workspace folder, for the process's life: jobs run one at a time, in
    submit order. Kept, though a thread that ran torch on the CPU keeps its OpenMP team while it lives
    (with two teams alive libgomp throttles the spin-waiting both rely on: a small model's forwards in the notebook
    run slower after a job, ``benchmarks/RESULTS.md``): a new thread per job made a resumed job's rows differ from
    an uninterrupted run's in their last bits (``tests/test_durability.py``). At the interpreter's exit, its jobs
    are waited for (see :func:`_at_exit`)."""

    def __init__(self, name: str):
        self.models = ModelCache()
        self._ended_in_memory: dict = {}  # jobs whose end is known only here (no store to read it from)
        self._queue: queue.Queue = queue.Queue()
        self._live: dict = {}  # the jobs queued or running in this process, by id
        self._setting_up: set[str] = set()  # jobs whose files exist but that are not queued yet, by id
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"mistudio-jobs:{name}", daemon=True)
        self._thread.start()
        global _registered
        with _AT_EXIT:
            _RUNNERS.add(self)
            if not _registered:  # threading's exit hooks run before the interpreter stops threads and before
                threading._register_atexit(_at_exit)  # concurrent.futures' own (registered earlier, run later)
                _registered = True

    def enqueue(self, job) -> None:
        """Take the job: it is live in this process from now until it ends."""
        with self._lock:
            if job.id in self._live:
                raise RuntimeError(f"job {job.id} is already queued or running")
            self._live[job.id] = job
        job.started_here()
        job.emit("state", status=Status.QUEUED.value, previous=None)
        self._queue.put(job)

    @contextmanager
    def setting_up(self, job_id: str) -> Iterator[None]:
        """A job being set up in this process (its store or run folder created, its lease taken, then queued): it
        counts as this process's (:meth:`holds`) from before its files exist, so a recover meanwhile (another
        Workspace object on the folder, the Studio's Jobs or Train tab) never takes its live, not yet queued files
        for a crashed job's."""
        with self._lock:
            self._setting_up.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._setting_up.discard(job_id)

    def holds(self, job_id: str) -> bool:
        """The job is being set up, queued or running in this process."""
        with self._lock:
            return job_id in self._live or job_id in self._setting_up

    def live_job(self, extraction_id: str):
        """The job with this id if it is queued or running in this process."""
        with self._lock:
            return self._live.get(extraction_id)

    def ended_in_memory(self, extraction_id: str):
        """A job of this process that ended without a store to record it (a request refused while planning)."""
        with self._lock:
            return self._ended_in_memory.get(extraction_id)

    def live_jobs(self) -> list:
        """The jobs queued or running in this process, in submit order."""
        with self._lock:
            return list(self._live.values())

    def live_ids(self) -> set[str]:
        with self._lock:
            return set(self._live)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job.execute(self.models)  # an extraction's Execution, or another kind of job's own run
            except BaseException:  # noqa: BLE001 - execute records its own failures; this thread serves the rest
                log.exception("mistudio: job %s raised out of its run", job.id)
            finally:  # leave the live set before anyone waiting is woken (so a resume right after works)
                with self._lock:
                    self._live.pop(job.id, None)
                    if job.ended_in_memory:
                        self._ended_in_memory[job.id] = job
                job.finished()


class _Planning:
    """Tokenize and plan the store on a thread (its own tokenizer), while the caller loads the weights."""

    def __init__(self, request: Request, vocab_size: int | None, hidden_size: int):
        self.request, self.vocab_size, self.hidden_size = request, vocab_size, hidden_size
        self.plan = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mistudio-tokenize", daemon=True)
        if vocab_size is not None:  # else the vocabulary is known only once the weights are in: plan then
            self._thread.start()

    def _work(self) -> None:
        try:
            tokenizer = load_tokenizer(self.request.model_spec)
            self.plan = make_plan(self.request, tokenizer, self.vocab_size, self.hidden_size)
        except BaseException as exc:  # noqa: BLE001 - raised on the job's thread by result()
            self.error = exc

    def result(self, check_stop: Callable[[], None], vocab_size: int):
        """The plan, waiting for the thread with ``check_stop()`` between waits (cancel, timeout); its error is
        raised here. Planned again here if the model's vocabulary is not the one assumed."""
        while self._thread.is_alive():
            self._thread.join(0.05)
            check_stop()
        if self.vocab_size != vocab_size:
            self.vocab_size, self.error = vocab_size, None
            self._work()
        if self.error is not None:
            raise self.error
        return self.plan


class Execution:
    """One run of one job, on the worker thread: every state change of its store happens here."""

    def __init__(self, job, models: ModelCache):
        self.job, self.models = job, models
        self.store = job.store
        self.request = job.request
        self.deadline: float | None = None
        self.lost: StoreLost | None = None
        self.saes: dict | None = None

    # -- state ------------------------------------------------------------------------------------
    def set_state(self, status: Status, **sections) -> None:
        record = self.store.record
        previous = record.status
        if status in END_STATES:  # the writer has flushed: what was computed is what is saved
            sections["progress"] = {**sections.get("progress", {}),
                                    "samples_computed": record.progress.samples_committed}
        self.store.update(status=status, heartbeat=heartbeat(), **sections)
        self.job.emit("state", status=status.value, previous=previous.value)

    def check(self) -> None:
        """Raise if the job must stop. Called before every block of every batch: keep it cheap."""
        if self.lost is not None:
            raise self.lost
        if self.job.cancel_requested:
            self._stop("cancelled by the user")
        if self.deadline is not None and now() > self.deadline:
            raise JobTimeout(f"The job ran past its time limit of {self.request.timeout_s:g} s.")

    def _stop(self, cancelled: str) -> None:
        """The job was asked to stop: by the user (CANCELLED), or by its process exiting (INTERRUPTED)."""
        if self.job.interrupted_by is None:
            raise JobCancelled(cancelled)
        raise JobInterrupted(f"The job stopped because {self.job.interrupted_by}; what it computed is saved "
                             "(the progress says how much): resume it to continue from there, retry it from "
                             "scratch, or clean it up.")

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                if self.store.lease is not None:
                    self.store.lease.renew()  # a remote lease expires unless renewed
                computed = (self.job.progress or {}).get("samples_done") if self.job.live else None
                sections = {"progress": {"samples_computed": int(computed)}} if computed is not None else {}
                self.store.update(durable=False, heartbeat=heartbeat(), **sections)  # advisory: no disk flush
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
                self._stop("cancelled before it started")
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
        error = classify(exc, self.request.params(), self._disk(), resumable)
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
        return location, free, self.store.bytes_to_write()

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, StoreLost):
            raise exc
        record = self.store.record
        if isinstance(exc, InputError) and not self.store.is_allocated and not record.resumes:
            # refused while planning (no usable rows, a template that fails ...): nothing was extracted, so the
            # new store goes and the failure is the job's, in memory: a refused request leaves no store
            self.store.destroy()
            self._fail_in_memory(exc)
            return
        error = self._error(exc, resumable=bool(record.progress.samples_committed) or self.store.is_allocated)
        if error["error_type"] == "VALIDATION" and self.store.is_allocated:
            # the request was checked and its tokens are stored: what failed is the model's or the SAEs' files
            # (moved, changed, unreachable). Put them back (or point resume's model= at them) and resume.
            error["resume_available"] = True
        if error["error_type"] == "UNKNOWN":
            log.error("mistudio job %s failed", self.job.id, exc_info=exc)
        self.set_state(Status.FAILED, error=error, timings={"finished": now()})
        self.job.emit("failed", **error)

    def _run(self) -> None:
        req, options = self.request, self.job.options
        started = now()
        self.deadline = started + req.timeout_s if req.timeout_s else None
        self.set_state(Status.LOADING, timings={"started": started}, error=None)
        submitted = options.inputs  # the files' identities before they are read: a change during the read counts
        data_read_from, model_read_from = (None, None) if submitted is None else \
            (submitted.identities("dataset"), submitted.identities("model"))
        config = load_config(req.model_spec)
        parse_layers(req.layers, n_layers_of(config))  # a resume with another model: its layers must exist
        sharded = options.cluster is not None or "shards" in self.store.meta
        # the dataset is tokenized on a thread while the weights load (the tokenizer loads fast, weights slowly)
        planning = None if self.store.is_allocated else _Planning(req, getattr(config, "vocab_size", None),
                                                                  int(config.hidden_size))
        if sharded:  # the coordinator needs the tokenizer and the facts, not the weights
            loaded, facts, model_fp = None, describe_model(req.model_spec), fingerprint(req.model_spec)
        else:
            loaded = self.models.get(req.model_spec)
            facts, model_fp = loaded.describe(), self.models.fingerprint
        check_same_model(req.model_spec.name_or_path, self.store.record.model.fingerprint, model_fp)
        _check_same_precision(self.store.record, facts.get("dtype"))
        if submitted is not None:  # the folder as submitted: a re-save since would mislabel this store's model
            submitted.check_model(model_read_from)
        self.store.update(model={**facts, "revision": req.revision, "fingerprint": model_fp})
        self.check()
        if planning is not None:
            plan = planning.result(self.check, facts["vocab_size"])
            if submitted is not None:  # the rows read are the ones submitted
                submitted.check_dataset(data_read_from)
            self.check()
            layout = plan.layout
            if req.saes:
                if sharded:  # the SAEs' facts here (on the CPU); a probed width is measured on a worker
                    self.saes = load_saes(req, "cpu")
                    measure = None if options.cluster is None else measure_on(options.cluster, self.job.id, self.check)
                    widths = latent_widths(req, self.saes, loaded, plan, measure)
                else:
                    self.saes = load_saes(req, loaded.input_device)
                    widths = latent_widths(req, self.saes, loaded, plan)
                layout = plan.with_latents({hp: w for hp, (w, _) in widths.items()}, self.saes)
                self.store.update(latents=latent_infos(req, self.saes, widths, layout))
            self.store.allocate(plan.tokens, layout, plan.storage)
            self.store.update(dataset={"report": plan.report})
        if req.batch_size == "auto":
            self._choose_batch_size(loaded)
        if sharded:
            self.set_state(Status.EXTRACTING)
            cluster = options.cluster
            workers = len(cluster.scheduler_info()["workers"]) if cluster is not None else 1
            figures = ShardedRun(self.store, self.request, self.job.id, self.check, self.job.report_progress,
                                 n_shards=max(1, 2 * workers), before_batch=options.before_batch).run(cluster)
            return self._complete(figures)
        self._complete(self._extract_with_backoff(loaded))

    def _saes(self, loaded) -> dict:
        """The SAEs the store's metadata lists, loaded on the model's device (a resume loads them here)."""
        if self.saes is None:
            self.saes = load_saes(self.request, loaded.input_device, self.store.record.latents)
        return self.saes

    def _use(self, request: Request) -> None:
        """Run on with a changed request (a chosen or halved batch size); the job handle shows it too."""
        self.request = self.job.request = request

    def _choose_batch_size(self, loaded) -> None:
        """batch_size="auto": trial forwards pick it; the choice and its reason go to the metadata."""
        try:
            choice = choose_batch_size(loaded, self.store.input_ids(), self.store.sample_offsets(), self.request,
                                       self.job.options.before_batch)
        except Exception:
            self.store.update(params={"batch_size": 1})  # what failed: the error's advice reads a number
            self._use(self.request.model_copy(update={"batch_size": 1}))
            raise
        self.store.update(params={"batch_size": choice["chosen"], "batch_size_auto": choice})
        self._use(self.request.model_copy(update={"batch_size": choice["chosen"]}))
        self.check()

    def _extract_with_backoff(self, loaded) -> dict:
        """Extract from the commit mark; on OOM (if the user opted in) halve the batch and go on."""
        attempts = list(self.store.record.attempts)
        while True:
            req = self.request
            start = self.store.record.progress.samples_committed
            self.set_state(Status.EXTRACTING)
            try:
                return engine.run(loaded, self.store, req, start_sample=start, saes=self._saes(loaded),
                                  check=self.check, progress=self.job.report_progress,
                                  before_batch=self.job.options.before_batch)
            except Exception as exc:
                if disk_full_cause(exc) is not None:
                    raise
                oom_retries = sum(1 for a in attempts if a.get("auto_retry"))
                budget = req.max_batch_tokens  # a token budget is halved instead of the batch size
                size_name, size = ("max_batch_tokens", budget) if budget else ("batch_size", req.batch_size)
                if not (is_oom(exc) and req.auto_retry_on_oom and size > 1 and oom_retries < MAX_OOM_RETRIES):
                    raise
                smaller = size // 2
                attempts.append({"auto_retry": True, "error_type": "OOM", size_name: size,
                                 f"next_{size_name}": smaller, "at": now(), "error_message": str(exc)[:300],
                                 "samples_committed": self.store.record.progress.samples_committed})
                self.store.update(attempts=attempts, params={size_name: smaller}, auto_retried=True)
                self.job.emit("retry", attempt=oom_retries + 1, error_type="OOM", batch_size=smaller,
                              previous_batch_size=size, halved=size_name)  # with a budget: tokens
                self._use(req.model_copy(update={size_name: smaller}))
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
