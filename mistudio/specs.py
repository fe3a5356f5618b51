"""Validated specs of an extraction: which model, which data, what to capture, how to store it."""
from __future__ import annotations

import codecs
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator, model_validator

from .errors import InputError
from .formats import file_format

BATCH_SIZES = tuple(2**i for i in range(10))  # 1 .. 512
HOOK_KINDS = ("residual", "mlp", "attention")
STORAGE_DTYPES = ("float16", "float32")
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "mps")
OOV_POLICIES = ("clamp", "skip", "error")
LAYER_FORMS = "an int, a list of ints, a string such as '0,3' or '2-5' (inclusive), or 'all'"
_EXAMPLES = {"batch_size": "8", "max_length": "128", "max_samples": "1000", "chunk_mb": "2.0",
             "max_batch_tokens": "4096", "micro_batch_size": "2", "auto_batch_memory_fraction": "0.8"}
QUANTIZATIONS = ("int8", "nf4")


def _no_bool(value: Any, info: ValidationInfo) -> Any:
    """Numbers are numbers: True is not 1 (pydantic's lax mode would take it); numpy scalars become Python's."""
    if isinstance(value, (bool, np.bool_)):
        name = info.field_name
        raise ValueError(f"{name}={value!r} is a boolean, not a number: pass a number, e.g. "
                         f"{name}={_EXAMPLES.get(name, '1')}")
    return value.item() if isinstance(value, np.generic) else value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_layers(value: Any) -> list[int] | Literal["all"]:
    """Block indices from an int, a list/tuple/set/range/array of ints, '0,3', '2-5' (inclusive) or 'all'.

    Returns the sorted, de-duplicated indices, or ``"all"`` (which needs the model's layer count).
    """
    shown = _short(value)

    def bad(why: str) -> InputError:
        return InputError(f"layers={shown} {why}: give {LAYER_FORMS}")

    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return "all"
        items: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
            if m is None:
                raise bad(f"has {part!r}, which is neither a layer index nor a range like '2-5'")
            if m[3] is not None:
                items.append(int(m[3]))
            elif int(m[1]) > int(m[2]):
                raise bad(f"has the range {part!r}, which runs backwards (write '{m[2]}-{m[1]}')")
            else:
                items.extend(range(int(m[1]), int(m[2]) + 1))
    else:
        if isinstance(value, np.ndarray):
            value = value.tolist() if value.ndim else value.item()
        values = value if isinstance(value, (list, tuple, range, set, frozenset)) else [value]
        items = []
        for x in values:
            if isinstance(x, (bool, np.bool_)):
                raise bad(f"has {x!r}, a boolean, not a layer index")
            if not isinstance(x, (int, np.integer)):
                raise bad(f"has {x!r}, which is not a whole number")
            items.append(int(x))
    if not items:
        raise InputError(f"layers is empty: name at least one block index, e.g. layers=[0, 3]; give {LAYER_FORMS}")
    negative = [i for i in items if i < 0]
    if negative:
        raise InputError(f"layers={shown}: layer index {negative[0]} is out of range: blocks count from 0; "
                         f"give {LAYER_FORMS}")
    return sorted(set(items))


def pandas_kind(value: Any) -> str | None:
    """'dataframe' or 'series' for pandas objects (without importing pandas when nobody did)."""
    pd = sys.modules.get("pandas")
    if pd is None:
        return None
    return "dataframe" if isinstance(value, pd.DataFrame) else "series" if isinstance(value, pd.Series) else None


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """A model to load: Hub id or local folder, its compute dtype and device."""

    name_or_path: str
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    revision: str | None = None
    device_map: str | dict[str, Any] | None = None  # accelerate's: "auto", "balanced", {"module": device}
    max_memory: dict[str | int, str | int] | None = None  # with device_map: {0: "20GiB", "cpu": "60GiB"}
    quantization: Literal["int8", "nf4"] | None = None  # through bitsandbytes (pip install "mistudio[quant]")

    @field_validator("quantization", mode="before")
    @classmethod
    def _quantization(cls, v: Any) -> Any:
        if v is not None and v not in QUANTIZATIONS:
            raise ValueError(f"quantization={v!r} is not one of {QUANTIZATIONS}: pass 'int8', 'nf4' or None")
        return v

    @model_validator(mode="after")
    def _memory_needs_map(self) -> "ModelSpec":
        if self.max_memory is not None and self.device_map is None:
            raise ValueError(f"max_memory={self.max_memory!r} needs device_map: pass device_map='auto' with it")
        return self

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
    """Where the rows come from and how they are cut into tokens.

    ``source`` is ``"sample"``, a path (as given: a link keeps its own name, which decides the format), a list
    of texts or token-id lists, a pandas DataFrame (read from ``text_column``) or Series, or a HubDataset.
    """

    source: Any
    text_column: str = "text"
    max_samples: Int | None = None
    max_length: Int = 128
    add_special_tokens: bool = True
    encoding: str = "utf-8"
    chat_template: str | None = None  # "auto": the tokenizer's own; or a Jinja template string

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("chat_template is empty: pass chat_template='auto' (the tokenizer's template), "
                             "a Jinja template string, or None for plain text")
        return v

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

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"encoding={v!r} is not a text encoding Python knows: use e.g. 'utf-8' or "
                             "'latin-1'") from None
        return v

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Any:
        if isinstance(v, HubDataset):
            return v
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, list) or pandas_kind(v):
            if len(v) == 0:
                raise ValueError(f"dataset is an empty {pandas_kind(v) or 'list'}: give at least one text")
            return v
        if isinstance(v, (str, os.PathLike)):
            v = os.fspath(v)
            if v == "sample":
                return v
            path = Path(os.path.abspath(os.path.expanduser(v)))  # not resolved: a link's name decides the format
            if not path.exists():
                link = f" (a broken link to {os.path.realpath(path)!r})" if path.is_symlink() else ""
                raise ValueError(
                    f"dataset path {v!r}{link} does not exist: give an existing .txt/.jsonl/.csv/.parquet file, "
                    "a folder saved with datasets' save_to_disk, a list of strings, a pandas DataFrame, "
                    "ms.sample_dataset(), or ms.HubDataset(name, split, column)"
                )
            if path.is_file():
                file_format(path)  # refuses files it cannot read, naming the link's target
            return str(path)
        raise ValueError(
            f"dataset={_short(v)} ({type(v).__name__}) is not a dataset mistudio can read: give a file path, a "
            "list of strings, a pandas DataFrame or Series, ms.sample_dataset(), or ms.HubDataset(name, split, column)"
        )

    @model_validator(mode="after")
    def _frame_column(self) -> "DatasetSpec":
        if pandas_kind(self.source) == "dataframe" and self.text_column not in self.source.columns:
            raise ValueError(f"text column {self.text_column!r} is not in the DataFrame: its columns are "
                             f"{list(self.source.columns)}; pass text_column=<one of them>")
        return self

    def describe(self) -> dict:
        """A JSON-able description for the metadata (in-memory lists and frames are summarised, not copied)."""
        kind = pandas_kind(self.source)
        if isinstance(self.source, list) or kind:
            source: Any = {"kind": kind or "list", "n_rows": len(self.source)}
            if kind == "dataframe":
                source["columns"] = [str(c) for c in self.source.columns]
        elif isinstance(self.source, HubDataset):
            source = {"kind": "hub", **self.source.model_dump()}
        elif self.source == "sample":
            source = {"kind": "sample"}
        else:
            source = {"kind": "path", "path": self.source}
        return {"source": source, **self.model_dump(exclude={"source"})}

    @classmethod
    def from_description(cls, desc: dict) -> "DatasetSpec":
        """Rebuild a spec from :meth:`describe`; in-memory lists and frames cannot be rebuilt."""
        src = desc["source"]
        kind = src["kind"]
        if kind in ("list", "dataframe", "series"):
            what = {"list": "list of texts", "dataframe": "pandas DataFrame", "series": "pandas Series"}[kind]
            raise InputError(
                f"this extraction was made from an in-memory {what}, which is not saved on disk: "
                "pass it again, e.g. ws.retry(id, dataset=my_texts)"
            )
        source = {"hub": lambda: HubDataset(**{k: v for k, v in src.items() if k != "kind"}),
                  "sample": lambda: "sample", "path": lambda: src["path"]}[kind]()
        rest = {k: v for k, v in desc.items() if k in cls.model_fields and k != "source"}
        return build(cls, source=source, **rest)


class CaptureSpec(_Spec):
    """What to capture and how to store it."""

    layers: list[int]
    hooks: list[str] = ["residual"]
    batch_size: Int | Literal["auto"] = 8
    max_batch_tokens: Int | None = None  # batches cut by padded tokens instead of a sample count
    micro_batch_size: Int | None = None  # split each planned batch into forwards of this many samples
    auto_batch_memory_fraction: Float = 0.8  # batch_size="auto" on an accelerator: the share it may use
    dtype: Literal["float16", "float32"] = "float16"
    oov_policy: Literal["clamp", "skip", "error"] = "clamp"
    padding_side: Literal["right", "left"] = "right"
    chunk_mb: Float = 2.0
    shard_mb: Float = 32.0  # activation arrays larger than this are sharded (format 2); 0: one file per chunk
    checksum: bool = True  # a crc32c per chunk: a damaged chunk raises StoreCorrupted instead of reading wrong
    window: Int | None = None  # documents longer than this are cut into overlapping windows, not truncated
    stride: Int | None = None  # step between windows (default: window // 2)
    exclude_special: bool = False  # special tokens get no activation rows

    @model_validator(mode="after")
    def _window(self) -> "CaptureSpec":
        if self.window is None:
            if self.stride is not None:
                raise ValueError(f"stride={self.stride} needs a window: pass window=<tokens per window>, e.g. "
                                 f"window=512, stride=256")
            return self
        if self.window < 2:
            raise ValueError(f"window={self.window} is too small: pass a window of at least 2 tokens, e.g. window=512")
        if self.stride is None:
            object.__setattr__(self, "stride", max(1, self.window // 2))
        elif not 1 <= self.stride <= self.window:
            raise ValueError(f"stride={self.stride} must be from 1 to window={self.window}: e.g. "
                             f"stride={max(1, self.window // 2)}")
        return self

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> list[int]:
        layers = parse_layers(v)
        if layers == "all":
            raise ValueError("layers='all' needs the model's layer count: pass it to ms.extract or ws.submit, "
                             "which read it from the model's config")
        return layers

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
    def _batch_size(cls, v: int | str) -> int | str:
        if v != "auto" and v not in BATCH_SIZES:
            raise ValueError(f"batch_size={v!r} is not allowed: use a power of two from 1 to 512, e.g. 8, "
                             "or 'auto'")
        return v

    @field_validator("max_batch_tokens", "micro_batch_size")
    @classmethod
    def _positive(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"{info.field_name}={v} must be a positive number, e.g. "
                             f"{info.field_name}={_EXAMPLES[info.field_name]}, or None")
        return v

    @field_validator("auto_batch_memory_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.05 <= v <= 1:
            raise ValueError(f"auto_batch_memory_fraction={v} is out of range: use 0.05 to 1, e.g. 0.8")
        return v

    @model_validator(mode="after")
    def _one_sizing(self) -> "CaptureSpec":
        if self.batch_size == "auto" and self.max_batch_tokens is not None:
            raise ValueError(f"batch_size='auto' and max_batch_tokens={self.max_batch_tokens} both size the "
                             "batches: pass one of them")
        return self

    @field_validator("chunk_mb")
    @classmethod
    def _chunk_mb(cls, v: float) -> float:
        if not 0.01 <= v <= 64:
            raise ValueError(f"chunk_mb={v} is out of range: use 1 to 4 (MB per chunk)")
        return v

    @field_validator("shard_mb")
    @classmethod
    def _shard_mb(cls, v: float) -> float:
        if not 0 <= v <= 4096:
            raise ValueError(f"shard_mb={v} is out of range: use 32 to 256 (MB per shard), or 0 for no shards")
        return v

    def hook_points(self) -> list[str]:
        """Every ``layers.{i}.{kind}`` this capture writes, layer-major."""
        return [f"layers.{i}.{k}" for i in self.layers for k in self.hooks]


def build(cls: type[BaseModel], names: dict[str, str] | None = None, **values: Any) -> Any:
    """Construct a spec, turning pydantic's report into one InputError that names value and fix.

    ``names`` maps spec fields to the argument names the user typed (``dtype`` of a ModelSpec is the user's
    ``model_dtype``), so that every message names what the user actually passed.
    """
    try:
        return cls(**values)
    except pydantic.ValidationError as exc:
        lines, unions = [], set()
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            loc = err["loc"]
            if len(loc) > 1 and isinstance(loc[1], str) and ("[" in loc[1] or loc[1] in ("int", "float", "str")):
                if loc[0] in unions:  # a union (batch_size: a number or 'auto'): its first member's message
                    continue
                unions.add(loc[0])
                loc = loc[:1]
            if not loc:  # a whole-spec check: its message names its arguments
                lines.append(msg)
                continue
            name = (names or {}).get(str(loc[0]), str(loc[0]))
            if re.match(rf"{re.escape(name)}\b", msg):
                lines.append(msg)
            else:
                where = name + "".join(f"[{p!r}]" for p in loc[1:])
                lines.append(f"{where}={_short(err.get('input'))}: {msg}")
        raise InputError("; ".join(lines)) from None
