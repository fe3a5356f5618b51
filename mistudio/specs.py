"""Validated specs of an extraction: which model, which data, what to capture, how to store it."""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, field_validator

from .errors import InputError

BATCH_SIZES = tuple(2**i for i in range(10))  # 1 .. 512
HOOK_KINDS = ("residual", "mlp", "attention")
STORAGE_DTYPES = ("float16", "float32")
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "mps")
OOV_POLICIES = ("clamp", "skip", "error")
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """A model to load: Hub id or local folder, its compute dtype and device."""

    name_or_path: str
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    revision: str | None = None

    @field_validator("name_or_path")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not str(v).strip():
            raise ValueError("model is empty: give a Hugging Face id such as 'gpt2' or a local folder")
        return str(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        base = v.split(":")[0]
        if base not in DEVICES:
            raise ValueError(f"device={v!r} is not one of {DEVICES} (optionally 'cuda:N')")
        return v


class HubDataset(_Spec):
    """A dataset on the Hugging Face Hub: name, split and the text column."""

    name: str
    split: str = "train"
    column: str = "text"
    config: str | None = None


class DatasetSpec(_Spec):
    """Where the rows come from and how they are cut into tokens."""

    source: Union[HubDataset, str, list]
    text_column: str = "text"
    max_samples: int | None = None
    max_length: int = 128
    add_special_tokens: bool = True

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"max_length={v} must be a positive number of tokens, e.g. max_length=128")
        return v

    @field_validator("max_samples")
    @classmethod
    def _max_samples(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"max_samples={v} must be positive, or None for every row")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("dataset is an empty list: give at least one text")
            return v
        if isinstance(v, (str, os.PathLike)):
            v = str(v)
            if v == "sample":
                return v
            path = Path(v).expanduser()
            if not path.exists():
                raise ValueError(
                    f"dataset path {v!r} does not exist: give an existing .txt/.jsonl/.csv/.parquet file, "
                    "a folder saved with datasets' save_to_disk, a list of strings, "
                    "ms.sample_dataset(), or ms.HubDataset(name, split, column)"
                )
            if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
                raise ValueError(
                    f"dataset file {v!r} has an unsupported type {path.suffix!r}: "
                    f"supported are {', '.join(DATA_SUFFIXES)} files and saved `datasets` folders"
                )
            return str(path.resolve())
        return v

    def describe(self) -> dict:
        """A JSON-able description for the metadata (in-memory lists are summarised, not copied)."""
        if isinstance(self.source, list):
            source: Any = {"kind": "list", "n_rows": len(self.source)}
        elif isinstance(self.source, HubDataset):
            source = {"kind": "hub", **self.source.model_dump()}
        elif self.source == "sample":
            source = {"kind": "sample"}
        else:
            source = {"kind": "path", "path": self.source}
        return {"source": source, **self.model_dump(exclude={"source"})}

    @classmethod
    def from_description(cls, desc: dict) -> "DatasetSpec":
        """Rebuild a spec from :meth:`describe`; in-memory lists cannot be rebuilt."""
        src = desc["source"]
        kind = src["kind"]
        if kind == "list":
            raise InputError(
                "this extraction was made from an in-memory list of texts, which is not saved on disk: "
                "pass the texts again, e.g. ws.retry(id, dataset=my_texts)"
            )
        source = {"hub": lambda: HubDataset(**{k: v for k, v in src.items() if k != "kind"}),
                  "sample": lambda: "sample", "path": lambda: src["path"]}[kind]()
        rest = {k: v for k, v in desc.items() if k in cls.model_fields and k != "source"}
        return build(cls, source=source, **rest)


class CaptureSpec(_Spec):
    """What to capture and how to store it."""

    layers: list[int]
    hooks: list[str] = ["residual"]
    batch_size: int = 8
    dtype: Literal["float16", "float32"] = "float16"
    oov_policy: Literal["clamp", "skip", "error"] = "clamp"
    padding_side: Literal["right", "left"] = "right"
    chunk_mb: float = 2.0
    checksum: bool = True  # a crc32c per chunk: a damaged chunk raises StoreCorrupted instead of reading wrong

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("layers is empty: name at least one block index, e.g. layers=[0, 3]")
        return sorted(set(v))

    @field_validator("hooks")
    @classmethod
    def _hooks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"hooks is empty: choose from {HOOK_KINDS}")
        for kind in v:
            if kind not in HOOK_KINDS:
                raise ValueError(f"unknown hook kind {kind!r}: choose from {HOOK_KINDS}")
        return [k for k in HOOK_KINDS if k in v]

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int) -> int:
        if v not in BATCH_SIZES:
            raise ValueError(f"batch_size={v} is not allowed: use a power of two from 1 to 512, e.g. 8")
        return v

    @field_validator("chunk_mb")
    @classmethod
    def _chunk_mb(cls, v: float) -> float:
        if not 0.01 <= v <= 64:
            raise ValueError(f"chunk_mb={v} is out of range: use 1 to 4 (MB per chunk)")
        return v

    def hook_points(self) -> list[str]:
        """Every ``layers.{i}.{kind}`` this capture writes, layer-major."""
        return [f"layers.{i}.{k}" for i in self.layers for k in self.hooks]


def build(cls: type[BaseModel], **values: Any) -> Any:
    """Construct a spec, turning pydantic's report into one InputError that names value and fix."""
    try:
        return cls(**values)
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "value_error":
                lines.append(msg)
            else:
                lines.append(f"{where}={err.get('input')!r}: {msg}")
        raise InputError("; ".join(lines)) from None


@dataclass
class JobRequest:
    """Everything a job needs to run; ``before_batch`` is a fault-injection hook for tests."""

    model: ModelSpec
    dataset: DatasetSpec
    capture: CaptureSpec
    timeout_s: float | None = None
    auto_retry_on_oom: bool = False
    before_batch: Callable[[int, int], None] | None = field(default=None, repr=False)
    cluster: Any = field(default=None, repr=False)  # a dask.distributed Client: shard over its workers

    def params(self) -> dict:
        """Flat, JSON-able parameters: what the metadata records and a retry copies."""
        return {
            **self.capture.model_dump(),
            "max_samples": self.dataset.max_samples, "max_length": self.dataset.max_length,
            "text_column": self.dataset.text_column, "add_special_tokens": self.dataset.add_special_tokens,
            "model_dtype": self.model.dtype, "device": self.model.device,
            "timeout_s": self.timeout_s, "auto_retry_on_oom": self.auto_retry_on_oom,
        }


def make_request(model: str | ModelSpec, dataset: Any, layers: list[int], hooks: list[str] | tuple = ("residual",),
                 batch_size: int = 8, max_samples: int | None = None, max_length: int = 128,
                 dtype: str = "float16", model_dtype: str = "auto", device: str = "auto",
                 text_column: str = "text", add_special_tokens: bool = True, oov_policy: str = "clamp",
                 padding_side: str = "right", chunk_mb: float = 2.0, timeout_s: float | None = None,
                 auto_retry_on_oom: bool = False, revision: str | None = None, checksum: bool = True,
                 before_batch: Callable[[int, int], None] | None = None, cluster: Any = None) -> JobRequest:
    """Validate every argument of ``ms.extract`` / ``ws.submit`` before anything is loaded or written."""
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(hooks, str):
        hooks = [hooks]
    model_spec = model if isinstance(model, ModelSpec) else build(
        ModelSpec, name_or_path=str(model), dtype=model_dtype, device=device, revision=revision)
    if dataset is None:
        raise InputError("dataset is missing: pass ms.sample_dataset(), a file path, a list of strings, "
                         "or ms.HubDataset(name, split, column)")
    dataset_spec = dataset if isinstance(dataset, DatasetSpec) else build(
        DatasetSpec, source=dataset, text_column=text_column, max_samples=max_samples, max_length=max_length,
        add_special_tokens=add_special_tokens)
    capture = build(CaptureSpec, layers=list(layers), hooks=list(hooks), batch_size=batch_size, dtype=dtype,
                    oov_policy=oov_policy, padding_side=padding_side, chunk_mb=chunk_mb, checksum=checksum)
    if timeout_s is not None and timeout_s <= 0:
        raise InputError(f"timeout_s={timeout_s} must be a positive number of seconds, or None for no limit")
    if cluster is not None and not (hasattr(cluster, "submit") and hasattr(cluster, "scheduler_info")):
        raise InputError(f"cluster={cluster!r} is not a dask.distributed Client: pass Client(LocalCluster()) or "
                         "Client('tcp://scheduler:8786')")
    return JobRequest(model_spec, dataset_spec, capture, timeout_s, bool(auto_retry_on_oom), before_batch, cluster)


def request_from_meta(meta: dict, need_dataset: bool = True, **overrides: Any) -> JobRequest:
    """Rebuild a job's request from its stored metadata, with overrides (retry/resume after a restart).

    A resume of an allocated store reads its tokens from the store, so it needs no dataset.
    """
    params = dict(meta["params"])
    dataset = overrides.pop("dataset", None)
    if dataset is None and need_dataset:
        dataset = DatasetSpec.from_description(meta["dataset"]).source
    elif dataset is None:
        dataset = ["(tokens are read from the store)"]
    args = {"model": meta["model"]["name_or_path"], "dataset": dataset, "revision": meta["model"].get("revision"),
            **{k: params[k] for k in ("layers", "hooks", "batch_size", "max_samples", "max_length", "dtype",
                                      "model_dtype", "device", "text_column", "add_special_tokens", "oov_policy",
                                      "padding_side", "chunk_mb", "timeout_s", "auto_retry_on_oom")}}
    args.update(overrides)
    return make_request(**args)
