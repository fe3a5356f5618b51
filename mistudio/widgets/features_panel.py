"""Features tab: feature dashboards in the notebook.

Choose an extraction and a hook point (raw, or an SAE's latents); the **feature table** lists every feature (id,
density, mean, mean when active, max, top tokens), sorted and filtered by density, a page at a time (one list
widget per page, whatever the number of features). Clicking a row opens the feature's **page** (density,
histogram, top and quantile-band examples, token means, logit effects, co-firing features, prev/next, the note);
**Find by token** lists the features that fire most on a token; **From text** runs the model on a prompt and shows
each token's top features; **Export** writes chosen pages as one HTML file or in Neuronpedia's layout, and the
store's hook point as a ``datasets`` dataset (an SAE's latents: sparse, each token's non-zero latents) or in
SAELens's cached-activations layout (raw hook points).

Slow work (statistics, a page, a prompt, an export) runs on one background thread at a time; the busy line says
what runs, and its result or error shows in the tab when it ends.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import numpy as np

from ..analysis import exports
from ..analysis.feature_page import correlated_title, feature_page_html, percent
from ..analysis.feature_view import _shade as shade
from ..analysis.feature_view import (display_pieces, piece_html, pieces_and_titles, store_key, token_label,
                                     tokenizer_scheme)
from ..analysis.features import (FeatureTable, base_hook_point, dropped_latents_of, export_pages, feature_hook_points,
                                 feature_page, features_for_token, is_latent, load_statistics, parse_features, set_note,
                                 token_labels)
from ..analysis.prompt import prompt_features
from ..errors import InputError
from ..extraction import Extraction
from ..workspace import Workspace
from .common import (PerThreadFlag, answers_no_request, error_box, esc, extraction_label, for_ui, guard,
                     note_box)

log = logging.getLogger("mistudio")

SORTS = (("density", "density"), ("mean", "mean"), ("mean when active", "mean_active"), ("max", "max"),
         ("feature", "feature"))
SECTIONS = ("Feature table", "Find by token", "From text", "Export")
N_CORRELATED = 10
N_PROMPT = 5
CSS = """<style>
.mistudio-ftable select, .mistudio-flist select, .mistudio-ptokens select{font-family:var(--jp-code-font-family,
 Menlo,Consolas,monospace);font-size:12px}
.mistudio-fhead{font-family:var(--jp-code-font-family,Menlo,Consolas,monospace);font-size:12px;white-space:pre;
 padding-left:6px;opacity:.75;font-weight:600}
.mistudio-busy{color:#0d6efd}
.mistudio-prompt .msfp-tok{white-space:pre;border-radius:2px;font-family:var(--jp-code-font-family,monospace)}
</style>"""
EXPORT_BUTTON = "210px"  # the export buttons: one width, the longest label ("Export SAELens cache") and its icon fit
NUMBER_WIDTH = 7  # characters of a number cell of the table: every row's columns line up
TABLE_HEADER = (f"{'feature':>7} " + " ".join(f"{name:>{NUMBER_WIDTH}}"
                                              for name in ("density", "mean", "active", "max")) + "   top tokens")


def _row(children: list, layout: W.Layout | None = None) -> W.HBox:
    """A row of the tab that wraps onto a second line where the window is too narrow for it."""
    layout = layout or W.Layout()
    layout.flex_flow = "row wrap"
    return W.HBox(children, layout=layout)


def _quoted(text: str) -> str:
    return "'" + text.replace("\n", "↵") + "'"


def _new_folder(typed: str, default: str) -> Path:
    """The folder a store export writes: it must not exist yet, or be empty (exports never overwrite one)."""
    path = Path(typed.strip() or default).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path} exists and is not an empty folder: type a new folder (a store export never "
                         "overwrites one)")
    return path


TOKENS_SHOWN = 23  # characters of top tokens a row shows: a row fits the list at ~1,000 px (the page has them all)


def cell(value: float, suffix: str = "") -> str:
    """A number in a cell of ``NUMBER_WIDTH`` characters, right-aligned (3 significant digits, fewer or an
    exponent when that is wider: ``0.000759`` is ``0.00076``, ``-0.000144`` is ``-0.0001``, ``12345.6`` is
    ``1.2e+04``)."""
    width = NUMBER_WIDTH - len(suffix)
    text = format(value, ".3g")
    for spec in (".2g", ".1g", ".0e"):
        if len(text) <= width:
            break
        text = format(value, spec)
    return f"{text + suffix:>{NUMBER_WIDTH}}"


def percent_cell(share: float) -> str:
    """A share in a number cell: :func:`~mistudio.analysis.feature_page.percent` (99.97%, never 100% of a share
    under 1), or where that would not fit, :func:`cell`'s shorter form (a tiny share: 3e-05%) or '<100%'."""
    text = percent(share)
    if len(text) <= NUMBER_WIDTH:
        return f"{text:>{NUMBER_WIDTH}}"
    return f"{'<100%':>{NUMBER_WIDTH}}" if share >= 0.99 else cell(100 * share, "%")


def table_label(row: dict) -> str:
    """One feature-table row as a fixed-width line (the list widget shows text, not HTML), short enough for a narrow
    window: its top tokens, named as every tab names a token (``top_token_labels``), cut at ``TOKENS_SHOWN``
    characters."""
    tokens = " ".join(row["top_token_labels"])
    tokens = tokens if len(tokens) <= TOKENS_SHOWN else tokens[:TOKENS_SHOWN - 1] + "…"
    return (f"{row['feature']:>7} {percent_cell(row['density'])} {cell(row['mean'])} {cell(row['mean_active'])} "
            f"{cell(row['max'])} {'✎' if row['note'] else ' '} {tokens}")


def default_hook_point(points: list[str]) -> str | None:
    """The hook point the tab opens on: an SAE's latents when the store has them (what an extraction with an SAE
    was for), else the last residual stream, else the last point."""
    for suffix in (".latents", "residual"):
        found = [p for p in points if p.endswith(suffix)]
        if found:
            return found[-1]
    return points[-1] if points else None


class FeaturesPanel(W.VBox):
    """The Features tab. ``on_open_row(extraction_id, hook_point, dataset_row, feature)`` is called by *Open row in
    Browse* (the Studio shows that row there); without it the button is hidden. ``load=False``: nothing is read
    until ``refresh()`` (the Studio calls it when the tab is opened)."""

    _quiet = PerThreadFlag()  # this thread rebuilds a list: its value changes are not a user's choice

    def __init__(self, workspace: Workspace, on_open_row: Callable[[str, str, int, int], None] | None = None,
                 page_size: int = 25, load: bool = True):
        self.workspace = workspace
        self.on_open_row = on_open_row
        self.page_size = int(page_size)
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._busy_what = ""
        self._queued: tuple | None = None  # a page to open once the running task ends (the last one asked for)
        self._loaded: tuple | None = None  # the store content (location, nonce, commit mark) the table shows
        self.ext: Extraction | None = None
        self.table: FeatureTable | None = None
        self.page: dict | None = None
        self.prompt_result: dict | None = None
        self.token_result: dict | None = None
        self.table_page = 0
        self.pending: tuple[str, Callable[[], None]] | None = None  # an export waiting for its confirmation
        wide = {"description_width": "86px"}

        # -- choosing what to look at
        self.extraction = W.Dropdown(description="Extraction", style=wide,  # as the Browse tab's: it fits narrow
                                     layout=W.Layout(width="auto", align_self="stretch", max_width="760px"))
        self.refresh_button = W.Button(description="Refresh list", icon="refresh", layout=W.Layout(width="auto"))
        self.hook_point = W.Dropdown(description="Hook point", style=wide, layout=W.Layout(width="auto",
                                                                                        min_width="300px"))
        self.hide_special = W.Checkbox(value=False, description="hide special tokens", indent=False,
                                       layout=W.Layout(width="auto"))
        self.one_per_document = W.Checkbox(value=False, description="top examples: one per document", indent=False,
                                           layout=W.Layout(width="auto"))
        self.busy = W.HTML()
        self.status = W.HTML()

        # -- the feature table
        self.sort = W.Dropdown(options=SORTS, value="density", description="Sort by", style=wide,
                               layout=W.Layout(width="250px"))
        self.descending = W.Checkbox(value=True, description="descending", indent=False, layout=W.Layout(width="auto"))
        self.density_min = W.BoundedFloatText(value=0.0, min=0.0, max=100.0, step=0.01, description="Density %",
                                              style=wide, layout=W.Layout(width="170px"))
        self.density_max = W.BoundedFloatText(value=100.0, min=0.0, max=100.0, step=0.01, description="to",
                                              style={"description_width": "20px"}, layout=W.Layout(width="110px"))
        self.noted_only = W.Checkbox(value=False, description="with a note", indent=False,
                                     layout=W.Layout(width="auto"))
        self.first_page_button = W.Button(icon="angle-double-left", tooltip="first page", layout=W.Layout(width="36px"))
        self.prev_page_button = W.Button(icon="angle-left", tooltip="previous page", layout=W.Layout(width="36px"))
        self.next_page_button = W.Button(icon="angle-right", tooltip="next page", layout=W.Layout(width="36px"))
        self.page_label = W.HTML()
        self.table_head = W.HTML(f'<div class="mistudio-fhead">{esc(TABLE_HEADER)}</div>')
        self.table_list = W.Select(options=[], rows=14, layout=W.Layout(width="auto", align_self="stretch"))
        self.table_list.add_class("mistudio-ftable")
        table_box = W.VBox([
            _row([self.sort, self.descending, self.density_min, self.density_max, self.noted_only]),
            _row([self.first_page_button, self.prev_page_button, self.next_page_button, self.page_label],
                   layout=W.Layout(align_items="center")),
            self.table_head, self.table_list])

        # -- find by token
        self.token = W.Text(description="Token", placeholder="␣Paris or ' Paris' (a leading space matters), or Paris",
                            style=wide, layout=W.Layout(width="420px"))
        self.find_button = W.Button(description="Find features", icon="search", button_style="info",
                                    layout=W.Layout(width="auto"))
        self.found_info = W.HTML()
        self.found_list = W.Select(options=[], rows=10, layout=W.Layout(width="auto", align_self="stretch"))
        self.found_list.add_class("mistudio-flist")
        search_box = W.VBox([_row([self.token, self.find_button]), self.found_info, self.found_list])

        # -- from text
        self.prompt = W.Textarea(placeholder="Type a prompt; the model runs on it live", description="Prompt",
                                 style=wide, layout=W.Layout(width="80%", height="64px"))
        self.run_button = W.Button(description="Run", icon="play", button_style="primary",
                                   layout=W.Layout(width="auto"))
        self.prompt_html = W.HTML()
        self.prompt_html.add_class("mistudio-prompt")
        self.prompt_tokens = W.Select(options=[], rows=8, layout=W.Layout(width="auto", align_self="stretch"))
        self.prompt_tokens.add_class("mistudio-ptokens")
        self.prompt_buttons = [W.Button(layout=W.Layout(width="auto", display="none")) for _ in range(N_PROMPT)]
        for button in self.prompt_buttons:
            button.add_class("mistudio-pfeature")
        prompt_box = W.VBox([_row([self.prompt, self.run_button], layout=W.Layout(align_items="flex-start")),
                             self.prompt_html, self.prompt_tokens,
                             _row([W.HTML("<b>Top features of this token:</b>&nbsp;"), *self.prompt_buttons],
                                  layout=W.Layout(align_items="center"))])

        # -- export
        self.export_features = W.Text(description="Features", placeholder="3, 17, 40-45 (empty: the open page)",
                                      style=wide, layout=W.Layout(width="420px"))
        self.use_table_page = W.Button(description="This table page", icon="list", layout=W.Layout(width="auto"),
                                       tooltip="the features listed on the feature table's current page")
        self.html_path = W.Text(value="feature-pages.html", description="HTML file", style=wide,
                                layout=W.Layout(width="420px"))
        self.html_button = W.Button(description="Export HTML", icon="file-code-o",
                                    layout=W.Layout(width=EXPORT_BUTTON))
        self.np_folder = W.Text(value="neuronpedia", description="Folder", style=wide, layout=W.Layout(width="420px"))
        self.np_model = W.Text(description="Model id", placeholder="Neuronpedia's id, e.g. gpt2-small", style=wide,
                               layout=W.Layout(width="300px"))
        self.np_source = W.Text(value="mistudio", description="Source set", style=wide,
                                layout=W.Layout(width="250px"))
        self.np_button = W.Button(description="Export Neuronpedia", icon="upload",
                                  layout=W.Layout(width=EXPORT_BUTTON))
        self.ds_path = W.Text(value="dataset", description="Folder", style=wide, layout=W.Layout(width="420px"))
        self.ds_button = W.Button(description="Export datasets", icon="table",
                                  layout=W.Layout(width=EXPORT_BUTTON))
        self.sl_path = W.Text(value="saelens-cache", description="Folder", style=wide, layout=W.Layout(width="420px"))
        self.sl_context = W.BoundedIntText(value=128, min=1, max=1_000_000, description="Context size", style=wide,
                                           layout=W.Layout(width="190px"))
        self.sl_button = W.Button(description="Export SAELens cache", icon="database",
                                  layout=W.Layout(width=EXPORT_BUTTON))
        self.confirm_text = W.HTML()
        self.confirm_button = W.Button(description="Export", button_style="warning", icon="check",
                                       layout=W.Layout(width="auto"))
        self.cancel_button = W.Button(description="Cancel", layout=W.Layout(width="auto"))
        self.confirm_box = W.VBox([self.confirm_text, _row([self.confirm_button, self.cancel_button])],
                                  layout=W.Layout(display="none"))
        self.export_info = W.HTML()
        export_box = W.VBox([
            _row([self.export_features, self.use_table_page]),
            W.HTML("<b>Feature pages</b>"), _row([self.html_path, self.html_button]),
            _row([self.np_folder, self.np_button]), _row([self.np_model, self.np_source]),
            W.HTML("<b>The whole store</b> (the hook point chosen above)"),
            _row([self.ds_path, self.ds_button]), _row([self.sl_path, self.sl_button]), self.sl_context,
            self.confirm_box, self.export_info])
        self.sections = W.Tab(children=[table_box, search_box, prompt_box, export_box], titles=SECTIONS)

        # -- the feature page
        self.feature = W.BoundedIntText(value=0, min=0, max=0, description="Feature", style=wide,
                                        layout=W.Layout(width="190px"))
        self.open_button = W.Button(description="Open", icon="folder-open", button_style="primary",
                                    layout=W.Layout(width="auto"))
        self.prev_button = W.Button(description="Previous", icon="arrow-left", layout=W.Layout(width="auto"))
        self.next_button = W.Button(description="Next", icon="arrow-right", layout=W.Layout(width="auto"))
        self.page_html = W.HTML()
        self.page_html.add_class("mistudio-feature-page")
        self.correlated_buttons = [W.Button(layout=W.Layout(width="auto", display="none"))
                                   for _ in range(N_CORRELATED)]
        for button in self.correlated_buttons:
            button.add_class("mistudio-correlated")
        self.correlated_label = W.HTML("<b>Co-firing:</b>&nbsp;")
        self.example = W.Dropdown(description="Example", style=wide, layout=W.Layout(width="60%"))
        self.browse_button = W.Button(description="Open row in Browse", icon="external-link",
                                      layout=W.Layout(width="auto", display="" if on_open_row else "none"))
        self.note = W.Textarea(description="Note", placeholder="What does this feature do? (saved in the store)",
                               style=wide, layout=W.Layout(width="70%", height="60px"))
        self.save_note_button = W.Button(description="Save note", icon="save", layout=W.Layout(width="auto"))
        self.note_status = W.HTML()
        self.page_tools = W.VBox([
            _row([self.correlated_label, *self.correlated_buttons], layout=W.Layout(align_items="center")),
            _row([self.example, self.browse_button]),
            _row([self.note, self.save_note_button, self.note_status], layout=W.Layout(align_items="flex-start"))],
            layout=W.Layout(display="none"))

        self._actions = [self.open_button, self.prev_button, self.next_button, self.find_button, self.run_button,
                         self.html_button, self.np_button, self.ds_button, self.sl_button, self.confirm_button,
                         *self.correlated_buttons, *self.prompt_buttons]
        self._wire()
        super().__init__([
            W.HTML(CSS + "<b>Features</b>"), _row([self.extraction, self.refresh_button]),
            _row([self.hook_point, self.hide_special, self.one_per_document], layout=W.Layout(align_items="center")),
            self.busy, self.status, self.sections,
            _row([self.feature, self.open_button, self.prev_button, self.next_button],
                   layout=W.Layout(align_items="center")),
            self.page_tools, self.page_html])
        self.add_class("mistudio-features")  # the browser test checks this panel's layout on its own
        if load:  # a Studio loads it when its tab is opened: statistics are a pass over the store
            self.refresh()

    # -- wiring ---------------------------------------------------------------------------------------------
    def _wire(self) -> None:
        def click(button: W.Button, fn: Callable[[], Any]) -> None:
            button.on_click(guard(self._say, lambda _: fn()))

        def change(widget: W.Widget, fn: Callable[[], Any]) -> None:
            def changed(event: dict) -> None:
                quiet = self._quiet
                log.debug("features panel: %s %r -> %r on %s%s", type(widget).__name__, event["old"], event["new"],
                          threading.current_thread().name, " (muted)" if quiet else "")
                if not quiet:
                    fn()

            widget.observe(guard(self._say, changed), "value")

        click(self.refresh_button, self.refresh)
        change(self.extraction, self._select_extraction)
        change(self.hook_point, self._select_hook_point)
        change(self.hide_special, self._render_page)
        change(self.one_per_document, lambda: self.open_feature(self.page["feature"]) if self.page else None)
        for widget in (self.sort, self.descending, self.density_min, self.density_max, self.noted_only):
            change(widget, self.arrange)
        click(self.first_page_button, lambda: self.show_table_page(0))
        click(self.prev_page_button, lambda: self.show_table_page(self.table_page - 1))
        click(self.next_page_button, lambda: self.show_table_page(self.table_page + 1))
        change(self.table_list, lambda: self.open_feature(self.table_list.value)
               if self.table_list.value is not None else None)
        click(self.find_button, self.find)
        change(self.found_list, lambda: self.open_feature(self.found_list.value)
               if self.found_list.value is not None else None)
        click(self.run_button, self.run_prompt)
        change(self.prompt_tokens, self._show_prompt_token)
        for i, button in enumerate(self.prompt_buttons):
            click(button, lambda i=i: self.open_feature(self._prompt_feature(i)))
        click(self.open_button, lambda: self.open_feature(self.feature.value))
        click(self.prev_button, lambda: self.open_feature(self._neighbours()[0])
              if self._neighbours()[0] is not None else None)
        click(self.next_button, lambda: self.open_feature(self._neighbours()[1])
              if self._neighbours()[1] is not None else None)
        self.feature.observe(lambda _: None if self.working else self._enable_navigation(), "value")
        for i, button in enumerate(self.correlated_buttons):
            click(button, lambda i=i: self.open_feature(self.page["correlated"][i]["feature"]))
        click(self.browse_button, self.open_in_browse)
        click(self.save_note_button, self.save_note)
        click(self.use_table_page, self._use_table_page)
        click(self.html_button, lambda: self.prepare_export("html"))
        click(self.np_button, lambda: self.prepare_export("neuronpedia"))
        click(self.ds_button, lambda: self.prepare_export("datasets"))
        click(self.sl_button, lambda: self.prepare_export("saelens"))
        click(self.confirm_button, self.confirm_export)
        click(self.cancel_button, self.cancel_export)

    def _say(self, text: str) -> None:
        self.status.value = text

    # -- background work ---------------------------------------------------------------------------------------
    @property
    def working(self) -> bool:
        """Whether a background task runs now (or one is about to: a queued one is started under the lock)."""
        with self._lock:
            thread = self._thread
        return thread is not None and thread.is_alive()

    def wait(self, timeout: float | None = 600) -> bool:
        """Wait for the background work (the running task and any queued after it); True when none runs any more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:  # a queued task's thread is made and started under it: never seen unstarted
                thread = self._thread
            if thread is None or not thread.is_alive():
                return not self.working
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                return not self.working

    def _run(self, what: str, work: Callable[[], Any], done: Callable[[Any], None],
             show: Callable[[str], None] | None = None, queue: bool = False) -> bool:
        """Run ``work()`` on a background thread (one at a time), then ``done(result)``; the busy line says
        ``what`` meanwhile, and an error shows in the tab (through ``show``, else the status line). While another
        task runs: with ``queue`` this one runs after it (a newer queued one replaces it: the last click wins),
        else it is refused (False, and a note says why)."""
        with self._lock:
            if self.working:
                log.debug("features panel: %s: %s", what, "queued" if queue else "refused (busy)")
                if queue:
                    self._queued = (what, work, done, show)
                    return True
                self.status.value = note_box(f"Still busy: {esc(self._busy_what)}. Try again when it is "
                                             "done.", colour="#fd7e14", background="#fff3e0")
                return False
            self._start(what, work, done, show)
        return True

    def _start(self, what: str, work: Callable[[], Any], done: Callable[[Any], None],
               show: Callable[[str], None] | None) -> None:
        log.debug("features panel: %s: started", what)
        self._busy_what = what
        self.busy.value = f'<span class="mistudio-busy">⏳ {esc(what)}…</span>'
        for button in self._actions:
            button.disabled = True
        self._thread = threading.Thread(target=self._work, args=(what, work, done, show or self._say), daemon=True,
                                        name="mistudio-features")
        self._thread.start()

    @answers_no_request
    def _work(self, what: str, work: Callable[[], Any], done: Callable[[Any], None],
              show: Callable[[str], None]) -> None:
        try:
            result = work()
            with self._lock:
                done(result)
            log.debug("features panel: %s: done", what)
        except Exception as exc:  # noqa: BLE001 - shown in the tab
            log.debug("features panel: %s: failed", what, exc_info=True)
            with self._lock:
                show(error_box(for_ui(exc)))
        finally:
            with self._lock:
                queued, self._queued = self._queued, None
                if queued is not None:
                    self._start(*queued)
                else:
                    self.busy.value = ""
                    for button in self._actions:
                        button.disabled = False
                    self._enable_navigation()
                    # not working from here on, though this thread lives a moment more: a click now runs (it was
                    # queued, and lost, while this thread still counted as working); last, so wait() means reset
                    self._thread = None

    def _neighbours(self) -> tuple[int | None, int | None]:
        """The features Previous and Next open: the open page's, else the Feature field's (None: no such one)."""
        if self.page is not None:
            return self.page["prev"], self.page["next"]
        if self.table is None:
            return None, None
        feature = self.feature.value
        return (feature - 1 if feature > 0 else None), (feature + 1 if feature + 1 < self.table.stats.d else None)

    def _enable_navigation(self) -> None:
        """Previous/Next only where there is such a feature."""
        before, after = self._neighbours()
        self.prev_button.disabled, self.next_button.disabled = before is None, after is None

    # -- extraction and hook point ---------------------------------------------------------------------------
    def refresh(self, select: str | None = None) -> None:
        """List the stores that hold data (completed, or with committed samples), newest first; the table is
        read again when the chosen store has changed since (a running job committed more rows)."""
        options = []
        for row in self.workspace.extractions().to_dict("records"):
            if row["status"] == "COMPLETED" or row["samples_committed"]:
                options.append((extraction_label(row), row["id"]))
        current = select or self.extraction.value
        ids = [v for _, v in options]
        self._quiet = True
        try:
            self.extraction.options = options
            self.extraction.value = current if current in ids else (ids[0] if ids else None)
        finally:
            self._quiet = False
        if current and current not in ids:
            self.status.value = note_box(f"Extraction {esc(current)} is no longer in the workspace; the list "
                                         "is up to date.", colour="#fd7e14", background="#fff3e0")
        if self.extraction.value != (self.ext.id if self.ext is not None else None):
            self._select_extraction()
        elif not ids:
            self.status.value = "No extraction with data yet: launch one in the Extract tab."
        elif self.table is not None and self._loaded != store_key(self.ext):  # more rows committed since
            self._select_hook_point()

    def _select_extraction(self) -> None:
        self.ext, self.table, self.page, self.prompt_result, self.token_result = None, None, None, None, None
        self._clear_views()
        if not self.extraction.value:
            self._quiet = True
            try:
                self.hook_point.options = []
            finally:
                self._quiet = False
            self.status.value = "No extraction with data yet: launch one in the Extract tab."
            return
        self.ext = self.workspace.open(self.extraction.value)
        points = feature_hook_points(self.ext)
        self._quiet = True
        try:
            self.hook_point.options = points
            self.hook_point.value = default_hook_point(points)
        finally:
            self._quiet = False
        self._select_hook_point()

    def _clear_views(self) -> None:
        self._quiet = True
        try:
            self.table_list.options, self.found_list.options, self.prompt_tokens.options = [], [], []
        finally:
            self._quiet = False
        self.page_html.value = self.prompt_html.value = self.found_info.value = self.page_label.value = ""
        self.page_tools.layout.display = "none"
        for button in self.prompt_buttons:
            button.layout.display = "none"

    def _select_hook_point(self) -> None:
        """Load the hook point's statistics (computed once per store, then cached) and paint the table."""
        self.table, self.page, self.token_result = None, None, None
        self._clear_views()
        ext, hp = self.ext, self.hook_point.value
        if ext is None or not hp:
            return
        self.status.value = ""

        def work() -> FeatureTable:
            return FeatureTable(ext, hp, load_statistics(ext, hp))

        def done(table: FeatureTable) -> None:
            if self.ext is not ext or self.hook_point.value != hp:
                return  # the choice changed meanwhile
            self.table = table
            self._loaded = store_key(ext)
            self.feature.max = max(0, table.stats.d - 1)
            self.feature.value = 0  # a number of the table before means nothing here
            self.arrange()
            self.status.value = (f"{esc(hp)}: {table.stats.d:,} features over {table.stats.n_tokens:,} "
                                 "tokens. Click a row to open its page.")

        self._run(f"Reading the statistics of {hp} (computed once per store, then cached in it)", work, done)

    # -- the table -----------------------------------------------------------------------------------------------
    def arrange(self) -> None:
        """Sort and filter the table as the controls say, and show its first page."""
        if self.table is None:
            return
        lo, hi = self.density_min.value / 100, self.density_max.value / 100
        if lo > hi:
            self.status.value = error_box(f"The density range starts at {self.density_min.value:g}% and ends at "
                                          f"{self.density_max.value:g}%: make the first number the smaller one.")
            return
        self.table.arrange(self.sort.value, self.descending.value, (lo, hi), self.noted_only.value)
        self.show_table_page(0)

    def show_table_page(self, index: int) -> None:
        """Show page ``index`` of the arranged table (clamped to the pages there are)."""
        if self.table is None:
            return
        pages = self.table.n_pages(self.page_size)
        self.table_page = min(max(0, int(index)), pages - 1)
        rows = self.table.page(self.table_page, self.page_size)
        self._quiet = True
        try:
            self.table_list.options = [(table_label(r), r["feature"]) for r in rows]
            self.table_list.value = None  # nothing chosen: a click on any row, the last one too, opens its page
        finally:
            self._quiet = False
        n, d = len(self.table), self.table.stats.d
        first = self.table_page * self.page_size
        shown = f"{first + 1:,}–{first + len(rows):,} of {n:,}" if rows else "no feature"
        kept = "" if n == d else f" (of {d:,}: filtered)"
        self.page_label.value = f"&nbsp;page {self.table_page + 1:,} of {pages:,} · {shown} features{kept}"
        self.first_page_button.disabled = self.prev_page_button.disabled = self.table_page == 0
        self.next_page_button.disabled = self.table_page >= pages - 1

    # -- the page ------------------------------------------------------------------------------------------------
    def open_feature(self, feature: Any) -> bool:
        """Open ``feature``'s page (in the background; queued after a running task, the last asked for wins);
        False when there is nothing to open it in."""
        ext, hp = self.ext, self.hook_point.value
        if ext is None or not hp:
            self.status.value = error_box("Pick an extraction first.")
            return False
        feature = int(feature)
        one_per_document = self.one_per_document.value

        def done(page: dict) -> None:
            if self.ext is not ext or self.hook_point.value != hp:
                log.debug("features panel: the page of feature %s is not shown: the choice changed", feature)
                return
            self.page = page
            self.feature.value = page["feature"]
            self.note.value = page["note"]
            self.note_status.value = ""
            self._render_page()
            self._page_tools()
            self._render_prompt()
            self.status.value = f"Feature {page['feature']:,} of {esc(hp)}."

        return self._run(f"Building the page of feature {feature:,}", lambda: feature_page(
            ext, hp, feature, one_per_document=one_per_document), done, queue=True)

    def _render_page(self) -> None:
        if self.page is not None:
            self.page_html.value = feature_page_html(self.page, hide_special=self.hide_special.value)

    def _page_tools(self) -> None:
        page = self.page
        basis = page.get("correlated_basis") or {}
        among = f" (top-{basis['per_token']} per token)" if basis.get("kind") == "top" else ""
        self.correlated_label.value = f"<b>Co-firing{esc(among)}:</b>&nbsp;"
        self.correlated_label.tooltip = correlated_title(page)
        for button, row in zip(self.correlated_buttons, page["correlated"] + [None] * N_CORRELATED):
            button.layout.display = "none" if row is None else ""
            if row is not None:
                button.description = f"{row['feature']} · {percent(row['fraction'])}"
                overall = f"; it fires on {percent(row['density'])} of all tokens" \
                    if row.get("density") is not None else ""
                button.tooltip = f"open feature {row['feature']}: {percent(row['fraction'])} " \
                                 f"({row['count']:,} tokens) = {correlated_title(page)}{overall}"
        scheme = page.get("scheme", "auto")
        options = []
        labelled = [("top", i, e) for i, e in enumerate(page["top"])] + [
            (f"q{100 * b['quantiles'][0]:g}–{100 * b['quantiles'][1]:g}%", i, e)
            for b in page["bands"] for i, e in enumerate(b["examples"])]
        for group, i, e in labelled:
            text = "".join(display_pieces(e["tokens"], scheme)).strip().replace("\n", " ")
            label = f"{group} {i + 1}: {e['value']:.3g} · row {e['dataset_row']:,} pos {e['position']} · {text[:70]}"
            options.append((label, (e["dataset_row"], e["position"])))
        self.example.options = options
        self.example.index = 0 if options else None
        self._enable_navigation()
        self.page_tools.layout.display = ""

    def open_in_browse(self) -> None:
        """Hand the chosen example's dataset row to the Studio's Browse tab (``on_open_row``)."""
        if self.page is None or self.example.value is None or self.on_open_row is None:
            return
        row, _position = self.example.value
        self.on_open_row(self.page["extraction"], self.page["hook_point"], int(row), int(self.page["feature"]))
        self.status.value = f"Dataset row {row:,} opened in Browse."

    def save_note(self) -> None:
        """Save the note of the open feature in the store."""
        if self.page is None or self.ext is None:
            self.note_status.value = error_box("Open a feature first.")
            return
        try:
            set_note(self.ext, self.page["hook_point"], self.page["feature"], self.note.value)
        except ValueError as exc:  # InputError: too long, a store we cannot write
            self.note_status.value = error_box(for_ui(exc))
            return
        self.page["note"] = self.note.value if self.note.value.strip() else ""
        self._render_page()
        self.note_status.value = note_box("Saved." if self.page["note"] else "Note removed.", colour="#198754",
                                          background="#e8f5e9")
        if self.table is not None:
            self.show_table_page(self.table_page)  # the ✎ mark

    # -- find by token -----------------------------------------------------------------------------------------
    def find(self) -> bool:
        """List the features that fire most on the typed token (its rows read, at most 256 of them); a token typed
        as the tabs name it (``'␣Paris'``: a visible space) reads as typed with the space (``' Paris'``)."""
        ext, hp, text = self.ext, self.hook_point.value, self.token.value
        if ext is None or not hp:
            self.status.value = error_box("Pick an extraction first.")
            return False
        stats = self.table.stats if self.table is not None else None

        def done(result: dict) -> None:
            self.token_result = result
            self._quiet = True
            try:
                self.found_list.options = [
                    (f"{r['feature']:>7}  mean {r['mean']:>9.3g}  fires on {100 * r['fire_fraction']:>5.1f}%"
                     + (f"  density {percent(r['density'])}" if r["density"] is not None else ""), r["feature"])
                    for r in result["features"]]
                self.found_list.value = None
            finally:
                self._quiet = False
            labels = token_labels(ext)
            matched = ", ".join(esc(labels[i]) for i in result["token_ids"][:8]) or "no token"
            if not result["token_ids"]:
                how = ("a word as it reads ('paris' or its case-insensitive forms; ' paris' for the word alone) or a "
                       "continuation piece as the tokenizer writes it ('##ing')"
                       if tokenizer_scheme(ext.tokenizer) == "wordpiece" else
                       "it as it reads in the text (' Paris' for the word after a space, 'Paris' for either)")
                self.found_info.value = error_box(f"No token reads {esc(_quoted(text))}: type {esc(how)}."
                                                  + _pieces_hint(result["pieces"], labels))
            elif not result["n_rows"]:
                self.found_info.value = note_box(f"{matched} never occurs in this extraction.")
            else:
                sampled = (f", a sample of {result['n_read']:,} read" if result["n_read"] < result["n_rows"] else "")
                self.found_info.value = (f"Tokens {matched}: {result['n_rows']:,} rows{sampled}. The features with "
                                         "the highest mean activation on them (click one to open its page):")

        return self._run(f"Reading the rows of {text!r}", lambda: features_for_token(ext, hp, text,
                                                                                     statistics=stats), done)

    # -- from text -----------------------------------------------------------------------------------------------
    def run_prompt(self) -> bool:
        """Run the model (and the SAE, for latents) on the prompt; list each token's top features."""
        ext, hp, text = self.ext, self.hook_point.value, self.prompt.value
        if ext is None or not hp:
            self.status.value = error_box("Pick an extraction first.")
            return False

        def done(result: dict) -> None:
            self.prompt_result = result
            scheme = tokenizer_scheme(ext.tokenizer)
            labels = [token_label(t, scheme) for t in result["tokens"]]
            self._quiet = True
            try:
                self.prompt_tokens.options = [
                    (f"{i:>4} {label:<16} " + "  ".join(f"{t['feature']}:{t['value']:.3g}" for t in top), i)
                    for i, (label, top) in enumerate(zip(labels, result["top"]))]
                self.prompt_tokens.value = None
            finally:
                self._quiet = False
            for button in self.prompt_buttons:
                button.layout.display = "none"
            self._render_prompt()
            cut = f" ({result['n_cut']:,} tokens past the maximum length left out)" if result["n_cut"] else ""
            self.status.value = (f"Ran the model on {len(result['tokens']):,} tokens{cut}: choose a token to see "
                                 "its top features.")

        return self._run("Running the model on the prompt (loaded once, then kept)",
                         lambda: prompt_features(ext, hp, text, k=N_PROMPT), done)

    def _show_prompt_token(self) -> None:
        if self.prompt_result is None or self.prompt_tokens.value is None:
            return
        top = self.prompt_result["top"][self.prompt_tokens.value]
        for button, entry in zip(self.prompt_buttons, top + [None] * N_PROMPT):
            button.layout.display = "none" if entry is None else ""
            if entry is not None:
                button.description = f"{entry['feature']} · {entry['value']:.3g}"
                button.tooltip = f"open feature {entry['feature']}"
        self._render_prompt()

    def _prompt_feature(self, i: int) -> int:
        return self.prompt_result["top"][self.prompt_tokens.value][i]["feature"]

    def _render_prompt(self) -> None:
        """The prompt's tokens, shaded by the open feature's values on them (else by each token's top value)."""
        result = self.prompt_result
        if result is None:
            self.prompt_html.value = ""
            return
        values = result["values"]
        same = self.page is not None and self.page["hook_point"] == result["hook_point"]
        column = values[:, self.page["feature"]] if same and self.page["feature"] < values.shape[1] else None
        shown = column if column is not None else np.array([t[0]["value"] if t else 0.0 for t in result["top"]])
        scale = float(np.nanmax(np.abs(shown))) if len(shown) else 1.0
        scheme = tokenizer_scheme(self.ext.tokenizer) if self.ext else "auto"
        pieces, titles = pieces_and_titles(result["tokens"], scheme)
        chosen = self.prompt_tokens.value
        spans = []
        for i, (piece, value, special) in enumerate(zip(pieces, shown, result["special"])):
            value = None if value is None or math.isnan(float(value)) else float(value)
            top = ", ".join(f"{t['feature']}: {t['value']:.3g}" for t in result["top"][i])
            style = shade(value, scale) + (";outline:2px solid currentColor" if i == chosen else "") + \
                (";opacity:.5" if special else "")
            spans.append(f'<span class="msfp-tok" style="{style}" title="{esc(titles[i])} · top: '
                         f'{esc(top)}">{piece_html(piece)}</span>')
        what = (f"shaded by feature {self.page['feature']:,}" if column is not None
                else "shaded by each token's top feature")
        self.prompt_html.value = (f'<div style="margin:4px 0"><small>{esc(result["hook_point"])}, {what}</small>'
                                  f'<div style="line-height:1.8">{"<wbr>".join(spans)}</div></div>')  # wraps

    # -- exports -------------------------------------------------------------------------------------------------
    def _use_table_page(self) -> None:
        if self.table is not None:
            rows = self.table.page(self.table_page, self.page_size)
            self.export_features.value = ", ".join(str(r["feature"]) for r in rows)

    def _chosen_features(self) -> list[int]:
        text = self.export_features.value.strip()
        if not text:
            if self.page is None:
                raise InputError("«features=''» names no feature: open a feature, or «pass features=» e.g. "
                                 "3, 17, 40-45")
            return [int(self.page["feature"])]
        if self.table is None:
            raise InputError("the feature table is not loaded yet: wait for it, then export")
        return parse_features(text, self.table.stats.d)

    def prepare_export(self, kind: str) -> None:
        """Say what the export will write (and what it replaces) and wait for *Export* to confirm it."""
        ext, hp = self.ext, self.hook_point.value
        if ext is None or not hp:
            self.export_info.value = error_box("Pick an extraction first.")
            return
        try:
            plan = self._export_plan(kind, ext, hp)
        except ValueError as exc:  # InputError, bad feature list
            self.pending = None  # another export's confirmation does not stay beside this one's error
            self.confirm_box.layout.display = "none"
            self.export_info.value = error_box(for_ui(exc))
            return
        message, action = plan
        self.pending = (kind, action)
        self.confirm_text.value = note_box(message)
        self.confirm_box.layout.display = ""
        self.export_info.value = ""

    def _export_plan(self, kind: str, ext: Extraction, hp: str) -> tuple[str, Callable[[], str]]:
        """(what the export will write, as HTML; the function that writes it and says what it wrote)."""
        if kind in ("html", "neuronpedia"):
            features = self._chosen_features()
            options = {"one_per_document": self.one_per_document.value}
            listed = ", ".join(map(str, features[:12])) + (" …" if len(features) > 12 else "")
            what = f"the pages of {len(features):,} feature(s) of {esc(hp)} ({esc(listed)})"
            plan = self._plan_html if kind == "html" else self._plan_neuronpedia
            return plan(ext, hp, features, options, what)
        if kind == "datasets":
            return self._plan_dataset(ext, hp)
        if is_latent(hp):
            raise InputError(f"SAELens's cache holds dense activations and {hp} holds SAE latents: choose "
                             f"{base_hook_point(hp)}, or write the latents with Export datasets")
        arr = ext.activations(hp)
        size = f"about {int(ext.committed_tokens()) * int(arr.shape[1]) * np.dtype(arr.dtype).itemsize / 1e6:,.1f} MB"
        path = _new_folder(self.sl_path.value, "saelens-cache")
        context = int(self.sl_context.value)
        return (f"Write {esc(hp)} ({size}) in SAELens's cached-activations layout, rows of {context:,} tokens, "
                f"to <code>{esc(path)}</code>.",
                lambda: f"Wrote {len(exports.to_saelens_cache(ext, hp, path, context_size=context)):,} rows of "
                        f"{context:,} tokens to <code>{esc(path)}</code> (SAELens: cached_activations_path).")

    def _plan_dataset(self, ext: Extraction, hp: str) -> tuple[str, Callable[[], str]]:
        """The store's hook point (raw, or an SAE's latents: sparse) as a Hugging Face ``datasets`` dataset."""
        path = _new_folder(self.ds_path.value, "dataset")
        tokens = int(ext.committed_tokens())
        if is_latent(hp):
            info = ext.latent_info(hp)
            index, values = ext.latent_arrays(hp)
            stored = tokens * info.width * (np.dtype(index.dtype).itemsize + np.dtype(values.dtype).itemsize)
            what = (f"the latents of {esc(hp)} (the SAE at <code>{esc(info.sae)}</code>, {esc(info.architecture)}, "
                    f"d_sae {info.d_sae:,}) of {tokens:,} tokens, each token's non-zero latents as lists of "
                    f"indices and values (the store keeps {info.width:,} slots a token, about {stored / 1e6:,.1f} "
                    "MB)")
        else:
            arr = ext.activations(hp)
            what = (f"{esc(hp)} of {tokens:,} tokens (about "
                    f"{tokens * int(arr.shape[1]) * np.dtype(arr.dtype).itemsize / 1e6:,.1f} MB of activations)")

        def write() -> str:
            dataset = exports.to_hf_dataset(ext, [hp], path=path)
            written = sum(Path(f["filename"]).stat().st_size for f in dataset.cache_files)
            latents = f", {exports.count_latents(dataset, hp):,} non-zero latents" if is_latent(hp) else ""
            return (f"Wrote {len(dataset):,} samples{latents}, {written / 1e6:,.1f} MB, to <code>{esc(path)}</code> "
                    "(<code>datasets.load_from_disk</code> opens it).")

        return f"Write {what} as a Hugging Face <code>datasets</code> dataset to <code>{esc(path)}</code>.", write

    def _plan_html(self, ext: Extraction, hp: str, features: list[int], options: dict,
                   what: str) -> tuple[str, Callable[[], str]]:
        path = Path(self.html_path.value.strip() or "feature-pages.html").expanduser().absolute()
        hide = self.hide_special.value

        def write() -> str:
            written = exports.export_html(export_pages(ext, hp, features, **options), path, hide_special=hide)
            return f"Wrote <code>{esc(written)}</code> ({len(features):,} pages; it opens offline in any browser)."

        replaces = " It replaces the file there." if path.exists() else ""
        return f"Write {what} to <code>{esc(path)}</code>, one self-contained HTML file.{replaces}", write

    def _plan_neuronpedia(self, ext: Extraction, hp: str, features: list[int], options: dict,
                          what: str) -> tuple[str, Callable[[], str]]:
        model_id, source = self.np_model.value.strip(), self.np_source.value.strip()
        if not model_id:
            raise InputError("'Model id' is empty: type the model's Neuronpedia id (e.g. gpt2-small)")
        folder = Path(self.np_folder.value.strip() or "neuronpedia").expanduser().absolute()
        target = folder / model_id / f"{hp.split('.')[1] if hp.startswith('layers.') else '?'}-{source}"

        dropped = dropped_latents_of(ext, hp)

        def write() -> str:
            root = exports.export_neuronpedia(export_pages(ext, hp, features, **options), folder, model_id, source,
                                              tokenizer=ext.tokenizer, overwrite=True, allow_dropped=bool(dropped),
                                              n_layers=int(ext.record.model.n_layers or 0))
            return f"Wrote <code>{esc(root)}</code> ({len(features):,} features, Neuronpedia's bulk-import layout)."

        replaces = " It replaces the export there." if target.exists() and any(target.iterdir()) else ""
        narrow = (f" <b>The store left out {dropped:,} firing latents for want of width</b>: the densities and "
                  "histograms count each token's largest latents only, and Neuronpedia shows them as exact (the "
                  "source's notes will say so; extract again with a wider Latent width to export exact ones)."
                  if dropped else "")
        return (f"Write {what} in Neuronpedia's bulk-import layout under <code>{esc(target)}</code>.{replaces}"
                f"{narrow}", write)

    def confirm_export(self) -> bool:
        """Run the export waiting for confirmation (in the background)."""
        if self.pending is None:
            return False
        kind, action = self.pending
        self.pending = None
        self.confirm_box.layout.display = "none"

        def done(message: str) -> None:
            self.export_info.value = note_box(message, colour="#198754", background="#e8f5e9")

        def work() -> str:
            try:
                return action()
            except Exception:
                self.export_info.value = ""
                raise

        return self._run(f"Exporting ({kind})", work, done, show=self._export_say)

    def _export_say(self, text: str) -> None:
        self.export_info.value = text

    def cancel_export(self) -> None:
        self.pending = None
        self.confirm_box.layout.display = "none"
        self.export_info.value = "Export cancelled."


def _pieces_hint(pieces: list[int], labels: list[str]) -> str:
    """Where the tokenizer splits a typed text into pieces (a word is often several): which, to find by one."""
    if not pieces:
        return ""
    distinct = list(dict.fromkeys(pieces))
    shown = ", ".join(esc(_quoted(labels[i])) for i in distinct[:8]) + (", ..." if len(distinct) > 8 else "")
    return f" The tokenizer reads it as {len(pieces)} pieces, {shown}: find by one of them."
