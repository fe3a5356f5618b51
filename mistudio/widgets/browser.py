"""Browse tab: pick an extraction, hook point, row and feature; heatmap, norms, histogram, top tokens inline;
and the feature view (top examples over the whole store, quantile samples, token means) as HTML."""
from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from ..analysis import plots
from ..analysis.feature_view import feature_view, feature_view_html, tokenizer_scheme
from ..extraction import Extraction
from ..workspace import Workspace
from .common import error_box, for_ui, guard, note_box, summarise_hook_points

PLOTS = (("heatmap", "Token × feature"), ("norms", "Norm per layer"), ("histogram", "Feature histogram"),
         ("top_tokens", "Top activating tokens"))


class ActivationBrowser(W.VBox):
    """The Browse tab. Plots are drawn in button callbacks (the kernel's main path), never from a worker."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        style = {"description_width": "90px"}
        self.extraction = W.Dropdown(description="Extraction", style=style, layout=W.Layout(width="70%"))
        self.hook_point = W.Dropdown(description="Hook point", style=style)
        self.row = W.IntText(value=0, description="Dataset row", style=style)
        self.feature = W.IntText(value=0, description="Feature", style=style)
        self.top_k = W.IntSlider(value=15, min=5, max=50, description="Top k", style=style)
        self.hide_special = W.Checkbox(value=False, description="hide special tokens", indent=False,
                                       layout=W.Layout(width="auto"))
        self.hide_outliers = W.Checkbox(value=False, description="hide outliers", indent=False,
                                        layout=W.Layout(width="auto"),
                                        tooltip="tokens whose norm is over the hook point's outlier threshold")
        self.plot_button = W.Button(description="Plot", button_style="primary", icon="bar-chart",
                                    tooltip="the row's heatmap and norms, the feature's histogram and top tokens")
        self.view_button = W.Button(description="Feature view", icon="search", button_style="info",
                                    tooltip="top examples over the whole store, quantile samples, token means",
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
        self.extraction.observe(guard(self._say, lambda _: self._select()), "value")
        self.hook_point.observe(guard(self._say, lambda _: self._describe_hook_point()), "value")
        self.plot_button.on_click(guard(self._say, lambda _: self.plot()))
        self.view_button.on_click(guard(self._say, lambda _: self.show_feature()))
        self.refresh_button.on_click(guard(self._say, lambda _: self.refresh()))
        super().__init__([W.HTML("<b>Browse</b>"), W.HBox([self.extraction, self.refresh_button]), self.hook_point,
                          W.HBox([self.row, self.feature]), W.HBox([self.top_k, self.hide_special, self.hide_outliers]),
                          W.HBox([self.plot_button, self.view_button]), self.info, self.feature_hist,
                          self.feature_html, *self._boxes.values(), self.top_table])
        self.refresh()

    def _say(self, text: str) -> None:
        self.info.value = text

    def refresh(self, select: str | None = None) -> None:
        """List stores that hold data (completed, or with committed samples), newest first."""
        options = []
        for row in self.workspace.extractions().to_dict("records"):
            if row["status"] == "COMPLETED" or row["samples_committed"]:
                label = f"{row['id']} · {row['status']} · {summarise_hook_points(row['hook_points'])}"
                options.append((label, row["id"]))
        current = select or self.extraction.value
        ids = [v for _, v in options]
        gone = current if current and current not in ids else None
        self.extraction.options = options
        if options:
            self.extraction.value = current if current in ids else ids[0]
        self._select()
        if gone:
            self.info.value = note_box(f"Extraction {html.escape(gone)} is no longer in the workspace (deleted or "
                                       "cleaned up); the list is up to date." + (" Showing the newest one instead."
                                                                                 if options else ""),
                                       colour="#fd7e14", background="#fff3e0")

    def _select(self) -> None:
        for box in self._boxes.values():
            box.layout.display = "none"
        self.top_table.value = self.feature_html.value = ""
        self.feature_hist.layout.display = "none"
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
                self.info.value = note_box(f"Extraction {html.escape(missing)} is no longer in the workspace "
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
                           + (f"<br>{self.norm_line(self.hook_point.value)}" if self.hook_point.value else ""))

    def plot(self) -> bool:
        """Draw the four plots for the current choices; errors show in the panel."""
        if self.ext is None:
            self.info.value = error_box("Pick an extraction first.")
            return False
        ext, hp, row, feature = self.ext, self.hook_point.value, self.row.value, self.feature.value
        kind = hp.rsplit(".", 1)[1]
        try:
            column = plots.feature_column(ext, hp, feature)  # one scan of the store serves both plots
            column, hidden_rows = self._hide_rows(hp, column)
            points = [p for p in ext.hook_points if p.endswith("." + kind)]
            hide = self._hidden_tokens(row, points)
            self.images["heatmap"].value = plots.to_png(plots.heatmap(ext, row, hp, feature=feature, hide=hide))
            self.images["norms"].value = plots.to_png(plots.layer_norms(ext, row, kind, hide=hide))
            self.images["histogram"].value = plots.to_png(plots.feature_histogram(ext, hp, feature, values=column))
            top = plots.top_tokens(ext, hp, feature, k=self.top_k.value, values=column)
            self.images["top_tokens"].value = plots.to_png(plots.top_tokens_figure(ext, hp, feature, top=top))
        except (ValueError, KeyError) as exc:
            self.info.value = error_box(for_ui(exc))
            return False
        self.hidden = {"row_tokens": int(hide.sum()) if hide is not None else 0, "rows": hidden_rows}
        for box in self._boxes.values():
            box.layout.display = ""
        self.top_table.value = ("<table class='mistudio-top'><tr><th>value</th><th>row</th><th>pos</th>"
                                "<th>context</th></tr>" + "".join(
                                    f"<tr><td>{t['value']:.3f}</td><td>{t['row']:,}</td><td>{t['position']}</td>"
                                    f"<td>{html.escape(t['context'])}</td></tr>" for t in top) + "</table>")
        hidden = (f" Hidden: {self.hidden['row_tokens']} of the row's tokens, {hidden_rows:,} activation rows in the "
                  "histogram and top tokens." if self.hide_special.value or self.hide_outliers.value else "")
        self.info.value = f"Plotted {html.escape(hp)}, row {row}, feature {feature}.{hidden} {self.norm_line(hp)}"
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
        return (f"<small>{html.escape(hook_point)} norm quantiles: {parts} · "
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
            special = np.asarray(self.ext.store.tokens("special")[:], dtype=bool)
            hide |= special[self.ext.token_index(np.arange(len(column)))]
        if self.hide_outliers.value:
            rows = self.ext.outliers(hook_point)["rows"]
            hide[rows[rows < len(column)]] = True
        if not hide.any():
            return column, 0
        return np.where(hide, np.nan, column).astype(np.float32), int(hide.sum())

    def show_feature(self) -> bool:
        """The feature view of the chosen hook point and feature over the whole store (cached in the store)."""
        if self.ext is None:
            self.info.value = error_box("Pick an extraction first.")
            return False
        ext, hp, feature = self.ext, self.hook_point.value, self.feature.value
        try:
            view = feature_view(ext, hp, feature, k=self.top_k.value)
        except (ValueError, KeyError) as exc:  # InputError is a ValueError: out-of-range feature, ...
            self.info.value = error_box(for_ui(exc))
            return False
        tokenizer = ext.tokenizer
        self.feature_html.value = feature_view_html(view, tokenizer.all_special_tokens, tokenizer_scheme(tokenizer))
        self.feature_hist.value = plots.to_png(plots.histogram_from_counts(
            view["hist"], view["edges"], f"{hp} feature {feature} over {view['n_tokens']:,} tokens"))
        self.feature_hist.layout.display = ""
        self.info.value = (f"Feature view of {html.escape(hp)} feature {feature}"
                           f"{' (from the store cache)' if view['cached'] else ''}.")
        return True
