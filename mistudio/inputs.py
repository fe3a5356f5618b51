"""What a job reads when it runs, held to what the user submitted.

Jobs run one after another on the workspace's worker, so a queued job reads its dataset and its model's files
minutes after ``submit`` returned. A notebook that rewrites ``data.jsonl`` (or re-saves a model folder) and submits
again, in a loop, would otherwise get every store filled from the last version, each labelled as its own. So:

- in-memory data (a list, a DataFrame, a Series) is copied at submit: changing it afterwards changes no job;
- files are recorded at submit by identity (size, modification time, inode), and the smaller ones, up to
  ``DIGEST_BUDGET`` bytes an input, by a digest of their bytes too. They are checked again once the job has read
  them: a file that changed in between fails the job, saying which file and how to avoid it. A file whose identity
  changed but whose digest did not (a loop that regenerates the same rows before each submit) is not a change, if
  it did not change while the job read it (then the job may have read other bytes: A, B, A again).
"""
from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .fingerprints import file_kind
from .request import Request
from .specs import pandas_kind

Identity = tuple[int, int, int]  # size, modification time (ns), inode
DIGEST_BUDGET = 64 * 2**20  # bytes of an input's files hashed at submit (smallest first): ~0.1 s of the submit call


def _identity(path: Path) -> Identity | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def files_of(path: Path, only=None) -> dict[str, Identity | None]:
    """The identities of a file, or of the files at the top of a folder (``only``: a filter on their names)."""
    if path.is_file():
        return {path.name: _identity(path)}
    if not path.is_dir():
        return {}
    return {p.name: _identity(p) for p in sorted(path.iterdir()) if p.is_file() and (only is None or only(p.name))}


def _digest(path: Path) -> str | None:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def digests_of(path: Path, identities: dict[str, Identity | None]) -> dict[str, str | None]:
    """Digests of the bytes of ``identities``' files in ``path`` (a file, or a folder), smallest first, while they
    fit in ``DIGEST_BUDGET`` bytes in all (a larger file is held by identity alone)."""
    folder = path if path.is_dir() else path.parent
    digests, spent = {}, 0
    for name, identity in sorted((kv for kv in identities.items() if kv[1] is not None), key=lambda kv: kv[1][0]):
        spent += identity[0]
        if spent > DIGEST_BUDGET:
            break
        digests[name] = _digest(folder / name)
    return digests


def dataset_files(request: Request) -> tuple[Path, dict[str, Identity | None]] | None:
    """A file or folder dataset's path and its files' identities (None for in-memory, sample and Hub data)."""
    src = request.dataset
    if not isinstance(src, str) or src == "sample":
        return None
    path = Path(src)
    return path, files_of(path)


def model_files(request: Request) -> tuple[Path, dict[str, Identity | None]] | None:
    """A local model folder's files that ``from_pretrained`` reads (weights, config, tokenizer), by identity, through
    the path as given (a link repointed since, 'latest' -> another checkpoint, shows as changed). None for a Hub id:
    its cached snapshot is immutable (a download in between only adds the files the job needs)."""
    path = Path(request.model).expanduser()
    return (path, files_of(path, only=file_kind)) if path.is_dir() else None


def frozen(request: Request) -> Request:
    """The request with its in-memory dataset copied, so the job runs on the data as it was at submit."""
    src = request.dataset
    if isinstance(src, list):  # texts are immutable; token-id lists, arrays and chat records are copied
        rows = [row if isinstance(row, (str, bytes, int, float, type(None))) else copy.deepcopy(row) for row in src]
        return request.model_copy(update={"dataset": rows})
    if pandas_kind(src):
        return request.model_copy(update={"dataset": src.copy(deep=True)})
    return request


@dataclass(frozen=True)
class SubmittedInputs:
    """The dataset's and the model's files as they were when the job was submitted."""

    dataset: tuple[Path, dict[str, Identity | None]] | None = None
    model: tuple[Path, dict[str, Identity | None]] | None = None
    digests: dict[str, dict[str, str | None]] = field(default_factory=dict)  # "dataset"/"model": digests_of's
    at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, request: Request) -> "SubmittedInputs":
        dataset, model = dataset_files(request), model_files(request)
        return cls(dataset=dataset, model=model, digests={
            param: digests_of(*recorded) for param, recorded in (("dataset", dataset), ("model", model)) if recorded})

    def identities(self, param: str) -> dict[str, Identity | None] | None:
        """The identities of the ``"dataset"``'s or ``"model"``'s files now: take them before the job reads the
        files, and pass them to the check after (``read_from``)."""
        recorded = self.dataset if param == "dataset" else self.model
        return None if recorded is None else files_of(recorded[0], only=None if param == "dataset" else file_kind)

    def check_dataset(self, read_from: dict | None = None) -> None:
        """Raise InputError when the dataset's files changed since submit (call it after the job read them, with
        the :meth:`identities` taken before)."""
        self._check(self.dataset, None, "dataset", "the dataset", "write each version to a file of its own (or pass "
                    "the rows as a list), or submit once the file is final", read_from)

    def check_model(self, read_from: dict | None = None) -> None:
        """Raise InputError when the model folder's files changed since submit (call it after the job loaded it,
        with the :meth:`identities` taken before)."""
        self._check(self.model, file_kind, "model", "the model", "save each version to a folder of its own (e.g. "
                    "save_pretrained(f'ckpt-{step}')), or submit once the folder is final", read_from)

    def _check(self, recorded, only, param: str, what: str, fix: str, read_from: dict | None) -> None:
        """``recorded``: (path, identities) as :func:`files_of` took them with ``only``; taken again and compared. A
        file whose identity changed but whose bytes are the submitted ones is no change, unless it changed while
        the job read it (``read_from``: the identities before the read): the bytes read may have been others."""
        if recorded is None:
            return
        path, before = recorded
        after = files_of(path, only=only)
        changed = [n for n in before.keys() | after.keys() if before.get(n) != after.get(n)]
        stable = set() if read_from is None else {n for n in changed if read_from.get(n) == after.get(n)}
        digests, folder = self.digests.get(param, {}), path if path.is_dir() else path.parent
        same_bytes = {n for n in changed if n in stable and digests.get(n) and after.get(n)
                      and after[n][0] == before[n][0] and _digest(folder / n) == digests[n]}
        changed = sorted(set(changed) - same_bytes)
        if not changed:
            return
        at = time.strftime("%H:%M:%S", time.localtime(self.at))
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise InputError(f"{what} changed after this job was submitted (at {at}): {shown} in {os.fspath(path)!r} "
                         f"{'was' if len(changed) == 1 else 'were'} written, added or removed since, so the job "
                         f"would have run on data you did not submit. Nothing was extracted: {fix}", param=param)
