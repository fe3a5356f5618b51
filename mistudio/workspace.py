"""A workspace: a folder of extraction stores (:mod:`mistudio.listing`) and the jobs that fill them: submit,
retry, resume, cancel, delete, cleanup, and its presets (:mod:`mistudio.presets`).

Every front end turns its arguments into one :class:`~mistudio.request.Request`, checked by
:func:`mistudio.plan.check` before any store exists.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import DiskFull, InputError, StoreBusy, StoreLost, disk_full_cause, disk_full_message, human_bytes, \
    render, retry_words
from .extraction import Extraction
from .inputs import SubmittedInputs, frozen
from .jobs import Job, Observable, RunOptions
from .listing import LIST_COLUMNS, Folder, check_id, default_workspace, new_id
from .models import model_source
from .plan import check, check_new, check_unchanged
from .presets import Presets, check_preset_name, from_json, preset_arguments, read_preset_file
from .request import Request, with_request_keywords
from .runner import Runner
from .storage.lease import WriterLease
from .storage.liveness import heartbeat
from .storage.metadata import FORMAT_VERSION, ExtractionMeta, Status, can_resume, new_nonce, now
from .storage.store import ExtractionStore
from .training import LIST_COLUMNS as TRAIN_COLUMNS
from .training import TrainingJob, list_trainings, readers_of, submit_training, training_job

__all__ = ["Workspace", "check_id", "check_preset_name", "human_bytes", "default_workspace"]

CREATING_GRACE_S = 120.0  # an unreadable store younger than this may still be being written: never cleaned
_RUNNERS: dict[str, Runner] = {}
_LISTENERS: dict[str, list] = {}  # per folder: every Workspace object on it hears every job of this process
_RUNNERS_LOCK = threading.Lock()


def _forget_parent_runners() -> None:
    """In a forked child (a process pool, a DataLoader worker): the parent's runners are there but not their
    threads, so a job submitted there would wait forever; the child makes runners of its own."""
    global _RUNNERS_LOCK
    _RUNNERS_LOCK = threading.Lock()  # a lock another thread of the parent held at the fork stays held in the child
    _RUNNERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_runners)


def check_options(request: Request, options: RunOptions) -> None:
    """What a run option cannot do with this request (a dask cluster runs fixed batches of every token)."""
    cluster = options.cluster
    if cluster is None:
        return
    if not (hasattr(cluster, "submit") and hasattr(cluster, "scheduler_info")):
        raise InputError(f"«cluster={cluster!r}» is not a dask.distributed Client: pass Client(LocalCluster()) or "
                         "Client('tcp://scheduler:8786')", param="cluster")
    if request.exclude_special:
        raise InputError("«exclude_special=True» is not supported with «cluster» yet: drop cluster= (run locally) "
                         "or keep special tokens («pass exclude_special=False») and mask them with tokens/special",
                         param="exclude_special")
    if request.batch_size == "auto":
        raise InputError("«batch_size='auto'» runs a trial on a local model and cannot size a dask run: pass a "
                         "number, e.g. «pass batch_size=8», with cluster=", param="batch_size")


class Workspace(Folder, Observable):
    """A folder of extraction stores (``<root>/extractions/<id>.zarr``) and the jobs that fill them.
    Its listeners receive the events of every job this process runs in the folder, whichever ``Workspace``
    object submitted it.

    Opening one marks jobs whose process died (kernel restart, crash) as FAILED/INTERRUPTED.
    Several ``Workspace`` objects on one folder share one job runner in this process.
    """

    def __init__(self, root: str | os.PathLike | None = None, storage_options: dict | None = None,
                 recover: bool = True):
        Folder.__init__(self, root, storage_options)
        Observable.__init__(self)
        with _RUNNERS_LOCK:  # shared: a Studio hears the jobs another cell submits through its own Workspace
            self.listeners = _LISTENERS.setdefault(self.root, [])
        self._handles: dict[str, Job] = {}  # jobs started through this object, kept after they end
        self.presets_folder = Presets(self)
        if recover and self.fs.exists(self._extractions_path):
            self.recover()

    @property
    def runner(self) -> Runner:
        """The job runner of this folder, shared by every Workspace on it in this process."""
        with _RUNNERS_LOCK:
            if self.root not in _RUNNERS:
                _RUNNERS[self.root] = Runner(self.root)
            return _RUNNERS[self.root]

    def live_here(self, extraction_id: str) -> bool:
        with _RUNNERS_LOCK:
            runner = _RUNNERS.get(self.root)
        return runner is not None and runner.holds(extraction_id)

    def open(self, extraction_id: str) -> Extraction:
        return Extraction(self.store(extraction_id))

    def extractions(self) -> pd.DataFrame:
        """Every store, any status, newest first: one row per store (``id`` is its folder name).

        Columns: id, status, error (type), message, model, dataset, hook_points, samples_committed,
        samples_total, tokens_committed, tokens_total, size, bytes, created (a timestamp), retry_of, damaged,
        problem, location. Unreadable stores have status ``UNREADABLE`` and ``damaged`` True.
        """
        frame = pd.DataFrame(self.rows(), columns=LIST_COLUMNS + ["created_at"])
        frame["created"] = pd.to_datetime(frame.pop("created_at"), unit="s")
        return frame.drop(columns=["nonce"])

    def remove_if_empty(self, keep: str) -> None:
        """Remove this (local) workspace's folder if it holds nothing but an empty ``extractions/``, and its empty
        parents up to ``keep`` (a folder that existed before: kept)."""
        path = self._extractions_path
        while path != keep and os.path.dirname(path) != path:
            try:
                os.rmdir(path)  # only an empty folder goes
            except OSError:
                return
            path = os.path.dirname(path)

    # -- SAE training runs ----------------------------------------------------------------------
    def train_sae(self, extraction: Any, hook_point: str, **settings: Any) -> TrainingJob:
        """Train an SAE on a COMPLETED extraction's activations at ``hook_point``, as a background job whose run
        lives in ``<workspace>/saes/<run id>/`` (``settings``: TrainConfig fields, ``timeout_s``, ``evaluate``)."""
        return submit_training(self, extraction, hook_point, **settings)

    def training(self, run_id: str) -> TrainingJob:
        """A handle on one training run (live here, or read from its ``run.json``)."""
        return training_job(self, run_id)

    def trainings(self) -> pd.DataFrame:
        """Every SAE training run, newest first (runs whose process died are marked FAILED/INTERRUPTED)."""
        frame = pd.DataFrame(list_trainings(self), columns=TRAIN_COLUMNS)
        frame["created"] = pd.to_datetime(frame["created"], unit="s")
        return frame

    # -- requests ---------------------------------------------------------------------------------
    def arguments(self, model: Any = None, dataset: Any = None, layers: Any = None, *, preset: str | None = None,
                  **options: Any) -> dict:
        """The full arguments: the preset's (if any), then those given (``None`` means "not given")."""
        given = {k: v for k, v in (("model", model), ("dataset", dataset), ("layers", layers)) if v is not None}
        args = {**(self.preset(preset) if preset is not None else {}), **given, **options}
        if args.get("model") is None:
            raise InputError("«model» is missing: «pass model» (a Hugging Face id or a local folder) or "
                             f"«pass preset» (saved presets: {self.presets_folder.names() or 'none'})", param="model")
        return args

    def request(self, model: Any = None, dataset: Any = None, layers: Any = None, *, preset: str | None = None,
                **options: Any) -> Request:
        """The checked :class:`Request` of these arguments (what ``submit`` runs and ``ms.estimate`` plans)."""
        return check_new(check(Request.build(**self.arguments(model, dataset, layers, preset=preset, **options))))

    # -- jobs -------------------------------------------------------------------------------------
    @with_request_keywords
    def submit(self, model: Any = None, dataset: Any = None, layers: Any = None, *, preset: str | None = None,
               cluster: Any = None, before_batch: Any = None, **options: Any) -> Job:
        """Check the request, create the store (QUEUED) and queue the job on the background worker.

        ``preset=name`` starts from a saved preset's arguments; anything passed here overrides them. A request that
        fails a check leaves no store. Submitting does not estimate the run (tokenizing twice costs time): call
        ``ms.estimate`` first to see its cost.
        """
        request = self.request(model, dataset, layers, preset=preset, **options)
        run = RunOptions(cluster=cluster, before_batch=before_batch)
        check_options(request, run)
        return self._start(request, run, lineage={"preset": preset} if preset is not None else {})

    def _start(self, request: Request, options: RunOptions, lineage: dict) -> Job:
        extraction_id = new_id()
        request = frozen(request)  # the job runs on the data and files as they are now, or fails saying so
        options = dataclasses.replace(options, inputs=SubmittedInputs.of(request))
        meta = ExtractionMeta.model_validate({
            "format_version": FORMAT_VERSION, "id": extraction_id, "nonce": new_nonce(), "status": "QUEUED",
            "model": {"name_or_path": request.model, "revision": request.revision},
            "dataset": request.dataset_description(), "params": request.params(),
            "hook_points": request.hook_points, "timings": {"created": now()}, "heartbeat": heartbeat(), **lineage})
        runner = self.runner
        with runner.setting_up(extraction_id):  # a recover() meanwhile leaves the new QUEUED store alone
            store = self._create(self.path_of(extraction_id), meta)
            store.take_lease("extraction", extraction_id)  # held from now until the job ends
            job = Job(self, store, request, options, also_notify=self.listeners)
            self._handles[extraction_id] = job
            runner.enqueue(job)
        return job

    def _create(self, location: str, meta: ExtractionMeta) -> ExtractionStore:
        """Create a store, or say plainly why the workspace cannot hold one (nothing is left behind)."""
        try:
            self.fs.makedirs(self._extractions_path, exist_ok=True)
            return ExtractionStore.create(location, meta,
                                          storage_options=self.storage_options if self.remote else None)
        except OSError as exc:
            if disk_full_cause(exc) is not None:
                free = shutil.disk_usage(self._root_path).free if not self.remote else None
                raise DiskFull(disk_full_message(f"workspace {self.root}", free, None, "No store was created."),
                               free=free) from exc
            raise InputError(f"workspace {self.root!r} is not writable ({exc.strerror or exc}): «pass workspace=<a "
                             "folder you can write>», or set $MISTUDIO_WORKSPACE", param="workspace") from exc

    def job(self, extraction_id: str) -> Job:
        """A handle for any extraction: the live one if it runs here, else one that reads its store."""
        extraction_id = check_id(extraction_id)
        live = (self.runner.live_job(extraction_id) or self._handles.get(extraction_id)
                or self.runner.ended_in_memory(extraction_id))
        if live is not None and (live.live or live.ended_in_memory
                                 or self.fs.exists(self.fs_path(self.path_of(extraction_id)))):
            return live
        return Job(self, self.store(extraction_id), also_notify=self.listeners)

    def cancel(self, extraction_id: str) -> Job:
        """Cancel a job queued or running in this process (a job of another process: cancel it there)."""
        job = self.job(extraction_id)
        if not job.live:
            who = self.owner_of(job.id, job.record)
            if who is not None:
                raise InputError(f"extraction {job.id} runs in another process ({who}): cancel it from there")
            return job
        return job.cancel()

    def retry(self, extraction_id: str, **overrides: Any) -> Job:
        """A new job linked to ``extraction_id`` (``retry_of``, ``retry_count``, ``retry_reason``): its request
        with ``overrides``, checked again."""
        old = self.job(extraction_id)
        meta = old.record
        run = {k: overrides.pop(k) for k in ("cluster", "before_batch") if k in overrides}
        if old.request is not None:
            request = old.request.replace(**overrides) if overrides else old.request
        else:
            request = meta.request(**overrides)
        request = check(request)
        if "micro_batch_size" in overrides:  # a contradiction typed now is refused as at submit
            check_new(request)
        options = RunOptions(cluster=run.get("cluster", old.options.cluster),
                             before_batch=run.get("before_batch", old.options.before_batch))
        check_options(request, options)
        reason = meta.error.error_type if meta.error else meta.status.value.lower()
        before = {"model": meta.model.name_or_path, **meta.params.model_dump()}
        after = {"model": request.model, **request.params()}
        changed = {k: v for k, v in after.items() if k in overrides and before.get(k) != v}
        lineage = {"retry_of": old.id, "retry_count": meta.retry_count + 1, "retry_reason": reason,
                   "auto_retried": False, "retry_overrides": changed}
        return self._start(request, options, lineage)

    def rerecord(self, extraction_id: str) -> dict[str, dict[str, int]]:
        """Write a store's missing chunk records from the checksum in each chunk's own file
        (:meth:`ExtractionStore.rerecord`): the repair when only a chunk records file (``.mistudio-chunks``) was
        lost, cut short or zeroed and the data files are where they belong; a record that names other data is
        left, and refused. Returns ``{"recorded": {array: chunks}, "left": {array: chunks}}``; ``verify()`` after
        it reports whatever is still damaged."""
        extraction_id = check_id(extraction_id)
        store = self.store(extraction_id, writable=True)
        self.ensure_free(extraction_id, store)
        store.take_lease("rerecord", extraction_id)  # no job writes it meanwhile, here or in another process
        try:
            return store.rerecord()
        finally:
            store.release_lease()

    def resume(self, extraction_id: str, batch_size: int | None = None, cluster: Any = None,
               before_batch: Any = None, model: str | os.PathLike | None = None) -> Job:
        """Continue a FAILED/CANCELLED/INTERRUPTED job in its own store from the committed mark.

        Refused at once when it cannot help (a bad request: retry it instead), and when the model cannot be found
        or is not the one the store was made with (the store is left as it was). ``model``: where the model is now,
        when it moved (its files must be the ones the store recorded). A sharded (dask) extraction reruns only its
        unfinished shards: on ``cluster`` if given, else here.
        """
        extraction_id = check_id(extraction_id)
        store = self.store(extraction_id, writable=True)
        self.ensure_free(extraction_id, store)  # a job of this kernel: said as such, before the lease is asked
        store.take_lease("resume", extraction_id)  # one writer: another process resuming it is refused by name
        try:
            return self._resume(store, extraction_id, batch_size, cluster, before_batch, model)
        except BaseException:
            store.release_lease()
            raise

    def _resume(self, store: ExtractionStore, extraction_id: str, batch_size: int | None, cluster: Any,
                before_batch: Any, model: str | os.PathLike | None) -> Job:
        meta = self.ensure_free(extraction_id, store)  # read again under the lease
        if meta.status == Status.COMPLETED:
            raise InputError(f"extraction {extraction_id} is already COMPLETED: nothing to resume ("
                             + retry_words("retry runs it again with other parameters",
                                           "`mistudio extract` with the flags you want makes a new extraction") + ")")
        error = meta.error
        # a damaged store is not offered a resume (it would stop at the damage again), but one whose files were put
        # back resumes: the job checks the committed rows it continues from
        if error is not None and not can_resume(meta.status, error) and error.error_type != "STORE_DAMAGED":
            why = ("Resuming would fail again: " + retry_words(
                "retry it (with the request corrected) instead",
                "run `mistudio extract` again with the request corrected (a new extraction)")
                if error.error_type == "VALIDATION" else
                "There is nothing stored to resume from: " + retry_words("retry it"))
            template = getattr(error, "error_template", None)  # marked: each front end's words (when it is its own)
            said = template if template and render(template) == error.error_message else error.error_message
            raise InputError(f"extraction {extraction_id} cannot resume: it failed [{error.error_type}] "
                             f"{said.rstrip('.')}. {why}")
        store.check_records()  # committed chunks in their places, before anything is written over them
        old = self._handles.get(extraction_id)
        if old is not None and old.request is not None:
            request = old.request
        elif store.is_allocated:  # the tokens are in the store: the dataset is not read again
            request = meta.request(dataset="sample")
        else:
            request = check(meta.request())
        if model is not None:
            request = request.replace(model=model)
        stored_in = meta.model.dtype if meta.progress.samples_committed else None
        if request.model_dtype == "auto" and stored_in in ("float32", "float16", "bfloat16"):
            # 'auto' resolves where the job runs (float32 on a CPU, bfloat16 on most GPUs): the rows still to come
            # are computed in the precision of those stored, wherever this resume runs
            request = request.replace(model_dtype=stored_in)
        try:
            model_source(request.model_spec)
        except InputError as exc:
            raise InputError(f"extraction {extraction_id} cannot resume yet: {exc}. Put the model back there, or "
                             "«pass model=» with where it is now (the files the store was made with); the store is "
                             "unchanged", param="model") from None
        if batch_size:
            if request.max_batch_tokens is not None and batch_size != request.batch_size:
                raise InputError(f"extraction {extraction_id} batches by «max_batch_tokens={request.max_batch_tokens}»"
                                 f": «batch_size={batch_size}» would not apply; resume without it ("
                                 + retry_words("retry with another «max_batch_tokens» to batch differently",
                                               "a new `mistudio extract` with another «max_batch_tokens» batches "
                                               "differently") + ")", param="batch_size")
            request = request.replace(batch_size=batch_size)
        hook = before_batch if before_batch is not None else old.options.before_batch if old is not None else None
        options = RunOptions(cluster=cluster, before_batch=hook)
        check_options(request, options)
        check_unchanged(request, meta)
        store.guarded = True  # from here on every write checks that the store is still this one
        store.update(status=Status.QUEUED, heartbeat=heartbeat(), params={"batch_size": request.batch_size},
                     resumes=meta.resumes + [{"at": now(), "from_sample": meta.progress.samples_committed,
                                              "previous_status": meta.status.value}])
        job = Job(self, store, request, options, also_notify=self.listeners)
        self._handles[extraction_id] = job
        self.runner.enqueue(job)
        return job

    # -- deleting ---------------------------------------------------------------------------------
    def delete(self, extraction_id: str, force: bool = False) -> int:
        """Delete one store that no live job owns; returns the bytes freed.

        A COMPLETED store (finished activations) is deleted only with ``force=True``.
        """
        extraction_id = check_id(extraction_id)
        location = self.path_of(extraction_id)
        if not self.fs.exists(self.fs_path(location)):
            self.store(extraction_id)  # raises the "no extraction" message
        if self.live_here(extraction_id):
            self.ensure_free(extraction_id, self.open_store(location))  # says "in this kernel", with the fix
        readers = readers_of(self, extraction_id)
        if readers:  # a run reading it would fail, its checkpoint of no more use
            raise StoreBusy(f"extraction {extraction_id} is being read by SAE training run {', '.join(readers)}: "
                            "wait for it to end, or cancel it (ws.training(<id>).cancel(), the Train tab's Cancel, or "
                            "Ctrl-C where `mistudio train` runs), then delete")
        lease = WriterLease.acquire(location, extraction_id, "delete", None,
                                    self.storage_options if self.remote else None)  # a writer elsewhere: refused
        try:
            try:
                store = self.open_store(location)
            except InputError:
                raise
            except Exception:  # noqa: BLE001 - an unreadable store: nobody can own it
                return self._remove(location)
            meta = self.ensure_free(extraction_id, store)
            if meta.status == Status.COMPLETED and not force:
                raise InputError(f"extraction {extraction_id} is COMPLETED: deleting it loses its activations "
                                 f"({human_bytes(self.size_of(location))}). «pass force=True» to delete it anyway",
                                 param="force")
            return self._remove(location)
        finally:
            lease.release()

    def _remove(self, location: str) -> int:
        """Remove a store folder (inside extractions/ only)."""
        if not self.inside(location):
            raise InputError(f"{location} is outside the workspace's extractions/: not deleted")
        size = self.size_of(location)
        ExtractionStore.remove(location, self.storage_options if self.remote else None)
        self._handles.pop(location.rsplit("/", 1)[1].removesuffix(".zarr"), None)
        return size

    def cleanup(self, dry_run: bool = True, force: bool = False) -> pd.DataFrame:
        """Failed, cancelled and unreadable stores with their bytes; deleted unless ``dry_run``.

        Never touches a COMPLETED store or one a live job owns. Damaged stores (unreadable, or flagged by
        the listing's checks) are deleted only with ``force=True``; an unreadable store younger than two
        minutes may still be being created and is left alone. Each store is re-checked right before it is
        deleted: one that changed since it was listed (resumed, say) is skipped.
        """
        rows = []
        for row in self.rows():
            status = row["status"]
            if status == "UNREADABLE":
                if time.time() - row["created_at"] < CREATING_GRACE_S:
                    continue
                reason = f"not a readable mistudio store ({row['problem']})"
            elif status in ("FAILED", "CANCELLED"):
                reason = f"incomplete ({status.lower()}{', ' + row['error'] if row['error'] else ''}; " \
                         f"{row['samples_committed']}/{row['samples_total']} samples)"
                if row["samples_committed"] == 0:
                    reason = f"empty ({status.lower()})"
            else:
                continue
            rows.append({"id": row["id"], "status": status, "reason": reason, "size": row["size"],
                         "bytes": row["bytes"], "damaged": bool(row["damaged"]), "deleted": False,
                         "note": "" if force or not row["damaged"] else "damaged: kept (force=True deletes it)",
                         "_location": row["location"], "_nonce": row["nonce"]})
        if not dry_run:
            for row in rows:
                if row["damaged"] and not force:
                    continue
                row["note"] = self._delete_listed(row)
                row["deleted"] = not row["note"]
        return pd.DataFrame(rows, columns=["id", "status", "reason", "size", "bytes", "damaged", "deleted", "note",
                                           "_location", "_nonce"]).drop(columns=["_location", "_nonce"])

    def _delete_listed(self, row: dict) -> str:
        """Delete the store listed in ``row`` if it is still what was listed; else say why not."""
        location = row["_location"]
        if not self.fs.exists(self.fs_path(location)):
            return "gone before deletion"
        if not self.inside(location):
            return "links outside the workspace: kept"
        try:
            meta = self.open_store(location).record
        except Exception:  # noqa: BLE001
            meta = None
        if (meta is None) != (row["status"] == "UNREADABLE"):
            return "changed since listed: kept"
        try:
            lease = WriterLease.acquire(location, row["id"], "cleanup", None,
                                        self.storage_options if self.remote else None)
        except StoreBusy as exc:
            return f"being written: kept ({exc})"
        except StoreLost:
            return "gone before deletion"
        try:
            if meta is not None:
                meta = self.open_store(location).record  # read again under the lease
                if meta.nonce != row["_nonce"] or meta.status.value != row["status"]:
                    return f"changed since listed (now {meta.status}): kept"
                if self.owner_of(row["id"], meta) is not None:
                    return "owned by a live job: kept"
            self._remove(location)
            return ""
        finally:
            lease.release()

    # -- presets ----------------------------------------------------------------------------------
    def save_preset(self, name: str, **arguments: Any) -> dict:
        """Save extraction arguments under ``name`` (``<workspace>/presets/<name>.json``, replaced if it exists).

        They are checked as ``ws.submit`` would (the model's config and the data are read): a preset that could
        not run is refused. Returns the arguments as saved (JSON: absolute paths).
        """
        check_preset_name(name)
        saved = preset_arguments(arguments)
        if saved.get("model") is None:
            raise InputError(f"preset {name!r} has no model: «pass model» (a Hugging Face id or a local folder)",
                             param="model")
        check_new(check(Request.build(**from_json(saved))))
        self.presets_folder.write(name, saved)
        return saved

    def preset(self, name: str) -> dict:
        """One preset's arguments, ready for ``ws.submit(**arguments)``."""
        return self.presets_folder.read(name)

    def presets(self) -> dict[str, dict]:
        """Every readable saved preset: name -> its arguments (as saved, JSON), sorted by name (files that cannot
        be read are left out: ``ws.preset_problems()`` names them)."""
        return self.presets_folder.all()

    def preset_problems(self) -> dict[str, str]:
        """Preset files that cannot be read: name -> why."""
        return self.presets_folder.problems()

    def delete_preset(self, name: str) -> None:
        """Delete a saved preset."""
        self.presets_folder.delete(name)

    def export_preset(self, name: str, path: str | os.PathLike) -> str:
        """Write a preset to a JSON file (to share it); returns the file's path."""
        return self.presets_folder.export(name, path)

    def import_preset(self, path: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> str:
        """Save the preset in a JSON file (from ``export_preset``) under ``name`` (default: its own name).

        Its arguments are checked like ``save_preset``'s; an existing preset is replaced only with
        ``overwrite=True``. Returns the name.
        """
        data = read_preset_file(os.path.expanduser(os.fspath(path)))
        name = check_preset_name(name if name is not None else data.name or Path(path).stem)
        if not overwrite and name in self.presets_folder.names():
            raise InputError(f"preset {name!r} already exists: «pass name=<another name>» or «pass overwrite=True»",
                             param="overwrite")
        try:
            self.save_preset(name, **from_json(data.arguments))
        except InputError as exc:  # about a key of the file: named as the file writes it
            raise InputError(f"{os.fspath(path)!r} cannot be imported: {exc.render('file')}; correct that in the "
                             "file (or export the preset again)", param="path") from None
        return name
