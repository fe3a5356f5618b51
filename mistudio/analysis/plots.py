"""Pure plotting functions: a slice of a store in, a matplotlib Figure out. They read only what they draw."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .stats import check_feature

if TYPE_CHECKING:
    from ..extraction import Extraction

DEFAULT_SCAN_TOKENS = 2_000_000
WIDTH = 9.0  # inches: every figure the same width, so they show at one scale
LABEL_CHARS = 48


def _clean(token: str) -> str:
    return token.replace("Ġ", "·").replace("▁", "·").replace("Ċ", "\\n")


def feature_window(feature: int | None, d: int, size: int = 64) -> slice:
    """``size`` consecutive features around ``feature`` (from 0 when none is chosen), inside ``0..d-1``."""
    size = min(size, d)
    start = 0 if feature is None else min(max(0, int(feature) - size // 2), d - size)
    return slice(start, start + size)


def heatmap(ext: "Extraction", row: int, hook_point: str, features: slice | None = None,
            max_features: int = 64, feature: int | None = None, hide: np.ndarray | None = None) -> Figure:
    """Token × feature heatmap of one dataset row (tokens as labels): a window of ``max_features`` features
    around ``feature`` (which is outlined), named in the title with the hook point's feature count.
    ``hide``: a bool per token of the row; those tokens are left out (counted in the title)."""
    d = int(ext.activations(hook_point).shape[1])
    feature = None if feature is None else check_feature(feature, d, hook_point)
    features = features or feature_window(feature, d, max_features)
    first, last = features.start or 0, min(features.stop, d) - 1
    sample = ext.sample(row, [hook_point])  # excluded special tokens: NaN rows, drawn blank
    values = np.asarray(sample["activations"][hook_point][:, features], dtype=np.float32)
    tokens = [_clean(t) for t in sample["tokens"]]
    values, tokens, hidden = _drop(values, tokens, hide)
    fig = Figure(figsize=(WIDTH, min(10.0, 1.8 + len(tokens) * 0.2)), layout="constrained")
    ax = fig.add_subplot()
    limit = float(np.nan_to_num(np.nanmax(np.abs(values)) if values.size else 0.0)) or 1.0
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    ticks = list(range(0, values.shape[1], max(1, values.shape[1] // 16)))
    if feature is not None and first <= feature <= last and feature - first not in ticks:
        ticks = sorted(ticks + [feature - first])
    ax.set_xticks(ticks, [str(first + t) for t in ticks], fontsize=7)
    if feature is not None and first <= feature <= last:
        col = feature - first
        ax.add_patch(Rectangle((col - 0.5, -0.5), 1, len(tokens), fill=False, edgecolor="black", linewidth=1.6))
        for label in ax.get_xticklabels():
            if label.get_text() == str(feature):
                label.set_fontweight("bold")
    ax.set_xlabel(f"feature ({first}–{last} of {d})")
    ax.set_ylabel("token")
    chosen = f", feature {feature} outlined" if feature is not None else ""
    ax.set_title(f"{hook_point} — row {row}: features {first}–{last} of {d}{chosen}{hidden}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label("activation", fontsize=8)
    return fig


def _drop(values: np.ndarray, tokens: list[str], hide: np.ndarray | None) -> tuple[np.ndarray, list[str], str]:
    """Leave out the tokens ``hide`` marks: (values, tokens, a title note such as ' · 2 tokens hidden')."""
    if hide is None or not np.any(hide):
        return values, tokens, ""
    keep = ~np.asarray(hide, dtype=bool)
    return values[keep], [t for t, k in zip(tokens, keep) if k], f" · {int((~keep).sum())} tokens hidden"


def layer_norms(ext: "Extraction", row: int, kind: str = "residual", hide: np.ndarray | None = None) -> Figure:
    """L2 norm of every stored layer's ``kind`` activation along the row's tokens (``hide``: as in heatmap)."""
    points = [hp for hp in ext.hook_points if hp.endswith("." + kind)]
    sample = ext.sample(row, points)
    names = [_clean(t) for t in sample["tokens"]]
    fig = Figure(figsize=(WIDTH, 3.8), layout="constrained")
    ax = fig.add_subplot()
    tokens, hidden = names, ""
    for hp in points:
        norms, tokens, hidden = _drop(np.linalg.norm(np.asarray(sample["activations"][hp], np.float32), axis=1),
                                      names, hide)
        ax.plot(norms, marker=".", label=hp.split(".")[1])
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7 if len(tokens) < 60 else 5)
    ax.set_ylabel("L2 norm")
    ax.set_title(f"{kind} norm per layer — row {row}{hidden}", fontsize=9)
    ax.legend(title="layer", fontsize=7, ncol=min(6, len(points)))
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
               max_tokens: int = DEFAULT_SCAN_TOKENS, values: np.ndarray | None = None) -> list[dict]:
    """The ``k`` tokens where ``feature`` is largest, with dataset row, position and context (``values``: a
    column already read, activation rows set to NaN are left out)."""
    values = feature_column(ext, hook_point, feature, max_tokens) if values is None else values
    values = np.where(np.isnan(values), -np.inf, values)
    k = min(k, len(values))
    best = np.argpartition(-values, k - 1)[:k] if k else np.zeros(0, int)
    best = best[np.argsort(-values[best])]
    best = best[np.isfinite(values[best])]
    offsets, rows = ext.sample_offsets, ext.sample_index
    ids = ext.store.group["tokens/input_ids"]
    out = []
    for best_row in best:
        token_index = ext.token_index(int(best_row))  # activation row -> token
        pos = int(np.searchsorted(offsets, token_index, side="right")) - 1
        start, stop = int(offsets[pos]), int(offsets[pos + 1])
        lo, hi = max(start, int(token_index) - context), min(stop, int(token_index) + context + 1)
        window = ext.tokenizer.convert_ids_to_tokens([int(i) for i in ids[lo:hi]])
        at = int(token_index) - lo
        out.append({"value": float(values[best_row]), "row": int(rows[pos]), "position": int(token_index) - start,
                    "token": _clean(window[at]),
                    "context": " ".join(_clean(t) if i != at else f"[[{_clean(t)}]]" for i, t in enumerate(window))})
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
