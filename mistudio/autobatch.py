"""``batch_size="auto"``: the batch size a job runs with, chosen by trial forwards of its longest samples.

On an accelerator: the largest power of two whose batch of the longest samples runs without running out of
memory and peaks within ``auto_batch_memory_fraction`` of the device, halving from the top. On the CPU
(memory is rarely the limit there): the fastest of a few powers of two, by a short throughput probe.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .engine import forward_batches
from .errors import is_oom
from .models import LoadedModel, free_memory
from .request import Request
from .specs import BATCH_SIZES

CPU_CANDIDATES = (1, 4, 16, 64)


def is_accelerator(device: torch.device) -> bool:
    """True where memory, not speed, bounds the batch (CUDA, MPS)."""
    return device.type in ("cuda", "mps")


def _memory(device: torch.device) -> tuple[int, Callable[[], int]] | None:
    """(total bytes, peak-since-reset reader) of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.get_device_properties(device).total_memory, lambda: torch.cuda.max_memory_allocated(device)


def _trial(loaded: LoadedModel, ids: np.ndarray, offsets: np.ndarray, request: Request, n: int,
           before_batch: Callable[[int, int], None] | None) -> tuple[float, int]:
    """One forward of the ``n`` longest samples (stored first) at batch size ``n``: (seconds, real tokens)."""
    trial = request.model_copy(update={"batch_size": n, "max_batch_tokens": None})
    stop = min(n, len(offsets) - 1)
    started = time.perf_counter()
    for _ in forward_batches(loaded, ids, offsets, trial, 0, stop, before_batch=before_batch):
        pass
    return time.perf_counter() - started, int(offsets[stop])


def choose_batch_size(loaded: LoadedModel, ids: np.ndarray, offsets: np.ndarray, request: Request,
                      before_batch: Callable[[int, int], None] | None = None,
                      accelerator: bool | None = None) -> dict:
    """``{"chosen": n, "reason": "...", "tried": [...]}`` for ``batch_size="auto"``.

    ``accelerator`` (default: from the model's device) picks the memory search or the CPU throughput probe.
    An out-of-memory error on batch 1 is raised: nothing fits.
    """
    n_samples = len(offsets) - 1
    top = min(BATCH_SIZES[-1], 1 << max(0, (n_samples - 1).bit_length()))  # no point beyond the sample count
    device = loaded.input_device
    accelerator = is_accelerator(device) if accelerator is None else accelerator
    tried: list[dict] = []
    if accelerator:
        fraction = request.auto_batch_memory_fraction
        n = top
        while True:
            memory = _memory(device)
            try:
                _trial(loaded, ids, offsets, request, n, before_batch)
            except Exception as exc:
                if not is_oom(exc) or n == 1:
                    raise
                tried.append({"batch_size": n, "ok": False, "why": "out of memory"})
                free_memory()
                n //= 2
                continue
            peak = memory[1]() if memory else None
            if memory and peak > fraction * memory[0] and n > 1:
                tried.append({"batch_size": n, "ok": False, "peak_bytes": peak,
                              "why": f"peak above {fraction:g} of the device's memory"})
                n //= 2
                continue
            tried.append({"batch_size": n, "ok": True, "peak_bytes": peak})
            longest = int(offsets[1] - offsets[0])
            reason = (f"largest power of two whose batch of the longest samples ({longest} tokens) fits "
                      f"{fraction:g} of {device} memory" + ("" if n == top else f" (batch {n * 2} did not)"))
            return {"chosen": n, "reason": reason, "tried": tried}
    candidates = [c for c in CPU_CANDIDATES if c <= top] or [1]
    _trial(loaded, ids, offsets, request, 1, before_batch)  # warm-up: the first forward pays one-off costs
    best = None
    for n in candidates:
        try:
            seconds, tokens = _trial(loaded, ids, offsets, request, n, before_batch)
        except Exception as exc:
            if not is_oom(exc):
                raise
            tried.append({"batch_size": n, "ok": False, "why": "out of memory"})
            break
        rate = tokens / seconds if seconds > 0 else float("inf")
        tried.append({"batch_size": n, "ok": True, "tokens_per_s": round(rate, 1)})
        if best is None or rate >= best[1]:
            best = (n, rate)
    if best is None:
        raise MemoryError("batch_size='auto': even one sample ran out of memory")
    return {"chosen": best[0], "tried": tried,
            "reason": f"fastest on {device} of batch sizes {[t['batch_size'] for t in tried]} "
                      f"in a throughput probe on the longest samples ({best[1]:.0f} tokens/s)"}
