"""Per hook point statistics accumulated as rows are committed: moments, per-token norm quantiles, outliers."""
from __future__ import annotations

import math

import numpy as np


class HookStats:
    """Accumulators of one hook point over committed rows: mean/std/max-abs/zero-fraction (exact), per-token L2
    norm quantiles (from a fixed log-spaced histogram, mergeable, within about 5%), and outlier tokens: those
    whose norm is over ``OUTLIER_FACTOR`` × the median norm of the rows committed up to their batch (a running
    median), counted, with the first ``MAX_OUTLIERS`` as ``[activation row, norm]``."""

    KEYS = ("count", "sum", "sum_sq", "max_abs", "zeros", "n_out_of_range", "n_nan", "norm_hist", "n_outliers",
            "outliers")
    NORM_EDGES = np.logspace(-3, 7, 10 * 24 + 1)  # 24 bins a decade, 1e-3 .. 1e7; under/overflow bins at the ends
    QUANTILES = (0.5, 0.9, 0.99, 0.999)
    OUTLIER_FACTOR = 100.0
    MAX_OUTLIERS = 100  # the list is in the metadata, rewritten at every commit
    _CANDIDATES = 256  # per batch: rows over 10x the batch's median norm, the largest first

    @staticmethod
    def empty() -> dict:
        return {"count": 0, "sum": 0.0, "sum_sq": 0.0, "max_abs": 0.0, "zeros": 0, "n_out_of_range": 0, "n_nan": 0,
                "norm_hist": [0] * (len(HookStats.NORM_EDGES) + 1), "n_outliers": 0, "outliers": []}

    @staticmethod
    def of_tensor(values, limit: float = float("inf")) -> dict:
        """One batch's accumulators of ``values`` (rows, d), computed by torch where the values are; outlier
        candidates are ``[row in the batch, norm]``, judged when the batch is merged. ``limit``: the largest
        finite value of the storage dtype (values beyond it are counted: stored, they would be inf)."""
        return HookStats.from_device(values.numel(), HookStats.device_sums(values, limit).tolist(),
                                     HookStats.device_norms(values).cpu().numpy())

    @staticmethod
    def device_norms(values):
        """The L2 norm of each row of ``values`` (rows, d), as float32 where they are (no sync)."""
        import torch

        return torch.linalg.vector_norm(values.float().reshape(len(values), -1), dim=-1)

    @staticmethod
    def device_sums(values, limit: float = float("inf")):
        """(sum, sum of squares, max abs, zeros, values beyond ``limit`` (inf included), NaNs) of ``values`` as one
        float64 tensor where they are (no sync)."""
        import torch

        f = values.float().reshape(-1)
        if not f.numel():
            return torch.zeros(6, dtype=torch.float64, device=f.device)
        magnitude = f.abs()
        return torch.stack([f.sum(dtype=torch.float64), torch.dot(f, f).double(), magnitude.max().double(),
                            (f == 0).sum().double(), (magnitude > limit).sum().double(), f.isnan().sum().double()])

    @staticmethod
    def from_device(count: int, sums: list[float], norms: np.ndarray) -> dict:
        """The accumulators from ``count``, the values of :meth:`device_sums` and the row norms (on the host):
        outlier candidates are ``[row in the batch, norm]``, judged when the batch is merged."""
        norms = np.asarray(norms, dtype=np.float64)
        if not count:
            return HookStats.empty()
        total, sum_sq, max_abs, zeros, out_of_range, nans = (list(sums) + [0, 0])[:6]
        hist = np.bincount(np.searchsorted(HookStats.NORM_EDGES, np.nan_to_num(norms, nan=0.0), side="left"),
                           minlength=len(HookStats.NORM_EDGES) + 1)
        top = np.argsort(-norms, kind="stable")[:HookStats._CANDIDATES]
        over = top[norms[top] > 10 * np.median(norms)]
        return {"count": int(count), "sum": total, "sum_sq": sum_sq, "max_abs": max_abs, "zeros": int(zeros),
                "n_out_of_range": int(out_of_range), "n_nan": int(nans),
                "norm_hist": hist.tolist(), "n_outliers": 0, "outliers": [],
                "candidates": [[int(r), float(norms[r])] for r in over]}

    @staticmethod
    def merge(acc: dict, delta: dict, first_row: int = 0) -> None:
        """Add ``delta`` (a batch whose first activation row is ``first_row``, or another accumulator) to ``acc``."""
        for key in ("count", "sum", "sum_sq", "zeros", "n_outliers", "n_out_of_range", "n_nan"):
            acc[key] = acc.get(key, 0) + delta.get(key, 0)
        acc["max_abs"] = max(acc["max_abs"], delta["max_abs"])
        hist = delta.get("norm_hist") or [0] * len(acc["norm_hist"])
        acc["norm_hist"] = [a + b for a, b in zip(acc["norm_hist"], hist)]
        found = list(delta.get("outliers", []))
        if delta.get("candidates"):
            limit = HookStats.OUTLIER_FACTOR * HookStats.quantile(acc["norm_hist"], 0.5)
            found += sorted([first_row + r, n] for r, n in delta["candidates"] if n > limit)
            acc["n_outliers"] += len(found) - len(delta.get("outliers", []))
        acc["outliers"] = acc["outliers"] + found[: max(0, HookStats.MAX_OUTLIERS - len(acc["outliers"]))]

    @staticmethod
    def quantile(hist: list[int], q: float) -> float:
        """The ``q`` quantile of the norms in ``hist``: the geometric middle of the bin it falls in."""
        total = sum(hist)
        if not total:
            return 0.0
        k = int(np.searchsorted(np.cumsum(hist), q * total))
        edges = HookStats.NORM_EDGES
        if k == 0:
            return float(edges[0])
        if k >= len(edges):
            return float(edges[-1])
        return float(math.sqrt(edges[k - 1] * edges[k]))

    @staticmethod
    def summary(acc: dict) -> dict:
        n = acc["count"]
        mean = acc["sum"] / n if n else 0.0
        var = max(0.0, acc["sum_sq"] / n - mean * mean) if n else 0.0
        median = HookStats.quantile(acc["norm_hist"], 0.5)
        return {**acc, "mean": mean, "std": math.sqrt(var), "frac_zeros": acc["zeros"] / n if n else 0.0,
                "norm_quantiles": {str(q): HookStats.quantile(acc["norm_hist"], q) for q in HookStats.QUANTILES},
                "outlier_threshold": HookStats.OUTLIER_FACTOR * median}


class LatentStats:
    """Accumulators of one SAE's latents over committed rows: rows, latents that fired (L0), latents dropped for
    want of width (and the rows that lost some), the largest value."""

    @staticmethod
    def empty() -> dict:
        return {"rows": 0, "active": 0, "dropped": 0, "rows_dropped": 0, "max": 0.0}

    @staticmethod
    def device_sums(active, dropped, values):
        """(rows, fired, dropped, rows that dropped some, max value) as one float64 tensor where they are."""
        import torch

        if not len(active):
            return torch.zeros(5, dtype=torch.float64, device=active.device)
        return torch.stack([torch.tensor(float(len(active)), dtype=torch.float64, device=active.device),
                            active.sum().double(), dropped.sum().double(), (dropped > 0).sum().double(),
                            values.float().max().double()])

    @staticmethod
    def from_device(sums: list[float]) -> dict:
        rows, active, dropped, rows_dropped, top = sums
        return {"rows": int(rows), "active": int(active), "dropped": int(dropped), "rows_dropped": int(rows_dropped),
                "max": float(top)}

    @staticmethod
    def merge(acc: dict, delta: dict) -> None:
        for key in ("rows", "active", "dropped", "rows_dropped"):
            acc[key] = acc.get(key, 0) + delta.get(key, 0)
        acc["max"] = max(acc.get("max", 0.0), delta.get("max", 0.0))

    @staticmethod
    def summary(acc: dict) -> dict:
        return {**acc, "mean_l0": acc["active"] / acc["rows"] if acc["rows"] else 0.0}
