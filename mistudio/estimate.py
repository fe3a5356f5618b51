"""``ms.estimate``: what an extraction will cost before it is launched (disk, device memory, time).

It validates the arguments as ``ws.submit`` does, reads the model's config and tokenizes the dataset, but
loads weights only for ``probe=True`` (parameters are counted on the meta device). ``ws.submit`` does not
estimate (tokenizing twice costs time on big datasets): call this first, as the Extract tab does.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import plan_order, tokenize
from .errors import InputError, human_bytes
from .models import describe_model, load_config, load_tokenizer, resolve_device, resolve_dtype
from .request import make_request
from .store import chunk_rows, shard_rows

CHECKSUM_BYTES = 4  # crc32c appends 4 bytes to every chunk
SHARD_INDEX_ENTRY = 16  # a shard's index: (offset, length) as two uint64 per inner chunk, then its crc32c
PROBE_SECONDS = 3.0  # probe=True times batches for about this long


def _array_bytes(n: int, width: int, rows_per_chunk: int, itemsize: int, checksum: bool) -> int:
    """Bytes of an (n, width) array's chunk files: every chunk (the last one too) is written whole."""
    n_chunks = math.ceil(n / rows_per_chunk) if n else 0
    return n_chunks * (rows_per_chunk * width * itemsize + (CHECKSUM_BYTES if checksum else 0))


def store_bytes(lengths: np.ndarray, hook_dims: dict[str, int], dtype: str, chunk_mb: float,
                checksum: bool, n_rows: int | None = None, per_token_bytes: tuple[int, ...] = (1,),
                row_offsets: bool = False, shard_mb: float = 0) -> int:
    """Exact bytes of the chunk files ``ExtractionStore.allocate`` creates and the writer fills.

    ``n_rows`` activation rows (default: every token); ``per_token_bytes`` the item sizes of the optional
    per-token arrays (``special`` always; ``role``, ``positions`` when present); ``row_offsets`` when
    ``activation_offsets`` is written (``exclude_special``); ``shard_mb`` as ``ExtractionStore.allocate``."""
    n_samples, n_tokens = len(lengths), int(np.sum(lengths))
    n_rows = n_tokens if n_rows is None else n_rows
    token_arrays = [(n_tokens, 4), (n_samples + 1, 8), (n_samples, 8)]  # input_ids, offsets, index
    token_arrays += [(n_tokens, size) for size in per_token_bytes] + ([(n_samples + 1, 8)] if row_offsets else [])
    total = sum(_array_bytes(n, 1, max(1, min(n, 2**20)), size, checksum) for n, size in token_arrays)
    itemsize = np.dtype(dtype).itemsize
    rows = chunk_rows(max(hook_dims.values()), itemsize, chunk_mb)
    per_shard = shard_rows(rows, max(hook_dims.values()) * itemsize, shard_mb, n_rows)
    if not per_shard:
        return total + sum(_array_bytes(n_rows, w, rows, itemsize, checksum) for w in hook_dims.values())
    inner = per_shard // rows  # a shard file: its inner chunks that hold rows, then an index of every inner chunk
    index = inner * SHARD_INDEX_ENTRY + CHECKSUM_BYTES
    return total + sum(_array_bytes(n_rows, w, rows, itemsize, checksum) + math.ceil(n_rows / per_shard) * index
                       for w in hook_dims.values())


def _free_disk(workspace: str | os.PathLike | None) -> int | None:
    """Bytes free where the workspace is (its nearest existing folder); None for remote workspaces."""
    from .workspace import default_workspace

    root = str(workspace if workspace is not None else default_workspace())
    if "://" in root and not root.startswith("file://"):
        return None
    path = Path(root.removeprefix("file://")).expanduser().resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _device_memory(device) -> int | None:
    """Total memory of the device the model runs on: the GPU's, or the machine's RAM for the CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def peak_device_bytes(n_parameters: int, config: Any, batch: int, width: int, n_captured: int,
                      model_bytes: int) -> int:
    """Weights + the largest batch's working activations + its captured rows, all in the model dtype.

    For ``batch`` samples padded to ``width`` tokens (T = batch x width), hidden size h, MLP size m, heads a:
    ``n_parameters·b + T·(4h + 2m)·b + batch·a·width²·b + n_captured·T·h·b`` (b bytes per value). The middle
    terms are one block's transient tensors (residual, q/k/v/out, the MLP's hidden twice, the attention
    scores); earlier blocks' are freed (inference mode), so the count of layers up to the last one only adds
    its captured rows (the last term).
    """
    h = int(config.hidden_size)
    m = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
    tokens = batch * width
    return int(model_bytes * (n_parameters + tokens * (4 * h + 2 * m) + batch * heads * width * width
                              + n_captured * tokens * h))


def estimate(model: Any = None, dataset: Any = None, layers: Any = None, hooks: Any = None, *,
             workspace: str | os.PathLike | None = None, probe: bool = False, preset: str | None = None,
             **options: Any) -> dict:
    """What ``ms.extract``/``ws.submit`` with these arguments will take, before launching it.

    Returns a dict with ``samples``, ``tokens``, ``batches``, ``bytes_on_disk`` (exact for the activation and
    token chunks; metadata adds a few KB), ``free_disk_bytes`` (the workspace's disk; None if remote),
    ``peak_device_bytes`` (see :func:`peak_device_bytes`), ``device_memory_bytes``, ``seconds`` (with
    ``probe=True``: the model is loaded and a few batches timed; else None), ``warnings`` (strings) and a
    one-line ``summary``. ``batch_size="auto"`` is estimated at batch 8 (its choice needs the model).
    ``preset=`` starts from a saved preset of ``workspace``, as ``ws.submit`` does.
    """
    storage_options = options.pop("storage_options", None)
    if hooks is not None:
        options["hooks"] = hooks
    if preset is not None:
        from .workspace import Workspace

        ws = Workspace(workspace, storage_options=storage_options, recover=False)
        options = ws.arguments(model, dataset, layers, preset=preset, **options)
    else:
        options = {"dataset": "sample", "layers": (0,), **{k: v for k, v in (
            ("model", model), ("dataset", dataset), ("layers", layers)) if v is not None}, **options}
    if options.get("model") is None:
        raise InputError("model is missing: pass model= (a Hugging Face id or a local folder) or preset=<name>")
    req = make_request(**options)
    capture, spec = req.capture, req.model
    config = load_config(spec)
    facts = describe_model(spec)
    tokenizer = load_tokenizer(spec)
    tokenized = tokenize(req.dataset, tokenizer, facts["vocab_size"], capture.oov_policy)
    order = plan_order(tokenized.lengths)
    lengths = tokenized.lengths[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hook_points = capture.hook_points()
    special = np.isin(np.concatenate(tokenized.ids), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
    n_rows = int((~special).sum()) if capture.exclude_special else len(special)
    per_token = (1,) + ((1,) if tokenized.roles is not None else ()) + ((4,) if capture.window else ())
    disk = store_bytes(lengths, {hp: facts["hidden_size"] for hp in hook_points}, capture.dtype, capture.chunk_mb,
                       capture.checksum, n_rows, per_token, row_offsets=capture.exclude_special,
                       shard_mb=capture.shard_mb)
    from .engine import plan_batches

    planned = capture if capture.batch_size != "auto" else capture.model_copy(update={"batch_size": 8})
    batches = plan_batches(offsets, planned, 0, len(lengths))
    step = capture.micro_batch_size
    largest = max(((min(step or e - b, e - b), int(lengths[b])) for b, e in batches), key=lambda x: x[0] * x[1])
    device = resolve_device(spec.device)
    model_bytes = np.dtype(str(resolve_dtype(spec.dtype, device)).removeprefix("torch.").replace(
        "bfloat16", "float16")).itemsize
    peak = peak_device_bytes(facts["n_parameters"], config, largest[0], largest[1], len(hook_points), model_bytes)
    free = _free_disk(workspace)
    memory = _device_memory(device)
    warnings = []
    if free is not None and disk > free:
        warnings.append(f"the store needs {human_bytes(disk)} but the workspace's disk has {human_bytes(free)} "
                        "free: free space, pick another workspace=, or capture fewer hook points/samples")
    if memory is not None and peak > memory:
        warnings.append(f"peak device memory {human_bytes(peak)} is above the {human_bytes(memory)} of {device}: "
                        "pass a smaller batch_size, max_batch_tokens, micro_batch_size, or device_map='auto'")
    if capture.max_batch_tokens is not None and int(lengths[0]) > capture.max_batch_tokens:
        over = int(np.sum(lengths > capture.max_batch_tokens))
        warnings.append(f"{over} sample(s) are longer than max_batch_tokens={capture.max_batch_tokens}: each gets "
                        f"a batch of its own (up to {int(lengths[0])} tokens)")
    seconds = _probe(req, lengths, tokenized, order, capture) if probe else None
    result = {
        "samples": len(lengths), "tokens": int(offsets[-1]), "batches": len(batches), "hook_points": hook_points,
        "bytes_on_disk": disk, "free_disk_bytes": free, "peak_device_bytes": peak, "device": str(device),
        "device_memory_bytes": memory, "largest_batch": {"samples": largest[0], "width": largest[1]},
        "n_parameters": facts["n_parameters"], "seconds": seconds, "warnings": warnings,
    }
    result["summary"] = summary(result)
    return result


def _probe(req, lengths: np.ndarray, tokenized, order: np.ndarray, capture) -> float:
    """Load the model, time batches for about PROBE_SECONDS (longest first: a cautious rate), extrapolate."""
    from .engine import forward_batches
    from .models import load_model

    loaded = load_model(req.model)
    ids = np.concatenate([tokenized.ids[i] for i in order]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if capture.batch_size == "auto":
        capture = capture.model_copy(update={"batch_size": 8})
    done, started = 0, time.perf_counter()
    for first, stop, _rows, _stats in forward_batches(loaded, ids, offsets, capture, 0, len(lengths)):
        done += int(offsets[stop] - offsets[first])
        if time.perf_counter() - started > PROBE_SECONDS:
            break
    elapsed = time.perf_counter() - started
    return float(elapsed * offsets[-1] / max(1, done))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def summary(result: dict) -> str:
    """One line: '≈ 12.4 GB on disk, 80.0 GB free · peak 9.1 GB of 80.0 GB · ~3 min'."""
    parts = [f"≈ {human_bytes(result['bytes_on_disk'])} on disk"
             + (f", {human_bytes(result['free_disk_bytes'])} free" if result["free_disk_bytes"] is not None else "")]
    memory = result["device_memory_bytes"]
    parts.append(f"peak {human_bytes(result['peak_device_bytes'])}"
                 + (f" of {human_bytes(memory)}" if memory else ""))
    if result["seconds"] is not None:
        parts.append(_duration(result["seconds"]))
    line = " · ".join(parts)
    return line + (f" · {len(result['warnings'])} warning(s)" if result["warnings"] else "")
