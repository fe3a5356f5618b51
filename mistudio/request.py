"""A job's request: every argument of ``ms.extract`` / ``ws.submit`` validated into specs, and rebuilt
from a store's metadata for a retry or a resume."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import InputError
from .models import check_placement, load_config, max_positions_of, n_layers_of
from .specs import CaptureSpec, DatasetSpec, ModelSpec, build, parse_layers


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
            "encoding": self.dataset.encoding, "chat_template": self.dataset.chat_template,
            "model_dtype": self.model.dtype, "device": self.model.device,
            "device_map": self.model.device_map, "max_memory": self.model.max_memory,
            "quantization": self.model.quantization,
            "timeout_s": self.timeout_s, "auto_retry_on_oom": self.auto_retry_on_oom,
        }


def make_request(model: str | ModelSpec, dataset: Any, layers: Any, hooks: list[str] | tuple | str = ("residual",),
                 batch_size: int = 8, max_samples: int | None = None, max_length: int = 128,
                 dtype: str = "float16", model_dtype: str = "auto", device: str = "auto",
                 text_column: str = "text", add_special_tokens: bool = True, oov_policy: str = "clamp",
                 padding_side: str = "right", chunk_mb: float = 2.0, shard_mb: float = 32.0,
                 timeout_s: float | None = None,
                 auto_retry_on_oom: bool = False, revision: str | None = None, encoding: str = "utf-8",
                 checksum: bool = True, window: int | None = None, stride: int | None = None,
                 exclude_special: bool = False, chat_template: str | None = None,
                 max_batch_tokens: int | None = None, micro_batch_size: int | None = None,
                 auto_batch_memory_fraction: float = 0.8, device_map: str | dict | None = None,
                 max_memory: dict | None = None, quantization: str | None = None,
                 before_batch: Callable[[int, int], None] | None = None, cluster: Any = None) -> JobRequest:
    """Validate every argument of ``ms.extract`` / ``ws.submit`` before anything is loaded or written.

    ``layers`` takes the forms of :func:`parse_layers`; ``'all'`` and the ``max_length`` limit are checked
    against the model's config (read without weights). Every error names the argument as the user typed it.
    """
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",")]
    model_spec = model if isinstance(model, ModelSpec) else build(
        ModelSpec, {"name_or_path": "model", "dtype": "model_dtype"},
        name_or_path=str(model), dtype=model_dtype, device=device, revision=revision, device_map=device_map,
        max_memory=max_memory, quantization=quantization)
    check_placement(model_spec)
    if dataset is None:
        raise InputError("dataset is missing: pass ms.sample_dataset(), a file path, a list of strings, "
                         "a pandas DataFrame, or ms.HubDataset(name, split, column)")
    dataset_spec = dataset if isinstance(dataset, DatasetSpec) else build(
        DatasetSpec, {"source": "dataset"}, source=dataset, text_column=text_column, max_samples=max_samples,
        max_length=max_length, add_special_tokens=add_special_tokens, encoding=encoding, chat_template=chat_template)
    layer_list, config = parse_layers(layers), None
    if layer_list == "all":
        config = load_config(model_spec)
        layer_list = list(range(n_layers_of(config)))
    capture = build(CaptureSpec, layers=layer_list, hooks=list(hooks), batch_size=batch_size, dtype=dtype,
                    oov_policy=oov_policy, padding_side=padding_side, chunk_mb=chunk_mb, shard_mb=shard_mb,
                    checksum=checksum, window=window, stride=stride, exclude_special=exclude_special,
                    max_batch_tokens=max_batch_tokens, micro_batch_size=micro_batch_size,
                    auto_batch_memory_fraction=auto_batch_memory_fraction)
    not_number = isinstance(timeout_s, (bool, np.bool_)) or not isinstance(timeout_s, (int, float, np.number))
    if timeout_s is not None and (not_number or timeout_s <= 0):
        raise InputError(f"timeout_s={timeout_s!r} must be a positive number of seconds, e.g. timeout_s=600, "
                         "or None for no limit")
    if cluster is not None and not (hasattr(cluster, "submit") and hasattr(cluster, "scheduler_info")):
        raise InputError(f"cluster={cluster!r} is not a dask.distributed Client: pass Client(LocalCluster()) or "
                         "Client('tcp://scheduler:8786')")
    if cluster is not None and capture.exclude_special:
        raise InputError("exclude_special=True is not supported with cluster= yet: drop cluster= (run locally) "
                         "or keep special tokens (exclude_special=False) and mask them with tokens/special")
    if cluster is not None and capture.batch_size == "auto":
        raise InputError("batch_size='auto' runs a trial on a local model and cannot size a dask run: pass a "
                         "number, e.g. batch_size=8, with cluster=")
    limit = max_positions_of(config or load_config(model_spec))
    if limit is not None and capture.window is not None and capture.window > limit:
        raise InputError(f"window={capture.window} is more than the {limit} positions of model "
                         f"{model_spec.name_or_path!r}: pass window={limit} or less")
    if limit is not None and capture.window is None and dataset_spec.max_length > limit:
        raise InputError(f"max_length={dataset_spec.max_length} is more than the {limit} positions of model "
                         f"{model_spec.name_or_path!r}: pass max_length={limit} or less (longer samples are cut)")
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
                                      "padding_side", "chunk_mb", "shard_mb", "timeout_s", "auto_retry_on_oom",
                                      "encoding",
                                      "checksum", "window", "stride", "exclude_special", "chat_template",

                                      "checksum", "max_batch_tokens", "micro_batch_size",
                                      "auto_batch_memory_fraction", "device_map", "max_memory", "quantization")
               if k in params}}
    args.update(overrides)
    return make_request(**args)
