"""Pure plotting functions: a slice of a store in, a matplotlib Figure out. They read only what they draw."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .feature_view import display_pieces, tokenizer_scheme
from .features import token_labels
from .stats import check_feature

if TYPE_CHECKING:
    from ..extraction import Extraction

DEFAULT_SCAN_TOKENS = 2_000_000
WIDTH = 9.0  # inches: every figure the same width, so they show at one scale
LABEL_CHARS = 48


def _labels(ext: "Extraction", ids) -> list[str]:
    """Token ids as tick and table labels: :func:`~.features.token_labels`, the spelling every tab uses (tokens
    added with ``add_tokens`` as written)."""
    labels = token_labels(ext)
    return [labels[int(i)] if 0 <= int(i) < len(labels) else f"<id {int(i)}>" for i in ids]


def feature_window(feature: int | None, d: int, size: int = 64) -> slice:
    """``size`` consecutive features around ``feature`` (from 0 when none is chosen), inside ``0..d-1``."""
    size = min(size, d)
    start = 0 if feature is None else min(max(0, int(feature) - size // 2), d - size)
    return slice(start, start + size)


def token_window(n_tokens: int, peak: int | None, size: int = 64) -> slice:
    """``size`` consecutive token positions around ``peak`` (from 0 when none), inside ``0..n_tokens-1``: what a
    long row's heatmap and norm plots draw, so that each label stays readable and a 3,000-token row draws as
    fast as a short one."""
    size = min(size, n_tokens)
    start = 0 if peak is None else min(max(0, int(peak) - size // 2), n_tokens - size)
    return slice(start, start + size)


def peak_position(values: np.ndarray, hide: np.ndarray | None = None) -> int | None:
    """Position of the largest value (NaN and hidden positions left out); None when there is none."""
    values = np.asarray(values, dtype=np.float64).copy()
    if hide is not None and np.any(hide):
        values[np.asarray(hide, dtype=bool)] = np.nan
    if not values.size or np.all(np.isnan(values)):
        return None
    return int(np.nanargmax(values))


def colour_limit(values: np.ndarray, percentile: float = 99.0, outlier_factor: float = 5.0) -> tuple[float, list[int]]:
    """A symmetric colour range that no single dimension takes over: the ``percentile`` of |value| over the
    features (columns) that are not outliers, where an outlier feature's largest |value| is over
    ``outlier_factor`` times the median feature's. Returns (limit, the outlier columns). Values beyond the limit
    are drawn in the end colours."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    finite = np.isfinite(magnitude)
    if not finite.any():
        return 1.0, []
    column_max = np.where(finite, magnitude, -np.inf).max(axis=0)
    seen = np.isfinite(column_max)
    median = float(np.median(column_max[seen])) if seen.any() else 0.0
    outliers = np.flatnonzero(seen & (column_max > outlier_factor * median)) if median > 0 else np.zeros(0, int)
    keep = np.ones(magnitude.shape[1], dtype=bool)
    keep[outliers] = False
    pool = magnitude[:, keep][finite[:, keep]]
    if not pool.size:
        pool = magnitude[finite]
    limit = float(np.percentile(pool, percentile)) or float(pool.max()) or 1.0
    return limit, [int(c) for c in outliers]


def heatmap(ext: "Extraction", row: int, hook_point: str, features: slice | None = None,
            max_features: int = 64, feature: int | None = None, hide: np.ndarray | None = None,
            tokens: slice | None = None, max_tokens: int = 64) -> Figure:
    """Token × feature heatmap of one dataset row (tokens as labels): a window of ``max_features`` features
    around ``feature`` (which is outlined) and of ``max_tokens`` tokens around the feature's peak in the row (the
    largest value; ``tokens``: positions to draw instead), both named in the title. The colour range is robust
    (:func:`colour_limit`: a high percentile, with a dimension far above the others drawn saturated and named)
    and said on the colour bar. ``hide``: a bool per token of the row; those tokens are left out (counted)."""
    d = int(ext.activations(hook_point).shape[1])
    feature = None if feature is None else check_feature(feature, d, hook_point)
    features = features or feature_window(feature, d, max_features)
    first, last = features.start or 0, min(features.stop, d) - 1
    sample = ext.sample(row, [hook_point])  # excluded special tokens: NaN rows, drawn blank
    acts = sample["activations"][hook_point]
    n = len(sample["tokens"])
    if tokens is None:
        chosen = acts[:, feature] if feature is not None and 0 <= feature < d else \
            np.linalg.norm(np.nan_to_num(np.asarray(acts, np.float32)), axis=1)
        peak = peak_position(chosen, hide)
        tokens = token_window(n, peak, max_tokens)
    else:
        peak = None
    a, b = tokens.start or 0, min(tokens.stop, n)
    values = np.asarray(acts[a:b, features], dtype=np.float32)
    names = _labels(ext, sample["input_ids"][a:b])
    values, names, hidden = _drop(values, names, None if hide is None else np.asarray(hide)[a:b])
    fig = Figure(figsize=(WIDTH, min(10.0, 1.8 + len(names) * 0.16)), layout="constrained")
    ax = fig.add_subplot()
    limit, beyond = colour_limit(values) if values.size else (1.0, [])
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = list(range(0, values.shape[1], max(1, values.shape[1] // 16)))
    if feature is not None and first <= feature <= last and feature - first not in ticks:
        ticks = sorted(ticks + [feature - first])
    ax.set_xticks(ticks, [str(first + t) for t in ticks], fontsize=7)
    if feature is not None and first <= feature <= last:
        col = feature - first
        ax.add_patch(Rectangle((col - 0.5, -0.5), 1, len(names), fill=False, edgecolor="black", linewidth=1.6))
        for label in ax.get_xticklabels():
            if label.get_text() == str(feature):
                label.set_fontweight("bold")
    ax.set_xlabel(f"feature ({first}–{last} of {d})")
    ax.set_ylabel(f"token (positions {a}–{b - 1} of {n})" if (a, b) != (0, n) else "token")
    chosen_note = f", feature {feature} outlined" if feature is not None else ""
    where = (f" · tokens {a}–{b - 1} of {n}" + (f" around its peak (position {peak})" if peak is not None else "")
             if (a, b) != (0, n) else "")
    saturated = (f" · feature{'s' if len(beyond) > 1 else ''} {', '.join(str(first + c) for c in beyond[:4])}"
                 f"{'…' if len(beyond) > 4 else ''} beyond the colour range" if beyond else "")
    ax.set_title(f"{hook_point} — row {row}: features {first}–{last} of {d}{chosen_note}{where}{hidden}{saturated}",
                 fontsize=9, wrap=True)
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, extend="both")
    bar.set_label(f"activation (range ±{limit:.3g}: 99th percentile of |value|)", fontsize=8)
    return fig


def _drop(values: np.ndarray, tokens: list[str], hide: np.ndarray | None) -> tuple[np.ndarray, list[str], str]:
    """Leave out the tokens ``hide`` marks: (values, tokens, a title note such as ' · 2 tokens hidden')."""
    if hide is None or not np.any(hide):
        return values, tokens, ""
    keep = ~np.asarray(hide, dtype=bool)
    return values[keep], [t for t, k in zip(tokens, keep) if k], f" · {int((~keep).sum())} tokens hidden"


def layer_norms(ext: "Extraction", row: int, kind: str = "residual", hide: np.ndarray | None = None,
                tokens: slice | None = None, max_tokens: int = 64) -> Figure:
    """L2 norm of every stored layer's ``kind`` activation along the row's tokens (``hide``: as in heatmap): a
    window of ``max_tokens`` tokens around the largest norm of the last layer (``tokens``: positions to draw
    instead, e.g. the heatmap's window), every token labelled."""
    points = [hp for hp in ext.hook_points if hp.endswith("." + kind)]
    sample = ext.sample(row, points)
    n = len(sample["tokens"])
    norms = {hp: np.linalg.norm(np.asarray(sample["activations"][hp], np.float32), axis=1) for hp in points}
    if tokens is None:
        tokens = token_window(n, peak_position(norms[points[-1]], hide) if points else None, max_tokens)
    a, b = tokens.start or 0, min(tokens.stop, n)
    names = _labels(ext, sample["input_ids"][a:b])
    part = None if hide is None else np.asarray(hide)[a:b]
    fig = Figure(figsize=(WIDTH, 3.8), layout="constrained")
    ax = fig.add_subplot()
    shown, hidden = names, ""
    for hp in points:
        values, shown, hidden = _drop(norms[hp][a:b], names, part)
        ax.plot(values, marker=".", label=hp.split(".")[1])
    ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=7 if len(shown) <= 40 else 6)
    ax.set_ylabel("L2 norm")
    where = f" · tokens {a}–{b - 1} of {n}" if (a, b) != (0, n) else ""
    ax.set_title(f"{kind} norm per layer — row {row}{where}{hidden}", fontsize=9)
    ax.legend(title="layer", fontsize=7, ncol=min(6, max(1, len(points))))
    return fig


def feature_column(ext: "Extraction", hook_point: str, feature: int,
                   max_tokens: int = DEFAULT_SCAN_TOKENS) -> np.ndarray:
    """One feature over the committed tokens, read chunk by chunk (at most ``max_tokens``)."""
    arr = ext.activations(hook_point)
    feature = check_feature(feature, int(arr.shape[1]), hook_point)
    stop = min(ext.committed_tokens(), max_tokens)
    step = arr.chunks[0]
    return np.concatenate([np.asarray(arr[b:min(b + step, stop), feature], dtype=np.float32)
                           for b in range(0, stop, step)] or [np.zeros(0, np.float32)])


def feature_histogram(ext: "Extraction", hook_point: str, feature: int, bins: int = 60,
                      max_tokens: int = DEFAULT_SCAN_TOKENS, values: np.ndarray | None = None) -> Figure:
    """Histogram of one feature over every stored token (``values``: a column already read; NaN left out)."""
    values = feature_column(ext, hook_point, feature, max_tokens) if values is None else values
    values = values[~np.isnan(values)]
    fig = Figure(figsize=(WIDTH, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, color="#4C72B0")
    ax.set_yscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("tokens")
    ax.set_title(f"{hook_point} feature {feature} over {len(values):,} tokens "
                 + (f"(mean {values.mean():.3g}, max {values.max():.3g})" if len(values) else ""), fontsize=9)
    return fig


def histogram_from_counts(counts: np.ndarray, edges: np.ndarray, title: str) -> Figure:
    """A histogram already counted (``analysis.feature_stats``' per-feature ``hist`` and ``edges``)."""
    fig = Figure(figsize=(WIDTH, 2.4), layout="constrained")
    ax = fig.add_subplot()
    edges = np.asarray(edges, dtype=np.float64)
    ax.stairs(np.asarray(counts, dtype=np.float64), edges, fill=True, color="#4C72B0")
    ax.set_yscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    return fig


def top_tokens(ext: "Extraction", hook_point: str, feature: int, k: int = 15, context: int = 4,
               max_tokens: int = DEFAULT_SCAN_TOKENS, values: np.ndarray | None = None,
               one_per_document: bool = False) -> list[dict]:
    """The ``k`` tokens where ``feature`` is largest, with dataset row, position and context (``values``: a
    column already read, activation rows set to NaN are left out): ``context`` the pieces' labels with the token
    in ``[[ ]]`` (a plot's tick label), ``pieces`` the same window as running text (:func:`display_pieces`, read
    with the pieces around it, so that a character cut at the window's edge reads as in the whole text) with the
    token at ``peak``. ``one_per_document``: each document's largest value only, and a context already listed
    (the same words in another document) once."""
    values = feature_column(ext, hook_point, feature, max_tokens) if values is None else values
    values = np.where(np.isnan(values), -np.inf, values)
    offsets, rows = ext.sample_offsets, ext.sample_index
    if one_per_document:  # each document's largest first (top_rows' rule), a repeated context left out below
        held = np.flatnonzero(np.isfinite(values))
        documents = np.searchsorted(np.asarray(ext.activation_offsets), held, side="right") - 1
        best = _best(np.stack([values[held], held, documents], axis=1), len(held), True)[:, 1].astype(np.int64)
    else:
        fetch = min(k, len(values))
        best = np.argpartition(-values, fetch - 1)[:fetch] if fetch else np.zeros(0, int)
        best = best[np.lexsort((best, -values[best]))]  # ties: the earlier row first
        best = best[np.isfinite(values[best])]
    ids = ext.store.group["tokens/input_ids"]
    scheme = tokenizer_scheme(ext.tokenizer)
    out, contexts = [], set()
    for best_row in best:
        if len(out) >= k:
            break
        token_index = ext.token_index(int(best_row))  # activation row -> token
        pos = int(np.searchsorted(offsets, token_index, side="right")) - 1
        start, stop = int(offsets[pos]), int(offsets[pos + 1])
        lo, hi = max(start, int(token_index) - context), min(stop, int(token_index) + context + 1)
        window = _labels(ext, ids[lo:hi])
        at = int(token_index) - lo
        shown = " ".join(t if i != at else f"[[{t}]]" for i, t in enumerate(window))
        if one_per_document and shown in contexts:
            continue
        contexts.add(shown)
        wide_lo, wide_hi = max(start, lo - 3), min(stop, hi + 3)  # a character's other bytes: 3 at most
        pieces = display_pieces(ext.tokenizer.convert_ids_to_tokens([int(i) for i in ids[wide_lo:wide_hi]]),
                                scheme)[lo - wide_lo:hi - wide_lo]
        out.append({"value": float(values[best_row]), "row": int(rows[pos]), "position": int(token_index) - start,
                    "token": window[at], "context": shown, "pieces": pieces, "peak": at})
    return out


def top_tokens_figure(ext: "Extraction", hook_point: str, feature: int, k: int = 15, context: int = 4,
                      top: list[dict] | None = None) -> Figure:
    """Bar chart of the top-k activating tokens of a feature (``top``: :func:`top_tokens`' list, if at hand)."""
    top = top_tokens(ext, hook_point, feature, k, context) if top is None else top
    fig = Figure(figsize=(WIDTH, 1.0 + 0.28 * max(1, len(top))), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(top)), [t["value"] for t in top], color="#DD8452")
    ax.set_yticks(range(len(top)), [f"row {t['row']}: {_short(t['context'])}" for t in top], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("activation")
    ax.set_title(f"top {len(top)} tokens of {hook_point} feature {feature}", fontsize=9)
    return fig


def _short(label: str, chars: int = LABEL_CHARS) -> str:
    """A tick label that fits: cut in the middle around the [[marked]] token when it is long."""
    if len(label) <= chars:
        return label
    at = label.find("[[")
    lo = max(0, min(at - chars // 2, len(label) - chars)) if at >= 0 else 0
    return ("…" if lo else "") + label[lo:lo + chars] + ("…" if lo + chars < len(label) else "")


def to_png(fig: Figure, dpi: int = 90) -> bytes:
    """PNG bytes of a figure (for ipywidgets.Image)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def top_rows(ext: "Extraction", hook_point: str, feature: int, k: int = 20, skip_special: bool = False,
             one_per_document: bool = False) -> np.ndarray:
    """``(n, 2)`` [value, activation row] of the ``k`` largest values of ``feature`` over every committed row,
    largest first (ties: the earlier row), read one chunk at a time (memory: a chunk and ``k`` candidates).
    ``skip_special`` leaves out the tokenizer's special tokens; ``one_per_document`` keeps only each document's
    (stored sample's) largest value, so that near-identical rows do not fill the list."""
    arr = ext.activations(hook_point)
    if not 0 <= feature < arr.shape[1]:
        raise ValueError(f"feature {feature} is out of range: {hook_point} has features 0..{arr.shape[1] - 1}")
    mark, step = int(ext.committed_tokens()), int(arr.chunks[0])
    special = ext.special_flags() if skip_special else None
    row_offsets = np.asarray(ext.activation_offsets, dtype=np.int64)
    best = np.zeros((0, 3))  # value, row, document
    for a in range(0, mark, step):
        b = min(a + step, mark)
        values = np.asarray(arr[a:b, feature], dtype=np.float64)
        rows = np.arange(a, b)
        keep = ~np.isnan(values)
        if special is not None:
            keep &= ~special[np.asarray(ext.token_index(rows))]
        values, rows = values[keep], rows[keep]
        documents = np.searchsorted(row_offsets, rows, side="right") - 1
        best = _best(np.concatenate([best, np.stack([values, rows, documents], axis=1)]), k, one_per_document)
    return best[:, :2]


def _best(candidates: np.ndarray, k: int, one_per_document: bool) -> np.ndarray:
    order = np.lexsort((candidates[:, 1], -candidates[:, 0]))  # largest value first, ties by row
    candidates = candidates[order]
    if one_per_document:
        _, first = np.unique(candidates[:, 2], return_index=True)
        candidates = candidates[np.sort(first)]
    return candidates[:k]
