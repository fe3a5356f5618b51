"""The blocking entry points: ``ms.extract`` and ``ms.open_extraction``; their keywords are the Request's."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .errors import ExtractionFailed, InputError, JobCancelled, StoreCorrupted, render
from .extraction import Extraction
from .jobs import Job
from .listing import nearest_existing
from .progress import TqdmListener
from .request import with_request_keywords
from .workspace import Workspace



@with_request_keywords
def extract(model: Any = None, dataset: Any = None, layers: Any = None, hooks: Any = None, *,
            workspace: str | os.PathLike | None = None, storage_options: dict | None = None, progress: bool = True,
            preset: str | None = None, cluster: Any = None, **options: Any) -> Extraction:
    """Run one extraction to the end and return it (blocking; Ctrl-C cancels and keeps what was saved).

    The keywords are the fields of :class:`mistudio.request.Request` (``batch_size``, ``max_samples``,
    ``max_length``, ``dtype`` (storage), ``model_dtype``, ``device``, ``window``/``stride``, ``chat_template``,
    ``exclude_special`` ...), plus ``preset=`` (a saved preset of the workspace; arguments given here override it),
    ``cluster=`` (a dask client) and ``workspace=``. Unset, ``dataset`` is the bundled sample, ``layers`` [0] and
    ``hooks`` residual. A failed job raises: bad input as ``InputError``, anything else as ``ExtractionFailed``
    carrying the error record and suggested retry.
    """
    ws = Workspace(workspace, storage_options=storage_options)
    made = os.path.join(ws.root, "extractions")
    existing = None if ws.remote else str(nearest_existing(made))  # what a refusal must not remove
    if hooks is not None:
        options["hooks"] = hooks
    job = ws.submit(model, dataset, layers, preset=preset, cluster=cluster, **options)
    bar = job.subscribe(TqdmListener()) if progress else None
    try:
        wait_or_cancel(job, ws)
    finally:
        if bar is not None:
            bar.close()
    status = job.status
    if status == "COMPLETED":
        ext = job.extraction()
        for line in ext.warnings() if progress else ():  # under the bar, on its stream: what to know before trusting
            print(f"warning: {render(line)}", file=sys.stderr)
        return ext
    if status == "CANCELLED":
        raise JobCancelled(f"extraction {job.id} was cancelled; what was saved is kept (ws.resume({job.id!r}))")
    error = job.error or {"error_type": "UNKNOWN", "error_message": f"job ended {status}"}
    if error["error_type"] == "VALIDATION":
        if existing is not None and existing != made:  # refused while tokenizing: its store is gone, and so go
            ws.remove_if_empty(keep=existing)          # the workspace folders this call made
        raise InputError(error.get("error_template") or error["error_message"], param=error.get("param"))
    raise ExtractionFailed(job.id, error)


def wait_or_cancel(job: Job, ws: Workspace) -> Job:
    """Wait for a job; on Ctrl-C cancel it, keep what was saved, and say how to resume (KeyboardInterrupt)."""
    try:
        return job.wait()
    except KeyboardInterrupt:
        job.cancel().wait()
        done = job.progress
        raise KeyboardInterrupt(
            f"extraction {job.id} was cancelled: {done['samples_done']} of {done['samples_total'] or '?'} samples "
            f"are saved and kept in {job.store.location}; continue with `mistudio resume {job.id}` or "
            f"ms.Workspace({str(ws.root)!r}).resume({job.id!r})") from None


def open_extraction(id_or_path: str | os.PathLike, workspace: str | os.PathLike | None = None,
                    storage_options: dict | None = None) -> Extraction:
    """Open a stored extraction by id (in ``workspace``) or by the path/URL of its ``.zarr`` store."""
    text = str(id_or_path)
    if "://" in text:
        return Extraction.open(text, storage_options)
    path = Path(text).expanduser()
    fix = "give an extraction's .zarr folder (ws.extractions()['location'] lists them) or its id"
    if path.is_file():
        raise InputError(f"{text!r} is a file, not an extraction store: {fix}")
    if path.is_dir() and (path / "extractions").is_dir() and not (path / "zarr.json").exists():
        raise InputError(f"{text!r} is a workspace, not one extraction: open one of its extractions by id, "
                         f"ms.open_extraction('<id>', workspace={text!r}) (`mistudio jobs --workspace {text}` lists "
                         "the ids)")
    if path.exists():
        try:
            return Extraction.open(str(path))
        except StoreCorrupted:
            raise
        except Exception as exc:
            raise InputError(f"{text!r} is not a mistudio extraction store ({type(exc).__name__}: {exc}): "
                             f"{fix}") from exc
    if os.sep in text or "/" in text:
        raise InputError(f"there is no store at {text!r}: that path does not exist; {fix}")
    return Workspace(workspace, storage_options=storage_options).open(text)
