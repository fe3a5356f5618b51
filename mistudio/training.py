"""SAE training runs as background jobs of a workspace: submit, observe, cancel, retry, resume, list.

A run lives in ``<workspace>/saes/<run id>/``:

- ``run.json``: the run's record (:class:`TrainingRecord`: status, the extraction and hook point, the
  TrainConfig, progress and last metrics, error, lineage, timings, heartbeat), replaced whole and atomically;
- ``history.jsonl``: the trainer's figures, one line per progress report (a resumed run rewrites from its
  checkpoint's step on: :func:`read_history` keeps the last word for every step);
- ``checkpoint/``: the trainer's resumable state (:func:`mistudio.analysis.sae_training.train_sae`);
- ``sae/`` (SAELens's format) and ``evaluation.json`` once trained.

A :class:`TrainingJob` runs on the workspace's job runner like an extraction (one job at a time per folder):
``QUEUED → LOADING → TRAINING → SAVING → COMPLETED``, or ``FAILED`` / ``CANCELLED``, with the same events
(``state``, ``progress``, ``completed``, ``failed``; each carries ``kind="training"``) to its own listeners and
the workspace's. Runs whose process died are marked ``FAILED``/``INTERRUPTED`` when listed, and resume from
their checkpoint exactly.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import os
import math
import re
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from .analysis.sae_training import (CLASS_MARK, CLASS_SAYS_MARK, SAE_DIR, TrainConfig, TrainingPlan,
                                    check_setting_names, evaluate_sae, plan_training, train_sae)
from .errors import InputError, JobCancelled, JobTimeout, StoreBusy, StoreLost, classify, render
from .extraction import Extraction
from .jobs import Handle, call_all
from .models import FAMILIES
from .request import Request, dataset_source, params
from .runner import HEARTBEAT_S
from .saes import SAE, load_sae
from .specs import ModelSpec
from .storage.files import write_atomic
from .storage.liveness import heartbeat, live_owner
from .storage.metadata import LIVE_STATES, ErrorRecord, Heartbeat, Status, can_resume, new_nonce, now

if TYPE_CHECKING:
    from .workspace import Workspace

log = logging.getLogger("mistudio")

RUNS_DIR = "saes"
RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
EVALUATION_FILE = "evaluation.json"
RUN_FORMAT = 1
MANY_PASSES = 50  # a run over the same rows more often than this is warned: it fits those rows
RUN_ID = re.compile(r"sae_[A-Za-z0-9][A-Za-z0-9_.-]{0,123}")
PROGRESS_EVERY_S = 0.25  # at most this often a progress event (and a run.json write); the last step always
EVALUATE_CHOICES = (True, False, "reconstruction")  # True: with the spliced next-token loss for decoder models
ENCODER_TYPES = frozenset(t for t, paths in FAMILIES.items() if paths[0] == "encoder.layer")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_PAIRS = (("d_sae", "expansion_factor"), ("n_tokens", "epochs"))  # give one of each pair
# what decides the tokens an extraction reads and the values its model gives them: extracting with an SAE repeats them
# What extracting with a run's SAE repeats of its extraction: every setting that shaped the tokens, the model's dtype,
# and the storage dtype (a bfloat16 store chosen for activations past float16's range stays bfloat16).
SAME_DATA = tuple(p.name for p in params() if p.group == "data" and p.name != "dataset") + ("model_dtype", "dtype")
OF_THE_DATASET = ("text_column", "encoding", "max_samples")  # about the dataset itself: not carried to another one


# -- the record ---------------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class ExtractionRef(_Section):
    """The extraction a run trains on, and its model (for the evaluation and for extracting with the SAE)."""

    id: str
    location: str
    model: str = ""
    model_type: str | None = None
    revision: str | None = None
    data: dict | None = None  # how it read its data (SAME_DATA): extracting with the SAE repeats it, store or no store


class TrainProgress(_Section):
    step: int = 0
    total_steps: int | None = None
    tokens: int = 0
    total_tokens: int | None = None
    epoch: int = 0


class TrainTimings(_Section):
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None


class TrainingRecord(_Section):
    """Everything ``run.json`` holds. Unknown keys are kept (a newer mistudio may have written them)."""

    format_version: int = RUN_FORMAT
    kind: str = "sae_training"
    id: str
    nonce: str
    status: Status
    extraction: ExtractionRef
    hook_point: str
    config: dict  # TrainConfig's fields
    d_in: int
    d_sae: int
    rows: int  # rows an epoch of the loader yields
    timeout_s: float | None = None
    evaluate: bool | str = True
    progress: TrainProgress = Field(default_factory=TrainProgress)
    metrics: dict = Field(default_factory=dict)  # the trainer's last figures
    history_file: str = HISTORY_FILE
    evaluation: dict | None = None
    sae_path: str | None = None
    error: ErrorRecord | None = None
    retry_of: str | None = None
    retry_count: int = 0
    retry_reason: str | None = None
    retry_overrides: dict = Field(default_factory=dict)
    resumes: list[dict] = Field(default_factory=list)
    timings: TrainTimings = Field(default_factory=TrainTimings)
    heartbeat: Heartbeat = Field(default_factory=Heartbeat)

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATES

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{k: v for k, v in self.config.items() if k in TRAIN_FIELDS})

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_record(folder: str | Path) -> TrainingRecord:
    """A run's ``run.json`` (raises OSError when missing, pydantic's ValidationError when damaged)."""
    return TrainingRecord.model_validate_json(Path(folder, RUN_FILE).read_bytes())


def write_record(folder: str | Path, record: TrainingRecord, durable: bool = True) -> None:
    write_atomic(str(Path(folder, RUN_FILE)), record.model_dump_json(indent=1).encode(), durable=durable)


def read_history(folder: str | Path) -> list[dict]:
    """The trainer's figures in step order. A resumed run writes again from its checkpoint's step: a line whose
    step is not past the previous one drops what came after the checkpoint, so the last word for each step wins."""
    history: list[dict] = []
    try:
        lines = Path(folder, HISTORY_FILE).read_text().splitlines()
    except FileNotFoundError:
        return history
    for line in lines:
        try:
            figures = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        while history and history[-1].get("step", 0) >= figures.get("step", 0):
            history.pop()
        history.append(figures)
    return history


# -- ids, folders, configs ----------------------------------------------------------------------------
def new_run_id() -> str:
    """Sortable, unique: ``sae_20261129_031502_1a2b3c``."""
    return f"sae_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"


def check_run_id(run_id: Any) -> str:
    """A run id is a name (``sae_...``), never a path."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise InputError(f"{run_id!r} is not a training run id: ids are names such as 'sae_20261129_031502_1a2b3c'; "
                         "ws.trainings() lists the runs of a workspace (`mistudio trainings`)")
    return run_id


def runs_folder(ws: "Workspace") -> Path:
    if ws.remote:
        raise InputError(f"workspace {ws.root!r} is remote: SAE training writes its checkpoints to a local folder. "
                         "Open a local workspace (the extraction may stay remote: pass ms.open_extraction(url))",
                         param="workspace")
    return Path(ws.root) / RUNS_DIR


def run_folder(ws: "Workspace", run_id: str) -> Path:
    """The folder of an existing run (a clear message, with recent ids, when there is none)."""
    folder = runs_folder(ws) / check_run_id(run_id)
    if not (folder / RUN_FILE).is_file():
        known = [p.name for p in _run_folders(ws)][:5]
        raise InputError(f"no training run {run_id!r} in workspace {ws.root!r}"
                         f"{'; recent ones: ' + ', '.join(known) if known else ' (it has none)'}")
    return folder


def _run_folders(ws: "Workspace") -> list[Path]:
    """Every ``saes/sae_*`` folder, newest first."""
    root = runs_folder(ws)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and RUN_ID.fullmatch(p.name)), reverse=True)


# the sparsity settings of one architecture: given for another, they would be silently ignored
SPARSITY_OWNER = {"k": "topk", "l1_coefficient": "standard", "l1_warm_up_steps": "standard",
                  "l0_coefficient": "jumprelu", "l0_warm_up_steps": "jumprelu"}


def make_config(base: dict | TrainConfig | None = None, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from ``base`` (fields or a config) with ``overrides``; an unknown field is an InputError that
    names it and the closest field. Overriding one of d_sae / expansion_factor (or n_tokens / epochs) drops the
    other."""
    if base is not None and not isinstance(base, (TrainConfig, dict)):
        raise InputError(f"«config={base!r}» must be a TrainConfig or a dict of its settings, e.g. "
                         "«pass config=TrainConfig(architecture='topk', k=32)», or give the settings by name",
                         param="config")
    fields = dataclasses.asdict(base) if isinstance(base, TrainConfig) else dict(base or {})
    overrides = dict(overrides or {})
    check_setting_names([*fields, *overrides])
    architecture = overrides.get("architecture", fields.get("architecture", TrainConfig.architecture))
    architecture = "standard" if architecture == "relu" else architecture
    for name in sorted(overrides):
        owner = SPARSITY_OWNER.get(name)
        if owner is not None and owner != architecture and architecture in SPARSITY_OWNER.values():
            raise InputError(f"«{name}={overrides[name]!r}» applies to {owner} SAEs only, and this run trains a "
                             f"{architecture!r} one: leave it out, or «pass architecture={owner!r}»", param=name)
    for a, b in _PAIRS:
        if overrides.get(a) is not None and b not in overrides:
            fields[b] = None
        if overrides.get(b) is not None and a not in overrides:
            fields[a] = None
    try:
        return TrainConfig(**{**fields, **overrides})
    except InputError as exc:
        if isinstance(base, TrainConfig):
            raise
        # the settings were given by name (ws.train_sae(..., k=0)): named as given, not as the class's fields
        raise InputError(exc.template.replace(CLASS_MARK, "").replace(CLASS_SAYS_MARK, ""), param=exc.param) from None


def _check_options(timeout_s: Any, evaluate: Any) -> None:
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        raise InputError(f"«timeout_s={timeout_s!r}» must be a positive number of seconds («pass timeout_s=None» "
                         "for no limit)", param="timeout_s")
    if not any(evaluate is choice for choice in (True, False)) and evaluate != "reconstruction":
        raise InputError(f"«evaluate={evaluate!r}» is not True, False or 'reconstruction' (explained variance, L0 "
                         "and dead fraction without the model's next-token loss)", param="evaluate")


def _extraction_of(ws: "Workspace", extraction: Any) -> Extraction:
    """An Extraction from what the user passed: an id of the workspace, an Extraction, or an extraction Job."""
    if isinstance(extraction, Extraction):
        ext = extraction
    elif isinstance(extraction, str):
        ext = ws.open(extraction)
    elif callable(getattr(extraction, "extraction", None)):
        ext = extraction.extraction()
    else:
        raise InputError(f"«extraction={extraction!r}» is not an extraction: pass an id (ws.extractions() lists "
                         "them), an Extraction or an extraction Job", param="extraction")
    status = ext.record.status
    if status != Status.COMPLETED:
        advice = "wait for it to complete" if status in LIVE_STATES else \
            f"resume it first (ws.resume({ext.id!r}), `mistudio resume {ext.id}`)"
        raise InputError(f"extraction {ext.id} is {status}: an SAE trains on a COMPLETED extraction; {advice}",
                         param="extraction")
    return ext


def _reference(ext: Extraction) -> ExtractionRef:
    model = ext.record.model
    return ExtractionRef(id=ext.id, location=ext.location, model=model.name_or_path, model_type=model.model_type,
                         revision=model.revision, data=_same_data(ext.record))


def _same_data(record) -> dict:
    """An extraction's :data:`SAME_DATA` settings (a Request default where the store recorded none)."""
    settings, description = record.params.model_dump(), record.dataset.model_dump()
    out = {}
    for name in SAME_DATA:
        value = settings.get(name)
        value = description.get(name) if value is None else value
        out[name] = Request.model_fields[name].default if value is None else value
    return out


# -- the job ------------------------------------------------------------------------------------------
class TrainingJob(Handle):
    """Handle on one training run. While it lives in this process its record is in memory; else in ``run.json``.

    The runner calls :meth:`execute` on its worker thread; users call ``status``, ``progress``, ``wait``,
    ``cancel``, ``retry`` and ``resume`` like an extraction Job's.
    """

    def __init__(self, ws: "Workspace", folder: Path, record: TrainingRecord | None = None):
        super().__init__()
        self.workspace = ws
        self.folder = Path(folder)
        self.id: str = self.folder.name
        self._also_notify = ws.listeners
        self._record = record  # the live record (run.json follows it); None: read run.json
        self._lock = threading.RLock()
        self._in_memory = False
        self._lost: StoreLost | None = None
        self._deadline: float | None = None
        self._progress: dict = {}
        self._emitted_at = 0.0
        self._history = None  # the open history file while training

    def __repr__(self) -> str:
        return f"TrainingJob({self.id!r}, status={self.status})"

    # -- observing --------------------------------------------------------------------------------
    @property
    def record(self) -> TrainingRecord:
        """The typed record: in memory while the job lives here, else read fresh from ``run.json``."""
        with self._lock:
            if self._record is not None and (self._live or self._in_memory):
                return self._record.model_copy(deep=True)
        return read_record(self.folder)

    @property
    def progress(self) -> dict:
        """Step, tokens and their totals with the trainer's last figures (loss, l0, explained_variance,
        dead_fraction, tokens_per_s, eta_s ...)."""
        with self._lock:
            if self._live and self._progress:
                return dict(self._progress)
        record = self.record
        return {**record.metrics, **record.progress.model_dump()}

    @property
    def ended_in_memory(self) -> bool:
        """The end is known only here: ``run.json`` could not be written (its folder was deleted)."""
        return self._in_memory

    @property
    def hook_point(self) -> str:
        return self.record.hook_point

    @property
    def sae_path(self) -> Path:
        """Where the trained SAE is (or will be), in SAELens's format."""
        return self.folder / SAE_DIR

    @property
    def evaluation(self) -> dict | None:
        return self.record.evaluation

    def history(self) -> list[dict]:
        """The trainer's figures so far, in step order."""
        return read_history(self.folder)

    def sae(self, device: str = "cpu") -> SAE:
        """The trained SAE (``mistudio.saes.SAE``)."""
        if not (self.sae_path / "cfg.json").is_file():
            raise InputError(f"training run {self.id} is {self.status}: it has no trained SAE yet")
        return load_sae(self.sae_path, device=device)

    def extraction(self) -> Extraction:
        """The extraction the run trains on."""
        return Extraction.open(self.record.extraction.location)

    def warnings(self) -> list[str]:
        """What a researcher should know of this run before trusting its SAE: it passes over the same rows more
        than :data:`MANY_PASSES` times (:meth:`warning_templates`, worded for Python)."""
        return [render(w) for w in self.warning_templates()]

    def warning_templates(self) -> list[str]:
        """:meth:`warnings` marked for the front ends (see :func:`mistudio.errors.render`)."""
        record = self.record
        total, rows = record.progress.total_tokens, record.rows
        if not total or not rows or total / rows <= MANY_PASSES:
            return []
        return [f"this run passes over the {rows:,} rows of {record.extraction.id} {total / rows:,.0f} times: an SAE "
                "trained this often on so few rows fits them, and its features may not hold beyond them; extract "
                "more samples, or train for less («n_tokens», «epochs»)"]

    def extract_arguments(self, dataset: Any = None, *, partial: bool = False) -> dict:
        """Arguments for ``ws.submit`` (or the Extract tab's form) that extract with this run's SAE: the SAE at its
        hook point, the extraction's model (and revision) and dataset, every setting that shaped the tokens it read
        and their values (``window``, ``stride``, ``max_length``, ``add_special_tokens``, ``chat_template``,
        ``model_dtype``, the storage ``dtype`` ...: :data:`SAME_DATA`, recorded with the run, so known when the
        extraction is gone), the hook
        point's layer and kind. With another ``dataset``, the first's ``text_column``, ``encoding`` and
        ``max_samples`` are left out (they describe that dataset).
        ``dataset`` replaces the extraction's; it is needed when that one cannot be named again (an in-memory list
        or frame, or an extraction that is gone): then this raises, saying so, unless ``partial`` (the Studio asks
        for the data in its Dataset tab), which leaves it out."""
        record = self.record
        if record.status != Status.COMPLETED:
            raise InputError(f"training run {self.id} is {record.status}: extract with its SAE once it is COMPLETED")
        _, layer, kind = record.hook_point.split(".")[:3]
        arguments: dict[str, Any] = {"saes": {record.hook_point: str(self.sae_path)}, "model": record.extraction.model,
                                     "layers": [int(layer)], "hooks": [kind]}
        if record.extraction.revision:
            arguments["revision"] = record.extraction.revision
        try:
            stored = self.extraction().record
        except Exception:  # noqa: BLE001 - the extraction is gone: the run recorded how it read its data
            same, unknown = record.extraction.data or {}, f"its extraction {record.extraction.id} is gone"
        else:
            same = _same_data(stored)
            try:
                arguments["dataset"] = dataset_source(stored.dataset.model_dump())
                unknown = None
            except InputError:  # made from an in-memory list or frame: the user gives the data again
                unknown = f"its extraction {record.extraction.id} was made from in-memory data, which is not saved"
        arguments.update(same)  # all of them: the Studio's form shows each one
        if dataset is not None:
            arguments["dataset"] = dataset
            for name in OF_THE_DATASET:  # another dataset: its own column, encoding and length
                arguments.pop(name, None)
        elif unknown is not None and not partial:  # ws.submit would fall back on the bundled sample
            raise InputError(f"training run {self.id} cannot name the data to extract with its SAE: {unknown}. Give "
                             "it: «pass dataset=» (e.g. job.extract_arguments(dataset=texts))", param="dataset")
        return arguments

    def _owner(self, record: TrainingRecord) -> str | None:
        return live_owner(record, self.workspace.live_here(self.id))

    # -- acting -----------------------------------------------------------------------------------
    def cancel(self) -> "TrainingJob":
        """Stop before the next step (a checkpoint of the last step is written), end CANCELLED; a queued run never
        starts. Resume continues from the checkpoint."""
        if self._live:
            self._cancel.set()
        else:
            cancel_training(self.workspace, self.id)
        return self

    def retry(self, **overrides: Any) -> "TrainingJob":
        """A new run with this one's settings and ``overrides`` (TrainConfig fields, hook_point, extraction,
        timeout_s, evaluate), linked by ``retry_of``."""
        return retry_training(self.workspace, self.id, **overrides)

    def resume(self) -> "TrainingJob":
        """Continue in this run's folder from its checkpoint (exactly where it stopped)."""
        return resume_training(self.workspace, self.id)

    # -- driven by the runner ---------------------------------------------------------------------
    def emit(self, event: str, **payload: Any) -> None:
        """Tell this job's listeners, then the workspace's; a broken listener never breaks the job."""
        record = {"event": event, "job_id": self.id, "kind": "training", "time": time.time(), **payload}
        call_all(self.listeners, record)
        call_all(self._also_notify, record)

    def execute(self, models) -> None:
        """The run's whole life on the runner's thread. Never raises."""
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(stop,), daemon=True, name="mistudio-train-heartbeat")
        try:
            beat.start()
            if self._cancel.is_set():
                raise JobCancelled("cancelled before it started")
            try:
                self._run(models)
            finally:  # every line written is on disk before the end state is heard
                self._close_history()
        except JobCancelled:
            self._end(lambda: self._set_state(Status.CANCELLED, error=None, timings={"finished": now()}))
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a FAILED record
            self._end(functools.partial(self._fail, exc))
        finally:
            stop.set()
            beat.join()

    # -- the run ----------------------------------------------------------------------------------
    def _run(self, models) -> None:
        record = self._record
        started = now()
        self._deadline = started + record.timeout_s if record.timeout_s else None
        self._set_state(Status.LOADING, error=None,
                        timings={"started": record.timings.started or started, "finished": None})
        try:
            ext = Extraction.open(record.extraction.location)
            ext.record  # noqa: B018 - read now: a missing store says so before training
        except FileNotFoundError:
            raise InputError(f"extraction {record.extraction.id} is gone from {record.extraction.location}: this run "
                             "cannot continue (retry it on another extraction: «pass extraction=<another id>»)",
                             param="extraction") from None
        config = record.train_config()
        self._check()
        self._set_state(Status.TRAINING)
        self._history = open(self.folder / HISTORY_FILE, "a", encoding="utf-8")
        result = train_sae(ext, record.hook_point, config, self.folder, check=self._check, progress=self._on_progress)
        self._close_history()
        history = [_finite(h) for h in result.history]
        write_atomic(str(self.folder / HISTORY_FILE), "".join(json.dumps(h) + "\n" for h in history).encode())
        last = history[-1] if history else {}
        with self._lock:
            self._progress = dict(last)
        seconds = result.elapsed_s
        rate = result.tokens / seconds if seconds else None
        self._set_state(Status.SAVING, sae_path=str(result.path), metrics=last,
                        progress=_progress_of(last) if last else {},
                        timings={"train_seconds": seconds, "tokens_per_s": rate})
        if record.evaluate:  # a moment (a model load and forwards for the loss): said, so nobody thinks it hangs
            self.emit("evaluating", loss=record.evaluate is True)
        evaluation = self._evaluate(result.sae, ext, models) if record.evaluate else None
        if evaluation is not None:
            write_atomic(str(self.folder / EVALUATION_FILE), json.dumps(evaluation, indent=1).encode())
        self._set_state(Status.COMPLETED, evaluation=evaluation, timings={"finished": now()})
        self.emit("completed", steps=result.steps, tokens=result.tokens, seconds=seconds, metrics=last,
                  evaluation=evaluation, sae_path=str(result.path))

    def _evaluate(self, sae: SAE, ext: Extraction, models) -> dict:
        """evaluate_sae over the stored rows; for a decoder model (unless evaluate='reconstruction') with the
        next-token loss spliced. A model that cannot be loaded leaves the loss out and says why."""
        record = self._record
        ref = record.extraction
        rows_of_training = record.train_config().exclude_special  # evaluated on the rows it was trained on
        model: Any = None
        if record.evaluate is True and ref.model and ref.model_type not in ENCODER_TYPES:
            model = ref.model
        try:
            if model is not None and ref.revision is not None:  # a Hub revision: the loaded model carries it
                model = models.get(ModelSpec(name_or_path=ref.model, revision=ref.revision, device=str(sae.device),
                                             dtype="float32"))
            figures = evaluate_sae(sae, ext, record.hook_point, model=model, exclude_special=rows_of_training,
                                   check=self._check_stop)
        except (InputError, OSError) as exc:
            if model is None:
                raise
            figures = evaluate_sae(sae, ext, record.hook_point, exclude_special=rows_of_training,
                                   check=self._check_stop)
            figures["ce_error"] = (f"the next-token loss was not measured: the model {ref.model!r} could not be "
                                   f"loaded ({exc}). The SAE is saved; to measure it, load the model from where it "
                                   "is now: mistudio.analysis.sae_training.evaluate_sae(job.sae(), "
                                   "job.extraction(), job.hook_point, model=<its folder>)")
        return _finite(figures)

    def _on_progress(self, figures: dict) -> None:
        """The trainer's figures (on the job's thread): to the history file always; to run.json and the listeners
        at most every PROGRESS_EVERY_S, and at the last step."""
        figures = _finite(figures)
        if self._history is not None:
            self._history.write(json.dumps(figures) + "\n")
        with self._lock:
            self._progress = dict(figures)
            self._record.metrics = dict(figures)
            for key, value in _progress_of(figures).items():
                setattr(self._record.progress, key, value)
        moment = time.monotonic()
        if moment - self._emitted_at < PROGRESS_EVERY_S and figures["step"] < figures["total_steps"]:
            return
        self._emitted_at = moment
        if self._history is not None:
            self._history.flush()
        self._save(durable=False)
        self.emit("progress", **figures)

    def _close_history(self) -> None:
        if self._history is not None:
            try:
                self._history.close()
            except OSError:
                pass
            self._history = None

    # -- state ------------------------------------------------------------------------------------
    def _save(self, durable: bool = True) -> None:
        """Write the record to run.json; a run folder deleted under the job is StoreLost (never recreated)."""
        with self._lock:
            if not (self.folder / RUN_FILE).is_file():
                raise StoreLost(f"the training run folder {self.folder} was deleted or moved while its job ran")
            try:
                write_record(self.folder, self._record, durable=durable)
            except FileNotFoundError:
                raise StoreLost(f"the training run folder {self.folder} was deleted while its job ran") from None

    def _set_state(self, status: Status, **fields: Any) -> None:
        with self._lock:
            record = self._record
            previous = record.status
            for key, value in fields.items():
                if key in ("timings", "progress"):
                    section = getattr(record, key)
                    for name, item in value.items():
                        setattr(section, name, item)
                elif key == "error":
                    record.error = ErrorRecord.model_validate(value) if value is not None else None
                else:
                    setattr(record, key, value)
            record.status = status
            record.heartbeat = Heartbeat.model_validate(heartbeat())
            self._save()
        self.emit("state", status=status.value, previous=previous.value)

    def _check(self) -> None:
        """Raise if the run must stop (before every training step: cheap)."""
        self._check_stop()
        if self._deadline is not None and now() > self._deadline:
            raise JobTimeout(f"The training ran past its time limit of {self._record.timeout_s:g} s.")

    def _check_stop(self) -> None:
        """Raise if the run was cancelled or its folder lost (the evaluation's check: the time limit is the
        training's, which a resume could not make shorter)."""
        if self._lost is not None:
            raise self._lost
        if self._cancel.is_set():
            raise JobCancelled("cancelled by the user")

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    self._record.heartbeat = Heartbeat.model_validate(heartbeat())
                    self._save(durable=False)  # advisory: not worth a disk flush
            except StoreLost as exc:
                self._lost = exc  # the run stops at its next check
                return
            except Exception:  # noqa: BLE001 - a full disk must not kill the run from this thread
                log.exception("mistudio heartbeat write failed for %s", self.id)

    def _error(self, exc: BaseException) -> dict:
        error = classify(exc, {"batch_size": self._record.config.get("batch_size")})
        if isinstance(exc, JobTimeout):  # said for a training run, not an extraction
            template = (f"{exc} Resume it to continue from its last checkpoint (each resumed run has the same time "
                        "again), or retry it with fewer tokens («pass n_tokens»).")
            error.update(error_message=render(template), error_template=template)
        # a bad setting fails again on resume, checkpoint or not: the one rule is storage.metadata.can_resume's
        error.setdefault("resume_available", error["error_type"] != "VALIDATION")
        error.update(retry_available=True, cancel_available=False, failed_at=now())
        return error

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, StoreLost):
            raise exc
        ref = self._record.extraction
        gone = not _exists(ref.location)
        if gone and not isinstance(exc, InputError):  # deleted while the run read it
            exc = InputError(f"extraction {ref.id} is gone from {ref.location} (deleted while this run read it): this "
                             "run cannot continue (retry it on another extraction: «pass extraction=<another id>»)",
                             param="extraction")
        error = self._error(exc)
        if gone:  # a checkpoint does not help: its rows are gone
            error["resume_available"] = False
        if error["error_type"] == "UNKNOWN":
            log.error("mistudio training %s failed", self.id, exc_info=exc)
        self._set_state(Status.FAILED, error=error, timings={"finished": now()})
        self.emit("failed", **error)

    def _end(self, write_end_state: Callable[[], None]) -> None:
        """Write the end state; if that fails (folder deleted, disk full) the run still ends FAILED, in memory."""
        try:
            write_end_state()
        except Exception as exc:  # noqa: BLE001
            if not isinstance(exc, StoreLost):
                log.exception("mistudio could not record the end of training %s", self.id)
            with self._lock:
                previous = self._record.status
                error = {**self._error(exc), "resume_available": False}
                self._record.status = Status.FAILED
                self._record.error = ErrorRecord.model_validate(error)
                self._in_memory = True
            self.emit("state", status=Status.FAILED.value, previous=previous.value)
            self.emit("failed", **error)


def _exists(location: str) -> bool:
    """Whether an extraction's store is still there (a remote one is assumed to be)."""
    if "://" in location and not location.startswith("file://"):
        return True
    return os.path.isdir(location.removeprefix("file://"))


def _progress_of(figures: dict) -> dict:
    return {k: figures[k] for k in ("step", "total_steps", "tokens", "total_tokens", "epoch") if k in figures}


# -- the workspace's side -----------------------------------------------------------------------------
def submit_training(ws: "Workspace", extraction: Any, hook_point: str, *, config: TrainConfig | None = None,
                    timeout_s: float | None = None, evaluate: bool | str = True, **settings: Any) -> TrainingJob:
    """Check everything, create ``<workspace>/saes/<run id>/`` (QUEUED) and queue the run on the workspace's
    job runner. Nothing is created when a check fails.

    ``extraction``: an id of ``ws``, an Extraction or an extraction Job (COMPLETED). ``settings``: TrainConfig
    fields (``architecture``, ``d_sae`` or ``expansion_factor``, ``k``, ``l1_coefficient``, ``lr``, ``batch_size``,
    ``n_tokens`` or ``epochs`` ...), over ``config`` if given. ``timeout_s`` stops the run (resumable) after that
    long; ``evaluate``: True (explained variance, L0, dead fraction and, for decoder models, the next-token loss
    with the reconstruction spliced in), ``"reconstruction"`` (without the loss) or False.
    """
    _check_options(timeout_s, evaluate)
    runs_folder(ws)  # a remote workspace is refused before anything is read
    ext = _extraction_of(ws, extraction)
    plan = plan_training(ext, hook_point, make_config(config, settings))
    return _start(ws, ext, plan, timeout_s, evaluate, lineage={})


def _start(ws: "Workspace", ext: Extraction, plan: TrainingPlan, timeout_s: float | None, evaluate: bool | str,
           lineage: dict) -> TrainingJob:
    run_id = new_run_id()
    folder = runs_folder(ws) / run_id
    record = TrainingRecord(
        id=run_id, nonce=new_nonce(), status=Status.QUEUED, extraction=_reference(ext), hook_point=plan.hook_point,
        config=plan.config.to_dict(), d_in=plan.d_in, d_sae=plan.d_sae, rows=plan.rows, timeout_s=timeout_s,
        evaluate=evaluate, progress=TrainProgress(total_steps=plan.total_steps, total_tokens=plan.total_tokens),
        timings=TrainTimings(created=now()), heartbeat=Heartbeat.model_validate(heartbeat()), **lineage)
    runner = ws.runner
    with runner.setting_up(run_id):  # a recover meanwhile (the Train tab's listing) leaves the new QUEUED run alone
        try:
            folder.mkdir(parents=True)
            write_record(folder, record)
        except OSError as exc:
            if folder.exists():
                _remove_new_folder(folder)
            raise InputError(f"workspace {ws.root!r} cannot hold a training run ({exc.strerror or exc}): «pass "
                             "workspace=<a folder you can write, with free space>»", param="workspace") from exc
        job = TrainingJob(ws, folder, record)
        runner.enqueue(job)
    return job


def _remove_new_folder(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def training_job(ws: "Workspace", run_id: str) -> TrainingJob:
    """A handle on any run: the live one if it runs here, else one that reads ``run.json`` (a run whose process
    died is marked FAILED/INTERRUPTED first, as a listing marks it)."""
    run_id = check_run_id(run_id)
    live = ws.runner.live_job(run_id) or ws.runner.ended_in_memory(run_id)
    if isinstance(live, TrainingJob):
        return live
    folder = run_folder(ws, run_id)
    try:
        _mark_interrupted(ws, folder, read_record(folder))
    except (OSError, ValueError):  # unreadable: the handle says so when read
        pass
    return TrainingJob(ws, folder)


def readers_of(ws: "Workspace", extraction_id: str) -> list[str]:
    """The live training runs (here or in another process) that read extraction ``extraction_id`` (none in a
    remote workspace: runs live in local ones)."""
    if ws.remote:
        return []
    out = []
    for folder in _run_folders(ws):
        try:
            record = read_record(folder)
        except Exception:  # noqa: BLE001 - an unreadable run reads nothing
            continue
        if record.extraction.id == extraction_id and live_owner(record, ws.live_here(record.id)) is not None:
            out.append(record.id)
    return out


def _ensure_free(ws: "Workspace", job: TrainingJob) -> TrainingRecord:
    """Refuse to restart a run whose job is live, here or in another process."""
    if job.live:
        raise StoreBusy(f"training run {job.id} is {job.status} in this kernel: wait for it or cancel it first")
    record = read_record(job.folder)
    who = live_owner(record, ws.live_here(job.id))
    if who is not None:
        raise StoreBusy(f"training run {job.id} is {record.status} in another process ({who}): wait for it, or "
                        "cancel it from there")
    return record


def resume_training(ws: "Workspace", run_id: str) -> TrainingJob:
    """Continue a FAILED/CANCELLED/INTERRUPTED run in its folder, from its checkpoint (exactly)."""
    job = training_job(ws, run_id)
    record = _ensure_free(ws, job)
    if record.status == Status.COMPLETED:
        raise InputError(f"training run {run_id} is already COMPLETED: nothing to resume (retry trains again, with "
                         "other settings if you pass them)")
    error = record.error
    if not can_resume(record.status, error):
        why = f"it failed [{error.error_type}] {error.error_message.rstrip('.')}" if error is not None \
            else f"it is {record.status}"
        raise InputError(f"training run {run_id} cannot resume: {why}. Resuming would fail again: retry it (with the "
                         "settings corrected) instead")
    source = record.extraction
    if not _exists(source.location):  # refused up front: the run keeps its state and its checkpoint
        raise InputError(f"training run {run_id} reads extraction {source.id}, which is not at {source.location} "
                         f"(moved, deleted or on a disk not mounted): the run stays {record.status} with its "
                         "checkpoint. Bring the store back and resume again, or retry it on another extraction: «pass "
                         "extraction=<another id>»", param="extraction")
    record.resumes.append({"at": now(), "last_step": record.progress.step, "previous_status": record.status.value,
                           "previous_error": error.error_type if error is not None else None})
    record.status = Status.QUEUED
    record.heartbeat = Heartbeat.model_validate(heartbeat())
    write_record(job.folder, record)
    resumed = TrainingJob(ws, job.folder, record)
    ws.runner.enqueue(resumed)
    return resumed


def retry_training(ws: "Workspace", run_id: str, **overrides: Any) -> TrainingJob:
    """A new run with ``run_id``'s settings and ``overrides`` (TrainConfig fields, ``hook_point``, ``extraction``,
    ``timeout_s``, ``evaluate``), checked again, linked by ``retry_of``, ``retry_count``, ``retry_reason``."""
    old = training_job(ws, run_id).record
    hook_point = overrides.pop("hook_point", old.hook_point)
    timeout_s = overrides.pop("timeout_s", old.timeout_s)
    evaluate = overrides.pop("evaluate", old.evaluate)
    _check_options(timeout_s, evaluate)
    if "extraction" in overrides:
        ext = _extraction_of(ws, overrides.pop("extraction"))
    else:
        try:
            ext = _extraction_of(ws, Extraction.open(old.extraction.location))
        except FileNotFoundError:
            raise InputError(f"extraction {old.extraction.id} of training run {run_id} is gone: retry it on another "
                             "extraction, «pass extraction=<another id>»", param="extraction") from None
    config = make_config(old.config, overrides)
    plan = plan_training(ext, hook_point, config)
    before = {**old.config, "hook_point": old.hook_point, "extraction": old.extraction.id,
              "timeout_s": old.timeout_s, "evaluate": old.evaluate}
    after = {**config.to_dict(), "hook_point": hook_point, "extraction": ext.id, "timeout_s": timeout_s,
             "evaluate": evaluate}
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    reason = old.error.error_type if old.error is not None else old.status.value.lower()
    lineage = {"retry_of": old.id, "retry_count": old.retry_count + 1, "retry_reason": reason,
               "retry_overrides": changed}
    return _start(ws, ext, plan, timeout_s, evaluate, lineage)


def cancel_training(ws: "Workspace", run_id: str) -> TrainingJob:
    """Cancel a run queued or running in this process (one of another process: cancel it there)."""
    job = training_job(ws, run_id)
    if job.live:
        return job.cancel()
    record = job.record
    who = live_owner(record, ws.live_here(job.id))
    if who is not None:
        raise InputError(f"training run {job.id} runs in another process ({who}): cancel it from there")
    return job


def recover_trainings(ws: "Workspace") -> list[str]:
    """Mark live-state runs whose process is gone as FAILED/INTERRUPTED (resumable); returns their ids."""
    marked = []
    for folder in _run_folders(ws):
        try:
            record = read_record(folder)
        except Exception:  # noqa: BLE001 - unreadable runs are listed as such
            continue
        if _mark_interrupted(ws, folder, record):
            marked.append(record.id)
    return marked


def _mark_interrupted(ws: "Workspace", folder: Path, record: TrainingRecord) -> bool:
    """Mark ``record`` (a live state that no live process owns) FAILED/INTERRUPTED, resumable; whether it was."""
    if not record.live or live_owner(record, ws.live_here(record.id)) is not None:
        return False
    beat, progress = record.heartbeat, record.progress
    reached = (f"it had reached step {progress.step:,} of {progress.total_steps:,}" if progress.total_steps
               else "it had not started training")
    record.error = ErrorRecord.model_validate({
        "error_type": "INTERRUPTED",
        "error_message": (f"The process running this training (pid {beat.pid} on {beat.host}) ended while it was "
                          f"{record.status}: most likely the kernel was restarted or crashed. {reached}; resume "
                          "it to continue from its last checkpoint, or retry it from scratch."),
        "retry_available": True, "resume_available": True, "cancel_available": False, "failed_at": now(),
        "interrupted_in": record.status.value})
    record.status = Status.FAILED
    try:
        write_record(folder, record)
    except OSError:
        log.exception("mistudio could not mark training run %s interrupted", record.id)
        return False
    return True


LIST_COLUMNS = ["id", "status", "error", "message", "extraction", "model", "hook_point", "architecture", "d_sae",
                "sparsity", "step", "total_steps", "tokens", "total_tokens", "loss", "l0", "explained_variance",
                "dead_fraction", "eval_explained_variance", "eval_l0", "eval_dead_fraction", "ce_loss_score",
                "created", "retry_of", "folder", "problem"]


def _row(ws: "Workspace", folder: Path) -> dict:
    base = {**dict.fromkeys(LIST_COLUMNS), "id": folder.name, "folder": str(folder), "message": "", "error": "",
            "problem": "", "retry_of": "", "created": 0.0}
    live = ws.runner.live_job(folder.name) if ws.live_here(folder.name) else None
    try:
        record = live.record if isinstance(live, TrainingJob) else read_record(folder)
    except Exception as exc:  # noqa: BLE001 - shown as such
        return {**base, "status": "UNREADABLE", "problem": f"{type(exc).__name__}: {exc}"[:200]}
    config, metrics, evaluation = record.config, record.metrics, record.evaluation or {}
    sparsity = {"topk": f"k={config.get('k')}", "standard": f"l1={config.get('l1_coefficient')}",
                "jumprelu": f"l0={config.get('l0_coefficient')}"}.get(config.get("architecture"), "")
    return {**base, "status": record.status.value, "error": record.error.error_type if record.error else "",
            "message": record.error.error_message if record.error else "", "extraction": record.extraction.id,
            "model": record.extraction.model, "hook_point": record.hook_point,
            "architecture": config.get("architecture"), "d_sae": record.d_sae, "sparsity": sparsity,
            **record.progress.model_dump(include={"step", "total_steps", "tokens", "total_tokens"}),
            **{k: metrics.get(k) for k in ("loss", "l0", "explained_variance", "dead_fraction")},
            "eval_explained_variance": evaluation.get("explained_variance"), "eval_l0": evaluation.get("l0"),
            "eval_dead_fraction": evaluation.get("dead_fraction"),
            "ce_loss_score": evaluation.get("ce_loss_score"), "created": record.timings.created,
            "retry_of": record.retry_of or ""}


def list_trainings(ws: "Workspace", recover: bool = True) -> list[dict]:
    """Every training run of the workspace, newest first, one dict per run (see :data:`LIST_COLUMNS`; ``created``
    in seconds since the epoch). Runs whose process died are marked FAILED/INTERRUPTED first (``recover``)."""
    if recover:
        recover_trainings(ws)
    rows = [_row(ws, folder) for folder in _run_folders(ws)]
    rows.sort(key=lambda r: (r["created"] or 0.0, r["id"]), reverse=True)
    return rows
