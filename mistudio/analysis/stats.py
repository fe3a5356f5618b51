"""Dataset-wide queries over one hook point: per-feature statistics and a feature's top examples.

Both stream the store chunk by chunk (memory: one chunk at a time), optionally fan the chunks out over
a ``dask.distributed.Client``, and cache their answer in the store's ``analysis/`` group, keyed by the
query's parameters and the commit mark, so a stale answer is never served. Only ``analysis/`` is ever
written; a live job's store, or a store this process cannot write, is simply not cached.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import zarr

from ..errors import InputError, StoreCorrupted, StoreLost
from ..storage import featfeed, featstats
from ..storage.layout import array_codecs
from ..storage.metadata import LIVE_STATES
from ..storage.reads import DECODE_ERRORS, CheckedArray
from ..storage.store import open_group

if TYPE_CHECKING:
    from ..extraction import Extraction

log = logging.getLogger(__name__)
STAT_ARRAYS = ("mean", "std", "max", "min", "frac_active", "hist", "edges")
EXAMPLES_KEY = "examples=3"  # in the cache key of described examples: 1 had the activation row as token_index,
# 2 any of the rows tied at the k-th place


@dataclass
class FeatureStats:
    """Per-feature statistics of one hook point over every committed token (arrays of shape (d,) unless noted)."""

    hook_point: str
    n_tokens: int
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    min: np.ndarray
    frac_active: np.ndarray   # fraction of tokens where the feature is > 0
    hist: np.ndarray          # (d, bins) counts, per-feature bins spanning [min, max]
    edges: np.ndarray         # (d, bins + 1) bin edges
    cached: bool = field(default=False, compare=False)  # True when read from the store's analysis/ cache


class Examples(list):
    """The list of top examples, with ``cached`` telling whether it came from the store's cache."""

    cached: bool = False


# -- arguments -------------------------------------------------------------------------------------
def as_index(value: Any, name: str, what: str) -> int:
    """``value`` as an index (a whole number, Python's or numpy's); a bool, a float (even 2.0), a string or
    anything else is refused naming the value: ``True`` is not index 1, and ``2.9`` is not index 2."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        kind = "a boolean" if isinstance(value, (bool, np.bool_)) else f"a {type(value).__name__}"
        raise InputError(f"«{name}={value!r}» is {kind}, not {what}: give a whole number, e.g. «pass {name}=0»",
                         param=name)
    return int(value)


def check_feature(feature: Any, d: int, hook_point: str, name: str = "feature") -> int:
    """``feature`` as a feature index of a hook point with ``d`` features: a whole number in ``0..d-1``
    (see :func:`as_index`)."""
    index = as_index(feature, name, f"a feature index of {hook_point} (0 to {d - 1})")
    if not 0 <= index < d:
        raise InputError(f"«{name}={index}» is out of range: {hook_point} has {d:,} features (0 to {d - 1}): "
                         f"«pass {name}={d - 1}» or less", param=name)
    return index


def check_features(features: Any, d: int, hook_point: str, name: str = "feature") -> tuple[list[int], bool]:
    """(feature indices, whether one was given alone) from one index or a list/tuple/array of them, each checked
    by :func:`check_feature`."""
    if isinstance(features, np.ndarray) and features.ndim == 0:
        features = features[()]
    if isinstance(features, (list, tuple, np.ndarray, range)):
        if isinstance(features, np.ndarray) and features.ndim != 1:
            raise InputError(f"«{name}» is an array of shape {features.shape}: give one feature index or a flat "
                             "list of them", param=name)
        return [check_feature(f, d, hook_point, name) for f in features], False
    return [check_feature(features, d, hook_point, name)], True


def check_count(value: Any, name: str, low: int) -> int:
    """A whole-number argument (``k``, ``context``) of at least ``low``; bools and floats are refused by name."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(f"«{name}={value!r}» is not valid: «pass {name}={max(low, 1)}» or more (a whole number)",
                         param=name)
    return int(value)


# -- chunk plan and the per-chunk work (module-level functions: they travel to dask workers) -----------
def _mark(ext: "Extraction") -> int:
    return int(ext.committed_tokens())


def _chunk_ranges(ext: "Extraction", hook_point: str, limit: int, per_task: int = 1) -> list[tuple[int, int]]:
    rows = int(ext.activations(hook_point).chunks[0]) * per_task
    return [(a, min(a + rows, limit)) for a in range(0, limit, rows)]


def _moments(ext: "Extraction", hook_point: str, a: int, b: int) -> dict:
    x = ext.activations(hook_point)[a:b].astype(np.float64)
    return {"n": b - a, "sum": x.sum(0), "sum_sq": np.einsum("ij,ij->j", x, x), "max": x.max(0), "min": x.min(0),
            "active": (x > 0).sum(0)}


def _histogram(ext: "Extraction", hook_point: str, a: int, b: int, lo: np.ndarray, hi: np.ndarray,
               bins: int) -> np.ndarray:
    x = ext.activations(hook_point)[a:b].astype(np.float64)
    width = np.where(hi > lo, hi - lo, 1.0)
    idx = np.clip(((x - lo) / width * bins).astype(np.int64), 0, bins - 1)
    d = x.shape[1]
    return np.bincount((idx + np.arange(d) * bins).ravel(), minlength=d * bins).reshape(d, bins)


def _top(ext: "Extraction", hook_point: str, a: int, b: int, features: list[int], k: int) -> list[np.ndarray]:
    """Per feature: (value, row) of the chunk's k largest, ties to the earlier row, as a (m, 2) float64 array."""
    cols = ext.activations(hook_point)[a:b][:, features].astype(np.float64)
    out = []
    for j in range(cols.shape[1]):
        col = cols[:, j]
        m = min(k, len(col))
        kth = -np.partition(-col, m - 1)[m - 1] if m else np.nan
        # every row at least the k-th largest (all of its ties: argpartition would keep any of them), or all rows
        # when NaN reaches the k-th place; then largest first, ties by row
        best = np.flatnonzero(col >= kth) if not np.isnan(kth) else np.arange(len(col))
        best = best[np.lexsort((best, -col[best]))][:m]
        out.append(np.stack([col[best], best + a], axis=1))
    return out


def _remote(opener, location, storage_options, fn_name, hook_point, ranges, *args):
    """Run one of the chunk functions on a dask worker over a few ranges (opens the store there)."""
    ext = opener(location, storage_options)
    fn = globals()[fn_name]
    return [fn(ext, hook_point, a, b, *args) for a, b in ranges]


def _map(ext: "Extraction", fn: Callable, hook_point: str, ranges: list[tuple[int, int]], cluster: Any,
         *args) -> list:
    """``fn`` over every range, in range order: here, one range at a time, or as tasks on ``cluster``."""
    if cluster is None:
        return [fn(ext, hook_point, a, b, *args) for a, b in ranges]
    per = max(1, math.ceil(len(ranges) / 256))  # at most ~256 tasks
    groups = [ranges[i:i + per] for i in range(0, len(ranges), per)]
    futures = cluster.map(_remote, [type(ext).open] * len(groups), [ext.location] * len(groups),
                          [ext.store.storage_options] * len(groups),
                          [fn.__name__] * len(groups), [hook_point] * len(groups), groups,
                          *[[arg] * len(groups) for arg in args], pure=False)
    return [r for group in cluster.gather(futures) for r in group]


# -- the cache -------------------------------------------------------------------------------------
def cache_path(kind: str, hook_point: str, key: str) -> str:
    """Where an answer of ``kind`` for one hook point and argument key is cached in the store."""
    return f"analysis/{kind}/{hook_point}/{key}"


def cache_read(ext: "Extraction", path: str, mark: int) -> zarr.Group | None:
    """The cached group at ``path`` if it was computed at commit mark ``mark``, else None."""
    try:
        group = open_group(ext.location, ext.store.storage_options, "r", path)
    except Exception:  # noqa: BLE001 - absent (or unreadable) means no cache
        return None
    return group if group.attrs.get("mark") == mark else None


def cache_write(ext: "Extraction", path: str, mark: int, attrs: dict, arrays: dict[str, np.ndarray]) -> bool:
    """Write under ``analysis/`` only; skip (False) for a live job or a store we cannot write."""
    if ext.store.local and not os.path.isfile(os.path.join(ext.location.removeprefix("file://"), "zarr.json")):
        return False  # the store was deleted since it was opened: a cache write must not create its folder again
    try:
        if ext.status in LIVE_STATES or _mark(ext) != mark:
            return False
    except (OSError, StoreLost, StoreCorrupted):  # gone or damaged meanwhile: nothing to cache into
        return False
    try:
        group = open_group(ext.location, ext.store.storage_options, "w", path, zarr_format=3)
        for name, data in arrays.items():  # checksummed like the store's arrays: a flipped bit is a cache miss;
            # chunks of fill values written too (left out, they would read back as missing: never a hit)
            group.create_array(name, data=data, config={"write_empty_chunks": True}, **array_codecs(True))
        group.attrs.update({**attrs, "mark": mark})  # written last: a half-written entry has no mark, so it misses
        return True
    except Exception as exc:  # noqa: BLE001 - read-only store, permissions, remote without write access
        log.debug("mistudio: not caching %s in %s: %s", path, ext.location, exc)
        return False


def cached_feature_stats(ext: "Extraction", hook_point: str, mark: int | None = None) -> FeatureStats | None:
    """Any cached :class:`FeatureStats` of ``hook_point`` (whatever its bins) at commit mark ``mark`` (default:
    today's), else None."""
    mark = _mark(ext) if mark is None else int(mark)
    try:
        parent = open_group(ext.location, ext.store.storage_options, "r", f"analysis/feature_stats/{hook_point}")
        keys = sorted(parent.group_keys())
    except Exception:  # noqa: BLE001
        return None
    for key in keys:
        group = cache_read(ext, f"analysis/feature_stats/{hook_point}/{key}", mark)
        stats = _stats_from_group(ext, hook_point, group) if group is not None else None
        if stats is not None:
            return stats
    return None


def cached_arrays(ext: "Extraction", group: zarr.Group, names=None) -> dict[str, np.ndarray] | None:
    """A cache entry's arrays (``names``, or all of the group's), checked (crc32c, every chunk present); None when
    any is damaged or missing, its metadata included: the caller recomputes."""
    try:
        names = list(group.array_keys()) if names is None else names
        return {name: CheckedArray(group[name], ext.location, group[name].shape[0])[...] for name in names}
    except (DECODE_ERRORS + (KeyError, FileNotFoundError, IndexError)):
        return None
    except Exception:  # noqa: BLE001 - StoreCorrupted and anything else a damaged cache raises: a miss
        return None


def _stats_from_group(ext: "Extraction", hook_point: str, group: zarr.Group) -> FeatureStats | None:
    arrays = cached_arrays(ext, group, STAT_ARRAYS)
    if arrays is None or not isinstance(group.attrs.get("n_tokens"), int):
        return None
    d = int(arrays["mean"].shape[0])
    shapes_ok = all(arrays[n].shape[0] == d for n in STAT_ARRAYS) and arrays["edges"].shape[1:] == \
        (arrays["hist"].shape[1] + 1,)
    return FeatureStats(hook_point, int(group.attrs["n_tokens"]), *(arrays[n] for n in STAT_ARRAYS),
                        cached=True) if shapes_ok else None


# -- the queries -----------------------------------------------------------------------------------
def feature_stats(ext: "Extraction", hook_point: str, bins: int = 64, cluster: Any = None) -> FeatureStats:
    """Per-feature mean, std, max, min, fraction active (> 0) and a ``bins``-bin histogram over every committed token.

    Two streaming passes (moments and range, then histograms with per-feature edges from min to max).
    ``cluster``: a ``dask.distributed.Client`` to run the chunks on its workers.
    """
    bins = check_count(bins, "bins", 1)
    ext.activations(hook_point)  # names the hook points when this one is wrong
    mark = _mark(ext)
    path = cache_path("feature_stats", hook_point, f"bins={bins}")
    group = cache_read(ext, path, mark)
    cached = _stats_from_group(ext, hook_point, group) if group is not None else None
    if cached is not None:
        return cached
    ranges = _chunk_ranges(ext, hook_point, mark)
    d = int(ext.activations(hook_point).shape[1])
    if not ranges:
        zeros = np.zeros(d)
        return FeatureStats(hook_point, 0, zeros, zeros, zeros, zeros, zeros, np.zeros((d, bins), np.int64),
                            np.zeros((d, bins + 1)))
    parts = _map(ext, _moments, hook_point, ranges, cluster)
    n, mean, std = _mean_std(parts)
    hi, lo = np.max([p["max"] for p in parts], 0), np.min([p["min"] for p in parts], 0)
    active = sum(p["active"] for p in parts) / n
    hist = sum(_map(ext, _histogram, hook_point, ranges, cluster, lo, hi, bins))
    edges = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, bins + 1)[None, :]
    stats = FeatureStats(hook_point, n, mean, std, hi, lo, active, hist.astype(np.int64), edges)
    cache_write(ext, path, mark, {"n_tokens": n, "bins": bins},
                 {name: getattr(stats, name) for name in STAT_ARRAYS})
    return stats


def _mean_std(parts: list[dict]) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, per-feature mean, std) from :func:`_moments` of consecutive ranges, summed in range order."""
    n = sum(p["n"] for p in parts)
    total, sum_sq = sum(p["sum"] for p in parts), sum(p["sum_sq"] for p in parts)
    mean = total / n
    return n, mean, np.sqrt(np.maximum(sum_sq / n - mean * mean, 0.0))


def feature_moments(ext: "Extraction", hook_point: str, mark: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (mean, std) over the first ``mark`` rows, exactly as :func:`feature_stats` computes them: from
    its cache when it holds them, else from its first pass alone (the same sums in the same order, so the same
    numbers whatever the cache holds), cached for the next call."""
    cached = cached_feature_stats(ext, hook_point, mark)
    if cached is not None:
        return cached.mean, cached.std
    path = cache_path("feature_moments", hook_point, "moments")
    group = cache_read(ext, path, mark)
    arrays = cached_arrays(ext, group, ["mean", "std"]) if group is not None else None
    if arrays is not None:
        return arrays["mean"], arrays["std"]
    ranges = _chunk_ranges(ext, hook_point, mark)
    if not ranges:
        zeros = np.zeros(int(ext.activations(hook_point).shape[1]))
        return zeros, zeros
    _, mean, std = _mean_std(_map(ext, _moments, hook_point, ranges, None))
    cache_write(ext, path, mark, {}, {"mean": mean, "std": std})
    return mean, std


def kept_moments(ext: "Extraction", hook_point: str, mark: int,
                 dropped: Callable[[int, int], np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-feature (mean, std) and the mean squared row norm over the first ``mark`` rows less those ``dropped(a,
    b)`` marks True in ``[a, b)`` (the loader's special tokens), in one pass, cached for the next call."""
    path = cache_path("feature_moments", hook_point, "kept")
    group = cache_read(ext, path, mark)
    arrays = cached_arrays(ext, group, ["mean", "std"]) if group is not None else None
    if arrays is not None and isinstance(group.attrs.get("mean_sq_norm"), float):
        return arrays["mean"], arrays["std"], group.attrs["mean_sq_norm"]
    parts = []
    for a, b in _chunk_ranges(ext, hook_point, mark):
        x = ext.activations(hook_point)[a:b].astype(np.float64)
        mask = dropped(a, b)
        x = x if mask is None else x[~mask]
        parts.append({"n": len(x), "sum": x.sum(0), "sum_sq": np.einsum("ij,ij->j", x, x)})
    if not sum(p["n"] for p in parts):
        zeros = np.zeros(int(ext.activations(hook_point).shape[1]))
        return zeros, zeros, 0.0
    n, mean, std = _mean_std(parts)
    mean_sq_norm = float(sum(p["sum_sq"] for p in parts).sum() / n)
    cache_write(ext, path, mark, {"mean_sq_norm": mean_sq_norm}, {"mean": mean, "std": std})
    return mean, std, mean_sq_norm


def top_examples(ext: "Extraction", hook_point: str, feature: int | list[int], k: int = 20, context: int = 8,
                 cluster: Any = None) -> Examples | dict[int, Examples]:
    """The ``k`` tokens where ``feature`` is largest over every committed token, largest first.

    Each example: ``value``, ``token_index`` (its token: the index into ``tokens/*``; ``input_index`` is the same
    number), ``activation_row`` (its row of the hook point's activations: another number on a store made with
    ``exclude_special=True``), ``sample_position`` (stored sample), ``row`` (dataset row), ``position`` (token
    position in the sample), ``token_id``, ``token``, and the context
    window within the sample (``context`` tokens either side): ``context_start`` (position of its first
    token), ``context_ids``, ``context_tokens``, ``context_values`` (this feature's activations).
    A list of features is answered in one pass: a dict {feature: examples}.
    """
    d = int(ext.activations(hook_point).shape[1])
    features, alone = check_features(feature, d, hook_point)
    k, context = check_count(k, "k", 1), check_count(context, "context", 0)
    mark = _mark(ext)
    paths = {f: cache_path("top_examples", hook_point, f"{EXAMPLES_KEY},feature={f},k={k},context={context}")
             for f in features}
    answers: dict[int, Examples] = {}
    for f in features:
        group = cache_read(ext, paths[f], mark)
        if group is not None:
            answers[f] = Examples(json.loads(group.attrs["examples"]))
            answers[f].cached = True
    todo = [f for f in features if f not in answers]
    if todo:
        parts = _map(ext, _top, hook_point, _chunk_ranges(ext, hook_point, mark), cluster, todo, k)
        for j, f in enumerate(todo):
            cand = np.concatenate([p[j] for p in parts]) if parts else np.zeros((0, 2))
            order = np.lexsort((cand[:, 1], -cand[:, 0]))[:k]  # largest value first, ties by stored order
            answers[f] = Examples(describe_examples(ext, hook_point, f, cand[order], context))
            cache_write(ext, paths[f], mark, {"examples": json.dumps(answers[f])}, {})
    return answers[features[0]] if alone else answers


def describe_examples(ext: "Extraction", hook_point: str, feature: int, best: np.ndarray, context: int) -> list[dict]:
    """Each best activation row with its sample, position and the feature's values over its context tokens
    (``None`` for tokens that have no activation row, e.g. special tokens of an ``exclude_special`` store)."""
    offsets, rows, row_offsets = ext.sample_offsets, ext.sample_index, ext.activation_offsets
    ids, acts = ext.store.tokens("input_ids"), ext.activations(hook_point)
    out = []
    for value, act_row in best:
        act_row = int(act_row)
        token = int(ext.token_index(act_row))
        pos = int(np.searchsorted(offsets, token, side="right")) - 1
        start, stop = int(offsets[pos]), int(offsets[pos + 1])
        lo, hi = max(start, token - context), min(stop, token + context + 1)
        window = [int(i) for i in ids[lo:hi]]
        names = ext.tokenizer.convert_ids_to_tokens(window)
        sample_rows = np.arange(int(row_offsets[pos]), int(row_offsets[pos + 1]))
        tokens_of_rows = np.asarray(ext.token_index(sample_rows))
        inside = sample_rows[(tokens_of_rows >= lo) & (tokens_of_rows < hi)]
        values: list[float | None] = [None] * (hi - lo)
        if len(inside):
            column = acts[int(inside[0]):int(inside[-1]) + 1][:, feature].astype(float)
            for r, v in zip(inside, column):
                values[int(ext.token_index(int(r))) - lo] = float(v)
        out.append({"value": float(value), "token_index": token, "input_index": token, "activation_row": act_row,
                    "sample_position": pos, "row": int(rows[pos]), "position": token - start,
                    "token_id": window[token - lo], "token": names[token - lo], "context_start": lo - start,
                    "context_ids": window, "context_tokens": names, "context_values": values})
    return out


def feature_statistics(ext: "Extraction", hook_point: str, **options: Any) -> featstats.FeatureStatistics:
    """Per-feature statistics as dashboards show them (:mod:`mistudio.storage.featstats`: density, mean, max,
    log-binned histogram, top examples, quantile-band samples, co-occurrence) of a stored hook point or an SAE's
    ``<hook point>.latents``: those the extraction saved as it ran, when it did (and ``options`` are left at
    their defaults; a stopped job's continued from its snapshot), else one streamed pass over the committed rows;
    cached under ``analysis/`` (checksummed: a damaged cache is recomputed)."""
    featfeed.check_key(ext.store, hook_point)
    mark = _mark(ext)
    if not options:
        saved = featfeed.load(ext.store, hook_point, mark)
        if saved is not None and saved[0] == mark:
            return featstats.FeatureStatsAccumulator.from_state_dict(saved[1]).result()
    path = cache_path("featstats", hook_point, json.dumps(options, sort_keys=True).replace("/", "_"))
    group = cache_read(ext, path, mark)
    if group is not None:
        arrays = cached_arrays(ext, group)
        if arrays is not None:
            try:
                state = {**{k: v for k, v in group.attrs.items() if k != "mark"}, **arrays}
                return featstats.FeatureStatsAccumulator.from_state_dict(state).result()
            except (InputError, *DECODE_ERRORS):
                pass  # a damaged entry: computed again below
    acc = featfeed.accumulate(ext, hook_point, **options)
    state = acc.state_dict()
    cache_write(ext, path, mark, {k: v for k, v in state.items() if not isinstance(v, np.ndarray)},
                {k: v for k, v in state.items() if isinstance(v, np.ndarray)})
    return acc.result()
