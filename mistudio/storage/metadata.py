"""The store's metadata (``attrs['mistudio']``) as typed models, read and written here only.

The JSON layout on disk is the one format version 1 wrote (lineage fields at the top level), so
every existing store opens. Every section is typed; unknown keys are kept (a newer mistudio may have
written them).
"""
from __future__ import annotations

import secrets
import time
from enum import Enum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..request import Request

FORMAT_VERSION = 2  # 2: activation arrays may be sharded (storage.shard_rows); 1: one file per chunk


class Status(str, Enum):
    """A job's state. Compares equal to its name as a string (``status == "COMPLETED"``)."""

    QUEUED = "QUEUED"
    LOADING = "LOADING"
    EXTRACTING = "EXTRACTING"
    TRAINING = "TRAINING"  # an SAE training job's running state
    SAVING = "SAVING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def live(self) -> bool:
        return self in LIVE_STATES


LIVE_STATES = (Status.QUEUED, Status.LOADING, Status.EXTRACTING, Status.TRAINING, Status.SAVING)
END_STATES = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", use_enum_values=False)


class ModelInfo(_Section):
    """What the model was: name, architecture, sizes, where and how it ran, and its weights' fingerprint."""

    name_or_path: str = ""
    revision: str | None = None
    model_type: str | None = None
    architecture: str | None = None
    n_layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    n_parameters: int | None = None
    parameter_bytes: int | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: dict | str | None = None
    max_memory: dict | None = None
    quantization: str | None = None
    fingerprint: dict | None = None  # {"weights": sha256, "config": sha256, "tokenizer": sha256, "files": {...}}


class DataReport(_Section):
    """What reading and tokenizing the dataset gave: rows read, samples kept, and what was dropped or cut, why."""

    n_rows_read: int = 0
    n_samples: int = 0
    n_tokens: int = 0
    n_rows: int | None = None  # activation rows (tokens less excluded special tokens)
    n_windows: int | None = None  # forwarded sequences (samples, or their windows)
    skipped: dict[str, int] = Field(default_factory=dict)  # reason -> rows
    n_skipped_invalid: int = 0  # every skipped row but the out-of-vocabulary ones (stores from before `skipped`)
    n_skipped_oov: int = 0
    n_clamped_tokens: int = 0
    n_truncated: int = 0
    n_truncated_tokens: int = 0


class DatasetInfo(_Section):
    """Where the rows came from, how they were read, and the report of reading them."""

    source: dict = Field(default_factory=dict)
    text_column: str | None = None
    max_samples: int | None = None
    max_length: int | None = None
    add_special_tokens: bool | None = None
    encoding: str | None = None
    chat_template: str | None = None
    report: DataReport | None = None


# the request's parameters as recorded (every Request field but model, revision and dataset, which have sections)
Params = create_model("Params", __base__=_Section,
                      **{name: (Any, None) for name in Request.model_fields if name not in ("model", "revision",
                                                                                           "dataset")},
                      batch_size_auto=(dict | None, None), hook_points=(list | None, None))


class HookStatistics(_Section):
    """Per hook point: moments of the stored values, per-token norm histogram and quantiles, outlier tokens."""

    count: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    max_abs: float = 0.0
    zeros: int = 0
    n_out_of_range: int = 0  # values past the storage dtype's range: stored as ±inf (float16 past ±65,504)
    n_nan: int = 0
    norm_hist: list[int] = Field(default_factory=list)
    n_outliers: int = 0
    outliers: list[list[float]] = Field(default_factory=list)
    mean: float | None = None
    std: float | None = None
    frac_zeros: float | None = None
    norm_quantiles: dict[str, float] = Field(default_factory=dict)
    outlier_threshold: float | None = None


class LatentInfo(_Section):
    """An SAE applied during the extraction: which, and how its latents are stored (``latents/<hook point>/``)."""

    sae: str  # the SAE's folder
    fingerprint: str | None = None
    architecture: str | None = None
    d_sae: int = Field(ge=1)
    k: int | None = None  # top-k SAEs: the k of the SAE
    width: int = Field(ge=1)  # latents kept per token (the largest): a top-k SAE's k, else from a probe of its L0
    width_reason: str = ""
    block_rows: int = Field(ge=1)  # rows per chunk of indices/values: the unit of the by-feature index
    hook_name: str | None = None  # the SAE's own name of its hook point (TransformerLens)
    trained_model: str | None = None  # the model the SAE says it was trained on
    trained_weights: str | None = None  # that model's weights' sha256 (an SAE mistudio trained records it)


class LatentStatistics(_Section):
    """Per SAE: rows, latents that fired (their mean is the L0), latents dropped for want of width and the rows
    that lost some, the largest latent value, stored values past the storage dtype's range (±inf) and NaN latents."""

    rows: int = 0
    active: int = 0
    dropped: int = 0
    rows_dropped: int = 0
    max: float = 0.0
    mean_l0: float = 0.0
    n_out_of_range: int = 0  # latents stored as ±inf (float16 past 65,504)
    n_nan: int = 0  # NaN latents: not stored (an empty slot)


class StorageInfo(_Section):
    """How the arrays are stored."""

    checksum: bool | None = None
    exclude_special: bool = False
    n_input_tokens: int | None = Field(None, ge=0)
    shard_rows: int | None = Field(None, ge=1)
    window: int | None = None
    stride: int | None = None
    role_codes: dict[str, int] | None = None
    chunk_records: str | None = None  # the key of the chunk records (storage/positions.py); None: a store without


class Progress(_Section):
    """Counts, never negative (a size read from here is checked against the files before it sizes anything)."""

    samples_committed: int = Field(0, ge=0)
    tokens_committed: int = Field(0, ge=0)
    samples_computed: int | None = Field(None, ge=0)  # forwarded at the last heartbeat, saved or not
    samples_total: int | None = Field(None, ge=0)
    tokens_total: int | None = Field(None, ge=0)
    chunk_rows: int | None = Field(None, ge=1)


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


def can_resume(status: "Status | str", error: dict | ErrorRecord | None) -> bool:
    """Whether a resume can continue the store: a cancelled job, or a failure whose record offers it (the one rule
    the workspace, the CLI and the Studio's buttons share)."""
    try:
        status = Status(status)
    except ValueError:  # a listing's UNREADABLE
        return False
    if status == Status.CANCELLED:
        return True
    if isinstance(error, ErrorRecord):
        error = error.model_dump()
    return status == Status.FAILED and bool((error or {}).get("resume_available"))


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
    model: ModelInfo = Field(default_factory=ModelInfo)
    dataset: DatasetInfo = Field(default_factory=DatasetInfo)
    params: Params = Field(default_factory=Params)
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
    statistics: dict[str, HookStatistics] = Field(default_factory=dict)
    latents: dict[str, LatentInfo] = Field(default_factory=dict)  # hook point -> the SAE applied there
    latent_statistics: dict[str, LatentStatistics] = Field(default_factory=dict)
    storage: StorageInfo = Field(default_factory=StorageInfo)

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATES

    def committed_tokens(self) -> int:
        """Tokens whose rows are final: all of them once COMPLETED, else the commit mark."""
        if self.status == Status.COMPLETED and self.progress.tokens_total is not None:
            return int(self.progress.tokens_total)
        return int(self.progress.tokens_committed)

    def request(self, **overrides: Any) -> Request:
        """The request this store was made with, plus ``overrides`` (see :meth:`Request.from_stored`)."""
        return Request.from_stored(self.model.model_dump(), self.dataset.model_dump(),
                                   self.params.model_dump(), **overrides)

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


_REPLACED_WHOLE = {"error", "statistics", "latent_statistics"}  # sections that a write replaces instead of merging into


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
