"""The vocabulary of a request: allowed values, the layer parser, Hub datasets, the model to load, and the turning
of pydantic's reports into one :class:`~mistudio.errors.InputError` that names the value and the fix."""
from __future__ import annotations

import re
import sys
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator, model_validator

from .errors import InputError

BATCH_SIZES = tuple(2**i for i in range(10))  # 1 .. 512
HOOK_KINDS = ("residual", "mlp", "attention")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
MODEL_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device mistudio runs on (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), or None."""
    kind, colon, index = name.partition(":")
    if kind not in DEVICES or (colon and not index.isdigit()):
        return f"is not one of {DEVICES} (optionally 'cuda:N')"
    return None


OOV_POLICIES = ("clamp", "skip", "error")
QUANTIZATIONS = ("int8", "nf4")
MAX_LAYER_INDEX = 10_000  # no model has more blocks: a larger index is refused before anything is expanded
LAYER_FORMS = "an int, a list of ints, a string such as '0,3' or '2-5' (inclusive), or 'all'"
LAYER_FORMS_SAID = (f"«py+studio:{LAYER_FORMS}»"  # in messages: the command line's own forms there
                    "«cli:an index, a list such as 0,3, a range such as 2-5 (inclusive), or all»")
EXAMPLES = {"batch_size": "8", "max_length": "128", "max_samples": "1000", "chunk_mb": "2.0", "shard_mb": "32",
            "max_batch_tokens": "4096", "micro_batch_size": "2", "auto_batch_memory_fraction": "0.8",
            "window": "512", "stride": "256", "timeout_s": "600"}


def no_bool(value: Any, info: ValidationInfo) -> Any:
    """Numbers are numbers: True is not 1 (pydantic's lax mode would take it); numpy scalars become Python's."""
    if isinstance(value, (bool, np.bool_)):
        name = info.field_name
        raise ValueError(f"«{name}={value!r}» is a boolean, not a number: pass a number, e.g. "
                         f"«{name}={EXAMPLES.get(name, '1')}»")
    return value.item() if isinstance(value, np.generic) else value


Int = Annotated[int, BeforeValidator(no_bool)]
Float = Annotated[float, BeforeValidator(no_bool)]


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_layers(value: Any, n_layers: int | None = None) -> list[int] | Literal["all"]:
    """Block indices from an int, a list/tuple/set/range/array of ints, '0,3', '2-5' (inclusive) or 'all'.

    Returns the sorted, de-duplicated indices, or ``"all"`` (which needs the model's layer count). Every index is
    checked against ``n_layers`` (when known, else :data:`MAX_LAYER_INDEX`) before any range is expanded, so
    ``'0-3000000000'`` is refused at once instead of filling the memory.
    """
    shown = short(value)
    limit = n_layers if n_layers is not None else MAX_LAYER_INDEX + 1

    def bad(why: str) -> InputError:
        return InputError(f"«layers={shown}» {why}: give {LAYER_FORMS_SAID}", param="layers")

    def out_of_range(index: int) -> InputError:
        if n_layers is None:
            return bad(f"has layer index {index}, which is out of range: no model has that many blocks")
        return InputError(f"«layers={shown}»: layer index {index} is out of range: this model has {n_layers} layers, "
                          f"use 0 to {n_layers - 1} (or «pass layers='all'»)", param="layers")

    ranges: list[range] = []  # checked by their ends before they are expanded
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return "all" if n_layers is None else list(range(n_layers))
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(\d{1,12})\s*-\s*(\d{1,12})|(\d{1,12})", part)
            if m is None:
                raise bad(f"has {part!r}, which is neither a layer index nor a range like '2-5'")
            first, last = (int(m[3]), int(m[3])) if m[3] is not None else (int(m[1]), int(m[2]))
            if first > last:
                raise bad(f"has the range {part!r}, which runs backwards (write '{m[2]}-{m[1]}')")
            ranges.append(range(first, last + 1))
    elif isinstance(value, range):
        ranges.append(value if value.step > 0 else value[::-1])
    else:
        if isinstance(value, np.ndarray):
            value = value.tolist() if value.ndim else value.item()
        for x in value if isinstance(value, (list, tuple, set, frozenset)) else [value]:
            if isinstance(x, (bool, np.bool_)):
                raise bad(f"has {x!r}, a boolean, not a layer index")
            if not isinstance(x, (int, np.integer)):
                raise bad(f"has {short(x, 30)}, which is not a whole number")
            ranges.append(range(int(x), int(x) + 1))
    ranges = [r for r in ranges if len(r)]
    if not ranges:
        raise InputError(f"«layers» is empty: name at least one block index, e.g. «pass layers=[0, 3]»; give "
                         f"{LAYER_FORMS_SAID}", param="layers")
    negative = [r[0] for r in ranges if r[0] < 0]
    if negative:
        raise InputError(f"«layers={shown}»: layer index {negative[0]} is out of range: blocks count from 0; give "
                         f"{LAYER_FORMS_SAID}", param="layers")
    highest = max(r[-1] for r in ranges)
    if highest >= limit:
        raise out_of_range(highest)
    return sorted({i for r in ranges for i in r})


def pandas_kind(value: Any) -> str | None:
    """'dataframe' or 'series' for pandas objects (without importing pandas when nobody did)."""
    pd = sys.modules.get("pandas")
    if pd is None:
        return None
    return "dataframe" if isinstance(value, pd.DataFrame) else "series" if isinstance(value, pd.Series) else None


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubDataset(Spec):
    """A dataset on the Hugging Face Hub: ``HubDataset("imdb", "train", "text")`` or by keywords."""

    name: str
    split: str = "train"
    column: str = "text"
    config: str | None = None

    def __init__(self, name: str | None = None, split: str = "train", column: str = "text",
                 config: str | None = None, **data: Any):
        if name is not None:
            data["name"] = name
        super().__init__(split=split, column=column, config=config, **data)

    @field_validator("name", "split", "column")
    @classmethod
    def _not_empty(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError(f"the Hub dataset's {info.field_name} is empty: e.g. HubDataset('imdb', 'train', 'text')")
        return v.strip()


class ModelSpec(Spec):
    """A model to load: Hub id or local folder, its compute dtype and device, and how to place or quantise it."""

    name_or_path: str
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    revision: str | None = None
    device_map: str | dict[str, Any] | None = None  # accelerate's: "auto", "balanced", {"module": device}
    max_memory: dict[str | int, str | int] | None = None  # with device_map: {0: "20GiB", "cpu": "60GiB"}
    quantization: Literal["int8", "nf4"] | None = None  # through bitsandbytes (pip install "mistudio[quant]")

    @model_validator(mode="after")
    def _memory_needs_map(self) -> "ModelSpec":
        if self.max_memory is not None and self.device_map is None:
            raise ValueError(f"«max_memory={self.max_memory!r}» needs «device_map»: "
                             "«pass device_map='auto'» with it")
        return self


def build(cls: type[BaseModel], names: dict[str, str] | None = None, **values: Any) -> Any:
    """Construct a model, turning pydantic's report into one InputError that names value and fix.

    ``names`` maps fields to the argument names the user typed (``dtype`` of a ModelSpec is the user's
    ``model_dtype``), so that every message names what the user actually passed.
    """
    try:
        return cls(**values)
    except pydantic.ValidationError as exc:
        raise validation_error(exc, names) from None


PLAIN_WORDS = {  # pydantic's type errors, in words that name no Python type
    "int_parsing": "is not a whole number", "int_type": "is not a whole number", "int_from_float": "is not a whole "
    "number", "float_parsing": "is not a number", "float_type": "is not a number", "bool_parsing": "is not true or "
    "false", "bool_type": "is not true or false", "string_type": "is not text", "dict_type": "is not a mapping",
    "list_type": "is not a list"}


def validation_error(exc: pydantic.ValidationError, names: dict[str, str] | None = None) -> InputError:
    """One InputError from a pydantic report: each problem marked with the parameter it is about."""
    lines, unions, params = [], set(), []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        msg = cause.template if isinstance(cause, InputError) else PLAIN_WORDS.get(
            err["type"], err["msg"].removeprefix("Value error, "))
        loc = err["loc"]
        if len(loc) > 1 and isinstance(loc[1], str) and ("[" in loc[1] or loc[1] in ("int", "float", "str")):
            if loc[0] in unions:  # a union (batch_size: a number or 'auto'): its first member's message
                continue
            unions.add(loc[0])
            loc = loc[:1]
        if not loc:  # a whole-model check: its message marks its parameters
            lines.append(msg)
            continue
        name = (names or {}).get(str(loc[0]), str(loc[0]))
        params.append(name)
        if "«" in msg:
            lines.append(msg)
        elif len(loc) == 1:
            lines.append(f"«{name}={short(err.get('input'))}»{' ' if err['type'] in PLAIN_WORDS else ': '}{msg}")
        else:
            where = name + "".join(f"[{p!r}]" for p in loc[1:])
            lines.append(f"{where}={short(err.get('input'))}: {msg}")
    return InputError("; ".join(lines), param=params[0] if params else None)
