"""A handle on one extraction job: observe it (status, progress, events), wait for it, act on it.

The handle is what users, widgets and the CLI hold. The :class:`~mistudio.runner.Runner` drives its
life; a :class:`~mistudio.workspace.Workspace` creates it. A handle for a job that does not run in this
process reads its store.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Self

from .extraction import Extraction
from .inputs import SubmittedInputs
from .request import Request
from .runner import Execution
from .storage.metadata import END_STATES, ExtractionMeta, Status
from .storage.store import ExtractionStore

log = logging.getLogger("mistudio")
Listener = Callable[[dict], None]


@dataclass(frozen=True)
class RunOptions:
    """What one run of a job needs besides its Request: a dask client to shard over, the inputs as submitted, a
    test hook."""

    cluster: Any = None  # a dask.distributed Client: shard over its workers
    before_batch: Callable[[int, int], None] | None = None  # fault injection for tests: (batch index, batch size)
    inputs: SubmittedInputs | None = None  # the dataset's and model's files at submit: the job checks them again


class JobActions(Protocol):
    """What a job handle asks of its workspace (retry and resume create or restart jobs)."""

    def retry(self, extraction_id: str, **overrides: Any) -> "Job": ...
    def resume(self, extraction_id: str, batch_size: int | None = None, cluster: Any = None,
               model: Any = None) -> "Job": ...
    def owner_of(self, extraction_id: str, meta: ExtractionMeta) -> str | None: ...


class _Held:
    """A listener as a list holds it: a bound method weakly (a panel that is gone stops listening), anything
    else as is."""

    def __init__(self, listener: Listener):
        self.target = weakref.WeakMethod(listener) if inspect.ismethod(listener) else (lambda: listener)

    def __call__(self) -> Listener | None:
        return self.target()


def call_all(held: list, record: dict) -> None:
    """Tell every live listener in ``held``; a broken listener never breaks the caller."""
    for entry in list(held):
        listener = entry()
        if listener is None:
            try:
                held.remove(entry)
            except ValueError:
                pass
            continue
        try:
            listener(record)
        except Exception:
            log.exception("mistudio listener %r failed on %s event", listener, record.get("event"))


class Observable:
    """Keeps event listeners (widgets, tqdm bars, tests): callables taking one event dict (a bound method is held
    weakly: an object that is gone stops listening)."""

    def __init__(self) -> None:
        self.listeners: list[_Held] = []

    def subscribe(self, listener: Listener) -> Listener:
        """Call ``listener(event_dict)`` for every event; returns it, for ``unsubscribe``."""
        self.listeners.append(_Held(listener))
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        for entry in list(self.listeners):
            if entry() == listener:
                self.listeners.remove(entry)


class Handle(Observable):
    """What an extraction Job and a training run share: observing a status kept in a record (in memory while
    the job lives in this process, else on disk), waiting for its end, and the runner's calls."""

    def __init__(self) -> None:
        super().__init__()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._live = False

    @property
    def record(self) -> Any:
        raise NotImplementedError

    def _owner(self, record: Any) -> str | None:
        """Who runs the job now (None: nobody, so waiting would be forever)."""
        raise NotImplementedError

    @property
    def meta(self) -> dict:
        """The record as a plain dict."""
        return self.record.to_json()

    @property
    def status(self) -> Status:
        return self.record.status

    @property
    def error(self) -> dict | None:
        error = self.record.error
        return error.model_dump(mode="json") if error is not None else None

    @property
    def live(self) -> bool:
        """True while this process queues or runs the job."""
        return self._live

    @property
    def done(self) -> bool:
        return self.status in END_STATES

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> Self:
        """Block until the job ends (or ``timeout`` seconds pass); returns self."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if not self._live:
                record = self.record
                if record.status in END_STATES or self._owner(record) is None:
                    break  # ended, or nobody runs it: waiting would be forever
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._done.wait(0.2 if left is None else min(0.2, left))
        return self

    def started_here(self) -> None:
        """The runner took the job: from now on its state is this process's."""
        self._live = True

    def finished(self) -> None:
        """The runner let go of the job; wake everyone waiting."""
        self._live = False
        self._done.set()


class Job(Handle):
    """Handle on one extraction job. While it lives in this process its state is in memory; else in its store.

    ``also_notify`` are listener lists shared with others (the workspace's), called after the job's own.
    """

    def __init__(self, actions: JobActions, store: ExtractionStore, request: Request | None = None,
                 options: RunOptions | None = None, also_notify: list[Listener] | None = None):
        super().__init__()
        self.actions = actions
        self.store = store
        self.request = request
        self.options = options or RunOptions()
        self.id: str = store.name
        self._also_notify = also_notify if also_notify is not None else []
        self.interrupted_by: str | None = None  # why the process stopped the job (set with the cancel event)
        self._progress: dict = {}
        self._memory_record: ExtractionMeta | None = None  # an end state that could not be written

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.status})"

    # -- observing --------------------------------------------------------------------------------
    @property
    def record(self) -> ExtractionMeta:
        """The typed metadata: in memory while the job lives here, else read fresh from the store."""
        if self._memory_record is not None:
            return self._memory_record.model_copy(deep=True)
        if not self._live:
            self.store.refresh()
        return self.store.record

    @property
    def progress(self) -> dict:
        """Samples/tokens done and total, tokens/s and ETA (live), else the committed marks."""
        if self._live and self._progress:
            return dict(self._progress)
        record = self.record
        saved = record.progress
        return {"samples_done": saved.samples_committed, "samples_total": saved.samples_total,
                "tokens_done": saved.tokens_committed, "tokens_total": saved.tokens_total,
                "tokens_per_s": record.timings.tokens_per_s, "eta_s": None}

    @property
    def ended_in_memory(self) -> bool:
        """The job's end is known only here: its store was refused (a bad request), deleted or replaced."""
        return self._memory_record is not None

    def _owner(self, record: ExtractionMeta) -> str | None:
        return self.actions.owner_of(self.id, record)

    def extraction(self) -> Extraction:
        """The store as an :class:`~mistudio.extraction.Extraction` (any status)."""
        return Extraction(self.store)

    # -- acting -----------------------------------------------------------------------------------
    def cancel(self) -> "Job":
        """Stop within one block, keep what was committed, end CANCELLED (a queued job never starts)."""
        if self._live:
            self._cancel.set()
        return self

    def interrupt(self, reason: str) -> "Job":
        """Stop within one block, keep what was committed, end FAILED/INTERRUPTED (resumable) saying ``reason``:
        for a process that is going away, where a cancel would read as the user's."""
        if self._live:
            self.interrupted_by = reason
            self._cancel.set()
        return self

    def retry(self, **overrides: Any) -> "Job":
        """A new job and store with this one's parameters and ``overrides``, linked by ``retry_of``."""
        return self.actions.retry(self.id, **overrides)

    def resume(self, batch_size: int | None = None, cluster: Any = None, model: Any = None) -> "Job":
        """Continue in this store after its committed mark (optionally with another batch size or cluster, or the
        model read from where it is now: ``model``, its files the ones the store recorded)."""
        return self.actions.resume(self.id, batch_size=batch_size, cluster=cluster, model=model)

    # -- driven by the runner ---------------------------------------------------------------------
    def execute(self, models) -> None:
        """Run the job to its end on the runner's thread (never raises): an extraction's state machine. The
        store's writer lease, held since the job was queued, is let go when it ends."""
        try:
            Execution(self, models).run()
        finally:
            self.store.release_lease()

    def emit(self, event: str, **payload: Any) -> None:
        """Tell every listener; a broken listener never breaks the job."""
        record = {"event": event, "job_id": self.id, "time": time.time(), **payload}
        call_all(self.listeners, record)
        call_all(self._also_notify, record)

    def report_progress(self, progress: dict) -> None:
        self._progress = progress
        self.emit("progress", **progress)

    def keep_in_memory(self, record: ExtractionMeta) -> None:
        """The end state could not be written (store deleted or replaced, disk full): hold it here."""
        self._memory_record = record

