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
    def of_tensor(values) -> dict:
        """One batch's accumulators of ``values`` (rows, d) as float32 values, computed by torch where they are;
        outlier candidates are ``[row in the batch, norm]``, judged when the batch is merged."""
        sums, norms = HookStats.device_sources(values[None])
        host = values.float().cpu().numpy()
        return HookStats.from_sources(values.numel(), sums.tolist(), norms.cpu().numpy(), [host])[0]

    @staticmethod
    def device_sources(stack):
        """The statistics sources of a stack of hook points' rows ``(hook points, rows, d)``, computed where they
        are in a fixed number of torch calls whatever the number of hook points (no sync): per hook point (sum,
        sum of squares, max abs, zeros) as float64 ``(hook points, 4)``, and each row's L2 norm as float32
        ``(hook points, rows)``. Sums are taken per row in float32, then over rows in float64 (a float64 sum of
        every value cost 5x as much on a CPU). Infinities and NaNs show in the sum and max abs; they are counted
        on the host, in the stored rows, in the rare batch that has some (:meth:`from_sources`)."""
        import torch

        f = stack.float()
        norms = torch.linalg.vector_norm(f, dim=-1)
        if not f.shape[1] or not f.shape[2]:
            return torch.zeros((len(f), 4), dtype=torch.float64, device=f.device), norms
        total = f.sum(-1).double().sum(-1)
        flat = f.reshape(len(f), -1)
        max_abs = torch.maximum(flat.amax(1), -flat.amin(1))  # amax/amin: 4x faster than aminmax along a dim
        return torch.stack([total, norms.double().square().sum(1), max_abs,
                            (flat == 0).sum(1, dtype=torch.int32)], dim=1), norms

    @staticmethod
    def from_sources(count: int, sums: list[list[float]], norms: np.ndarray, stored: list[np.ndarray],
                     limit: float = float("inf"), bfloat16: bool = False) -> list[dict]:
        """The accumulators of each hook point of a stack from ``count`` (values per hook point), the sources of
        :meth:`device_sources` and each hook point's ``stored`` rows on the host (numpy work for the whole stack
        at once). Outlier candidates are ``[row in the batch, norm]``, the largest ``_CANDIDATES`` over 10 × the
        batch's median norm, judged when the batch is merged. Values stored as ±inf (past the storage dtype's
        largest finite value ``limit``, or inf already) and NaNs are counted in ``stored`` (bfloat16 as its bit
        patterns), only where the sum or the max abs says there are some."""
        norms = np.asarray(norms, dtype=np.float64)
        if not count:
            return [HookStats.empty() for _ in norms]
        n_bins = len(HookStats.NORM_EDGES) + 1
        bins = norm_bins(np.nan_to_num(norms, nan=0.0))
        bins += np.arange(len(norms))[:, None] * n_bins  # one bincount for the stack: each row its own bins
        hists = np.bincount(bins.reshape(-1), minlength=len(norms) * n_bins).reshape(len(norms), n_bins).tolist()
        over = norms > 10 * row_medians(norms)  # a NaN median: no candidates
        out = []
        for row_norms, row_sums, hist, row_over, rows_stored in zip(norms, sums, hists, over, stored):
            total, sum_sq, max_abs, zeros = row_sums
            n_inf = n_nan = 0
            if not (math.isfinite(total) and max_abs <= limit):  # NaN fails both: so does a NaN max abs
                n_inf, n_nan = special_counts(rows_stored, bfloat16)
            rows = np.flatnonzero(row_over)
            rows = rows[np.argsort(-row_norms[rows], kind="stable")[:HookStats._CANDIDATES]]
            out.append({"count": int(count), "sum": total, "sum_sq": sum_sq, "max_abs": max_abs, "zeros": int(zeros),
                        "n_out_of_range": n_inf, "n_nan": n_nan, "norm_hist": hist, "n_outliers": 0, "outliers": [],
                        "candidates": [[int(r), float(row_norms[r])] for r in rows]})
        return out

    @staticmethod
    def merge(acc: dict, delta: dict, first_row: int = 0) -> None:
        """Add ``delta`` (a batch whose first activation row is ``first_row``, or another accumulator) to ``acc``."""
        for key in ("count", "sum", "sum_sq", "zeros", "n_outliers", "n_out_of_range", "n_nan"):
            acc[key] = acc.get(key, 0) + delta.get(key, 0)
        acc["max_abs"] = max(acc["max_abs"], delta["max_abs"])
        hist = delta.get("norm_hist")
        if hist is not None and len(hist):  # kept as an int64 array while merging; summary() gives a list
            acc["norm_hist"] = np.add(acc["norm_hist"], hist, dtype=np.int64)
        found = list(delta.get("outliers", []))
        if delta.get("candidates"):
            limit = HookStats.OUTLIER_FACTOR * HookStats.quantile(acc["norm_hist"], 0.5)
            found += sorted([first_row + r, n] for r, n in delta["candidates"] if n > limit)
            acc["n_outliers"] += len(found) - len(delta.get("outliers", []))
        acc["outliers"] = acc["outliers"] + found[: max(0, HookStats.MAX_OUTLIERS - len(acc["outliers"]))]

    @staticmethod
    def quantile(hist: list[int], q: float) -> float:
        """The ``q`` quantile of the norms in ``hist``: the geometric middle of the bin it falls in."""
        counts = np.cumsum(hist)
        if not len(counts) or not counts[-1]:
            return 0.0
        k = int(np.searchsorted(counts, q * counts[-1]))
        edges = HookStats.NORM_EDGES
        if k == 0:
            return float(edges[0])
        if k >= len(edges):
            return float(edges[-1])
        return float(math.sqrt(edges[k - 1] * edges[k]))

    @staticmethod
    def plain(acc: dict) -> dict:
        """``acc`` as JSON takes it (``merge`` keeps the histogram as an int64 array)."""
        return {**acc, "norm_hist": np.asarray(acc["norm_hist"], dtype=np.int64).tolist()}

    @staticmethod
    def summary(acc: dict) -> dict:
        n = acc["count"]
        mean = acc["sum"] / n if n else 0.0
        var = max(0.0, acc["sum_sq"] / n - mean * mean) if n else 0.0
        quantiles = {str(q): HookStats.quantile(acc["norm_hist"], q) for q in HookStats.QUANTILES}  # 0.5 among them
        return {**HookStats.plain(acc), "mean": mean, "std": math.sqrt(var),
                "frac_zeros": acc["zeros"] / n if n else 0.0, "norm_quantiles": quantiles,
                "outlier_threshold": HookStats.OUTLIER_FACTOR * quantiles["0.5"]}


_PADDED_EDGES = np.concatenate([[-np.inf], HookStats.NORM_EDGES, [np.inf]])  # [i] is NORM_EDGES[i - 1]


def norm_bins(norms: np.ndarray) -> np.ndarray:
    """``np.searchsorted(HookStats.NORM_EDGES, norms, side="left")`` for norms >= 0 (no NaN), 5x as fast: the bin
    from the edges' formula (24 a decade from 1e-3), then moved by one where rounding put it next to its own."""
    edges = HookStats.NORM_EDGES
    with np.errstate(divide="ignore"):  # log10(0) = -inf: bin 0
        approx = np.ceil((np.log10(norms) + 3) * 24)
    bins = np.clip(approx, 0, len(edges), out=approx).astype(np.intp)
    bins += norms > _PADDED_EDGES[bins + 1]  # past its upper edge
    bins -= norms <= _PADDED_EDGES[bins]  # at or under its lower edge
    return bins


def row_medians(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=1, keepdims=True)`` (NaN for a row with a NaN), by one partition: twice as fast."""
    n = values.shape[1]
    if not n:
        return np.full((len(values), 1), np.nan)
    middle = [(n - 1) // 2, n // 2]
    parts = np.partition(values, middle, axis=1)
    medians = (parts[:, middle[0]] + parts[:, middle[1]]) / 2
    medians[np.isnan(values).any(axis=1)] = np.nan
    return medians[:, None]


def special_counts(stored: np.ndarray, bfloat16: bool = False) -> tuple[int, int]:
    """(±inf, NaN) values in stored rows; ``bfloat16``: the rows are bfloat16's 2-byte patterns (uint16)."""
    if bfloat16:
        exponent_full = (stored & 0x7F80) == 0x7F80
        mantissa = (stored & 0x007F) != 0
        return int(np.count_nonzero(exponent_full & ~mantissa)), int(np.count_nonzero(exponent_full & mantissa))
    return int(np.count_nonzero(np.isinf(stored))), int(np.count_nonzero(np.isnan(stored)))


class LatentStats:
    """Accumulators of one SAE's latents over committed rows: rows, latents that fired (L0), latents dropped for
    want of width (and the rows that lost some), the largest value, values stored as ±inf (past the storage dtype's
    range) and NaN latents (not stored)."""

    @staticmethod
    def empty() -> dict:
        return {"rows": 0, "active": 0, "dropped": 0, "rows_dropped": 0, "max": 0.0, "n_out_of_range": 0, "n_nan": 0}

    @staticmethod
    def device_sums(active, dropped, values, stored, n_nan):
        """(rows, fired, dropped, rows that dropped some, max value, stored ±inf, NaN) as one float64 tensor where
        they are: ``values`` the kept latents, ``stored`` the same cast to the storage dtype."""
        import torch

        if not len(active):
            return torch.zeros(7, dtype=torch.float64, device=active.device)
        return torch.stack([torch.full((), len(active), dtype=torch.float64, device=active.device), active.sum(),
                            dropped.sum(), (dropped > 0).sum(), values.float().max(), stored.isinf().sum(),
                            n_nan.double()])

    @staticmethod
    def from_device(sums: list[float]) -> dict:
        rows, active, dropped, rows_dropped, top, n_inf, n_nan = sums
        return {"rows": int(rows), "active": int(active), "dropped": int(dropped), "rows_dropped": int(rows_dropped),
                "max": float(top), "n_out_of_range": int(n_inf), "n_nan": int(n_nan)}

    @staticmethod
    def merge(acc: dict, delta: dict) -> None:
        for key in ("rows", "active", "dropped", "rows_dropped", "n_out_of_range", "n_nan"):
            acc[key] = acc.get(key, 0) + delta.get(key, 0)
        acc["max"] = max(acc.get("max", 0.0), delta.get("max", 0.0))

    @staticmethod
    def summary(acc: dict) -> dict:
        return {**acc, "mean_l0": acc["active"] / acc["rows"] if acc["rows"] else 0.0}
