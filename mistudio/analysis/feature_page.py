"""A feature's page as researchers know it from SAEDashboard and Neuronpedia: plain data in, one HTML block out.

The page is a JSON-able dict (assembled elsewhere from a store's statistics; nothing here reads a store)::

    {"extraction": str, "hook_point": str, "feature": int, "kind": "neuron" | "latent", "d": int,
     "n_tokens": int, "fire_count": int, "density": float,          # fire_count / n_tokens (value > 0)
     "mean": float, "mean_active": float, "max": float,             # mean over all tokens / over firing tokens
     "histogram": {"edges": [n + 1 floats], "counts": [n ints],      # log-binned and signed; an edge may
                   "floor"?: float | None} | None,                 # be ±inf (or None) for under/overflow;
                                                                   # floor: the smallest sampled firing value
     "top": [example, ...],                                        # the top activations, largest first
     "bands": [{"quantiles": [lo, hi], "values": [v_lo, v_hi], "examples": [example, ...]}, ...],
     "token_means": [{"token_id": int, "token": str, "mean": float, "count": int, "special"?: bool}, ...],
     "min_count"?: int,                                            # token_means only lists tokens seen that often
     "logits": {"promoted": [{"token_id", "token", "value"}], "suppressed": [...]} | None,
     "logits_note"?: str | None, "one_per_document"?: bool, "scheme"?: "bpe" | "bytelevel" | "wordpiece",
     "n_layers"?: int | None,                                      # the model's layers (for the exports)
     "correlated": [{"feature": int, "count": int, "fraction": float, "density"?: float}, ...],
     "correlated_basis"?: {"kind": "sample" | "top", "tokens": int, "rows": int, "per_token": int,
                           "error"?: int} | None,
     "caveats"?: [str],                                           # what the store warns of this hook point
     "dropped_latents"?: int,                                     # latents left out for want of width
     "note": str, "prev": int | None, "next": int | None}

    example = {"value": float, "row": int,          # activation row (stored order)
               "sample": int, "dataset_row": int,   # stored sample and its dataset row
               "position": int, "context_start": int,   # token positions in the sample
               "tokens": [str], "values": [float | None], "special": [bool],   # the context window
               "peak": int}                         # index into tokens of the example's own token

Keys marked ``?`` are optional: ``caveats`` (the store's warnings about this hook point: latents dropped for want of
width make densities lower bounds, values stored as ±inf; shown under the title), ``dropped_latents`` (how many
firing latents of the hook point the store left out for want of width: ``export_neuronpedia`` refuses such
pages unless told), ``min_count``, the least count the
token means were computed with (the table says it and leaves out rows below it), ``special`` on a token-means row
(``hide_special`` hides it), ``logits_note`` (why there is no logit table: an encoder, a model without an LM head
...), ``correlated_basis`` (what a co-firing ``fraction`` is: with ``"sample"``, the share of the feature's ``tokens``
firing tokens in a sample of ``rows`` rows where the other fires too; with ``"top"`` (the default), the share of its
firing tokens where both are among the token's ``per_token`` most active firing features, far below the true share for
dense features, and each count low by up to ``error`` when the statistics' counters for the feature ran out),
``density`` on a co-firing row (the other feature's share of all tokens), ``one_per_document`` (the top examples are
at most one per document: the title says so) and ``scheme`` (how the tokenizer's pieces join: what ``scheme="auto"``
uses). :func:`mistudio.analysis.features.feature_page` assembles a page from a store. SAEDashboard's layout is
followed: statistics, histogram, logit table and feature tables on the left, the top activations and the
quantile-interval examples on the right. Rendering is pure and self-contained: inline CSS, inline SVG, no scripts, no
images, no links to anything outside the page; every string taken from the page goes through :func:`escape`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from ..errors import InputError
from .feature_view import _shade as shade  # the Browse tab's shading, shared
from .feature_view import escape  # the one escaping helper of the views and pages
from .feature_view import piece_html, pieces_and_titles, resolve_scheme, token_label

PAGE_KEYS = ("extraction", "hook_point", "feature", "kind", "d", "n_tokens", "fire_count", "density", "mean",
             "mean_active", "max", "histogram", "top", "bands", "token_means", "logits", "correlated", "note",
             "prev", "next")
EXAMPLE_KEYS = ("value", "row", "sample", "dataset_row", "position", "context_start", "tokens", "values", "special",
                "peak")
NARROW = 4  # tokens either side of the peak on an example's folded line

PAGE_CSS = """
.msfp{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:13px;line-height:1.45;color:inherit;
 border:1px solid rgba(127,127,127,.35);border-radius:6px;padding:10px 12px;margin:8px 0;max-width:1400px;
 white-space:normal;min-width:0}
.msfp h4{margin:0 0 2px;font-size:15px}.msfp h5{margin:10px 0 4px;font-size:12px;text-transform:uppercase;
 letter-spacing:.04em;opacity:.75}.msfp h6{margin:8px 0 2px;font-size:12px;font-weight:600}
.msfp-sub{opacity:.65;font-weight:normal}.msfp-stats span{display:inline-block;margin-right:14px;white-space:nowrap}
.msfp-note{margin:6px 0;padding:4px 8px;border-left:3px solid rgba(230,120,30,.8);white-space:pre-wrap}
.msfp-caveat{margin:6px 0;padding:4px 8px;border-left:3px solid rgba(200,40,40,.8);background:rgba(200,40,40,.06)}
.msfp-cols{display:flex;flex-wrap:wrap;gap:18px}.msfp-left{flex:0 1 440px;min-width:0;overflow-x:auto}
.msfp-right{flex:1 1 420px;min-width:min(340px,100%);overflow-x:auto}
.msfp-left td code{white-space:pre-wrap;overflow-wrap:anywhere}
.msfp table{border-collapse:collapse;font-variant-numeric:tabular-nums}.msfp td,.msfp th{padding:1px 6px}
.msfp th{text-align:left;font-weight:600;opacity:.8}.msfp td.num,.msfp th.num{text-align:right}
.msfp code,.msfp-ex{font-family:var(--jp-code-font-family,Menlo,Consolas,monospace);font-size:12px}
.msfp code{white-space:pre;background:rgba(127,127,127,.13);border-radius:3px;padding:0 2px}
.msfp-ex{margin:1px 0}.msfp-ex summary{cursor:pointer;white-space:nowrap}
.msfp-meta{display:inline-block;min-width:170px;opacity:.7}.msfp-full{margin:2px 0 6px 176px;white-space:normal}
.msfp-tok{white-space:pre;border-radius:2px}.msfp-special{opacity:.45;font-size:85%}
.msfp-peak{outline:2px solid currentColor;outline-offset:0}.msfp-none{opacity:.6;font-style:italic}
.msfp-bar{vertical-align:middle}
"""


def number(value: Any, spec: str = ".4g") -> str:
    """A number from the page, formatted (``float()`` first, so no string from the page passes through)."""
    if value is None:
        return "–"
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, spec)


def _int(value: Any) -> str:
    return f"{int(value):,}"


def check_page(page: Any) -> None:
    """Raise InputError naming what is missing when ``page`` does not follow the schema above."""
    if not isinstance(page, dict):
        raise InputError(f"a feature page is a dict (see mistudio.analysis.feature_page), not {type(page).__name__}")
    missing = [k for k in PAGE_KEYS if k not in page]
    if missing:
        raise InputError(f"feature page for {page.get('hook_point')!r} feature {page.get('feature')!r} lacks "
                         f"{missing}: build it with every key of mistudio.analysis.feature_page.PAGE_KEYS")
    if page["kind"] not in ("neuron", "latent"):
        raise InputError(f"feature page kind={page['kind']!r} is neither 'neuron' (a raw unit of the hook point) nor "
                         "'latent' (an SAE latent)")
    for group, examples in [("top", page["top"])] + [(f"bands[{i}]", b.get("examples", []))
                                                     for i, b in enumerate(page["bands"])]:
        for j, example in enumerate(examples):
            absent = [k for k in EXAMPLE_KEYS if k not in example]
            if absent:
                raise InputError(f"feature page example {group}[{j}] lacks {absent}: every example needs "
                                 f"{list(EXAMPLE_KEYS)}")
            n = len(example["tokens"])
            if len(example["values"]) != n or len(example["special"]) != n or not 0 <= int(example["peak"]) < n:
                raise InputError(f"feature page example {group}[{j}] has {n} tokens, {len(example['values'])} "
                                 f"values, {len(example['special'])} special flags and peak {example['peak']}: "
                                 "the three lists must have one entry per token and peak must index them")


def percent(share: Any) -> str:
    """A share (0 to 1) as a percentage with its ``%``: 3 significant digits, more where that would read as 100%
    of a share under 1 (2,995 of 2,996 tokens is 99.97%, not 100%); "–" for None."""
    if share is None:
        return "–"
    value = 100 * float(share)
    text, digits = number(value, ".3g"), 3
    while float(share) < 1 and text[:1].isdigit() and float(text) >= 100 and digits < 9:
        digits += 1
        text = number(value, f".{digits}g")
    return text + "%"


# -- pieces ----------------------------------------------------------------------------------------------
def _header(page: dict) -> str:
    density = float(page["density"])
    one_in = f" · 1 in {_int(round(1 / density))}" if 0 < density <= 0.1 else ""  # "1 in 1" says nothing
    nav = " ".join(s for s in (f"← {_int(page['prev'])}" if page.get("prev") is not None else "",
                               f"{_int(page['next'])} →" if page.get("next") is not None else "") if s)
    stats = [f"<span><b>density</b> {percent(density)}{one_in}</span>",
             f"<span><b>fires on</b> {_int(page['fire_count'])} of {_int(page['n_tokens'])} tokens</span>",
             f"<span><b>max</b> {number(page['max'])}</span>", f"<span><b>mean</b> {number(page['mean'])}</span>",
             f"<span><b>mean when active</b> {number(page['mean_active'])}</span>",
             f"<span><b>width</b> {_int(page['d'])}</span>"]
    note = f'<div class="msfp-note">{escape(page["note"])}</div>' if str(page.get("note") or "").strip() else ""
    note = "".join(f'<div class="msfp-caveat">⚠ {escape(line)}</div>' for line in page.get("caveats") or []) + note
    sub = escape(page["extraction"]) + (" · " + nav if nav else "")
    return (f'<div class="msfp-header"><h4>{escape(page["hook_point"])} · {escape(page["kind"])} '
            f'{_int(page["feature"])} <span class="msfp-sub">{sub}</span></h4>'
            f'<div class="msfp-stats">{"".join(stats)}</div>{note}</div>')


def _edge(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)


def _groups(edges: list[float], counts: list[int]) -> tuple[list[tuple[str, list[int]]], bool]:
    """The histogram's bins to draw, in groups: the negative bins, the exact-zero bin, the positive bins, each side
    from its first to its last non-empty bin (the empty bins between zero and the data, float16's 6e-8 upward, are
    not drawn: a gap in the axis says so); and whether empty bins next to zero were left out."""
    zero = [i for i in range(len(counts)) if edges[i] == edges[i + 1] == 0]
    negative = [i for i in range(len(counts)) if edges[i + 1] <= 0 and i not in zero]
    positive = [i for i in range(len(counts)) if edges[i] >= 0 and i not in zero]
    groups, skipped = [], False
    for name, bins in (("negative", negative), ("zero", zero), ("positive", positive)):
        used = [i for i in bins if counts[i]]
        if used:
            groups.append((name, list(range(used[0], used[-1] + 1))))
            skipped |= (name == "negative" and used[-1] < bins[-1]) or (name == "positive" and used[0] > bins[0])
    return groups, skipped


def _bin_title(a: float, b: float, count: int) -> str:
    if a == b == 0:
        return f"0 (not firing): {_int(count)}"
    if b <= 0:  # a negative bin holds a < v <= b
        return f"({number(a)}, {number(b)}]: {_int(count)}"
    return f"[{number(a)}, {number(b)}): {_int(count)}"


def _histogram(page: dict) -> str:
    hist = page.get("histogram") or {}
    counts = [int(c) for c in hist.get("counts", [])]
    edges = [_edge(e) for e in hist.get("edges", [])]
    if not counts or len(edges) != len(counts) + 1 or not any(counts):
        return '<section class="msfp-hist"><h5>Activation histogram</h5><i class="msfp-none">no histogram</i></section>'
    groups, skipped = _groups(edges, counts)
    width, height, left, top_pad, bottom, gap = 360, 120, 34, 8, 18, 8
    n_bars = sum(len(bins) for _, bins in groups)
    bar = (width - left - gap * (len(groups) - 1)) / n_bars
    top = max(counts)
    scale = math.log10(top + 1)
    parts = [f'<svg class="msfp-hist-svg" width="{width}" height="{top_pad + height + bottom}" viewBox="0 0 {width} '
             f'{top_pad + height + bottom}" role="img" aria-label="activation histogram, log count">']
    decade = 1
    while decade <= top:  # y ticks at powers of ten (the top one below the padding, never clipped)
        y = top_pad + height - height * math.log10(decade + 1) / scale
        parts.append(f'<line x1="{left - 3}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="rgba(127,127,127,.25)"/>'
                     f'<text x="{left - 5}" y="{y + 3:.1f}" font-size="9" text-anchor="end" fill="currentColor">'
                     f'{_int(decade)}</text>')
        decade *= 10
    ticks: list[tuple[int, float, str]] = []  # (priority, x, label): fewer is more important
    x = float(left)
    for g, (name, bins) in enumerate(groups):
        if g:
            x += gap
        start = x
        for i in bins:
            a, b, count = edges[i], edges[i + 1], counts[i]
            colour = "#999" if name == "zero" else ("#3b74d0" if name == "negative" else "#e0702a")
            h = height * math.log10(count + 1) / scale
            parts.append(f'<rect x="{x:.2f}" y="{top_pad + height - h:.2f}" width="{max(bar - 0.6, 0.6):.2f}" '
                         f'height="{h:.2f}" fill="{colour}"><title>{_bin_title(a, b, count)}</title></rect>')
            x += bar
        if name == "zero":
            ticks.append((0, (start + x) / 2, "0"))
            continue
        ticks += [(1, start, number(edges[bins[0]], ".3g")), (1, x, number(edges[bins[-1] + 1], ".3g"))]
        step = max(1, round(48 / bar))  # a label every ~48 px in between
        ticks += [(2, start + j * bar, number(edges[bins[0] + j], ".3g")) for j in range(step, len(bins), step)]
    placed: list[tuple[float, str]] = []
    for _, tx, label in sorted(ticks, key=lambda t: t[0]):
        if all(abs(tx - px) >= 8 + 3 * (len(label) + len(plabel)) and label != plabel for px, plabel in placed):
            placed.append((tx, label))
    for tx, label in placed:
        anchor = "start" if tx - left < 12 else ("end" if width - tx < 12 else "middle")
        parts.append(f'<text x="{tx:.1f}" y="{top_pad + height + 13}" font-size="9" text-anchor="{anchor}" '
                     f'fill="currentColor">{escape(label)}</text>')
    parts.append("</svg>")
    zero = next((counts[bins[0]] for name, bins in groups if name == "zero"), 0)
    words = ([f"0 (not firing): {_int(zero)} tokens"] if zero else []) + \
        (["the axis skips the empty bins between 0 and the data"] if skipped else [])
    said = f'<div class="msfp-sub msfp-hist-note">{" · ".join(words)}</div>' if words else ""
    return ('<section class="msfp-hist"><h5>Activation histogram <span class="msfp-sub">(log count; log-spaced '
            f'bins, equal width)</span></h5>{"".join(parts)}{said}</section>')


def _bar(value: float, scale: float, colour: str, width: int = 70) -> str:
    w = 0.0 if scale <= 0 else width * min(1.0, abs(value) / scale)
    return (f'<svg class="msfp-bar" width="{width}" height="10"><rect x="0" y="1" width="{w:.1f}" height="8" '
            f'fill="{colour}"/></svg>')


def _piece(token: Any, scheme: str) -> str:
    """A token named on its own (token means, logit effects): :func:`~.feature_view.token_label`."""
    return f"<code>{escape(token_label(token, scheme))}</code>"


def _id_if(entry: dict, scheme: str, unclear: set[str]) -> str:
    """The token id beside a label that does not tell the token apart (a byte piece shown as '�', or a label two
    tokens share), as the token-means table shows ids."""
    if token_label(entry["token"], scheme) not in unclear or entry.get("token_id") is None:
        return ""
    return f' <span class="msfp-sub">#{_int(entry["token_id"])}</span>'


def _logits(page: dict, scheme: str) -> str:
    logits = page.get("logits")
    if not logits:
        why = escape(page.get("logits_note") or "not computed (an encoder, or no unembedding given)")
        return f'<section class="msfp-logits"><h5>Logit effects</h5><i class="msfp-none">{why}</i></section>'
    pos, neg = list(logits.get("promoted", [])), list(logits.get("suppressed", []))
    scale = max([abs(float(e["value"])) for e in pos + neg] + [0.0])
    labels = [token_label(e["token"], scheme) for e in pos + neg]
    unclear = {label for label in labels if "\ufffd" in label or labels.count(label) > 1}
    rows = []
    for i in range(max(len(pos), len(neg))):
        cells = []
        for side, colour in ((neg, "#3b74d0"), (pos, "#e0702a")):
            if i < len(side):
                e = side[i]
                cells.append(f'<td>{_piece(e["token"], scheme)}{_id_if(e, scheme, unclear)}</td>'
                             f'<td class="num">{number(e["value"], "+.3g")}</td>'
                             f'<td>{_bar(float(e["value"]), scale, colour, 50)}</td>')
            else:
                cells.append("<td></td><td></td><td></td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return ('<section class="msfp-logits"><h5>Logit effects <span class="msfp-sub">(direction · final-norm gain · '
            'W_U)</span></h5><table><tr><th colspan="3">suppressed</th><th colspan="3">promoted</th></tr>'
            f'{"".join(rows)}</table></section>')


def _token_means(page: dict, scheme: str, hide_special: bool) -> str:
    min_count = int(page.get("min_count") or 1)
    rows = [m for m in page.get("token_means", []) if int(m["count"]) >= min_count
            and not (hide_special and m.get("special"))]
    title = f'Mean activation per token <span class="msfp-sub">(tokens seen ≥ {_int(min_count)} times)</span>'
    if not rows:
        return f'<section class="msfp-token-means"><h5>{title}</h5><i class="msfp-none">no token</i></section>'
    scale = max(abs(float(m["mean"])) for m in rows)
    body = "".join(f'<tr><td>{_piece(m["token"], scheme)}</td><td class="num">{number(m["mean"], ".3g")}</td>'
                   f'<td>{_bar(float(m["mean"]), scale, "#e0702a" if float(m["mean"]) >= 0 else "#3b74d0", 50)}</td>'
                   f'<td class="num">{_int(m["count"])}</td><td class="num msfp-sub">{_int(m["token_id"])}</td></tr>'
                   for m in rows)
    return (f'<section class="msfp-token-means"><h5>{title}</h5><table><tr><th>token</th><th class="num">mean</th>'
            f'<th></th><th class="num">count</th><th class="num">id</th></tr>{body}</table></section>')


def correlated_title(page: dict) -> str:
    """What the page's co-firing shares are, in words (its ``correlated_basis``: see the module docstring)."""
    basis = page.get("correlated_basis") or {}
    if basis.get("kind") == "sample":
        rows, tokens = int(basis["rows"]), int(basis["tokens"])
        where = f"all {_int(rows)} tokens" if rows >= int(page["n_tokens"]) else f"a sample of {_int(rows)} tokens"
        return f"share of this feature's {_int(tokens)} firing tokens in {where} where the other fires too"
    cap, error = basis.get("per_token"), basis.get("error")
    among = f"top-{_int(cap)}" if cap else "most active"
    cut = (f"; each count may read low by up to {_int(error)} (it fired with more features than the statistics "
           "keep counters for)") if error else ""
    return f"share of this feature's firing tokens where both are among the token's {among} firing features{cut}"


def _correlated(page: dict) -> str:
    rows = list(page.get("correlated") or [])
    title = f'Co-firing features <span class="msfp-sub">({escape(correlated_title(page))})</span>'
    if not rows:
        return f'<section class="msfp-correlated"><h5>{title}</h5><i class="msfp-none">none recorded</i></section>'
    body = "".join(f'<tr><td class="num">{_int(r["feature"])}</td><td class="num">'
                   f'{percent(r["fraction"])}</td>'
                   f'<td>{_bar(float(r["fraction"]), 1.0, "#8a5cc2", 60)}</td>'
                   f'<td class="num">{_int(r["count"])}</td><td class="num msfp-sub">'
                   f'{percent(r.get("density"))}'
                   '</td></tr>' for r in rows)
    return (f'<section class="msfp-correlated"><h5>{title}</h5><table><tr><th class="num">feature</th>'
            f'<th class="num">share</th><th></th><th class="num">tokens</th>'
            f'<th class="num" title="the other feature\'s share of all tokens: its share when unrelated">'
            f'overall</th></tr>{body}</table></section>')


def _tokens(example: dict, lo: int, hi: int, scale: float, scheme: str, hide_special: bool) -> str:
    tokens = [str(t) for t in example["tokens"]]
    scheme = resolve_scheme(tokens, scheme)
    pieces, titles = pieces_and_titles(tokens, scheme)  # from the whole example
    peak = int(example["peak"])
    out = []
    for i in range(lo, hi):
        special, value = bool(example["special"][i]), example["values"][i]
        value = None if value is None or math.isnan(float(value)) else float(value)
        if hide_special and special:
            continue
        cls = "msfp-tok" + (" msfp-special" if special or value is None else "") + (" msfp-peak" if i == peak else "")
        shown = "no activation" if value is None else number(value)
        out.append(f'<span class="{cls}" style="{shade(value, scale)}" title="{escape(f"{titles[i]} = {shown}")}">'
                   f"{piece_html(pieces[i])}</span>")
    return "".join(out)


def _examples(examples: Sequence[dict], scale: float, scheme: str, hide_special: bool) -> str:
    rows, hidden = [], 0
    for e in examples:
        peak, n = int(e["peak"]), len(e["tokens"])
        if hide_special and e["special"][peak]:
            hidden += 1
            continue
        lo, hi = max(0, peak - NARROW), min(n, peak + NARROW + 1)
        meta = (f'<span class="msfp-meta"><b>{number(e["value"], ".3g")}</b> · row {_int(e["dataset_row"])} · pos '
                f'{_int(e["position"])}</span>')
        rows.append(f'<details class="msfp-ex"><summary>{meta} {"…" if lo else ""}'
                    f'{_tokens(e, lo, hi, scale, scheme, hide_special)}{"…" if hi < n else ""}</summary>'
                    f'<div class="msfp-full">{_tokens(e, 0, n, scale, scheme, hide_special)}</div></details>')
    if hidden:
        rows.append(f'<div class="msfp-none">{_int(hidden)} example(s) at special tokens hidden</div>')
    return "".join(rows) or '<i class="msfp-none">no examples</i>'


def feature_page_html(page: dict, hide_special: bool = False, scheme: str = "auto", style: bool = True) -> str:
    """The page as one self-contained HTML block (SAEDashboard's layout; see the module docstring).

    ``hide_special`` leaves special tokens out of the examples (an example whose own token is special is left out
    whole, and counted) and out of the token-means table (rows flagged ``special``). ``scheme`` is how word pieces
    join (``"auto"``, ``"bpe"``, ``"bytelevel"``, ``"wordpiece"``: :func:`mistudio.feature_view.tokenizer_scheme`
    tells it from a tokenizer). ``style=False`` leaves out the ``<style>`` block (:data:`PAGE_CSS`), for pages shown
    together."""
    check_page(page)
    if scheme == "auto" and page.get("scheme") in ("bpe", "bytelevel", "wordpiece"):
        scheme = page["scheme"]
    values = [abs(float(v)) for e in page["top"] for v in e["values"] if v is not None]
    scale = max(values + [abs(float(page["max"])) if page["max"] is not None else 0.0, 1e-12])
    bands = []
    for band in page["bands"]:
        (q0, q1), (v0, v1) = band["quantiles"], band["values"]
        bands.append(f'<h6>Quantiles {number(100 * float(q0), "g")}–{number(100 * float(q1), "g")}% '
                     f'<span class="msfp-sub">(activation {number(v0, ".3g")} to {number(v1, ".3g")}; a sample)</span>'
                     f'</h6>{_examples(band["examples"], scale, scheme, hide_special)}')
    left = "".join([_histogram(page), _logits(page, scheme), _token_means(page, scheme, hide_special),
                    _correlated(page)])
    bands_html = "".join(bands) or '<i class="msfp-none">none</i>'
    per_doc = ", one per document" if page.get("one_per_document") else ""
    right = (f'<section class="msfp-top"><h5>Top activations <span class="msfp-sub">'
             f'({_int(len(page["top"]))}{per_doc}; '
             f'click a line for its context)</span></h5>{_examples(page["top"], scale, scheme, hide_special)}</section>'
             f'<section class="msfp-bands"><h5>Quantile bands</h5>{bands_html}</section>')
    css = f"<style>{PAGE_CSS}</style>" if style else ""
    return (f'<div class="msfp">{css}{_header(page)}<div class="msfp-cols"><div class="msfp-left">{left}</div>'
            f'<div class="msfp-right">{right}</div></div></div>')
