"""The store's metadata (``attrs['mistudio']``) as typed models, read and written here only.

The JSON layout on disk is the one format version 1 wrote (lineage fields at the top level), so
every existing store opens. Unknown keys are kept (a newer mistudio may have written them).
"""
from __future__ import annotations

import secrets
import time
from enum import Enum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 2  # 2: activation arrays may be sharded (storage.shard_rows); 1: one file per chunk


class Status(str, Enum):
    """A job's state. Compares equal to its name as a string (``status == "COMPLETED"``)."""

    QUEUED = "QUEUED"
    LOADING = "LOADING"
    EXTRACTING = "EXTRACTING"
    SAVING = "SAVING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def live(self) -> bool:
        return self in LIVE_STATES


LIVE_STATES = (Status.QUEUED, Status.LOADING, Status.EXTRACTING, Status.SAVING)
END_STATES = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", use_enum_values=False)


class Progress(_Section):
    samples_committed: int = 0
    tokens_committed: int = 0
    samples_total: int | None = None
    tokens_total: int | None = None
    chunk_rows: int | None = None


class Heartbeat(_Section):
    """Who runs the job (pid, host, process start tick against pid reuse) and when it last said so."""

    pid: int | None = None
    host: str | None = None
    proc_start: str | None = None
    time: float = 0.0


class ErrorRecord(_Section):
    error_type: str
    error_message: str
    suggested_retry_params: dict = Field(default_factory=dict)
    retry_available: bool = True
    resume_available: bool = False
    cancel_available: bool = False
    failed_at: float | None = None


class Timings(_Section):
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    tokens_per_s: float | None = None
    extract_seconds: float | None = None


class ExtractionMeta(_Section):
    """Everything ``attrs['mistudio']`` holds. Lineage (``retry_of`` ...) sits at the top level."""

    format_version: int = FORMAT_VERSION
    id: str
    nonce: str | None = None  # written at creation: a job checks it before writing (was the store replaced?)
    status: Status
    model: dict = Field(default_factory=dict)
    dataset: dict = Field(default_factory=dict)
    params: dict = Field(default_factory=dict)
    hook_points: list[str] = Field(default_factory=list)
    progress: Progress = Field(default_factory=Progress)
    timings: Timings = Field(default_factory=Timings)
    heartbeat: Heartbeat = Field(default_factory=Heartbeat)
    error: ErrorRecord | None = None
    retry_of: str | None = None
    retry_count: int = 0
    retry_reason: str | None = None
    auto_retried: bool = False
    retry_overrides: dict = Field(default_factory=dict)
    attempts: list[dict] = Field(default_factory=list)
    resumes: list[dict] = Field(default_factory=list)
    statistics: dict[str, dict] = Field(default_factory=dict)
    storage: dict = Field(default_factory=dict)  # how arrays are stored: {"checksum": bool}

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATES

    def committed_tokens(self) -> int:
        """Tokens whose rows are final: all of them once COMPLETED, else the commit mark."""
        if self.status == Status.COMPLETED and self.progress.tokens_total is not None:
            return int(self.progress.tokens_total)
        return int(self.progress.tokens_committed)

    def to_json(self) -> dict:
        """The JSON-able dict stored on disk (and handed to users as ``meta``)."""
        return self.model_dump(mode="json", exclude_none=False)


def new_nonce() -> str:
    return secrets.token_hex(8)


def jsonable(value: Any) -> Any:
    """Numpy scalars, tuples and models into plain JSON types, recursively."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


_REPLACED_WHOLE = {"error"}  # dict sections that a write replaces instead of merging into


def merged(meta: ExtractionMeta, sections: dict[str, Any]) -> ExtractionMeta:
    """A copy of ``meta`` with top-level sections replaced; dict sections merge key by key (validated)."""
    data = meta.to_json()
    for key, value in sections.items():
        value = jsonable(value)
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key not in _REPLACED_WHOLE:
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ExtractionMeta.model_validate(data)


def parse(raw: Any) -> ExtractionMeta:
    """Validate the raw ``attrs['mistudio']`` dict (raises pydantic's ValidationError when damaged)."""
    return ExtractionMeta.model_validate(raw)


def now() -> float:
    return time.time()
