"""The one declaration of an extraction's parameters: :class:`Request`.

Every front end builds a Request and nothing else: ``ms.extract``/``submit``/``estimate`` from keywords, the CLI
from flags generated from the fields (:func:`params`), the Studio from its form, presets as a partial Request,
retry and resume from the stored one plus overrides. Each field says its type, default, constraint, one line of
description, its group, its Studio label, its command-line flag and whether it changes the stored bytes.

Checks that need nothing but the values run here; checks against the model's config and the data run once, in
:func:`mistudio.plan.check`, before any store exists.
"""
from __future__ import annotations

import codecs
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .errors import InputError
from .formats import file_format, named
from .specs import (BATCH_SIZES, EXAMPLES, HOOK_KINDS, LAYER_FORMS, QUANTIZATIONS, HubDataset, ModelSpec,
                    Float, Int, device_problem, pandas_kind, parse_layers, short, validation_error)

SAES_SAID = "«py+studio:«pass saes={hook point: SAE folder}»»«cli:«pass saes=HOOK_POINT=FOLDER»»"
GROUPS = ("model", "data", "capture", "batching", "storage", "run")


def sae_pairs(text: str) -> dict[str, str] | None:
    """``saes`` as the command line and the Studio's field write it, ``layers.3.residual=/path,layers.5.mlp=/other``,
    as a mapping (not checked further); None when it is not hook point=folder pairs."""
    pairs = sae_pair_list(text)
    return None if pairs is None else dict(pairs)


def sae_pair_list(text: str) -> list[tuple[str, str]] | None:
    """The (hook point, folder) pairs of ``saes`` as text, in the order given (a hook point may repeat: the caller
    refuses that); None when it is not hook point=folder pairs."""
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        return None
    return [(a.strip(), b.strip()) for a, b in pairs]


def param(default: Any, description: str, *, group: str, label: str, stored: bool, flag: str | None = None,
          **field: Any) -> Any:
    """A Request field with the metadata every front end reads (see :class:`ParamInfo`)."""
    return Field(default, description=description,
                 json_schema_extra={"group": group, "label": label, "stored": stored, "flag": flag}, **field)


class Request(BaseModel):
    """Every parameter of an extraction, declared once. Build it with :meth:`build` (errors name the value)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    # -- the model -----------------------------------------------------------------------------------
    model: str = param(None, "Hugging Face id or local model folder (anything from_pretrained takes)",
                       group="model", label="Model", stored=True, validate_default=True)
    revision: str | None = param(None, "Hub revision (branch, tag or commit) of the model", group="model",
                                 label="Revision", stored=True)
    model_dtype: Literal["auto", "float32", "float16", "bfloat16"] = param(
        "auto", "dtype the model computes in (auto: float32 on CPU, bfloat16/float16 on GPUs)", group="model",
        label="Model dtype", stored=True)
    device: str = param("auto", "where the model runs: auto, cpu, cuda, cuda:N or mps", group="model",
                        label="Device", stored=False)
    device_map: str | dict[str, Any] | None = param(
        None, "split or offload the model with accelerate: auto, balanced, or a JSON {module: device}",
        group="model", label="Device map", stored=False)
    max_memory: dict[str | int, str | int] | None = param(
        None, "with device_map: memory per device as JSON, e.g. {\"0\": \"20GiB\", \"cpu\": \"60GiB\"}",
        group="model", label="Max memory", stored=False)
    quantization: Literal["int8", "nf4"] | None = param(
        None, "load the weights quantised by bitsandbytes (CUDA): int8 or nf4", group="model",
        label="Quantization", stored=True)
    # -- the data ------------------------------------------------------------------------------------
    dataset: Any = param("sample", "sample, a .txt/.jsonl/.csv/.parquet file, a saved datasets folder, a list of "
                         "texts, a DataFrame, or ms.HubDataset(name, split, column)", group="data",
                         label="Dataset", stored=True)
    text_column: str = param("text", "column (or JSON key) that holds the text", group="data", label="Text column",
                             stored=True)
    encoding: str = param("utf-8", "text encoding of .txt/.jsonl/.csv files, e.g. latin-1", group="data",
                          label="Encoding", stored=True)
    max_samples: Int | None = param(None, "how many usable rows to extract (None: all)", group="data",
                                    label="Max samples", stored=True)
    max_length: Int = param(128, "tokens per sample; longer samples are cut (not used with window)", group="data",
                            label="Max length", stored=True)
    add_special_tokens: bool = param(True, "let the tokenizer add its special tokens ([CLS]/[SEP], BOS ...)",
                                     group="data", label="Add special tokens", stored=True)
    chat_template: str | None = param(None, "rows are conversations: auto (the tokenizer's template) or a Jinja "
                                      "template", group="data", label="Chat template", stored=True)
    window: Int | None = param(None, "long documents in overlapping windows of this many tokens instead of cut",
                               group="data", label="Window", stored=True)
    stride: Int | None = param(None, "step between windows (default: window // 2)", group="data", label="Stride",
                               stored=True)
    exclude_special: bool = param(False, "special tokens get no activation rows", group="data",
                                  label="Exclude special tokens", stored=True)
    oov_policy: Literal["clamp", "skip", "error"] = param(
        "error", "token ids outside the model's vocabulary (ids from another tokenizer): stop saying where, skip "
        "the row, or clamp them to the last id (another text)", group="data", label="Out-of-vocabulary ids",
        stored=True)
    # -- what to capture -----------------------------------------------------------------------------
    layers: list[int] | Literal["all"] = param([0], f"block indices: {LAYER_FORMS}", group="capture",
                                                label="Layers", stored=True)
    hooks: list[str] = param(["residual"], "what to capture at each layer: residual, mlp, attention",
                             group="capture", label="Hooks", stored=True)
    saes: dict[str, str] | None = param(
        None, "SAEs to apply, {hook point: SAE folder} (SAELens or sparsify format): their latents are stored "
        "sparsely as <hook point>.latents", group="capture", label="SAEs", stored=True)
    latent_width: Int | None = param(
        None, "SAE latents kept per token, the largest (None: a top-k SAE's k, else 1.5 x the most active latents "
        "of the first batch, or see latent_coverage); tokens with more lose their smallest, counted",
        group="capture", label="Latent width", stored=True)
    latent_coverage: Float | None = param(
        None, "SAEs without k or latent_width: the share of the first batch's tokens whose active latents all fit "
        "(e.g. 0.99: the width is that quantile of its latents per token, about half the bytes of 1.5 x the most "
        "active; the rest lose their smallest, counted)", group="capture", label="Latent coverage", stored=True)
    feature_statistics: Literal["auto", "on", "off"] = param(
        "auto", "dashboard statistics per feature in the same pass (density, histogram, top and quantile "
        "examples, co-occurrence): auto = of SAE latents, on = of every stored hook point too (raw neurons: "
        "costly on a CPU), off = none (computed on first read instead)", group="capture",
        label="Feature statistics", stored=True)
    # -- batching ------------------------------------------------------------------------------------
    batch_size: Int | Literal["auto"] = param(8, "samples per forward: a power of two from 1 to 512, or auto",
                                              group="batching", label="Batch size", stored=False)
    max_batch_tokens: Int | None = param(None, "cut batches by padded tokens instead of a sample count",
                                         group="batching", label="Max batch tokens", stored=False)
    micro_batch_size: Int | None = param(None, "forward each batch in pieces of this many samples",
                                         group="batching", label="Micro-batch size", stored=False)
    auto_batch_memory_fraction: Float = param(0.8, "batch_size auto on a GPU: the share of its memory to use",
                                              group="batching", label="Auto batch memory fraction", stored=False)
    padding_side: Literal["right", "left"] = param("right", "where padding goes (it never reaches the store)",
                                                   group="batching", label="Padding side", stored=False)
    # -- storage -------------------------------------------------------------------------------------
    dtype: Literal["float16", "bfloat16", "float32"] = param(
        "float16", "storage dtype of the activations (bfloat16: a bfloat16 model's values bit for bit, and the "
        "range of float32)", group="storage", label="Store as", stored=True)
    chunk_mb: Float = param(2.0, "MB per chunk of an activation array", group="storage", label="Chunk MB",
                            stored=True)
    shard_mb: Float = param(32.0, "MB per shard file of a large array (0: one file per chunk)", group="storage",
                            label="Shard MB", stored=True)
    checksum: bool = param(True, "a crc32c per chunk: damage raises instead of reading wrong", group="storage",
                           label="Checksums", stored=True)
    # -- the run -------------------------------------------------------------------------------------
    timeout_s: Float | None = param(None, "seconds before the job stops as TIMEOUT (None: no limit)", group="run",
                                    label="Timeout (s)", stored=False, flag="timeout")
    auto_retry_on_oom: bool = param(False, "on out-of-memory, continue with half the batch (at most 3 times)",
                                    group="run", label="Retry with half the batch on out-of-memory", stored=False)

    # -- validators ----------------------------------------------------------------------------------
    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> str:
        if isinstance(v, ModelSpec):
            v = v.name_or_path
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if v is None:
            raise ValueError("«model» is missing: give a Hugging Face id such as 'gpt2' or a local folder")
        if isinstance(v, str) and not v.strip():
            raise ValueError("«model» is empty: give a Hugging Face id such as 'gpt2' or a local folder")
        if not isinstance(v, str):
            raise ValueError(f"«model={short(v)}» is not a model name: give a Hugging Face id or a folder path")
        if os.path.isdir(os.path.expanduser(v)):  # a local folder: recorded where it is, not where the cwd was
            return os.path.abspath(os.path.expanduser(v))
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        problem = device_problem(v)
        if problem:
            raise ValueError(f"«device={v!r}» {problem}: «pass device='auto'»")
        return v

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("«dataset» is missing: give 'sample', a file path, a list of strings, a pandas "
                             "DataFrame, or ms.HubDataset(name, split, column)")
        if isinstance(v, HubDataset):
            return v
        if isinstance(v, dict) and set(v) == {"hub"}:  # a preset's or a stored request's Hub dataset
            return HubDataset(**v["hub"])
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, list) or pandas_kind(v):
            if len(v) == 0:
                raise ValueError(f"«dataset» is an empty {pandas_kind(v) or 'list'}: give at least one text")
            return v
        if isinstance(v, (str, os.PathLike)):
            return _dataset_path(os.fspath(v))
        raise ValueError(f"«dataset={short(v)}» ({type(v).__name__}) is not a dataset mistudio can read: give a file "
                         "path, a list of strings, a pandas DataFrame or Series, 'sample', or "
                         "ms.HubDataset(name, split, column)")

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"«encoding={v!r}» is not a text encoding Python knows: use e.g. 'utf-8' or 'latin-1' "
                             "(«pass encoding='latin-1'»)") from None
        return v

    @field_validator("text_column")
    @classmethod
    def _text_column(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("«text_column» is empty: name the column that holds the text, e.g. «pass "
                             "text_column='text'»")
        return v

    @field_validator("max_length", "window", "stride", "max_samples", "max_batch_tokens", "micro_batch_size",
                     "latent_width")
    @classmethod
    def _positive(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v <= 0:
            name = info.field_name
            tail = "" if name == "max_length" else f", or «pass {name}=None»"
            raise ValueError(f"«{name}={v}» must be a positive number, e.g. «pass {name}={EXAMPLES.get(name, '1')}»"
                             f"{tail}")
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("«chat_template» is empty: «pass chat_template='auto'» (the tokenizer's template), a "
                             "Jinja template string, or None for plain text")
        return v

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, v: Any) -> Any:
        if v is None or isinstance(v, dict):
            return v
        raise ValueError(f"«max_memory={short(v)}» is not memory per device: give it as a mapping, e.g. "
                         "max_memory={0: '20GiB', 'cpu': '60GiB'} in Python or --max-memory '{\"0\": \"20GiB\", "
                         "\"cpu\": \"60GiB\"}' on the command line (with device_map)")

    @field_validator("quantization", mode="before")
    @classmethod
    def _quantization(cls, v: Any) -> Any:
        if v is not None and v not in QUANTIZATIONS:
            raise ValueError(f"«quantization={v!r}» is not one of {QUANTIZATIONS}: «pass quantization='nf4'» (or "
                             "'int8'), or «pass quantization=None»")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> list[int] | str:
        return parse_layers(v)

    @field_validator("hooks", mode="before")
    @classmethod
    def _hooks(cls, v: Any) -> list[str]:
        if isinstance(v, str):
            v = [h.strip() for h in v.split(",") if h.strip()]
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"«hooks={short(v)}» is empty«py+studio: or not a list»: choose from "
                             f"{', '.join(HOOK_KINDS)}, e.g. «pass hooks=['residual', 'mlp']»")
        for kind in v:
            if kind not in HOOK_KINDS:
                raise ValueError(f"«hooks={short(v)}»: unknown hook kind {kind!r}: choose from {HOOK_KINDS}")
        return [k for k in HOOK_KINDS if k in v]

    @field_validator("saes", mode="before")
    @classmethod
    def _saes(cls, v: Any) -> dict[str, str] | None:
        if v is None or v == {} or v == "":
            return None
        if isinstance(v, str):  # "layers.3.residual=path,layers.5.mlp=other" (the command line's form)
            pairs = sae_pair_list(v)
            if pairs is None:
                raise ValueError(f"«saes={v!r}» is not hook point=folder pairs: e.g. «pass "
                                 "saes='layers.3.residual=/path/to/sae'» (several: comma-separated)")
        elif isinstance(v, dict):
            pairs = list(v.items())
        else:
            raise ValueError(f"«saes={short(v)}» is not a mapping: «pass saes={{'layers.3.residual': "
                             "'/path/to/sae'}»")  # from Python only: the command line's text is parsed above
        out, given = {}, {}
        for point, folder in pairs:
            parts = str(point).split(".")
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in HOOK_KINDS:
                raise ValueError(f"«saes» has the key {point!r}, which is not a hook point: use "
                                 f"'layers.<i>.<{'|'.join(HOOK_KINDS)}>', e.g. 'layers.3.residual'")
            point = f"layers.{int(parts[1])}.{parts[2]}"  # 'layers.03.mlp' is layers.3.mlp
            if point in given:
                raise ValueError(f"«saes» names {point} twice ({given[point]} and {short(folder)}): one SAE per "
                                 "hook point: keep one of them")
            given[point] = short(folder)
            if isinstance(folder, str) and not folder.strip():
                raise ValueError(f"«saes» gives no folder for {point}: write the SAE's folder after the '=', e.g. "
                                 f"«pass saes='{point}=/path/to/sae'»")
            folder = getattr(folder, "sae_path", folder)  # a training run (TrainingJob): its SAE's folder
            if not isinstance(folder, (str, os.PathLike)):
                raise ValueError(f"«saes» gives {short(folder)} for {point}, not a folder: the values are folders an "
                                 "SAE was saved to («pass saes={'layers.3.residual': '/path/to/sae'}»; an SAE object: "
                                 "sae.save('<folder>') first; a training run: the run itself, or job.sae_path)")
            path = os.path.abspath(os.path.expanduser(os.fspath(folder)))
            if not os.path.isdir(path):
                raise ValueError(f"«saes» names {os.fspath(folder)!r} for {point}, which is not a folder: point at "
                                 "a folder an SAE was saved to (cfg.json with sae_weights.safetensors or "
                                 "sae.safetensors)")
            out[str(point)] = path
        return out

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int | str) -> int | str:
        if v != "auto" and v not in BATCH_SIZES:
            more = (" (for batches of more samples, cut them by padded tokens instead: «pass max_batch_tokens=16384»)"
                    if isinstance(v, int) and not isinstance(v, bool) and v > max(BATCH_SIZES) else "")
            raise ValueError(f"«batch_size={v!r}» is not allowed: use a power of two from 1 to 512, e.g. «pass "
                             f"batch_size=8», or 'auto'{more}")
        return v

    @field_validator("latent_coverage")
    @classmethod
    def _coverage(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"«latent_coverage={v}» is a share of tokens: use a number above 0 and at most 1, e.g. "
                             "«pass latent_coverage=0.99» (unset: 1.5 x the most active token's latents)")
        return v

    @field_validator("auto_batch_memory_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.05 <= v <= 1:
            raise ValueError(f"«auto_batch_memory_fraction={v}» is out of range: use 0.05 to 1, e.g. «pass "
                             "auto_batch_memory_fraction=0.8»")
        return v

    @field_validator("chunk_mb")
    @classmethod
    def _chunk_mb(cls, v: float) -> float:
        if not 0.01 <= v <= 64:
            raise ValueError(f"«chunk_mb={v}» is out of range: use 0.01 to 64 (MB per chunk), e.g. "
                             "«pass chunk_mb=2»")
        return v

    @field_validator("shard_mb")
    @classmethod
    def _shard_mb(cls, v: float) -> float:
        if not 0 <= v <= 4096:
            raise ValueError(f"«shard_mb={v}» is out of range: use up to 4096 MB per shard (32 to 256 suit most "
                             "stores), or «pass shard_mb=0» for no shards")
        return v

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"«timeout_s={v:g}» must be a positive number of seconds, e.g. "
                             "«pass timeout_s=600», or «pass timeout_s=None» for no limit")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "Request":
        if self.window is None and self.stride is not None:
            raise ValueError(f"«stride={self.stride}» needs a window: «pass window=512» with it")
        if self.window is not None:
            if self.window < 2:
                raise ValueError(f"«window={self.window}» is too small: use at least 2 tokens, e.g. "
                                 "«pass window=512»")
            if self.stride is None:
                object.__setattr__(self, "stride", max(1, self.window // 2))
            elif self.stride > self.window:
                raise ValueError(f"«stride={self.stride}» must be from 1 to the window ({self.window}): e.g. «pass "
                                 f"stride={max(1, self.window // 2)}»")
        if 0 < self.shard_mb < self.chunk_mb:  # a shard holds whole chunks: this one would hold none
            raise ValueError(f"«shard_mb={self.shard_mb:g}» is smaller than one chunk "
                             f"(«chunk_mb={self.chunk_mb:g}»): a shard holds whole chunks; "
                             f"«pass shard_mb={max(32, self.chunk_mb):g}» or more, or «pass shard_mb=0» for one "
                             "file per chunk")
        if self.batch_size == "auto" and self.max_batch_tokens is not None:
            raise ValueError(f"«batch_size='auto'» and «max_batch_tokens={self.max_batch_tokens}» both size the "
                             "batches: pass one of them")
        if self.latent_coverage is not None and not self.saes:
            raise ValueError(f"«latent_coverage={self.latent_coverage}» sizes the stored latents of SAEs, and no "
                             "SAE is given: " + SAES_SAID + " with it, or leave it unset")
        if self.latent_width is not None and not self.saes:
            raise ValueError(f"«latent_width={self.latent_width}» sets the latents kept per token of SAEs, and no SAE "
                             "is given: " + SAES_SAID + " with it, or leave it unset")
        if self.revision is not None and os.path.isdir(self.model):
            raise ValueError(f"«revision={self.revision!r}» picks a version of a Hub model, and «model={self.model!r}» "
                             "is a local folder (it holds one version): leave revision out")
        if self.latent_coverage is not None and self.latent_width is not None:
            raise ValueError(f"«latent_width={self.latent_width}» and «latent_coverage={self.latent_coverage}» "
                             "both set the latents kept per token: pass one of them")
        if self.max_memory is not None and self.device_map is None:
            raise ValueError(f"«max_memory={self.max_memory!r}» needs «device_map»: "
                             "«pass device_map='auto'» with it")
        if pandas_kind(self.dataset) == "dataframe" and self.text_column not in self.dataset.columns:
            raise ValueError(f"text column {self.text_column!r} is not in the DataFrame: its columns are "
                             f"{list(self.dataset.columns)}; «pass text_column=<one of them>»")
        return self

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, **values: Any) -> "Request":
        """A Request from keyword arguments (unknown names and bad values: one InputError naming each)."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            close = {u: _closest(u, cls.model_fields) for u in unknown}
            hints = ", ".join(f"{u!r}" + (f" (did you mean «{close[u]}»?)" if close[u] else "") for u in unknown)
            raise InputError(f"unknown argument{'s' if len(unknown) > 1 else ''} {hints}: the arguments are "
                             f"{', '.join(cls.model_fields)}", param=unknown[0])
        try:
            return cls(**values)
        except pydantic.ValidationError as exc:
            raise validation_error(exc) from None

    def replace(self, **overrides: Any) -> "Request":
        """This request with some fields changed, validated again."""
        return Request.build(**{**self.fields(), **overrides})

    def fields(self) -> dict[str, Any]:
        """Every field's value as given (the dataset object itself, not its description)."""
        return {name: getattr(self, name) for name in type(self).model_fields}

    # -- views ---------------------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        """The model to load (what the model cache is keyed by, with the weights' fingerprint)."""
        return ModelSpec(name_or_path=self.model, dtype=self.model_dtype, device=self.device, revision=self.revision,
                         device_map=self.device_map, max_memory=self.max_memory, quantization=self.quantization)

    @property
    def hook_points(self) -> list[str]:
        """Every ``layers.{i}.{kind}`` whose activations this request stores, layer-major (``layers`` must be
        resolved)."""
        if self.layers == "all":
            raise InputError("«layers='all'» is not resolved yet: it needs the model's layer count")
        return [f"layers.{i}.{k}" for i in self.layers for k in self.hooks]

    @property
    def latent_points(self) -> list[str]:
        """The SAE latents this request stores: ``<hook point>.latents`` for each SAE applied."""
        return [f"{hp}.latents" for hp in sorted(self.saes or {}, key=_hook_order)]

    @property
    def statistics_points(self) -> list[str]:
        """What the pass keeps feature statistics of (``feature_statistics``)."""
        if self.feature_statistics == "off":
            return []
        return (self.hook_points if self.feature_statistics == "on" else []) + self.latent_points

    @property
    def captured_points(self) -> list[str]:
        """Every hook point the forward must capture: the stored ones and those an SAE reads."""
        return sorted(set(self.hook_points) | set(self.saes or {}), key=_hook_order)

    def params(self) -> dict:
        """The JSON-able parameters the store's metadata records (model and dataset have sections of their own)."""
        return self.model_dump(mode="json", exclude={"model", "revision", "dataset"})

    def dataset_description(self) -> dict:
        """The dataset as the metadata records it: where it came from (in-memory data is summarised, not copied)."""
        src = self.dataset
        kind = pandas_kind(src)
        if isinstance(src, list) or kind:
            source: dict = {"kind": kind or "list", "n_rows": len(src)}
            if kind == "dataframe":
                source["columns"] = [str(c) for c in src.columns]
        elif isinstance(src, HubDataset):
            source = {"kind": "hub", **src.model_dump()}
        elif src == "sample":
            source = {"kind": "sample"}
        else:
            source = {"kind": "path", "path": src}
        return {"source": source, **{k: getattr(self, k) for k in ("text_column", "max_samples", "max_length",
                                                                    "add_special_tokens", "encoding",
                                                                    "chat_template")}}

    @classmethod
    def from_stored(cls, model_section: dict, dataset_section: dict, params_section: dict,
                    **overrides: Any) -> "Request":
        """The request a store was made with (its metadata's model, dataset and params sections), with overrides.

        Parameters a newer version added are left at their defaults; ones this version does not know are ignored.
        A store made from in-memory data needs ``dataset=`` again (the message says so)."""
        # a None is a parameter this store's version did not record, or one whose default is None
        values = {k: v for k, v in params_section.items() if k in cls.model_fields and v is not None}
        values.update(model=model_section.get("name_or_path"), revision=model_section.get("revision"))
        if "dataset" not in overrides:
            values["dataset"] = dataset_source(dataset_section)
        values.update(overrides)
        return cls.build(**values)

    def stored_changes(self, other: "Request") -> dict[str, tuple[Any, Any]]:
        """Fields that change the stored bytes and differ between the two requests: {name: (self's, other's)}."""
        out = {}
        for name, info in type(self).model_fields.items():
            if (info.json_schema_extra or {}).get("stored") and name != "dataset":
                a, b = getattr(self, name), getattr(other, name)
                if a != b:
                    out[name] = (a, b)
        return out


def _hook_order(point: str) -> tuple[int, int]:
    _, layer, kind = point.split(".")[:3]
    return int(layer), HOOK_KINDS.index(kind)


def dataset_source(description: dict) -> Any:
    """The dataset argument a recorded description came from; in-memory data cannot be rebuilt."""
    src = description.get("source", {})
    kind = src.get("kind")
    if kind in ("list", "dataframe", "series"):
        what = {"list": "list of texts", "dataframe": "pandas DataFrame", "series": "pandas Series"}[kind]
        raise InputError(f"this extraction was made from an in-memory {what}, which is not saved on disk: pass it "
                         "again, e.g. «pass dataset=my_texts» to the retry", param="dataset")
    if kind == "hub":
        return HubDataset(**{k: v for k, v in src.items() if k != "kind"})
    if kind == "path":
        return src["path"]
    return "sample"


def _dataset_path(given: str) -> str:
    """A dataset path: 'sample', a regular file of a known format, or a folder (as given: a link's own name decides
    the format). FIFOs, devices and sockets are refused (they would block or never end)."""
    if given == "sample":
        return given
    path = Path(os.path.abspath(os.path.expanduser(given)))  # not resolved: a link's name decides the format
    if not path.exists():
        link = f" (a broken link to {os.path.realpath(path)!r})" if path.is_symlink() else ""
        raise ValueError(f"dataset path {given!r}{link} does not exist: give an existing .txt/.jsonl/.json/.csv/"
                         ".parquet file, a folder saved with datasets' save_to_disk«cli: or 'sample'»«py+studio:, "
                         "'sample', a list of strings, a pandas DataFrame, or ms.HubDataset(name, split, column)»")
    if path.is_dir():
        return str(path)
    if not path.is_file():
        raise ValueError(f"dataset path {named(path)} is not a regular file (a pipe, a device or a socket): copy "
                         "the data into a .txt/.jsonl/.csv/.parquet file and pass that")
    file_format(path)  # refuses files it cannot read, naming the link's target
    return str(path)


def _closest(name: str, options) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.75)
    return found[0] if found else None


@dataclass(frozen=True)
class ParamInfo:
    """What a front end needs to show one Request field."""

    name: str
    group: str
    label: str
    flag: str
    stored: bool
    description: str
    default: Any
    choices: tuple | None
    kind: str  # "bool", "int", "float", "str", "choice", "layers", "list", "json", "dataset"


def _kind(name: str, annotation: Any) -> tuple[str, tuple | None]:
    """How a front end shows a field: its kind and, for a choice, the choices."""
    if name in ("layers", "hooks", "dataset"):
        return {"layers": "layers", "hooks": "list", "dataset": "dataset"}[name], \
            (HOOK_KINDS if name == "hooks" else None)
    if annotation is bool:
        return "bool", None
    members = [annotation] if get_origin(annotation) is Literal else \
        [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    if all(get_origin(m) is Literal for m in members):
        return "choice", tuple(x for m in members for x in get_args(m))
    text = " ".join(str(m) for m in members)
    if "dict" in text:
        return "json", None
    if "int" in text:
        return "int", None
    if "float" in text:
        return "float", None
    return "str", None


def params() -> list[ParamInfo]:
    """Every Request field with its metadata, in declaration order (front ends build their forms from it)."""
    out = []
    for name, info in Request.model_fields.items():
        extra = info.json_schema_extra or {}
        kind, choices = _kind(name, info.annotation)
        out.append(ParamInfo(name, extra["group"], extra["label"], extra.get("flag") or name.replace("_", "-"),
                             bool(extra["stored"]), info.description or "", info.default, choices, kind))
    return out


def with_request_keywords(fn: Callable) -> Callable:
    """Give ``fn`` (which takes ``**options``) a signature that lists every Request field as a keyword, so that
    ``help()``, IDEs and the tests see the real arguments (``**options`` still takes them)."""
    sig = inspect.signature(fn)
    kept = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    named = {p.name for p in kept}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info.default,
                               annotation=info.annotation)
             for name, info in Request.model_fields.items() if name not in named]
    fn.__signature__ = sig.replace(parameters=kept + extra)
    return fn


def param_names(**more: tuple[str, str]) -> dict[str, tuple[str, str]]:
    """{parameter: (command-line flag, Studio label)} for :func:`mistudio.errors.render`, plus ``more``."""
    return {**{p.name: (p.flag, p.label) for p in params()}, **more}
