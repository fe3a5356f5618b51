"""One feature, seen across the whole store: top examples, examples from activation quantiles, the
histogram and the mean activation per token string, plus a pure HTML builder that shows them.

The top examples and the histogram come from :mod:`mistudio.analysis` (cached there). What it lacks,
quantile samples and per-token-string means, is computed here in one streaming pass (one chunk of one
column at a time; memory: the chunk, the vocabulary-sized sums and a few examples per band) and cached
in the store next to it, under ``analysis/feature_view/``.
"""
from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import stats as analysis

if TYPE_CHECKING:
    from ..extraction import Extraction

BANDS = ((0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.0))


def quantile_thresholds(hist: np.ndarray, edges: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Activation values at quantiles ``qs``, interpolated within the histogram's bins."""
    cdf = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    cdf /= max(cdf[-1], 1.0)
    return np.interp(qs, cdf, edges)


def _scan(ext: "Extraction", hook_point: str, feature: int, cuts: np.ndarray, per_band: int,
          seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One pass: a uniform sample of ``per_band`` tokens per band (smallest random keys) and sums/counts per id."""
    arr = ext.activations(hook_point)
    ids = ext.store.tokens("input_ids")
    mark = int(ext.committed_tokens())
    step = int(arr.chunks[0])
    n_bands = len(cuts) - 1
    keep = [np.zeros((0, 3)) for _ in range(n_bands)]  # (key, value, token index)
    sums, counts = np.zeros(0), np.zeros(0, np.int64)
    for a in range(0, mark, step):
        b = min(a + step, mark)
        col = np.asarray(arr[a:b, feature], dtype=np.float64)
        where = np.asarray(ext.token_index(np.arange(a, b)))  # activation rows -> tokens (specials may be skipped)
        tok = np.asarray(ids[int(where[0]):int(where[-1]) + 1], dtype=np.int64)[where - where[0]]
        if tok.size and tok.max() >= len(sums):
            grow = int(tok.max()) + 1 - len(sums)
            sums, counts = np.concatenate([sums, np.zeros(grow)]), np.concatenate([counts, np.zeros(grow, np.int64)])
        sums += np.bincount(tok, weights=col, minlength=len(sums))
        counts += np.bincount(tok, minlength=len(counts))
        band = np.clip(np.searchsorted(cuts, col, side="right") - 1, 0, n_bands - 1)
        keys = np.random.default_rng([seed, a]).random(len(col))
        for j in range(n_bands):
            at = np.flatnonzero(band == j)
            if at.size:
                cand = np.concatenate([keep[j], np.stack([keys[at], col[at], at + a], axis=1)])
                keep[j] = cand[np.argsort(cand[:, 0])[:per_band]]
    return keep, sums, counts


def feature_view(ext: "Extraction", hook_point: str, feature: int, k: int = 20, context: int = 8,
                 per_band: int = 3, bands: Sequence[tuple[float, float]] = BANDS, n_token_means: int = 15,
                 min_count: int = 2, seed: int = 0) -> dict:
    """Everything the feature view shows, as plain data (JSON-able): ``top`` (analysis.top_examples),
    ``bands`` (quantile range, value range, a few examples each), ``hist``/``edges`` and ``token_means``."""
    top = analysis.top_examples(ext, hook_point, feature, k=k, context=context)
    stats = analysis.feature_stats(ext, hook_point)
    hist, edges = np.asarray(stats.hist[feature], np.float64), np.asarray(stats.edges[feature], np.float64)
    mark = int(ext.committed_tokens())
    key = f"feature={feature},bands={json.dumps([list(b) for b in bands])},per_band={per_band},context={context}," \
          f"seed={seed},means={n_token_means},min={min_count}"
    path = analysis.cache_path("feature_view", hook_point, key.replace("/", "_"))
    group = analysis.cache_read(ext, path, mark)
    if group is not None:
        rest = json.loads(group.attrs["view"])
        cached = True
    else:
        qs = sorted({q for band in bands for q in band})
        values = quantile_thresholds(hist, edges, qs)
        cuts = np.array([values[qs.index(lo)] for lo, _ in bands] + [np.inf])
        cuts[0] = -np.inf
        keep, sums, counts = _scan(ext, hook_point, feature, cuts, per_band, seed)
        out_bands = []
        for (lo, hi), sample in zip(bands, keep):
            best = sample[np.argsort(-sample[:, 1])][:, 1:]
            out_bands.append({"quantiles": [lo, hi], "values": [float(values[qs.index(lo)]),
                                                                  float(values[qs.index(hi)])],
                              "examples": analysis.describe_examples(ext, hook_point, feature, best, context)})
        seen = np.flatnonzero(counts >= min_count)
        means = sums[seen] / counts[seen]
        order = seen[np.argsort(-means)][:n_token_means]
        names = ext.tokenizer.convert_ids_to_tokens([int(i) for i in order]) if len(order) else []
        token_means = [{"token_id": int(i), "token": str(name), "mean": float(sums[i] / counts[i]),
                        "count": int(counts[i])} for i, name in zip(order, names)]
        rest = {"bands": out_bands, "token_means": token_means}
        cached = False
        analysis.cache_write(ext, path, mark, {"view": json.dumps(rest)}, {})
    return {"hook_point": hook_point, "feature": int(feature), "n_tokens": int(stats.n_tokens), "top": list(top),
            "hist": hist.tolist(), "edges": edges.tolist(), "cached": cached, **rest}


# -- display (pure functions: data in, HTML out) -----------------------------------------------------
def tokenizer_scheme(tokenizer: Any) -> str:
    """'wordpiece' (BERT's '##' continuations, spaces between words) or 'bpe' (GPT-2 'Ġ', SentencePiece '▁')."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    return "wordpiece" if type(model).__name__ == "WordPiece" else "bpe"


def display_pieces(tokens: Sequence[str], scheme: str = "auto") -> list[str]:
    """The text each token adds when the pieces are joined: 'Ġthe' -> ' the', '##ing' -> 'ing', 'Ċ' -> '↵'."""
    if scheme == "auto":
        marked = any("Ġ" in t or "▁" in t for t in tokens)
        scheme = "wordpiece" if not marked and any(t.startswith("##") for t in tokens) else "bpe"
    out = []
    for i, token in enumerate(tokens):
        if scheme == "wordpiece":
            out.append(token[2:] if token.startswith("##") else (token if i == 0 else " " + token))
        else:
            out.append(token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "↵").replace("ĉ", "⇥"))
    return out


def _shade(value: float | None, scale: float) -> str:
    if value is None:  # a token with no activation row (an excluded special token)
        return "background:none"
    alpha = min(1.0, abs(value) / scale) * 0.85 if scale > 0 else 0.0
    rgb = "220,70,30" if value >= 0 else "40,100,220"
    return f"background:rgba({rgb},{alpha:.2f})"


def _tokens_html(tokens: Sequence[str], values: Sequence[float | None], peak: int | None, scale: float,
                 special: set[str], scheme: str) -> str:
    parts = []
    for i, (token, piece, value) in enumerate(zip(tokens, display_pieces(tokens, scheme), values)):
        style = [_shade(value, scale), "border-radius:2px", "white-space:pre"]
        cls = "ms-tok"
        if token in special or value is None:
            style += ["opacity:0.45", "font-size:85%"]
            cls += " ms-special"
        if i == peak:
            style.append("outline:2px solid #111")
            cls += " ms-peak"
        shown = "no activation" if value is None else f"{value:.4g}"
        parts.append(f'<span class="{cls}" style="{";".join(style)}" '
                     f'title="{html.escape(token, quote=True)} = {shown}">{html.escape(piece)}</span>')
    return "".join(parts)


def examples_html(examples: Sequence[dict], special_tokens: Sequence[str] = (), scheme: str = "auto",
                  scale: float | None = None, narrow: int = 3) -> str:
    """Examples (analysis.top_examples' dicts) as HTML: every token shaded by its activation, word pieces
    joined, special tokens dimmed, the peak token outlined, row and value shown; the summary line shows
    ``narrow`` tokens either side and ``<details>`` opens the whole context window."""
    special = set(special_tokens)
    if scale is None:
        scale = max([abs(v) for e in examples for v in e.get("context_values", []) if v is not None] + [1e-12])
    rows = []
    for e in examples:
        toks, vals = list(e["context_tokens"]), list(e["context_values"])
        peak = int(e["position"]) - int(e["context_start"])
        lo, hi = max(0, peak - narrow), min(len(toks), peak + narrow + 1)
        short = _tokens_html(toks[lo:hi], vals[lo:hi], peak - lo, scale, special, scheme)
        full = _tokens_html(toks, vals, peak, scale, special, scheme)
        rows.append(f'<details class="ms-example"><summary><span class="ms-meta" style="color:#555;'
                    f'font-size:90%;display:inline-block;min-width:150px">row {int(e["row"]):,} · pos '
                    f'{int(e["position"])} · <b>{float(e["value"]):.3g}</b></span> {"…" if lo else ""}{short}'
                    f'{"…" if hi < len(toks) else ""}</summary><div style="margin:2px 0 6px 158px">{full}</div>'
                    "</details>")
    return "".join(rows) or "<i>no examples</i>"


def feature_view_html(view: dict, special_tokens: Sequence[str] = (), scheme: str = "auto") -> str:
    """The whole feature view (top examples, quantile samples, token means) as one HTML block."""
    top = view["top"]
    scale = max([abs(v) for e in top for v in e.get("context_values", []) if v is not None] + [1e-12])
    parts = [f'<div class="mistudio-feature-view" style="font-family:var(--jp-code-font-family,monospace);'
             f'font-size:12px;line-height:1.7"><h4 style="margin:4px 0">{html.escape(view["hook_point"])} · '
             f'feature {view["feature"]} · top {len(top)} of {view["n_tokens"]:,} tokens</h4>',
             examples_html(top, special_tokens, scheme, scale)]
    for band in view.get("bands", []):
        (q0, q1), (v0, v1) = band["quantiles"], band["values"]
        parts.append(f'<h4 style="margin:8px 0 2px">Quantiles {100 * q0:g}–{100 * q1:g}% '
                     f'<small>(activation {v0:.3g} to {v1:.3g}; a random sample)</small></h4>')
        parts.append(examples_html(band["examples"], special_tokens, scheme, scale))
    means = view.get("token_means", [])
    if means:
        pieces = [display_pieces([m["token"]], scheme)[0] for m in means]
        cells = "".join(f"<tr><td style='white-space:pre'>{html.escape(repr(p.strip() or p)[1:-1])}</td>"
                        f"<td>{m['mean']:.3g}</td><td>{m['count']:,}</td></tr>" for p, m in zip(pieces, means))
        parts.append("<h4 style='margin:8px 0 2px'>Highest mean activation per token string</h4>"
                     "<table class='ms-token-means'><tr><th>token</th><th>mean</th><th>count</th></tr>"
                     f"{cells}</table>")
    parts.append("</div>")
    return "".join(parts)
