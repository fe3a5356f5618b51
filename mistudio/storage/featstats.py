"""Per-feature statistics in one streaming pass, in memory fixed by the number of features (never by the tokens).

What a feature dashboard shows (SAEDashboard, Neuronpedia), computed while the activations stream past, batch by
batch, exactly, and resumable: :class:`FeatureStatsAccumulator` keeps, for each of ``d`` features,

- ``n_tokens``, ``fire_count`` (value > 0: density), ``nan_count``, ``sum`` (mean over all tokens) and
  ``fire_sum`` (mean over firing tokens), ``max``/``min`` over every token, with ``max_row`` (the first row holding
  the maximum, when it is > 0) and ``min_row`` (the first row holding the minimum, when it is < 0). A NaN value
  counts in ``n_tokens`` and ``nan_count`` and nowhere else; implicit zeros of sparse rows are zeros;
- a signed **log-binned histogram** (:func:`histogram_edges`): magnitudes ``2**lo <= |v| < 2**hi`` (default
  ``2**-24 .. 2**24``: every finite float16 value, and bfloat16/float32 activations from 6e-8 to 1.7e7) in ``bins``
  equal-width bins per octave, for each sign, plus an exact-zero bin and, per sign, an underflow bin
  (``0 < |v| < 2**lo``) and an overflow bin (``|v| >= 2**hi``, infinities included): no value is ever dropped;
- the **top-k firing examples** (value > 0: value, row, document), ties broken by row order; with
  ``one_per_document`` the k documents with the largest per-document maximum, each with its first argmax row
  (exact, also when documents span batches);
- **quantile-band samples**: per feature and per *stratum* (the positive histogram bins grouped ``bands`` to an
  octave, plus the underflow and the overflow bin), the ``per_band`` firing rows with the smallest key
  :func:`sample_keys` ``(seed, row)``: a bottom-m sample, so deterministic and mergeable. From it,
  :meth:`FeatureStatistics.quantile_examples` draws a sample of each band of the feature's own firing-value
  quantiles, every example inside the band's value range;
- **co-occurrence**: per feature a Misra-Gries summary of ``cooccurrence`` counters over the features firing on
  the same tokens (restricted per token to its ``cooccurrence_per_token`` most active firing features, largest
  value first, ties to the lower feature index; each token's pairs count once per ordered pair). Counts are lower
  bounds, off by at most ``co_error[f]``; they are **exact** (``co_error[f] == 0``) exactly when ``f`` co-fires
  (within those per-token sets) with at most ``cooccurrence`` distinct features.

Memory: ``O(d * (bins_total + k + strata * per_band + cooccurrence))`` (see :attr:`FeatureStatsAccumulator.nbytes`;
with the defaults about 8.4 kB a feature: 3.2 MB for d = 384, 52 MB for d = 6144), whatever the number of rows;
each batch is processed in row chunks of about 2M values, which bounds the temporaries. The work is vectorised in
torch over features and runs where the state lives (``device=``): on the GPU during an extraction, on the CPU in a
streamed pass (:func:`compute`). ``state_dict``/``load_state_dict`` and ``merge`` make it resumable and shardable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import InputError

BANDS = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.0))
STATE_VERSION = 1
_EMPTY_KEY = 2**63 - 1            # sorts after every sample key
_CHUNK_VALUES = 1 << 21           # values per internal row chunk: bounds the temporaries of one update
_GOLDEN = 0x9E3779B97F4A7C15      # splitmix64 constants
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CSR(NamedTuple):
    """Sparse rows (SAE latents): row ``i`` holds ``values[offsets[i]:offsets[i+1]]`` at features
    ``indices[offsets[i]:offsets[i+1]]`` (distinct within a row); every other value is exactly 0."""

    offsets: Any
    indices: Any
    values: Any


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def sample_keys(rows: Any, seed: int = 0) -> np.ndarray:
    """The sampling key of activation rows (int64): splitmix64 of ``row + (seed + 1) * golden``, a bijection on
    rows for a fixed seed, so keys never tie. The accumulator keeps, per stratum, the rows with the smallest keys."""
    z = np.asarray(rows, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(((seed + 1) * _GOLDEN) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    return z.view(np.int64)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _keys(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """:func:`sample_keys` in torch (int64 arithmetic wraps like uint64)."""
    z = rows + _signed(((seed + 1) * _GOLDEN) % (1 << 64))
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def histogram_edges(bins: int = 4, exponents: tuple[int, int] = (-24, 24)) -> np.ndarray:
    """Value boundaries between the ``2 * L + 5`` histogram bins (``L = (hi - lo) * bins``), ascending:
    ``[-2**hi, ..., -2**lo, 0, 0, 2**lo, ..., 2**hi]`` (length ``2 * L + 4``). Bins, in order: negative overflow
    (``v <= -2**hi``), ``L`` negative log bins, negative underflow, exact zero (``-0.0`` too), positive underflow
    (``0 < v < 2**lo``), ``L`` positive log bins, positive overflow (``v >= 2**hi``, ``+inf`` too). A positive log
    bin holds ``edges[i-1] <= v < edges[i]``, a negative one ``edges[i-1] < v <= edges[i]``. Octave ``[2**e,
    2**(e+1))`` is cut into ``bins`` equal-width parts (boundaries ``2**e * (1 + j / bins)``, exact in float32)."""
    lo, hi = exponents
    steps = np.arange((hi - lo) * bins + 1)
    magnitudes = np.ldexp(1.0 + (steps % bins) / bins, lo + steps // bins)
    return np.concatenate([-magnitudes[::-1], [0.0, 0.0], magnitudes])


@dataclass
class FeatureStatistics:
    """Per-feature statistics over ``n_tokens`` activation rows (arrays of shape ``(d,)`` unless noted).

    Empty slots: rows -1, values NaN. ``hist`` is ``(d, 2L+5)`` over :attr:`edges` (:func:`histogram_edges`);
    ``sample_rows``/``sample_values`` are ``(d, strata, per_band)``; ``co_features``/``co_counts`` are
    ``(d, cooccurrence)``, most frequent first."""

    n_tokens: int
    ranges: np.ndarray            # (r, 2) [start, stop) activation-row ranges seen
    fire_count: np.ndarray
    nan_count: np.ndarray
    sum: np.ndarray
    fire_sum: np.ndarray
    max: np.ndarray
    max_row: np.ndarray           # first row of the maximum when it is > 0, else -1
    min: np.ndarray
    min_row: np.ndarray           # first row of the minimum when it is < 0, else -1
    hist: np.ndarray
    edges: np.ndarray
    topk_values: np.ndarray       # (d, k), largest first
    topk_rows: np.ndarray         # (d, k)
    topk_documents: np.ndarray    # (d, k), -1 where no documents were given
    sample_rows: np.ndarray
    sample_values: np.ndarray
    co_features: np.ndarray
    co_counts: np.ndarray
    co_error: np.ndarray          # co_counts[f] undercount their features by at most co_error[f]; 0: exact
    bins: int
    exponents: tuple[int, int]
    bands: int
    seed: int
    one_per_document: bool
    cooccurrence_per_token: int = 16  # co-occurrence pairs up each token's this many most active firing features

    @property
    def d(self) -> int:
        return len(self.fire_count)

    @property
    def density(self) -> np.ndarray:
        """Fraction of tokens where the feature is > 0."""
        return self.fire_count / max(self.n_tokens, 1)

    @property
    def mean(self) -> np.ndarray:
        """Mean over every token (NaN values left out)."""
        return self.sum / np.maximum(self.n_tokens - self.nan_count, 1)

    @property
    def fire_mean(self) -> np.ndarray:
        """Mean over the tokens where the feature fires (> 0); 0 where it never fired."""
        return self.fire_sum / np.maximum(self.fire_count, 1)

    def _feature(self, feature: int) -> int:
        if isinstance(feature, (bool, np.bool_)) or not isinstance(feature, (int, np.integer)) \
                or not 0 <= feature < self.d:
            raise InputError(f"feature={feature!r} is not a feature index: give an int in 0..{self.d - 1}")
        return int(feature)

    def top_rows(self, feature: int) -> np.ndarray:
        """Activation rows of the feature's top examples, largest value first."""
        rows = self.topk_rows[self._feature(feature)]
        return rows[rows >= 0]

    def top_values(self, feature: int) -> np.ndarray:
        """The values at :meth:`top_rows`."""
        f = self._feature(feature)
        return self.topk_values[f][self.topk_rows[f] >= 0]

    def cooccurring(self, feature: int, n: int = 10) -> list[tuple[int, int]]:
        """Up to ``n`` ``(feature, count)``: the features firing on the same tokens most often, most first.
        Counts are exact when ``co_error[feature] == 0``, else each is low by at most ``co_error[feature]``."""
        f = self._feature(feature)
        keep = self.co_features[f] >= 0
        return [(int(g), int(c)) for g, c in zip(self.co_features[f][keep][:n], self.co_counts[f][keep][:n])]

    def _positive_counts(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """Counts of the positive bins (underflow, log bins, overflow) and of the strata."""
        zero = self.hist.shape[1] // 2
        counts = self.hist[f, zero + 1:].astype(np.int64)
        return counts, np.bincount(_strata_of_positive_bins(self.bins, self.exponents, self.bands), weights=counts,
                                   minlength=self.sample_rows.shape[1]).astype(np.int64)

    def firing_floor(self, feature: int) -> float | None:
        """The smallest firing value among the feature's sampled rows (each stratum of values is sampled, the
        lowest too): where its lowest histogram bin's values start, as far as the samples tell; None if none."""
        f = self._feature(feature)
        sampled = self.sample_values[f].ravel()[self.sample_rows[f].ravel() >= 0]
        sampled = sampled[sampled > 0]
        return float(sampled.min()) if sampled.size else None

    def quantile(self, feature: int, q: float) -> float:
        """The value at quantile ``q`` of the feature's firing values, from its histogram (geometric interpolation
        within a log bin, linear in the underflow bin, ``2**hi`` in the overflow bin; at most the maximum); NaN if
        it never fired. A bin's range is cut to the values that exist: the bin holding the maximum ends there, and
        the lowest firing bin starts at the smallest sampled firing value (a feature firing between 1.019 and
        1.021 is not read as spread over the whole bin [1, 1.19))."""
        f = self._feature(feature)
        counts, _ = self._positive_counts(f)
        total = counts.sum()
        if not total:
            return float("nan")
        target = min(max(float(q), 0.0), 1.0) * total
        cum = np.cumsum(counts)
        filled = np.flatnonzero(counts)
        i = int(filled[np.searchsorted(cum[filled], target, side="left")])  # the first non-empty bin reaching q
        frac = (target - (cum[i] - counts[i])) / counts[i]
        edges = self.edges[len(self.edges) // 2 + 1:]  # 2**lo .. 2**hi
        top = float(self.max[f])
        if i == len(counts) - 1:
            return float(min(edges[-1], top))
        low, high = (0.0 if i == 0 else float(edges[i - 1])), float(edges[i])
        high = max(min(high, top), low)  # no value of the bin lies above the maximum
        if i == filled[0] and (floor := self.firing_floor(f)) is not None:  # nor, as far as the samples tell,
            low = min(max(low, floor), high)                                # below the smallest firing value
        if frac >= 1 or high == low:
            return float(high)
        value = low + frac * (high - low) if i == 0 or low == 0 else low * (high / low) ** frac
        return float(min(value, top))

    def quantile_examples(self, feature: int, bands: Sequence[tuple[float, float]] = BANDS,
                          per_band: int = 3) -> list[dict]:
        """Examples from bands of the feature's firing-value quantiles: per band ``{"quantiles": (lo, hi),
        "values": (value at lo, value at hi), "rows", "activations"}`` (largest first), every activation within
        ``values`` (inclusive): of the rows sampled in every stratum, those with a value in the band's range, the
        ``per_band`` with the smallest :func:`sample_keys`. A uniform sample of the band's firing rows where its
        strata lie wholly inside the range; the (at most two) strata straddling its ends contribute only their
        sampled rows that fall inside, so a band narrower than a stratum may get fewer: it is filled up from the
        feature's top examples that lie in it (the 99-100% band showed none beside a top list inside its range)."""
        f = self._feature(feature)
        stored = self.sample_rows.shape[2]
        if not stored:
            raise InputError("these statistics were accumulated with per_band=0 (no samples): accumulate with "
                             "per_band >= 1 to draw quantile examples")
        if isinstance(per_band, bool) or not isinstance(per_band, (int, np.integer)) or not 1 <= per_band <= stored:
            raise InputError(f"per_band={per_band!r}: the statistics keep {stored} rows per stratum; give an int "
                             f"in 1..{stored} (or accumulate with a larger per_band)")
        held = self.sample_rows[f].ravel() >= 0
        all_rows, all_values = self.sample_rows[f].ravel()[held], self.sample_values[f].ravel()[held]
        top_rows, top_values = self.top_rows(f), self.top_values(f)
        out = []
        for lo, hi in _check_bands(bands):
            low, high = self.quantile(f, lo), self.quantile(f, hi)
            inside = (all_values >= low) & (all_values <= high)  # False throughout when it never fired (NaN)
            rows, values = all_rows[inside], all_values[inside]
            pick = np.argsort(sample_keys(rows, self.seed), kind="stable")[:per_band]
            rows, values = rows[pick], values[pick]
            if len(rows) < per_band:  # the samples missed a narrow band: its top examples, if it holds some
                more = (top_values >= low) & (top_values <= high) & ~np.isin(top_rows, rows)
                extra = np.flatnonzero(more)[:per_band - len(rows)]
                rows, values = np.concatenate([rows, top_rows[extra]]), np.concatenate([values, top_values[extra]])
            order = np.lexsort((rows, -values))
            out.append({"quantiles": (lo, hi), "values": (low, high), "rows": rows[order],
                        "activations": values[order]})
        return out


def _check_bands(bands: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    try:
        pairs = [(float(lo), float(hi)) for lo, hi in bands]
    except (TypeError, ValueError):
        raise InputError(f"bands={bands!r}: give (low, high) quantile pairs, e.g. {BANDS}") from None
    for lo, hi in pairs:
        if not 0.0 <= lo < hi <= 1.0:
            raise InputError(f"bands={bands!r}: each band needs 0 <= low < high <= 1, got ({lo}, {hi})")
    return pairs


def _strata_of_positive_bins(bins: int, exponents: tuple[int, int], bands: int) -> np.ndarray:
    """Stratum of each positive bin (underflow, the log bins, overflow)."""
    n_log = (exponents[1] - exponents[0]) * bins
    return np.concatenate([[0], 1 + np.arange(n_log) // (bins // bands), [n_log // (bins // bands) + 1]])


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise InputError(f"{name}={value!r} is not valid: give an int {span}")
    return int(value)


def _power_of_two(name: str, value: Any, high: int) -> int:
    value = _int(name, value, 1, high)
    if value & (value - 1):
        raise InputError(f"{name}={value} must be a power of two (1, 2, 4, ... {high})")
    return value


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sort(t: torch.Tensor) -> torch.Tensor:
    """Sorted values (numpy's vectorised sort on the CPU is many times faster than torch's)."""
    return torch.from_numpy(np.sort(t.numpy())) if t.device.type == "cpu" else torch.sort(t).values


def _argsort_distinct(t: torch.Tensor) -> torch.Tensor:
    """Indices sorting distinct values (any algorithm gives the same order)."""
    return torch.from_numpy(np.argsort(t.numpy())) if t.device.type == "cpu" else torch.argsort(t)


def _unique_counts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values, ascending, and how often each occurs."""
    if t.device.type == "cpu":
        keys, counts = np.unique(t.numpy(), return_counts=True)
        return torch.from_numpy(keys), torch.from_numpy(counts.astype(np.int64))
    return torch.unique(t, return_counts=True)


def _present(index: torch.Tensor, size: int) -> torch.Tensor:
    """The distinct values of ``index`` (in 0..size-1), ascending."""
    return torch.nonzero(torch.bincount(index, minlength=size)).squeeze(1)


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by ``keys`` (most significant first, each ascending), stable."""
    order = torch.argsort(keys[-1], stable=True)
    for key in reversed(keys[:-1]):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _rank_in_group(group: torch.Tensor) -> torch.Tensor:
    """Position of each element within its run of equal values in the sorted tensor ``group``."""
    return torch.arange(len(group), device=group.device) - torch.searchsorted(group, group, side="left")


class FeatureStatsAccumulator:
    """Streaming per-feature statistics of ``d`` features (see the module docstring for what and how exactly).

    ``update(first_row, values, documents)`` once per batch, in any order of disjoint row ranges; ``result()``
    at any time. Parameters: ``k`` top examples per feature; ``one_per_document``: at most one of them per
    document; ``bins`` histogram bins per octave (a power of two up to 64) over magnitudes
    ``2**exponents[0] .. 2**exponents[1]``; ``bands`` sample strata per octave (a power of two dividing ``bins``)
    with ``per_band`` rows each (0: no samples); ``cooccurrence`` counters per feature (0: none) over each token's
    ``cooccurrence_per_token`` most active features; ``seed`` of the sample keys; ``device`` where the state lives
    and the work runs."""

    def __init__(self, d: int, k: int = 20, one_per_document: bool = False, bins: int = 4,
                 exponents: tuple[int, int] = (-24, 24), bands: int = 2, per_band: int = 3, cooccurrence: int = 32,
                 cooccurrence_per_token: int = 16, seed: int = 0, device: str | torch.device = "cpu"):
        self.d = _int("d", d, 1)
        self.k = _int("k", k, 1)
        if not isinstance(one_per_document, (bool, np.bool_)):
            raise InputError(f"one_per_document={one_per_document!r}: give True or False")
        self.one_per_document = bool(one_per_document)
        self.bins = _power_of_two("bins", bins, 64)
        try:
            lo, hi = (_int("exponents[0]", exponents[0], -126, 127), _int("exponents[1]", exponents[1], -125, 128))
        except (TypeError, IndexError):
            raise InputError(f"exponents={exponents!r}: give (low, high) powers of two, e.g. (-24, 24)") from None
        if lo >= hi or len(exponents) != 2:
            raise InputError(f"exponents={exponents!r}: give (low, high) with low < high, e.g. (-24, 24)")
        self.exponents = (lo, hi)
        self.bands = _power_of_two("bands", bands, self.bins)
        self.per_band = _int("per_band", per_band, 0)
        self.cooccurrence = _int("cooccurrence", cooccurrence, 0)
        self.cooccurrence_per_token = _int("cooccurrence_per_token", cooccurrence_per_token, 2)
        self.seed = _int("seed", seed, 0, 2**62)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"device={device!r} is not a torch device: give e.g. 'cpu' or 'cuda'") from None
        self._n_log = (hi - lo) * self.bins
        self._count_bits = 63 - max(1, (self.d - 1).bit_length())  # co-occurrence counts sort as (f, count) keys
        self.n_bins = 2 * self._n_log + 5
        self.n_strata = (hi - lo) * self.bands + 2
        self.edges = histogram_edges(self.bins, self.exponents)
        table = np.full(self.n_bins + 1, -1, np.int64)  # bin -> stratum (-1: not positive; the last: NaN)
        table[self._n_log + 3:self.n_bins] = _strata_of_positive_bins(self.bins, self.exponents, self.bands)
        self._stratum_of_bin = torch.as_tensor(table, device=self.device)
        self._reset()

    # -- state ---------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        d, dev = self.d, self.device
        i64 = dict(dtype=torch.int64, device=dev)
        self.n_tokens = 0
        self.ranges: list[list[int]] = []
        self.fire_count = torch.zeros(d, **i64)
        self.nan_count = torch.zeros(d, **i64)
        self.sum = torch.zeros(d, dtype=torch.float64, device=dev)
        self.fire_sum = torch.zeros(d, dtype=torch.float64, device=dev)
        self.max = torch.full((d,), -math.inf, device=dev)
        self.max_row = torch.full((d,), -1, **i64)
        self.min = torch.full((d,), math.inf, device=dev)
        self.min_row = torch.full((d,), -1, **i64)
        self.hist = torch.zeros(d, self.n_bins, **i64)
        self.top_values = torch.full((d, self.k), -math.inf, device=dev)
        self.top_rows = torch.full((d, self.k), -1, **i64)
        self.top_documents = torch.full((d, self.k), -1, **i64)
        self.sample_rows = torch.full((d * self.n_strata, self.per_band), -1, **i64)
        self.sample_values = torch.full((d * self.n_strata, self.per_band), math.nan, device=dev)
        self.co_features = torch.full((d, self.cooccurrence), -1, **i64)
        self.co_counts = torch.zeros(d, self.cooccurrence, **i64)
        self.co_error = torch.zeros(d, **i64)
        self._sample_limit = torch.full((d * self.n_strata,), _EMPTY_KEY, **i64)

    _ARRAYS = ("fire_count", "nan_count", "sum", "fire_sum", "max", "max_row", "min", "min_row", "hist",
               "top_values", "top_rows", "top_documents", "sample_rows", "sample_values", "co_features",
               "co_counts", "co_error")

    def config(self) -> dict[str, int]:
        """The parameters that must agree for states to be loaded or merged."""
        return {"version": STATE_VERSION, "d": self.d, "k": self.k, "one_per_document": int(self.one_per_document),
                "bins": self.bins, "exponent_low": self.exponents[0], "exponent_high": self.exponents[1],
                "bands": self.bands, "per_band": self.per_band, "cooccurrence": self.cooccurrence,
                "cooccurrence_per_token": self.cooccurrence_per_token, "seed": self.seed}

    @property
    def nbytes(self) -> int:
        """Bytes of the state (fixed by ``d`` and the parameters)."""
        return sum(getattr(self, name).element_size() * getattr(self, name).numel()
                   for name in self._ARRAYS + ("_sample_limit",))

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """The whole state as numpy arrays and ints (config included), e.g. to store as Zarr arrays at a commit."""
        state: dict[str, Any] = dict(self.config())
        state["n_tokens"] = int(self.n_tokens)
        state["ranges"] = np.asarray(self.ranges, np.int64).reshape(-1, 2)
        for name in self._ARRAYS:
            state[name] = getattr(self, name).cpu().numpy().copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` (of an accumulator with the same parameters)."""
        missing = [key for key in (*self.config(), "n_tokens", "ranges", *self._ARRAYS) if key not in state]
        if missing:
            raise InputError(f"the state has no {missing}: pass the dict state_dict() returned")
        theirs = {key: int(np.asarray(state[key])) for key in self.config()}
        if theirs != self.config():
            diff = {key: (theirs[key], value) for key, value in self.config().items() if theirs[key] != value}
            raise InputError(f"the state was made with other parameters ({{name: (state, this)}}: {diff}): create "
                             "the accumulator with the state's parameters, or use FeatureStatsAccumulator."
                             "from_state_dict(state)")
        loaded = {}
        for name in self._ARRAYS:
            current = getattr(self, name)
            array = np.asarray(state[name])
            if tuple(array.shape) != tuple(current.shape):
                raise InputError(f"state[{name!r}] has shape {array.shape}, expected {tuple(current.shape)}")
            loaded[name] = torch.as_tensor(array, dtype=current.dtype).to(self.device)
        for name, tensor in loaded.items():
            setattr(self, name, tensor)
        self.n_tokens = int(np.asarray(state["n_tokens"]))
        self.ranges = np.asarray(state["ranges"], np.int64).reshape(-1, 2).tolist()
        self._refresh_limits(torch.arange(len(self.sample_rows), device=self.device))

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device = "cpu") -> FeatureStatsAccumulator:
        """An accumulator with the parameters stored in ``state``, continuing from it."""
        try:
            acc = cls(int(state["d"]), k=int(state["k"]), one_per_document=bool(int(state["one_per_document"])),
                      bins=int(state["bins"]), exponents=(int(state["exponent_low"]), int(state["exponent_high"])),
                      bands=int(state["bands"]), per_band=int(state["per_band"]),
                      cooccurrence=int(state["cooccurrence"]),
                      cooccurrence_per_token=int(state["cooccurrence_per_token"]), seed=int(state["seed"]),
                      device=device)
        except KeyError as exc:
            raise InputError(f"the state has no {exc.args[0]!r}: pass the dict state_dict() returned") from None
        acc.load_state_dict(state)
        return acc

    def result(self) -> FeatureStatistics:
        """The statistics so far, as numpy arrays (a copy: updating on does not change it)."""
        s = self.state_dict()
        empty = s["top_rows"] < 0
        order = np.lexsort((s["co_features"], -s["co_counts"]))  # most frequent first, then the lower feature
        co_features, co_counts = (np.take_along_axis(s[name], order, axis=1) for name in ("co_features", "co_counts"))
        return FeatureStatistics(
            n_tokens=s["n_tokens"], ranges=s["ranges"], fire_count=s["fire_count"], nan_count=s["nan_count"],
            sum=s["sum"], fire_sum=s["fire_sum"], max=s["max"], max_row=s["max_row"], min=s["min"],
            min_row=s["min_row"], hist=s["hist"], edges=self.edges.copy(),
            topk_values=np.where(empty, np.float32(np.nan), s["top_values"]), topk_rows=s["top_rows"],
            topk_documents=np.where(empty, -1, s["top_documents"]),
            sample_rows=s["sample_rows"].reshape(self.d, self.n_strata, self.per_band),
            sample_values=s["sample_values"].reshape(self.d, self.n_strata, self.per_band),
            co_features=co_features, co_counts=co_counts, co_error=s["co_error"], bins=self.bins,
            exponents=self.exponents, bands=self.bands, seed=self.seed, one_per_document=self.one_per_document,
            cooccurrence_per_token=self.cooccurrence_per_token)

    # -- rows ------------------------------------------------------------------------------------------------
    def _claim(self, start: int, stop: int) -> None:
        for a, b in self.ranges:
            if start < b and a < stop:
                raise InputError(f"rows {start}..{stop - 1} overlap rows {a}..{b - 1} already counted: each "
                                 "activation row goes into the statistics once (resume from the saved state, "
                                 "after its last row)")
        merged = sorted(self.ranges + [[start, stop]])
        out = [merged[0]]
        for a, b in merged[1:]:
            if a == out[-1][1]:
                out[-1][1] = b
            else:
                out.append([a, b])
        self.ranges = out

    # -- input -----------------------------------------------------------------------------------------------
    def _tensor(self, x: Any, what: str) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.detach()
        array = np.asarray(x)
        if array.dtype.name == "bfloat16":  # ml_dtypes
            return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        try:
            return torch.from_numpy(np.ascontiguousarray(array))
        except TypeError:
            raise InputError(f"{what} has dtype {array.dtype}: give float16, bfloat16 or float32 values") from None

    def _floats(self, x: Any, what: str) -> torch.Tensor:
        t = self._tensor(x, what)
        if t.dtype not in _INPUT_DTYPES:
            raise InputError(f"{what} has dtype {_name(t.dtype)}: give float16, bfloat16 or float32 values "
                             "(the values as stored)")
        return t.to(self.device, torch.float32).contiguous()

    def _ints(self, x: Any, what: str) -> torch.Tensor:
        t = self._tensor(x, what)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"{what} has dtype {_name(t.dtype)}: give integers")
        return t.to(self.device, torch.int64).reshape(-1)

    def _parse(self, values: Any) -> tuple[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, dense (n, d) float32) or (rows, (offsets, indices, values)) on the device, validated."""
        if isinstance(values, torch.Tensor) and values.layout == torch.sparse_csr:
            values = CSR(values.crow_indices(), values.col_indices(), values.values())
        if isinstance(values, tuple) and len(values) == 3:
            offsets, indices = self._ints(values[0], "offsets"), self._ints(values[1], "indices")
            vals = self._floats(values[2], "values").reshape(-1)
            n = len(offsets) - 1
            if n < 0 or int(offsets[0]) != 0 or int(offsets[-1]) != len(indices) or len(indices) != len(vals) \
                    or bool((offsets[1:] < offsets[:-1]).any()):
                raise InputError(f"sparse rows: offsets must start at 0, not decrease and end at len(indices) = "
                                 f"len(values) ({len(indices)}, {len(vals)}); got offsets of length {len(offsets)}")
            if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.d):
                raise InputError(f"sparse rows: indices must be features 0..{self.d - 1}, got "
                                 f"{int(indices.min())}..{int(indices.max())}")
            rows = torch.repeat_interleave(torch.arange(n, device=self.device), offsets.diff())
            if len(_unique_counts(rows * self.d + indices)[0]) != len(indices):
                raise InputError("sparse rows: a row lists the same feature twice; give each feature once per row")
            return n, (offsets, indices, vals)
        dense = self._floats(values, "values")
        if dense.ndim != 2 or dense.shape[1] != self.d:
            raise InputError(f"values of shape {tuple(dense.shape)}: give (rows, {self.d}) dense values or "
                             "CSR(offsets, indices, values) sparse rows")
        return dense.shape[0], dense

    # -- update ----------------------------------------------------------------------------------------------
    def update(self, first_row: int, values: Any, documents: Any = None) -> None:
        """Add one batch of consecutive activation rows starting at ``first_row``: ``values`` dense ``(n, d)``
        (torch on any device, or numpy; float16/bfloat16/float32, computed as float32) or sparse
        :class:`CSR` (or a torch sparse CSR tensor); ``documents`` ``(n,)``: the stored-sample index of each row
        (needed with ``one_per_document``; otherwise kept with the top examples when given)."""
        first_row = _int("first_row", first_row, 0)
        n, batch = self._parse(values)
        if documents is None:
            if self.one_per_document:
                raise InputError("one_per_document=True needs documents=: the stored-sample index of each row")
            docs = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        else:
            docs = self._ints(documents, "documents")
            if len(docs) != n:
                raise InputError(f"documents has {len(docs)} entries for {n} rows: give one per row")
        if n == 0:
            return
        self._claim(first_row, first_row + n)
        self.n_tokens += n
        with torch.no_grad():
            if isinstance(batch, torch.Tensor):
                step = max(1, _CHUNK_VALUES // max(self.d, self.cooccurrence_per_token ** 2))
                for a in range(0, n, step):
                    b = min(a + step, n)
                    self._dense(first_row + a, batch[a:b], docs[a:b])
            else:
                offsets, indices, vals = batch
                width = max(1, math.ceil(len(indices) / n), self.cooccurrence_per_token ** 2)
                step = max(1, _CHUNK_VALUES // width)
                for a in range(0, n, step):
                    b = min(a + step, n)
                    lo, hi = int(offsets[a]), int(offsets[b])
                    self._sparse(first_row + a, offsets[a:b + 1] - lo, indices[lo:hi], vals[lo:hi], docs[a:b])

    def _bins(self, v: torch.Tensor) -> torch.Tensor:
        """Histogram bin of each float32 value, from its bits (NaN: ``n_bins``, a bin that is dropped)."""
        lo, _ = self.exponents
        bits = v.view(torch.int32)
        mag = bits & 0x7FFFFFFF
        shift = 23 - int(math.log2(self.bins))
        size = ((mag - ((lo + 127) << 23)) >> shift).clamp_(-1, self._n_log) + 2  # 1 under, 2.. log, L+2 over
        size = size.masked_fill_(mag == 0, 0)
        zero = self._n_log + 2
        out = torch.where(bits < 0, zero - size, zero + size)
        return out.masked_fill_(mag > 0x7F800000, self.n_bins).long()

    def _dense(self, first: int, v: torch.Tensor, docs: torch.Tensor) -> None:
        n, d = v.shape
        dev = self.device
        rows = torch.arange(first, first + n, device=dev)
        nan = torch.isnan(v)
        if bool(nan.any()):
            clean, high, low = v.masked_fill(nan, 0.0), v.masked_fill(nan, -math.inf), v.masked_fill(nan, math.inf)
            self.nan_count += nan.sum(0)
        else:
            clean = high = low = v
        fire = clean > 0
        self.sum += clean.sum(0, dtype=torch.float64)
        self.fire_sum += clean.clamp(min=0).sum(0, dtype=torch.float64)
        self.fire_count += fire.sum(0)
        at = high.argmax(0)  # the first maximal row
        self._extreme(high.gather(0, at[None])[0], rows[at], largest=True)
        at = low.argmin(0)
        self._extreme(low.gather(0, at[None])[0], rows[at], largest=False)
        bins = self._bins(v)
        width = self.n_bins + 1
        flat = (bins + torch.arange(d, device=dev) * width).reshape(-1)
        self.hist += torch.bincount(flat, minlength=d * width).view(d, width)[:, :self.n_bins]

        # top-k: only values at or over the state's k-th can enter; early on, over the batch's k-th as well
        bar = self._top_bar()
        chosen = fire & (clean >= bar)
        if int(chosen.sum()) > 2 * d * self.k:
            firing = clean.masked_fill(~fire, -math.inf)
            if self.one_per_document:
                seg, inverse = torch.unique(docs, return_inverse=True)
                if len(seg) >= self.k:
                    best = torch.full((len(seg), d), -math.inf, device=dev)
                    best.scatter_reduce_(0, inverse[:, None].expand(n, d), firing, "amax")
                    chosen &= clean >= best.topk(self.k, dim=0).values[-1]
            elif n >= self.k:
                chosen &= clean >= firing.topk(self.k, dim=0).values[-1]
        r, f = torch.nonzero(chosen, as_tuple=True)
        self._merge_top(f, rows[r], clean[r, f], docs[r])

        if self.per_band:  # rows under their cell's limit: the limit of each (feature, bin), then one gather
            strata = self._stratum_of_bin
            limits = self._sample_limit.view(d, self.n_strata)[:, strata.clamp(min=0)].masked_fill_(strata < 0, -2**63)
            keys = _keys(rows, self.seed)
            r, f = torch.nonzero(keys[:, None] < limits.view(-1)[flat].view(n, d), as_tuple=True)
            self._merge_samples(f * self.n_strata + strata[bins[r, f]], keys[r], rows[r], clean[r, f])

        if self.cooccurrence:
            m = min(self.cooccurrence_per_token, d)
            order = (clean.view(torch.int32).long() << 32) | (0xFFFFFFFF - torch.arange(d, device=dev))
            top = order.masked_fill(~fire, -1).topk(m, dim=1).values
            self._count_pairs(torch.where(top >= 0, 0xFFFFFFFF - (top & 0xFFFFFFFF), -1))

    def _sparse(self, first: int, offsets: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                docs: torch.Tensor) -> None:
        n, d, dev = len(offsets) - 1, self.d, self.device
        local = torch.repeat_interleave(torch.arange(n, device=dev), offsets.diff())
        rows = local + first
        nan = torch.isnan(vals)
        has_nan = bool(nan.any())
        clean = vals.masked_fill(nan, 0.0) if has_nan else vals
        self.sum += self._feature_sums(idx, clean)
        if has_nan:
            self.nan_count += torch.bincount(idx[nan], minlength=d)
        implicit = n - torch.bincount(idx, minlength=d)  # zeros that are not listed
        for largest in (True, False):
            fill = -math.inf if largest else math.inf
            kept = vals.masked_fill(nan, fill) if has_nan else vals
            value = torch.full((d,), fill, device=dev).scatter_reduce_(0, idx, kept, "amax" if largest else "amin")
            value = torch.where(implicit > 0, value.clamp(min=0) if largest else value.clamp(max=0), value)
            hit = kept == value[idx]  # rows of a maximum that is not > 0 are dropped by _extreme
            row = torch.full((d,), 2**62, device=dev, dtype=torch.int64).scatter_reduce_(0, idx[hit], rows[hit], "amin")
            self._extreme(value, row, largest)
        bins = self._bins(vals)
        counted = torch.nonzero(bins < self.n_bins).squeeze(1) if has_nan else slice(None)  # NaN has no bin
        flat = idx[counted] * self.n_bins + bins[counted]
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.hist[:, self._n_log + 2] += implicit

        at = torch.nonzero(clean > 0).squeeze(1)  # the firing entries, in row order
        idx, clean, local, rows, bins = idx[at], clean[at], local[at], rows[at], bins[at]
        self.fire_sum += self._feature_sums(idx, clean)
        self.fire_count += torch.bincount(idx, minlength=d)
        chosen = torch.nonzero(clean >= self._top_bar()[idx]).squeeze(1)
        self._merge_top(idx[chosen], rows[chosen], clean[chosen], docs[local[chosen]])

        if self.per_band:
            cell = idx * self.n_strata + self._stratum_of_bin[bins]
            keys = _keys(rows, self.seed)
            chosen = torch.nonzero(keys < self._sample_limit[cell]).squeeze(1)
            self._merge_samples(cell[chosen], keys[chosen], rows[chosen], clean[chosen])

        if self.cooccurrence:
            m = min(self.cooccurrence_per_token, d)
            per_row = torch.bincount(local, minlength=n)
            if int(per_row.max()) > m:  # keep each token's m largest, ties to the lower feature
                order = _lexsort(local, -clean, idx)
                idx, local = idx[order], local[order]
            rank = torch.arange(len(idx), device=dev) - (torch.cumsum(per_row, 0) - per_row)[local]
            keep = rank < m
            feats = torch.full((n, m), -1, dtype=torch.int64, device=dev)
            feats[local[keep], rank[keep]] = idx[keep]
            self._count_pairs(feats)

    def _feature_sums(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """float64 sums of ``vals`` per feature, in a deterministic order on every device."""
        if self.device.type == "cpu":
            return torch.zeros(self.d, dtype=torch.float64).index_add_(0, idx, vals.double())
        order = torch.argsort(idx, stable=True)  # CUDA's index_add_ adds floats in a varying order
        return torch.segment_reduce(vals.double()[order], "sum", lengths=torch.bincount(idx, minlength=self.d))

    def _extreme(self, value: torch.Tensor, row: torch.Tensor, largest: bool) -> None:
        """Fold in one batch's per-feature maximum (or minimum) and the first row holding it; the row is kept
        only for a positive maximum (negative minimum); equal values keep the earlier row."""
        current, current_row = (self.max, self.max_row) if largest else (self.min, self.min_row)
        row = torch.where(value > 0 if largest else value < 0, row, -1)
        better = (value > current) if largest else (value < current)
        take = better | ((value == current) & (row >= 0) & (row < current_row))
        current.copy_(torch.where(take, value, current))
        current_row.copy_(torch.where(take, row, current_row))

    # -- bounded summaries -------------------------------------------------------------------------------------
    def _top_bar(self) -> torch.Tensor:
        """Per feature, the least value that may still enter the top k (the k-th held, or 0)."""
        full = self.top_rows[:, -1] >= 0
        return torch.where(full, self.top_values[:, -1], torch.zeros_like(self.top_values[:, -1]))

    def _merge_top(self, f: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor, docs: torch.Tensor) -> None:
        """Merge candidate examples into the top k of their features (one per document if asked)."""
        if not len(f):
            return
        touched = _present(f, self.d)
        held = self.top_rows[touched] >= 0
        f = torch.cat([touched[:, None].expand(-1, self.k)[held], f])
        rows = torch.cat([self.top_rows[touched][held], rows])
        vals = torch.cat([self.top_values[touched][held], vals])
        docs = torch.cat([self.top_documents[touched][held], docs])
        if self.one_per_document:  # keep each document's best example
            order = _lexsort(f, docs, -vals, rows)
            f, rows, vals, docs = f[order], rows[order], vals[order], docs[order]
            first = torch.ones_like(f, dtype=torch.bool)
            first[1:] = (f[1:] != f[:-1]) | (docs[1:] != docs[:-1])
            f, rows, vals, docs = f[first], rows[first], vals[first], docs[first]
        order = _lexsort(f, -vals, rows)
        f, rows, vals, docs = f[order], rows[order], vals[order], docs[order]
        rank = _rank_in_group(f)
        keep = rank < self.k
        self.top_rows[touched] = -1
        self.top_values[touched] = -math.inf
        self.top_documents[touched] = -1
        at = (f[keep], rank[keep])
        self.top_rows[at], self.top_values[at], self.top_documents[at] = rows[keep], vals[keep], docs[keep]

    def _merge_samples(self, cell: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor) -> None:
        """Merge candidate rows into the bottom-``per_band`` (by key) samples of their (feature, stratum) cells."""
        if not len(cell):
            return
        touched = _present(cell, len(self.sample_rows))
        held_rows = self.sample_rows[touched]
        held = held_rows >= 0
        cell = torch.cat([touched[:, None].expand(-1, self.per_band)[held], cell])
        rows = torch.cat([held_rows[held], rows])
        keys = torch.cat([_keys(held_rows[held], self.seed), keys])
        vals = torch.cat([self.sample_values[touched][held], vals])
        order = _lexsort(cell, keys)
        cell, rows, vals = cell[order], rows[order], vals[order]
        rank = _rank_in_group(cell)
        keep = rank < self.per_band
        self.sample_rows[touched] = -1
        self.sample_values[touched] = math.nan
        self.sample_rows[cell[keep], rank[keep]] = rows[keep]
        self.sample_values[cell[keep], rank[keep]] = vals[keep]
        self._refresh_limits(touched)

    def _refresh_limits(self, cells: torch.Tensor) -> None:
        """Key a row must be under to enter a full cell's sample (any key enters a cell that is not full)."""
        if not self.per_band:
            return
        last = self.sample_rows[cells, -1]
        self._sample_limit[cells] = torch.where(last >= 0, _keys(last, self.seed), _EMPTY_KEY)

    def _count_pairs(self, feats: torch.Tensor) -> None:
        """Count the ordered pairs of distinct features in each row of ``feats`` ((n, m), -1 empty)."""
        feats = feats[torch.nonzero((feats >= 0).sum(1) >= 2).squeeze(1)]
        if not len(feats):
            return
        a, b = feats[:, :, None], feats[:, None, :]
        keys, counts = _unique_counts(torch.where((a >= 0) & (b >= 0) & (a != b), a * self.d + b, -1).reshape(-1))
        if int(keys[0]) < 0:
            keys, counts = keys[1:], counts[1:]
        self._merge_cooccurrence(keys, counts)

    def _merge_cooccurrence(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        """Mergeable Misra-Gries: add the counts of the pairs ``keys = f * d + g`` (ascending, distinct) to the
        counters; where a feature then has more than ``cooccurrence`` partners, subtract the (c+1)-th largest count
        from all of its counters and keep those still positive (at most c: the cut needs no tie order)."""
        if not len(keys):
            return
        c, d, dev = self.cooccurrence, self.d, self.device
        f = keys // d
        touched = torch.nonzero(torch.bincount(f, minlength=d)).squeeze(1)
        held_g, held_n = self.co_features[touched], self.co_counts[touched]
        held = held_g >= 0
        held_f = touched[:, None].expand(-1, c)[held]
        held_keys, held_n = held_f * d + held_g[held], held_n[held]
        at = torch.searchsorted(keys, held_keys).clamp_(max=len(keys) - 1)
        found = keys[at] == held_keys
        counts = counts.clone().index_add_(0, at[found], held_n[found])  # counters the batch saw again
        extra_f, extra_g, extra_n = held_f[~found], held_g[held][~found], held_n[~found]  # grouped by feature
        # A lower bound of a full feature's (c+1)-th largest count: the least of its c counters and of its largest
        # new count (c+1 of its entries). New counts under it neither stay nor move the cut: drop them unsorted.
        full = torch.bincount(held_f, minlength=d) == c
        if bool(full.any()):
            seen = torch.zeros(len(keys), dtype=torch.bool, device=dev)
            seen[at[found]] = True
            low = torch.full((d,), 2**62, dtype=torch.int64, device=dev)
            low.scatter_reduce_(0, held_f, torch.where(found, counts[at], held_n), "amin")
            newest = torch.zeros(d, dtype=torch.int64, device=dev)
            newest.scatter_reduce_(0, f, counts.masked_fill(seen, 0), "amax")
            bound = torch.where(full, torch.minimum(low, newest), 0)
            keep = torch.nonzero(seen | (counts >= bound[f])).squeeze(1)
            if len(keep) < len(keys):
                keys, counts, f = keys[keep], counts[keep], f[keep]
        g = keys % d
        all_f, all_n = torch.cat([f, extra_f]), torch.cat([counts, extra_n])
        if int(all_n.max()) >= 1 << self._count_bits:
            raise InputError(f"co-occurrence counts over 2**{self._count_bits}: use fewer features or cooccurrence=0")
        per_f = torch.bincount(all_f, minlength=d)
        cut = torch.zeros(d, dtype=torch.int64, device=dev)
        crowded = per_f > c
        if bool(crowded.any()):  # the (c+1)-th largest count of each crowded feature, from one sort of values
            mask = (1 << self._count_bits) - 1
            mine = crowded[all_f]
            order = _sort((all_f[mine] << self._count_bits) | (mask - all_n[mine]))
            starts = torch.cumsum(per_f * crowded, 0) - per_f * crowded
            cut[crowded] = mask - (order[starts[crowded] + c] & mask)
        keep_b, keep_x = counts > cut[f], extra_n > cut[extra_f]
        kept_f = torch.cat([f[keep_b], extra_f[keep_x]])
        slots = torch.cat([_rank_in_group(f[keep_b]),
                           torch.bincount(f[keep_b], minlength=d)[extra_f[keep_x]] + _rank_in_group(extra_f[keep_x])])
        self.co_error += cut
        self.co_features[touched] = -1
        self.co_counts[touched] = 0
        self.co_features[kept_f, slots] = torch.cat([g[keep_b], extra_g[keep_x]])
        self.co_counts[kept_f, slots] = torch.cat([counts[keep_b], extra_n[keep_x]]) - cut[kept_f]

    # -- merge -------------------------------------------------------------------------------------------------
    def merge(self, other: FeatureStatsAccumulator) -> None:
        """Add ``other``'s statistics (same parameters, disjoint rows): the same as one pass over both."""
        if not isinstance(other, FeatureStatsAccumulator):
            raise InputError(f"merge takes a FeatureStatsAccumulator, not {type(other).__name__}")
        if other.config() != self.config():
            diff = {k: (v, other.config()[k]) for k, v in self.config().items() if other.config()[k] != v}
            raise InputError(f"cannot merge accumulators with other parameters ({{name: (this, other)}}: {diff})")
        saved = [list(r) for r in self.ranges]
        try:
            for a, b in other.ranges:
                self._claim(a, b)
        except InputError:
            self.ranges = saved
            raise
        o = {name: getattr(other, name).to(self.device) for name in self._ARRAYS}
        self.n_tokens += other.n_tokens
        for name in ("fire_count", "nan_count", "sum", "fire_sum", "hist", "co_error"):
            getattr(self, name).add_(o[name])
        self._extreme(o["max"], o["max_row"], largest=True)
        self._extreme(o["min"], o["min_row"], largest=False)
        held = o["top_rows"] >= 0
        feats = torch.arange(self.d, device=self.device)
        self._merge_top(feats[:, None].expand(-1, self.k)[held], o["top_rows"][held], o["top_values"][held],
                        o["top_documents"][held])
        if self.per_band:
            held = o["sample_rows"] >= 0
            cells = torch.arange(len(held), device=self.device)[:, None].expand(-1, self.per_band)[held]
            rows = o["sample_rows"][held]
            self._merge_samples(cells, _keys(rows, self.seed), rows, o["sample_values"][held])
        if self.cooccurrence:
            held = o["co_features"] >= 0
            keys = feats[:, None].expand(-1, self.cooccurrence)[held] * self.d + o["co_features"][held]
            order = _argsort_distinct(keys)
            self._merge_cooccurrence(keys[order], o["co_counts"][held][order])
