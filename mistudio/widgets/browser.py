"""Browse tab: pick an extraction, hook point, row and feature; heatmap and norms inline with the feature's top
tokens as a table; and the feature view (its histogram, top examples over the whole store, quantile samples,
token means). Tokens are named as in every tab (``token_label``). Every slow action shows it is busy; the info line
says what is shown, never the last one.
"""
from __future__ import annotations

import ipywidgets as W
import numpy as np

from ..analysis import plots
from ..analysis.feature_view import feature_view, feature_view_html, piece_html, token_label, tokenizer_scheme
from ..analysis.stats import describe_examples
from ..extraction import Extraction
from ..workspace import Workspace
from .common import (PerThreadFlag, busy, error_box, esc, extraction_label, for_ui, guard, note_box, store_notes,
                     stylesheet)

PLOTS = (("heatmap", "Token × feature"), ("norms", "Norm per layer"))  # the histogram: in the feature view
TOKEN_WINDOW = 64  # tokens drawn around the feature's peak in a row (like the 64-feature window)
CONTEXT = 8


def without_special(example: dict, special: set[str]) -> dict | None:
    """An example with the special tokens of its context left out (None when its peak is one)."""
    tokens, values = list(example["context_tokens"]), list(example["context_values"])
    peak = int(example["position"]) - int(example["context_start"])
    if not 0 <= peak < len(tokens) or tokens[peak] in special:
        return None
    keep = [i for i, t in enumerate(tokens) if t not in special]
    new_peak = keep.index(peak)
    return {**example, "context_tokens": [tokens[i] for i in keep], "context_values": [values[i] for i in keep],
            "context_ids": [example["context_ids"][i] for i in keep] if "context_ids" in example else [],
            "context_start": int(example["position"]) - new_peak}


def distinct_contexts(examples: list[dict], narrow: int = 3) -> list[dict]:
    """The examples whose peak token and ``narrow`` tokens either side were not seen in an earlier (larger)
    example: near-identical rows (the same sentence in several documents) show once."""
    seen, out = set(), []
    for e in examples:
        peak = int(e["position"]) - int(e["context_start"])
        key = tuple(e["context_tokens"][max(0, peak - narrow):peak + narrow + 1]) + (peak - max(0, peak - narrow),)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


WRAP = "white-space:pre-wrap;overflow-wrap:anywhere"  # running text keeps its spaces and wraps in a narrow box


def running(pieces: list[str], peak: int, label: str) -> str:
    """A context window as running text (HTML), its own token outlined and named (``label``) on hover, as the
    feature view shows examples."""
    return "".join(f'<b style="outline:1px solid currentColor" title="{esc(label)}">{piece_html(p)}</b>'
                   if i == peak else piece_html(p) for i, p in enumerate(pieces))


def token_means_html(means: list[dict], scheme: str, min_count: int) -> str:
    """The mean activation per token string as a table with room between its columns."""
    if not means:
        return (f"<p><small>No token string was seen at least {min_count:,} times: lower <i>Token means: min "
                "count</i>.</small></p>")
    pad = "padding:2px 14px"
    rows = "".join(
        f"<tr><td style='{pad} 2px 0;white-space:pre;font-family:var(--jp-code-font-family,monospace)'>"
        f"{esc(token_label(m['token'], scheme))}</td><td style='{pad};text-align:right'>{m['mean']:.3g}</td>"
        f"<td style='{pad};text-align:right'>{m['count']:,}</td></tr>"
        for m in means)
    return ("<h4 style='margin:8px 0 2px'>Highest mean activation per token string "
            f"<small>(tokens seen at least {min_count:,} times)</small></h4>"
            "<table class='ms-token-means' style='border-collapse:collapse'><tr>"
            f"<th style='{pad} 2px 0;text-align:left'>token</th><th style='{pad};text-align:right'>mean activation</th>"
            f"<th style='{pad};text-align:right'>times seen</th></tr>{rows}</table>")


class ActivationBrowser(W.VBox):
    """The Browse tab. Plots are drawn in button callbacks (the kernel's main path), never from a worker."""

    _quiet = PerThreadFlag()  # this thread rebuilds a list: its value changes are not a user's choice

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        style = {"description_width": "90px"}
        self.extraction = W.Dropdown(description="Extraction", style={"description_width": "72px"},
                                     layout=W.Layout(width="auto", align_self="stretch", max_width="760px"))
        self.about = W.HTML()
        self.hook_point = W.Dropdown(description="Hook point", style=style, layout=W.Layout(width="340px"))
        self.row = W.IntText(value=0, description="Dataset row", style=style, layout=W.Layout(width="220px"))
        self.feature = W.IntText(value=0, description="Feature", style=style, layout=W.Layout(width="220px"))
        self.top_k = W.IntSlider(value=15, min=5, max=50, description="Top k", style=style,
                                 layout=W.Layout(width="300px"))
        self.hide_special = W.Checkbox(value=False, description="hide special tokens", indent=False,
                                       layout=W.Layout(width="auto"),
                                       tooltip="leave [CLS]/[SEP], BOS/EOS... out of the plots and the feature view")
        self.hide_outliers = W.Checkbox(value=False, description="hide outliers", indent=False,
                                        layout=W.Layout(width="auto"),
                                        tooltip="tokens whose norm is over the hook point's outlier threshold")
        self.one_per_document = W.Checkbox(value=True, description="one top example per document or context",
                                           indent=False,
                                           layout=W.Layout(width="auto"),
                                           tooltip="the feature view's top examples: each document's largest value "
                                                   "only, and a context seen in a larger example (the same sentence "
                                                   "in another document) once")
        self.min_count = W.BoundedIntText(value=5, min=1, max=10**9, description="Token means: min count",
                                          style={"description_width": "175px"}, layout=W.Layout(width="270px"),
                                          tooltip="the token-mean table lists token strings seen at least this "
                                                  "often")
        self.plot_button = W.Button(description="Plot", button_style="primary", icon="bar-chart",
                                    tooltip="the row's heatmap and norms (64 tokens around the feature's peak) and "
                                            "the feature's top tokens", layout=W.Layout(width="auto"))
        self.view_button = W.Button(description="Feature view", icon="search", button_style="info",
                                    tooltip="the feature's histogram, top examples over the whole store, quantile "
                                            "samples, token means",
                                    layout=W.Layout(width="auto"))
        self.refresh_button = W.Button(description="Refresh list", icon="refresh", layout=W.Layout(width="auto"))
        self.info = W.HTML()
        self.images = {name: W.Image(format="png", layout=W.Layout(max_width="100%")) for name, _ in PLOTS}
        self._boxes = {name: W.VBox([W.HTML(f"<b>{title}</b>"), self.images[name]],
                                    layout=W.Layout(display="none")) for name, title in PLOTS}
        self.top_table = W.HTML()
        self.feature_html = W.HTML()
        self.feature_hist = W.Image(format="png", layout=W.Layout(max_width="100%", display="none"))
        self.ext: Extraction | None = None
        self.hidden: dict = {}
        self.window: slice | None = None
        self._rows_cache: dict[tuple, np.ndarray] = {}
        self._labels: dict[str, str] = {}
        self._states: dict[str, tuple] = {}  # id -> (status, samples saved): what the list says of each store
        self._shown: tuple | None = None  # (id, status, samples saved) of the store the tab shows
        self.extraction.observe(guard(self._say, lambda _: None if self._quiet else self._select()), "value")
        self.hook_point.observe(guard(self._say, lambda _: self._describe_hook_point()), "value")
        self.plot_button.on_click(guard(self._say, lambda _: self.plot()))
        self.view_button.on_click(guard(self._say, lambda _: self.show_feature()))
        self.refresh_button.on_click(guard(self._say, lambda _: self.refresh_list()))
        super().__init__([stylesheet(), W.HTML("<b>Browse</b>"), self.extraction, self.about,
                          W.HBox([self.hook_point, self.refresh_button]), W.HBox([self.row, self.feature]),
                          W.HBox([self.top_k, self.hide_special, self.hide_outliers]),
                          W.HBox([self.one_per_document, self.min_count]),
                          W.HBox([self.plot_button, self.view_button]), self.info, self.feature_hist,
                          self.feature_html, *self._boxes.values(), self.top_table])
        self.add_class("mistudio-panel")
        self.refresh()

    def _say(self, text: str) -> None:
        self.info.value = text

    def refresh_list(self) -> None:
        """*Refresh list*, with the button busy while the workspace is listed."""
        with busy(self.refresh_button, "Listing…"):
            self.refresh()

    def refresh(self, select: str | None = None) -> None:
        """List stores that hold data (completed, or with committed samples), newest first: each entry says its
        model, dataset, date and hook points. The store shown stays shown (with its plots) unless it changed,
        went away, or ``select`` names another."""
        options, self._labels, self._states = [], {}, {}
        for row in self.workspace.extractions().to_dict("records"):
            if row["status"] == "COMPLETED" or row["samples_committed"]:
                options.append((extraction_label(row), row["id"]))
                self._states[row["id"]] = (row["status"], int(row["samples_committed"] or 0))
                created = row.get("created")
                when = f"created {created:%Y-%m-%d %H:%M}" if created is not None and created == created else ""
                self._labels[row["id"]] = " · ".join(esc(str(part)) for part in (
                    row["id"], row["model"], row["dataset"], when, row["status"], row["hook_points"]) if part)
        ids = [v for _, v in options]
        previous = self.extraction.value
        current = select if select in ids else previous
        gone = previous if previous and previous not in ids else None
        target = current if current in ids else (ids[0] if ids else None)
        self._quiet = True
        try:
            if tuple(options) != tuple(self.extraction.options):
                self.extraction.options = options
            if options and self.extraction.value != target:
                self.extraction.value = target
        finally:
            self._quiet = False
        if target is None or self._shown != (target, *self._states[target]):
            self._select()
        if gone:
            self.info.value = note_box(f"Extraction {esc(gone)} is no longer in the workspace (deleted or "
                                       "cleaned up); the list is up to date." + (" Showing the newest one instead."
                                                                                 if options else ""),
                                       colour="#fd7e14", background="#fff3e0")

    def _select(self) -> None:
        self._shown = (self.extraction.value, *self._states.get(self.extraction.value, ())) \
            if self.extraction.value else None
        for box in self._boxes.values():
            box.layout.display = "none"
        self.top_table.value = self.feature_html.value = ""
        self.feature_hist.layout.display = "none"
        self.about.value = (f'<div class="mistudio-line"><small>{self._labels[self.extraction.value]}</small></div>'
                            if self.extraction.value in self._labels else "")
        if not self.extraction.value:
            self.ext = None
            self.info.value = "No extraction with data yet: launch one in the Extract tab."
            return
        try:
            self.ext = self.workspace.open(self.extraction.value)
            rows = self.ext.rows()
        except (FileNotFoundError, KeyError, ValueError) as exc:  # deleted (e.g. by Cleanup) since listed
            self.ext = None
            missing = self.extraction.value
            if isinstance(exc, FileNotFoundError) or "no extraction" in str(exc):
                self.refresh()
                self.info.value = note_box(f"Extraction {esc(missing)} is no longer in the workspace "
                                           "(deleted or cleaned up); the list is up to date.",
                                           colour="#fd7e14", background="#fff3e0")
            else:
                self.info.value = error_box(for_ui(exc))
            return
        points = self.ext.hook_points
        self.hook_point.options = points
        if points:
            self.hook_point.value = next((p for p in reversed(points) if p.endswith("residual")), points[-1])
        if len(rows) and self.row.value not in set(rows.tolist()):
            self.row.value = int(rows[0])
        self.info.value = (f"{self.ext.n_samples:,} samples, {self.ext.n_tokens:,} tokens; dataset rows "
                           f"{int(rows.min()) if len(rows) else '–'}..{int(rows.max()) if len(rows) else '–'}"
                           + (f"<br>{self.norm_line(self.hook_point.value)}" if self.hook_point.value else "")
                           + store_notes(self.ext))

    def open_row(self, extraction_id: str, row: int, hook_point: str | None = None,
                 feature: int | None = None, note: str = "") -> bool:
        """Show a dataset row of an extraction and plot it (e.g. an example clicked in another tab): the
        extraction, hook point and feature are chosen first; an extraction that is not listed is said so.
        ``note`` (HTML): what the info line adds once plotted (e.g. why a latent is not what is drawn)."""
        self.refresh(select=extraction_id)
        if self.extraction.value != extraction_id:
            self.info.value = error_box(f"Extraction {esc(extraction_id)} is not in this workspace's list "
                                        "(no committed data, or deleted).")
            return False
        if hook_point is not None:
            self.hook_point.value = hook_point
        if feature is not None:
            self.feature.value = int(feature)
        self.row.value = int(row)
        shown = self.plot()
        if shown and note:
            self.info.value += f" {note}"
        return shown

    def plot(self) -> bool:
        """Draw the plots for the current choices (a long row: the 64 tokens around the feature's peak); the info
        line says which row is shown once it is, and errors show in the panel."""
        if self.ext is None:
            self.info.value = error_box("Pick an extraction first.")
            return False
        ext, hp, row, feature = self.ext, self.hook_point.value, self.row.value, self.feature.value
        kind = hp.rsplit(".", 1)[1]
        for box in self._boxes.values():  # nothing of the previous row stays on screen while this one is drawn
            box.layout.display = "none"
        self.top_table.value = ""
        with busy(self.plot_button, "Plotting…"):
            self.info.value = (f'<span class="mistudio-working">⏳ Plotting {esc(hp)}, row {row}, feature '
                               f"{feature}…</span>")
            try:
                column = plots.feature_column(ext, hp, feature)
                column, hidden_rows = self._hide_rows(hp, column)
                points = [p for p in ext.hook_points if p.endswith("." + kind)]
                hide = self._hidden_tokens(row, points)
                sample = ext.sample(row, [hp], tokens=False)
                n_tokens = len(sample["input_ids"])
                peak = plots.peak_position(sample["activations"][hp][:, feature], hide)
                window = self.window = plots.token_window(n_tokens, peak, TOKEN_WINDOW)
                self.images["heatmap"].value = plots.to_png(plots.heatmap(ext, row, hp, feature=feature, hide=hide,
                                                                          tokens=window))
                self.images["norms"].value = plots.to_png(plots.layer_norms(ext, row, kind, hide=hide, tokens=window))
                top = plots.top_tokens(ext, hp, feature, k=self.top_k.value, values=column,
                                       one_per_document=self.one_per_document.value)
            except (ValueError, KeyError) as exc:
                self.info.value = error_box(f"Row {row}, feature {feature} of {esc(hp)} not plotted: "
                                            f"{for_ui(exc)}")
                return False
        self.hidden = {"row_tokens": int(hide.sum()) if hide is not None else 0, "rows": hidden_rows}
        for box in self._boxes.values():
            box.layout.display = ""
        self.top_table.value = (
            f"<b>Top {len(top)} tokens of feature {feature}"
            f"{' (one per document or context)' if self.one_per_document.value else ''}</b>"
            "<table class='mistudio-top' style='border-collapse:collapse'><tr><th style='padding:2px 10px 2px 0'>"
            "value</th><th style='padding:2px 10px'>row</th><th style='padding:2px 10px'>pos</th>"
            "<th style='text-align:left'>context</th></tr>" + "".join(
                f"<tr><td style='padding:2px 10px 2px 0'>{t['value']:.3f}</td><td style='padding:2px 10px'>"
                f"{t['row']:,}</td><td style='padding:2px 10px'>{int(t['position'])}</td>"
                f"<td style='{WRAP}'>{running(t['pieces'], t['peak'], t['token'])}</td></tr>" for t in top)
            + "</table>")
        hidden = (f" Hidden: {self.hidden['row_tokens']} of the row's tokens, {hidden_rows:,} activation rows in the "
                  "top tokens." if self.hide_special.value or self.hide_outliers.value else "")
        where = (f"tokens {window.start}–{window.stop - 1} of {n_tokens} around the feature's peak"
                 if (window.start, window.stop) != (0, n_tokens) else f"all {n_tokens} tokens")
        self.info.value = (f"Plotted {esc(hp)}, row {row} ({where}), feature {feature}.{hidden} "
                           f"{self.norm_line(hp)}")
        return True

    # -- hiding special and outlier tokens ----------------------------------------------------------
    def norm_line(self, hook_point: str) -> str:
        """The hook point's norm quantiles and outlier count (from the store's statistics)."""
        found = self.ext.outliers(hook_point)
        quantiles = found["quantiles"]
        if not quantiles:
            return ""
        ordered = sorted(quantiles.items(), key=lambda item: float(item[0]))
        parts = ", ".join(f"p{float(q) * 100:g} {v:.3g}" for q, v in ordered)
        threshold = f" (norm > {found['threshold']:.3g})" if found["threshold"] is not None else ""
        return (f"<small>{esc(hook_point)} norm quantiles: {parts} · "
                f"{found['n']:,} outlier token{'s' if found['n'] != 1 else ''}{threshold}</small>")

    def _describe_hook_point(self) -> None:
        if self.ext is not None and self.hook_point.value:
            line = self.norm_line(self.hook_point.value)
            if line:
                self.info.value = line

    def _hidden_tokens(self, row: int, points: list[str]) -> np.ndarray | None:
        """A bool per token of ``row``: special tokens and/or tokens whose norm is over an outlier threshold
        at any of ``points`` (the plotted hook points), as the checkboxes say; None when nothing is hidden."""
        if not (self.hide_special.value or self.hide_outliers.value):
            return None
        sample = self.ext.sample(row, points, tokens=False)
        hide = np.asarray(sample["special"], dtype=bool) if self.hide_special.value else np.zeros(
            len(sample["input_ids"]), dtype=bool)
        if self.hide_outliers.value:
            for point in points:
                threshold = self.ext.outliers(point)["threshold"]
                if threshold is not None:
                    norms = np.linalg.norm(np.asarray(sample["activations"][point], np.float32), axis=1)
                    hide |= np.nan_to_num(norms) > threshold
        return hide

    def _hide_rows(self, hook_point: str, column: np.ndarray) -> tuple[np.ndarray, int]:
        """The feature column with hidden activation rows set to NaN (histogram and top tokens skip them)."""
        hide = np.zeros(len(column), dtype=bool)
        if self.hide_special.value and len(column):
            special = self.ext.special_flags()
            hide |= special[self.ext.token_index(np.arange(len(column)))]
        if self.hide_outliers.value:
            rows = self.ext.outliers(hook_point)["rows"]
            hide[rows[rows < len(column)]] = True
        if not hide.any():
            return column, 0
        return np.where(hide, np.nan, column).astype(np.float32), int(hide.sum())

    # -- the feature view -------------------------------------------------------------------------------
    def _top_rows(self, hook_point: str, feature: int, k: int) -> np.ndarray:
        """The top examples' [value, row] as the options say (one per document, special tokens left out),
        remembered for this store's commit mark."""
        ext = self.ext
        key = (ext.store.name, hook_point, feature, k, self.hide_special.value, self.one_per_document.value,
               int(ext.committed_tokens()))
        if key not in self._rows_cache:
            self._rows_cache[key] = plots.top_rows(ext, hook_point, feature, k, skip_special=self.hide_special.value,
                                                   one_per_document=self.one_per_document.value)
        return self._rows_cache[key]

    def _histogram(self, hook_point: str, feature: int, view: dict):
        """The feature's histogram, the one Browse draws: over every token from the store's statistics, or, with
        *hide special tokens* / *hide outliers* ticked, over the tokens left (read from the store, those rows left
        out)."""
        if not (self.hide_special.value or self.hide_outliers.value):
            return plots.histogram_from_counts(view["hist"], view["edges"], f"{hook_point} feature {feature} over "
                                               f"{view['n_tokens']:,} tokens")
        column, _hidden = self._hide_rows(hook_point, plots.feature_column(self.ext, hook_point, feature))
        return plots.feature_histogram(self.ext, hook_point, feature, values=column)

    def show_feature(self) -> bool:
        """The feature view of the chosen hook point and feature over the whole store (cached in the store): its
        histogram (:meth:`_histogram`), top examples (one per document if ticked), quantile samples, token means of
        strings seen at least *min count* times; *hide special tokens* leaves them out of all four, *hide
        outliers* out of the histogram."""
        if self.ext is None:
            self.info.value = error_box("Pick an extraction first.")
            return False
        ext, hp, feature, k = self.ext, self.hook_point.value, self.feature.value, self.top_k.value
        min_count = max(1, int(self.min_count.value))
        with busy(self.view_button, "Computing…"):
            self.info.value = (f'<span class="mistudio-working">⏳ Feature view of {esc(hp)} feature {feature}'
                               " (one pass over the store the first time, then cached)…</span>")
            try:
                view = feature_view(ext, hp, feature, k=k, context=CONTEXT, min_count=min_count)
                if self.one_per_document.value or self.hide_special.value:
                    fetch = 4 * k if self.one_per_document.value else k  # room for the repeats left out
                    view["top"] = describe_examples(ext, hp, feature, self._top_rows(hp, feature, fetch), CONTEXT)
            except (ValueError, KeyError) as exc:  # InputError is a ValueError: out-of-range feature, ...
                self.info.value = error_box(f"Feature {feature} of {esc(hp)} not shown: {for_ui(exc)}")
                return False
            tokenizer = ext.tokenizer
            special = set(tokenizer.all_special_tokens)
            scheme = tokenizer_scheme(tokenizer)
            means = view.get("token_means", [])
            if self.hide_special.value:
                view["top"] = [e for e in (without_special(x, special) for x in view["top"]) if e is not None]
                view["bands"] = [{**band, "examples": [e for e in (without_special(x, special)
                                                                     for x in band["examples"]) if e is not None]}
                                 for band in view.get("bands", [])]
                means = [m for m in means if m["token"] not in special]
            if self.one_per_document.value:
                view["top"] = distinct_contexts(view["top"])
            view["top"] = view["top"][:k]
            self.feature_html.value = (feature_view_html({**view, "token_means": []}, sorted(special), scheme)
                                       + token_means_html(means, scheme, min_count))
            self.feature_hist.value = plots.to_png(self._histogram(hp, feature, view))
            self.feature_hist.layout.display = ""
        options = [o for o, on in (("one example per document", self.one_per_document.value),
                                   ("special tokens hidden", self.hide_special.value),
                                   ("outliers hidden from the histogram", self.hide_outliers.value)) if on]
        self.info.value = (f"Feature view of {esc(hp)} feature {feature}"
                           f"{' (' + ', '.join(options) + ')' if options else ''}"
                           f"{' · statistics from the store cache' if view['cached'] else ''}.")
        return True
