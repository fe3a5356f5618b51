"""Reference values for the engine tests: each forwarded span alone (no padding, no batching), its hook
points captured by plain forward hooks, and statistics recomputed in numpy the way the engine computed them
before hook points were grouped (one hook point at a time, float64 accumulators), merged batch by batch with
the store's own ``HookStats.merge``."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mistudio.data import plan_batches, window_spans
from mistudio.models import load_model
from mistudio.request import Request
from mistudio.specs import ModelSpec
from mistudio.storage.stats import HookStats


def reference_rows(model_dir: str, ext, hook_points: list[str], window=None, stride=None, exclude_special=False,
                   model_dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every stored row of each hook point, as float32, from forwarding each span of each stored sample alone."""
    loaded = load_model(ModelSpec(name_or_path=model_dir, device="cpu", dtype=model_dtype))
    ids = ext.store.input_ids()
    offsets = ext.store.sample_offsets()
    special = ext.store.tokens("special")[:] if exclude_special else None
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for hp in hook_points:
        _, layer, kind = hp.split(".")

        def hook(_m, _i, out, hp=hp):
            captured[hp] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        handles.append(loaded.module(int(layer), kind).register_forward_hook(hook))
    rows: dict[str, list[np.ndarray]] = {hp: [] for hp in hook_points}
    try:
        with torch.inference_mode():
            for s in range(len(offsets) - 1):
                base, end = int(offsets[s]), int(offsets[s + 1])
                for a, b, own in window_spans(end - base, window, stride):
                    span = torch.as_tensor(ids[base + a:base + b], dtype=torch.long)[None]
                    loaded.model(input_ids=span, attention_mask=torch.ones_like(span))
                    keep = np.arange(a, b) >= own
                    if special is not None:
                        keep &= ~special[base + a:base + b].astype(bool)
                    for hp in hook_points:
                        rows[hp].append(captured[hp][0].float().numpy()[keep])
                    captured.clear()
    finally:
        for h in handles:
            h.remove()
    return {hp: np.concatenate(r) if r else np.zeros((0, loaded.hidden_size), np.float32) for hp, r in rows.items()}


def numpy_batch_stats(values: np.ndarray, storage: torch.dtype) -> dict:
    """One batch's accumulators of one hook point, the pre-grouping way, in numpy; values beyond the storage
    dtype's range are those stored as ±inf."""
    if not values.size:
        return HookStats.empty()
    f = values.astype(np.float32)
    norms = np.linalg.norm(f.astype(np.float64), axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        hist = np.bincount(np.searchsorted(HookStats.NORM_EDGES, np.nan_to_num(norms, nan=0.0), side="left"),
                           minlength=len(HookStats.NORM_EDGES) + 1)
        top = np.argsort(-norms, kind="stable")[:HookStats._CANDIDATES]
        over = top[norms[top] > 10 * np.median(norms)]
        mag = np.abs(f.astype(np.float64))
        return {"count": int(f.size), "sum": float(f.astype(np.float64).sum()),
                "sum_sq": float((f.astype(np.float64) ** 2).sum()), "max_abs": float(mag.max()),
                "zeros": int((f == 0).sum()), "n_out_of_range": int(torch.isinf(torch.from_numpy(f).to(storage)).sum()),
                "n_nan": int(np.isnan(f).sum()), "norm_hist": hist.tolist(), "n_outliers": 0, "outliers": [],
                "candidates": [[int(r), float(norms[r])] for r in over]}


def reference_stats(values: np.ndarray, ext, request: Request, storage_dtype: str) -> dict:
    """A hook point's accumulators over the whole store, batch by batch as the engine planned them."""
    offsets = ext.store.sample_offsets()
    rows_at = ext.store.activation_offsets()
    acc = HookStats.empty()
    for first, stop in plan_batches(offsets, request, 0, len(offsets) - 1):
        a, b = int(rows_at[first]), int(rows_at[stop])
        HookStats.merge(acc, numpy_batch_stats(values[a:b], getattr(torch, storage_dtype)), a)
    return acc


def edited_model(source: str, folder: Path, edit: Callable[[torch.Tensor], None]) -> str:
    """A copy of the model folder ``source`` in ``folder`` whose token embedding matrix ``edit`` changed in place."""
    from transformers import AutoModel

    shutil.copytree(source, folder)
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        edit(model.get_input_embeddings().weight)
    model.save_pretrained(folder)
    return str(folder)
