"""Browse tab: pick an extraction, hook point, row and feature; heatmap, norms, histogram, top tokens inline."""
from __future__ import annotations

import html

import ipywidgets as W

from .. import plots
from ..extraction import Extraction
from ..workspace import Workspace
from .common import error_box


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
        self.plot_button = W.Button(description="Plot", button_style="primary", icon="bar-chart")
        self.refresh_button = W.Button(description="Refresh list", icon="refresh")
        self.info = W.HTML()
        self.images = {name: W.Image(format="png", layout=W.Layout(max_width="100%"))
                       for name in ("heatmap", "norms", "histogram", "top_tokens")}
        self.top_table = W.HTML()
        self.ext: Extraction | None = None
        self.extraction.observe(lambda _: self._select(), "value")
        self.plot_button.on_click(lambda _: self.plot())
        self.refresh_button.on_click(lambda _: self.refresh())
        images = W.VBox([W.HTML("<b>Token × feature</b>"), self.images["heatmap"],
                         W.HTML("<b>Norm per layer</b>"), self.images["norms"],
                         W.HTML("<b>Feature histogram</b>"), self.images["histogram"],
                         W.HTML("<b>Top activating tokens</b>"), self.images["top_tokens"], self.top_table])
        super().__init__([W.HTML("<b>Browse</b>"), W.HBox([self.extraction, self.refresh_button]), self.hook_point,
                          W.HBox([self.row, self.feature]), self.top_k, self.plot_button, self.info, images])
        self.refresh()

    def refresh(self, select: str | None = None) -> None:
        """List stores that hold data (completed, or with committed samples), newest first."""
        options = []
        for row in self.workspace.extractions().to_dict("records"):
            if row["status"] == "COMPLETED" or row["samples_committed"]:
                options.append((f"{row['id']} · {row['status']} · {row['model']} · {row['hook_points'][:40]}",
                                row["id"]))
        current = select or self.extraction.value
        self.extraction.options = options
        if options:
            ids = [v for _, v in options]
            self.extraction.value = current if current in ids else ids[0]
        self._select()

    def _select(self) -> None:
        if not self.extraction.value:
            self.ext = None
            self.info.value = "No extraction with data yet: launch one in the Extract tab."
            return
        self.ext = self.workspace.open(self.extraction.value)
        points = self.ext.hook_points
        self.hook_point.options = points
        if points:
            self.hook_point.value = next((p for p in reversed(points) if p.endswith("residual")), points[-1])
        rows = self.ext.rows()
        if len(rows) and self.row.value not in set(rows.tolist()):
            self.row.value = int(rows[0])
        self.info.value = (f"{self.ext.n_samples:,} samples, {self.ext.n_tokens:,} tokens; dataset rows "
                           f"{int(rows.min()) if len(rows) else '–'}..{int(rows.max()) if len(rows) else '–'}")

    def plot(self) -> bool:
        """Draw the four plots for the current choices; errors show in the panel."""
        if self.ext is None:
            self.info.value = error_box("Pick an extraction first.")
            return False
        ext, hp, row, feature = self.ext, self.hook_point.value, self.row.value, self.feature.value
        kind = hp.rsplit(".", 1)[1]
        try:
            self.images["heatmap"].value = plots.to_png(plots.heatmap(ext, row, hp))
            self.images["norms"].value = plots.to_png(plots.layer_norms(ext, row, kind))
            column = plots.feature_column(ext, hp, feature)  # one scan of the store serves both plots
            self.images["histogram"].value = plots.to_png(plots.feature_histogram(ext, hp, feature, values=column))
            top = plots.top_tokens(ext, hp, feature, k=self.top_k.value, values=column)
            self.images["top_tokens"].value = plots.to_png(plots.top_tokens_figure(ext, hp, feature, top=top))
        except (ValueError, KeyError) as exc:
            self.info.value = error_box(html.escape(str(exc)))
            return False
        self.top_table.value = ("<table class='mistudio-top'><tr><th>value</th><th>row</th><th>pos</th>"
                                "<th>context</th></tr>" + "".join(
                                    f"<tr><td>{t['value']:.3f}</td><td>{t['row']}</td><td>{t['position']}</td>"
                                    f"<td>{html.escape(t['context'])}</td></tr>" for t in top) + "</table>")
        self.info.value = f"Plotted {html.escape(hp)}, row {row}, feature {feature}."
        return True
