"""Train tab: train a sparse autoencoder on a stored extraction as a background job, watch its loss, L0, explained
variance and dead latents live, Cancel / Retry / Resume it, read its evaluation, and extract with it in one click.

Job events arrive on the runner's thread: they only set widget values; the plot is drawn (throttled) on a timer
thread into an Image widget, never through an Output widget.
"""
from __future__ import annotations

import math
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import ipywidgets as W
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from ..analysis.plots import to_png
from ..analysis.sae_training import FIELD_HELP, TrainConfig
from ..errors import InputError, render
from ..storage.metadata import LIVE_STATES, can_resume
from ..training import TrainingJob, list_trainings, make_config, submit_training, training_job
from ..workspace import Workspace
from .common import (PLAIN_ERRORS, ago, answers_no_request, badge, breakable, duration, error_box, esc,
                     extraction_label, for_ui, note_box, short_id, studio_names, stylesheet)

ARCHITECTURES = (("top-k", "topk"), ("ReLU", "standard"), ("JumpReLU", "jumprelu"))
SPARSITY_FIELD = {"topk": "k", "standard": "l1_coefficient", "jumprelu": "l0_coefficient"}
# how the tab names each setting in messages: (name, label)
LABELS = {"extraction": "Extraction", "hook_point": "Hook point", "architecture": "Architecture",
          "d_sae": "Latents (d_sae)", "expansion_factor": "Expansion ×", "k": "k (per token)",
          "l1_coefficient": "L1 coefficient", "l0_coefficient": "L0 coefficient", "lr": "Learning rate",
          "batch_size": "Batch (tokens)", "n_tokens": "Tokens", "epochs": "Epochs"}
RUN_HEADERS = ("status", "run", "extraction", "hook point", "SAE", "step", "EV", "L0", "dead", "age", "")
# The runs grid's tracks: eleven columns where the panel is wide enough (about 980 px), else each run on two lines
# (status, run, extraction, hook point, SAE over two tracks / step, EV, L0, dead, age, Show), so that no cell is cut
# and Show stays in view from ~480 px up (a file browser open, a split view): a container query on the panel's own
# width, as the Jobs grid does. Cells wrap (at most three lines, the whole text in the tooltip).
TRAIN_STYLE = """
.mistudio-train-panel { container-type: inline-size; }
.mistudio-train-panel .mistudio-train-runs { display: grid; gap: 3px 8px; align-items: center; overflow: visible;
  grid-template-columns: 96px 112px minmax(104px, 1fr) minmax(110px, 1.2fr) minmax(96px, 1fr) 92px 48px 48px 48px
    64px 56px; }
.mistudio-train-panel .mistudio-train-runs > * { min-width: 0; }
.mistudio-train-runs .mistudio-cell { white-space: normal; overflow-wrap: anywhere; line-height: 1.3;
  display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden; }
@container (max-width: 979px) {
  .mistudio-train-panel .mistudio-train-runs { grid-template-columns: minmax(88px, 1fr) minmax(96px, 1fr)
    minmax(56px, 1fr) minmax(56px, 1fr) minmax(56px, 0.8fr) minmax(60px, 0.8fr); row-gap: 2px; }
  .mistudio-train-panel .mistudio-train-runs .mistudio-wide { grid-column: span 2; }
  .mistudio-train-panel .mistudio-train-runs .mistudio-first { border-top: 1px solid var(--jp-border-color2, #ddd);
    padding-top: 3px; }
}
"""
MAX_RUNS = 40
PLOT_EVERY_S = 1.0
CURVES = (("loss", "loss", True), ("l0", "L0 (latents per token)", False),
          ("explained_variance", "explained variance", False), ("dead_fraction", "dead latents (fraction)", False))


def ui_error(exc: BaseException | str) -> str:
    """An error as the tab says it (escaped HTML): the form's labels for settings, the Studio's for the rest."""
    template = getattr(exc, "template", None) or str(exc)
    names = {**studio_names(), **{name: (name, label) for name, label in LABELS.items()}}
    return for_ui(render(template, "studio", names))


def curves_figure(history: list[dict]) -> Figure:
    """Loss (log scale), L0, explained variance and dead fraction against the step: one row of small panels.
    Few ticks and a fixed layout: it is redrawn while the run trains, so it must draw fast."""
    fig = Figure(figsize=(9.0, 2.2))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.86, wspace=0.32)
    steps = [h.get("step", 0) for h in history]
    for i, (key, title, log_scale) in enumerate(CURVES):
        ax = fig.add_subplot(1, len(CURVES), i + 1)
        points = [(s, h[key]) for s, h in zip(steps, history) if isinstance(h.get(key), (int, float))
                  and math.isfinite(h[key]) and (h[key] > 0 or not log_scale)]
        if key == "dead_fraction" and not points and history and history[-1].get("dead_window"):
            title = f"dead latents: from {_compact(history[-1]['dead_window'])} tokens"  # none before its window
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], color="#0d6efd", linewidth=1.2,
                    marker="o" if len(points) == 1 else None, markersize=4)  # one report: a dot, not nothing
            ax.set_title(f"{title}: {points[-1][1]:.3g}", fontsize=9)
        else:
            ax.set_title(title, fontsize=9)
        if log_scale and points:
            ax.set_yscale("log")
            _log_ticks(ax, min(p[1] for p in points), max(p[1] for p in points))
        else:
            ax.yaxis.set_major_locator(MaxNLocator(4))
        if key in ("explained_variance", "dead_fraction"):  # with a margin: a fraction of 0 is a line above the axis
            low = min(0.0, *(p[1] for p in points)) if points else 0.0
            margin = 0.04 * (1.0 - low)
            ax.set_ylim(low - margin, 1.0 + margin)
        if len(set(steps)) > 1:  # every panel spans the run's steps (dead latents are counted from a later one)
            first, last = min(steps), max(steps)
            ax.set_xlim(first - 0.03 * (last - first), last + 0.03 * (last - first))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.tick_params(labelsize=7)
    return fig


def _log_ticks(ax: Any, low: float, high: float) -> None:
    """Numbers on a log axis whatever the range: powers of ten only label a range that spans several, so a loss
    within one decade (the usual case once training settles) gets plain ticks (520, 540, 560), one within two
    decades 1-3-10-30 steps, and a wider one the powers of ten."""
    if high < 100 * low:
        locator = MaxNLocator(4) if high < 10 * low else LogLocator(subs=(1.0, 3.0))
        ax.yaxis.set_major_locator(locator)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:.3g}"))
    else:
        ax.yaxis.set_major_locator(LogLocator(numticks=4))


def _steps(step: Any, total: Any) -> str:
    step = int(step or 0)
    return f"{step:,} / {int(total):,}" if total else f"{step:,}"


def _compact(n: int) -> str:
    """A count short enough for a small panel's title: 960,000 is 960k, 1,500,000 1.5M."""
    for size, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _dead_over(figures: dict) -> str:
    """What the training's dead fraction counts (the evaluation's counts the stored rows, with the final SAE)."""
    window = figures.get("dead_window")
    return f" (no firing in the last {_compact(window)} training tokens)" \
        if window and figures.get("dead_fraction") is not None else ""


def _dead(figures: dict) -> str:
    """The dead fraction, or when it will be known: no latent counts as dead before the run's dead window."""
    if figures.get("dead_fraction") is None and figures.get("dead_window"):
        return f"– (counted from {figures['dead_window']:,} tokens)"
    return _number(figures.get("dead_fraction"))


def _number(value: Any, digits: int = 3) -> str:
    return "–" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.{digits}g}"


def resumable(job: TrainingJob | None) -> bool:
    """Resume can succeed: a cancelled run, or a failure whose record offers it (never a bad setting)."""
    return job is not None and can_resume(job.status, job.error)


class TrainPanel(W.VBox):
    """The Train tab. ``on_extract_with_sae(arguments)`` receives ``{"saes": {hook point: folder}, "model": ...,
    "dataset": ..., "layers": [...], "hooks": [...]}`` (what the Extract tab's ``show_arguments`` takes) when the
    user clicks "Extract with this SAE"; ``options`` go to every submit (e.g. ``timeout_s``, ``evaluate``)."""

    def __init__(self, workspace: Workspace, on_extract_with_sae: Callable[[dict], None] | None = None,
                 **options: Any):
        self.workspace = workspace
        self.on_extract_with_sae = on_extract_with_sae
        self.options = options
        self.job: TrainingJob | None = None
        self.history: list[dict] = []
        self.plot_every_s = PLOT_EVERY_S
        self.runs: list[dict] = []
        self._extraction_rows: dict[str, dict] = {}  # COMPLETED extractions by id (the form's choices)
        self.step_cells: dict[str, W.HTML] = {}  # run id -> its step cell in the table (moved by progress events)
        self._lock = threading.RLock()
        self._drawn_at = 0.0
        self._plot_timer: threading.Timer | None = None
        self._drawing = threading.Lock()
        self._render_s = 0.0  # how long the last drawing took
        self._filling = False  # show_settings is filling the form: no unit conversion
        style, wide = {"description_width": "130px"}, W.Layout(width="440px")
        self.extraction = W.Dropdown(options=[], description="Extraction", style={"description_width": "72px"},
                                     layout=W.Layout(width="auto", max_width="760px"),  # as Browse's: fits narrow
                                     tooltip="a COMPLETED extraction of this workspace: when it was made, its "
                                             "model, dataset and hook points")
        self.hook_point = W.Dropdown(options=[], description="Hook point", style=style, layout=wide)
        self.architecture = W.Dropdown(options=ARCHITECTURES, value="topk", description="Architecture", style=style,
                                       tooltip="top-k: exactly k latents per token; ReLU: an L1 penalty; JumpReLU: "
                                               "learned thresholds and an L0 penalty")
        self.size_by = W.Dropdown(options=(("expansion ×", "expansion_factor"), ("d_sae", "d_sae")),
                                  value="expansion_factor", description="Size by", style=style,
                                  layout=W.Layout(width="260px"))
        self.size = W.IntText(value=8, description=LABELS["expansion_factor"], style=style,
                              tooltip="latents = expansion × the hook point's width, or d_sae latents")
        self.sparsity = {"k": W.IntText(value=32, description=LABELS["k"], style=style, tooltip=FIELD_HELP["k"]),
                         "l1_coefficient": W.FloatText(value=5.0, description=LABELS["l1_coefficient"], style=style,
                                                       tooltip=FIELD_HELP["l1_coefficient"]),
                         "l0_coefficient": W.FloatText(value=1.0, description=LABELS["l0_coefficient"], style=style,
                                                       tooltip=FIELD_HELP["l0_coefficient"])}
        self.lr = W.FloatText(value=3e-4, description=LABELS["lr"], style=style, tooltip=FIELD_HELP["lr"])
        self.batch_size = W.IntText(value=4096, description=LABELS["batch_size"], style=style,
                                    tooltip=FIELD_HELP["batch_size"])
        self.length_by = W.Dropdown(options=(("epochs", "epochs"), ("tokens", "n_tokens")), value="epochs",
                                    description="Train for", style=style, layout=W.Layout(width="260px"),
                                    tooltip=f"epochs: {FIELD_HELP['epochs']}; tokens: {FIELD_HELP['n_tokens']}")
        self.length = W.FloatText(value=1.0, description=LABELS["epochs"], style=style)
        self.launch_button = W.Button(description="Launch training", icon="play", button_style="primary",
                                      layout=W.Layout(width="auto"))
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="auto"))
        self.busy = W.HTML()
        self.message = W.HTML()
        self.status = W.HTML("<small>No training run yet: choose an extraction and Launch.</small>")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", layout=W.Layout(width="440px"))
        self.metrics = W.HTML()
        self.plot = W.Image(format="png", layout=W.Layout(max_width="100%", display="none"))
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True, layout=W.Layout(width="auto"),
                                      tooltip="stop before the next step; a checkpoint keeps what was trained")
        self.retry_button = W.Button(description="Retry", icon="redo", disabled=True, layout=W.Layout(width="auto"),
                                     tooltip="a new run with the form as it is now, linked to this one")
        self.resume_button = W.Button(description="Resume", icon="forward", disabled=True,
                                      layout=W.Layout(width="auto"), tooltip="continue this run from its checkpoint")
        self.evaluation = W.HTML()
        self.extract_button = W.Button(description="Extract with this SAE", icon="magic", button_style="success",
                                       disabled=True, layout=W.Layout(width="auto", display=""
                                                                      if on_extract_with_sae else "none"),
                                       tooltip="fill the Extract tab: this SAE's latents at its hook point, the "
                                               "extraction's model and dataset")
        self.table = W.GridBox(layout=W.Layout(width="100%"))  # tracks: TRAIN_STYLE (two layouts by width)
        self.table.add_class("mistudio-train-runs")
        self.empty = W.HTML()

        self.extraction.observe(lambda _c: self._guarded(self._show_hook_points), "value")
        self.architecture.observe(lambda _c: self._show_sparsity(), "value")
        self.size_by.observe(lambda _c: self._label_size(), "value")
        self.length_by.observe(self._label_length, "value")
        for button, action in ((self.launch_button, self.launch), (self.refresh_button, self.refresh),
                               (self.cancel_button, self.cancel), (self.retry_button, self.retry),
                               (self.resume_button, self.resume), (self.extract_button, self.extract_with_sae)):
            button.on_click(lambda _b, a=action: a())
        form = W.VBox([W.HBox([self.extraction, self.refresh_button], layout=W.Layout(flex_flow="row wrap")),
                       self.hook_point, self.architecture,
                       W.HBox([self.size_by, self.size]), W.HBox(list(self.sparsity.values())),
                       W.HBox([self.lr, self.batch_size]), W.HBox([self.length_by, self.length]),
                       W.HBox([self.launch_button, self.busy])])
        live = W.VBox([self.status, self.progress, self.metrics, self.plot,
                       W.HBox([self.cancel_button, self.retry_button, self.resume_button, self.extract_button]),
                       self.evaluation])
        own_style = W.HTML(f"<style>{TRAIN_STYLE}</style>", layout=W.Layout(display="none"))
        super().__init__([stylesheet(), own_style, W.HTML("<b>Train a sparse autoencoder</b>"), form, self.message,
                          live, W.HTML("<b>Training runs</b>"), self.empty, self.table])
        self.add_class("mistudio-panel")
        self.add_class("mistudio-train-panel")
        self._show_sparsity()
        workspace.subscribe(self._on_event)  # every training job of the folder: live rows, the watched run
        self.refresh()

    # -- small helpers ----------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.message.value = text

    def _guarded(self, action: Callable[[], Any]) -> Any:
        """Run a button's action; any error is shown in the tab (never only logged)."""
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - the point: the user sees it here
            kind = PLAIN_ERRORS["VALIDATION"] if isinstance(exc, InputError) else type(exc).__name__
            self._say(error_box(f"<b>{esc(kind)}</b>: {ui_error(exc)}"))
            return None

    @contextmanager
    def _busy(self, text: str) -> Iterator[None]:
        """Show that a slow action runs: buttons off, a note next to Launch."""
        buttons = (self.launch_button, self.retry_button, self.resume_button, self.refresh_button)
        before = [b.disabled for b in buttons]
        for b in buttons:
            b.disabled = True
        self.busy.value = f'<span class="mistudio-busy">⏳ {esc(text)}…</span>'
        try:
            yield
        finally:
            self.busy.value = ""
            for b, disabled in zip(buttons, before):
                b.disabled = disabled
            self._update_buttons()

    def _show_sparsity(self) -> None:
        chosen = SPARSITY_FIELD[self.architecture.value]
        for name, widget in self.sparsity.items():
            widget.layout.display = "" if name == chosen else "none"

    def _label_size(self) -> None:
        self.size.description = LABELS[self.size_by.value]

    def _label_length(self, change: dict | None = None) -> None:
        """Name the length field, and carry its value over to the other unit (1 epoch of a 2,996-token store is
        2,996 tokens, not 1), counted by the chosen extraction's tokens (every stored row; special tokens, which
        training may leave out, included: an estimate the Launch checks)."""
        self.length.description = LABELS[self.length_by.value]
        if change is None or change.get("old") == change.get("new") or self._filling:
            return
        row = self._extraction_rows.get(self.extraction.value)
        tokens = int(row.get("tokens_total") or 0) if row else 0
        if change["new"] == "n_tokens":
            self.length.value = float(round(self.length.value * tokens)) if tokens else float(TrainConfig().batch_size)
        else:
            self.length.value = round(self.length.value / tokens, 3) if tokens else 1.0

    # -- the form ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the workspace: COMPLETED extractions for the form, training runs for the table."""
        self._guarded(self._refresh)

    def _refresh(self) -> None:
        with self._busy("Reading the workspace"):
            rows = [r for r in self.workspace.extractions().to_dict("records") if r["status"] == "COMPLETED"]
            self._extraction_rows = {r["id"]: r for r in rows}
            chosen = self.extraction.value
            self.extraction.options = [(extraction_label(r), r["id"]) for r in rows]
            ids = list(self._extraction_rows)
            self.extraction.value = chosen if chosen in self._extraction_rows else (ids[0] if ids else None)
            self._show_hook_points()
            self.refresh_runs()

    def _show_hook_points(self) -> None:
        row = self._extraction_rows.get(self.extraction.value)
        points = [p.strip() for p in (row["hook_points"] if row else "").split(",") if p.strip()]
        chosen = self.hook_point.value
        self.hook_point.options = points
        self.hook_point.value = chosen if chosen in points else (points[0] if points else None)

    def settings(self) -> dict:
        """The form as TrainConfig fields (the architecture's sparsity setting only)."""
        architecture = self.architecture.value
        sparsity = SPARSITY_FIELD[architecture]
        values: dict[str, Any] = {"architecture": architecture, self.size_by.value: self.size.value,
                                  sparsity: self.sparsity[sparsity].value, "lr": self.lr.value,
                                  "batch_size": self.batch_size.value}
        length = self.length.value
        if self.length_by.value == "n_tokens":
            if length != int(length):
                raise InputError(f"«n_tokens={length:g}» must be a whole number of tokens", param="n_tokens")
            length = int(length)
        values[self.length_by.value] = length
        return values

    def show_settings(self, config: dict, extraction_id: str | None = None, hook_point: str | None = None) -> None:
        """Fill the form from a run's TrainConfig (and its extraction and hook point when they are listed)."""
        if extraction_id in self._extraction_rows:
            self.extraction.value = extraction_id
        if hook_point in self.hook_point.options:
            self.hook_point.value = hook_point
        defaults = TrainConfig()
        self.architecture.value = config.get("architecture", "topk")
        if config.get("d_sae"):
            self.size_by.value, self.size.value = "d_sae", int(config["d_sae"])
        else:
            self.size_by.value, self.size.value = "expansion_factor", int(config.get("expansion_factor") or 8)
        for name, widget in self.sparsity.items():
            widget.value = config.get(name, getattr(defaults, name))
        self.lr.value = config.get("lr", defaults.lr)
        self.batch_size.value = config.get("batch_size", defaults.batch_size)
        self._filling = True  # the run's own length, not one converted from the form's
        try:
            if config.get("n_tokens"):
                self.length_by.value, self.length.value = "n_tokens", float(config["n_tokens"])
            else:
                self.length_by.value, self.length.value = "epochs", float(config.get("epochs") or 1.0)
        finally:
            self._filling = False

    # -- actions: each shows its error in the tab and returns None when it fails ------------------------
    def launch(self) -> TrainingJob | None:
        """Check the form and start a run on the chosen extraction and hook point (nothing is created when a check
        fails: the message says what to change)."""
        return self._guarded(self._launch)

    def retry(self) -> TrainingJob | None:
        """A new run linked to the watched one, with what the form changed (and a failure's suggestion)."""
        return self._guarded(self._retry)

    def resume(self) -> TrainingJob | None:
        """Continue the watched run from its checkpoint."""
        return self._guarded(self._resume)

    def extract_with_sae(self) -> dict | None:
        """Hand the watched run's SAE, model and dataset to the Studio's callback (the Extract tab)."""
        return self._guarded(self._extract_with_sae)

    def _launch(self) -> TrainingJob:
        self._say("")
        if self.extraction.value is None:
            raise InputError("choose a COMPLETED extraction first (the Extract tab makes one)", param="extraction")
        if self.hook_point.value is None:
            raise InputError("choose a hook point", param="hook_point")
        with self._busy("Checking the settings and queueing the run"):
            job = submit_training(self.workspace, self.extraction.value, self.hook_point.value, **self.settings(),
                                  **self.options)
        self.watch(job)
        return job

    def cancel(self) -> None:
        """Stop the watched run before its next step (a checkpoint keeps what was trained)."""
        if self.job is not None and self.job.live:
            self.job.cancel()
            self.cancel_button.disabled = True
            self.status.value = f"{badge('CANCELLING')} stopping before the next step; a checkpoint is written…"

    def _retry(self) -> TrainingJob | None:
        if self.job is None:
            return self._launch()
        with self._busy("Checking the settings and queueing the retry"):
            job = self.job.retry(**{**self._changes(self.job), **self.options})
        self.watch(job)
        return job

    def _changes(self, job: TrainingJob) -> dict:
        """The form's settings that differ from the run's (the run's own values stand where the form agrees)."""
        record = job.record
        new = make_config(record.config, self.settings()).to_dict()
        changes = {k: v for k, v in new.items() if record.config.get(k) != v}
        if self.hook_point.value is not None and self.hook_point.value != record.hook_point:
            changes["hook_point"] = self.hook_point.value
        if self.extraction.value is not None and self.extraction.value != record.extraction.id:
            changes["extraction"] = self.extraction.value
        return changes

    def _resume(self) -> TrainingJob | None:
        if not resumable(self.job):
            raise InputError("nothing to resume: Retry starts a new run (with the form corrected)")
        with self._busy("Resuming from the checkpoint"):
            job = self.job.resume()
        self.watch(job)
        return job

    def _extract_with_sae(self) -> dict | None:
        if self.job is None or self.on_extract_with_sae is None:
            return None
        arguments = self.job.extract_arguments(partial=True)
        self.on_extract_with_sae(arguments)
        missing = "" if "dataset" in arguments else (" The extraction was made from in-memory data: choose the "
                                                     "dataset in the Dataset tab.")
        self._say(note_box(f"The Extract tab now extracts with SAE {esc(self.job.id)} at "
                           f"{esc(self.job.hook_point)}.{esc(missing)}"))
        return arguments

    # -- watching a run ---------------------------------------------------------------------------
    def watch(self, job: TrainingJob) -> None:
        """Show a run: its settings in the form, its history in the plot, its state live."""
        with self._lock:
            another = self.job is None or self.job.id != job.id
            self.job = job
            self.history = job.history()
            record = job.record
        if another:  # what the tab said of the run shown before (e.g. "the Extract tab now extracts with ...")
            self._say("".join(note_box(ui_error(w)) for w in job.warning_templates()))
        self.show_settings(record.config, record.extraction.id, record.hook_point)
        self._show_state(record.status.value)
        self._draw_now()
        self.refresh_runs()

    def _show_state(self, status: str) -> None:
        job = self.job
        if job is None:
            return
        record = job.record
        progress = record.progress
        self.progress.max = max(1, progress.total_steps or 1)
        self.progress.value = min(progress.step, self.progress.max)
        self.progress.bar_style = {"COMPLETED": "success", "FAILED": "danger", "CANCELLED": "warning"}.get(status,
                                                                                                         "info")
        where = f"{esc(job.id)} · {esc(record.hook_point)} of {esc(record.extraction.id)}"
        if status == "FAILED" and record.error is not None:
            error = record.error
            plain = PLAIN_ERRORS.get(error.error_type, error.error_type)
            template = (error.model_extra or {}).get("error_template") or error.error_message
            self.status.value = f"{badge(status)} {where}"
            self._say(error_box(f"<b>{esc(plain)}</b> ({esc(error.error_type)}): {ui_error(template)}"))
            suggested = error.suggested_retry_params or {}
            if suggested:
                self.show_settings({**record.config, **suggested})
        elif status == "CANCELLED":
            self.status.value = (f"{badge(status)} {where}: stopped at step {progress.step:,}. Resume continues from "
                                 "its checkpoint.")
        elif status == "COMPLETED":
            seconds = record.timings.train_seconds
            self.status.value = (f"{badge(status)} {where}: {progress.step:,} steps, {progress.tokens:,} tokens in "
                                 f"{duration(seconds)}")
        else:
            self.status.value = f"{badge(status)} {where}"
        self._show_metrics(record.metrics, live=status in LIVE_STATES)
        self.evaluation.value = self._evaluation_html(record.evaluation) if status == "COMPLETED" else ""
        self._update_buttons()

    def _update_buttons(self) -> None:
        job = self.job
        try:
            status = job.status if job is not None else None
        except Exception:  # noqa: BLE001 - its folder is gone
            status = None
        live = status in LIVE_STATES  # by the state: an end state is heard just before the runner lets the job go
        self.cancel_button.disabled = not live
        self.retry_button.disabled = job is None or live
        self.resume_button.disabled = live or not resumable(job)
        self.extract_button.disabled = status != "COMPLETED" or self.on_extract_with_sae is None
        self.launch_button.disabled = False

    def _show_metrics(self, figures: dict, live: bool = True) -> None:
        """The metrics line; a run that ended (cancelled, failed, completed) has no ETA."""
        if not figures:
            self.metrics.value = ""
            return
        rate, eta = figures.get("tokens_per_s"), figures.get("eta_s")
        eta_words = f" · ETA {duration(eta)}" if live else ""
        self.metrics.value = (
            f"<span class='mistudio-train-metrics'>step {figures.get('step', 0):,} / {figures.get('total_steps', 0):,}"
            f" · loss {_number(figures.get('loss'))} · L0 {_number(figures.get('l0'))} · explained variance "
            f"{_number(figures.get('explained_variance'))} · dead{_dead_over(figures)} {_dead(figures)} · "
            f"{rate or 0:,.0f} tokens/s{eta_words}</span>")

    @staticmethod
    def _evaluation_html(evaluation: dict | None) -> str:
        if not evaluation:
            return note_box("Not evaluated (evaluate=False).")
        rows = [("explained variance", evaluation.get("explained_variance")), ("L0", evaluation.get("l0")),
                ("dead fraction", evaluation.get("dead_fraction")), ("MSE per element", evaluation.get("mse"))]
        if "ce_clean" in evaluation:
            over = (f" (over {evaluation['ce_tokens']:,} tokens of {evaluation['ce_samples']:,} samples)"
                    if evaluation.get("ce_tokens") and evaluation.get("ce_samples") else "")
            rows += [(f"next-token loss{over}, clean", evaluation.get("ce_clean")),
                     ("… with the SAE spliced in", evaluation.get("ce_spliced")),
                     ("… with the hook point zeroed", evaluation.get("ce_zero_ablation")),
                     ("loss recovered", evaluation.get("ce_loss_score")), ("KL divergence", evaluation.get("kl_div"))]
        cells = "".join(f"<tr><td>{esc(name)}</td><td style='text-align:right'>{_number(value, 4)}</td></tr>"
                        for name, value in rows)
        note = "".join(f"<br><small>{esc(evaluation[key])}</small>" for key in ("ce_loss_note", "ce_error")
                       if evaluation.get(key))  # why "loss recovered" or the loss is missing
        rows_used = {True: ", special tokens left out", False: ", special tokens included"}.get(
            evaluation.get("exclude_special"), "")  # as the run trained (older runs' evaluations do not say)
        return note_box(f"<b>Evaluation</b> over {int(evaluation.get('n_tokens') or 0):,} stored tokens{rows_used}"
                        f"<table class='mistudio-evaluation'>{cells}</table>{note}", colour="#198754",
                        background="#e8f5e9")

    # -- events (runner thread) -------------------------------------------------------------------
    @answers_no_request
    def _on_event(self, event: dict) -> None:
        if event.get("kind") != "training":
            return
        with self._lock:
            watched = self.job is not None and event.get("job_id") == self.job.id
            cell = self.step_cells.get(event.get("job_id"))
            if event["event"] == "progress" and cell is not None:
                cell.value = _cell(_steps(event.get("step"), event.get("total_steps"))).value
            if watched and event["event"] == "progress":
                figures = {k: v for k, v in event.items() if k not in ("event", "job_id", "kind", "time")}
                while self.history and self.history[-1].get("step", 0) >= figures.get("step", 0):
                    self.history.pop()
                self.history.append(figures)
                self.progress.max = max(1, figures.get("total_steps") or 1)
                self.progress.value = min(figures.get("step", 0), self.progress.max)
                self._show_metrics(figures)
                self._schedule_plot()
                return
        if event["event"] == "state":
            try:
                if watched:
                    self._show_state(str(event["status"]))
                    if str(event["status"]) in ("COMPLETED", "FAILED", "CANCELLED"):
                        history = self.job.history()  # every report, not only those sent as events
                        with self._lock:
                            self.history = history
                        self._stop_timer()
                        self._schedule_plot(now=True)  # drawn off the job's thread: the run ends without waiting
                self.refresh_runs()
            except Exception as exc:  # noqa: BLE001 - never break the job's thread
                self._say(error_box(f"<b>{esc(type(exc).__name__)}</b>: {esc(str(exc))}"))

    def _schedule_plot(self, now: bool = False) -> None:
        """Draw the plot on a timer thread, at most every ``plot_every_s`` and at most a third of the time (a slow
        machine draws less often, so that drawing never slows the training much); events meanwhile only
        add to the history. One timer and one drawing at a time; ``now``: without waiting (the final curves)."""
        with self._lock:
            if self._plot_timer is not None:
                return
            every = max(self.plot_every_s, 2 * self._render_s)
            wait = 0.0 if now else every - (time.monotonic() - self._drawn_at)
            timer = threading.Timer(max(0.0, wait), self._draw_from_timer)
            timer.daemon = True
            self._plot_timer = timer
        timer.start()

    @answers_no_request
    def _draw_from_timer(self) -> None:
        drawn = None
        try:
            drawn = self._draw_now()
        finally:
            with self._lock:
                if self._plot_timer is threading.current_thread():  # not a newer timer set meanwhile
                    self._plot_timer = None
                newer = drawn is not None and bool(self.history) and self.history[-1].get("step", 0) != drawn
        if newer:  # reports came while it drew: the curves and their titles catch up with the metrics line
            self._schedule_plot()

    def _stop_timer(self) -> None:
        with self._lock:
            timer, self._plot_timer = self._plot_timer, None
        if timer is not None:
            timer.cancel()

    def _draw_now(self) -> int | None:
        """Draw the curves of the history so far; returns the last step drawn."""
        with self._drawing:  # one drawing at a time
            with self._lock:
                history = list(self.history)
            if not history:
                self.plot.layout.display = "none"
                return None
            began = time.monotonic()
            png = to_png(curves_figure(history), dpi=80)
            self.plot.value = png
            self.plot.layout.display = ""
            with self._lock:
                self._drawn_at = time.monotonic()
                self._render_s = self._drawn_at - began
            return history[-1].get("step", 0)

    # -- the runs table ---------------------------------------------------------------------------
    def refresh_runs(self) -> None:
        """Rebuild the runs table from the workspace (runs whose process died are marked first)."""
        rows = list_trainings(self.workspace)
        with self._lock:
            self.runs = rows
            cells: list[W.Widget] = [_cell(f"<b>{h}</b>", first=i < 5, wide=i == 4) for i, h in enumerate(RUN_HEADERS)]
            self.step_cells = {}
            for row in rows[:MAX_RUNS]:
                cells += self._run_cells(row)
            self.table.children = cells
            self.table.layout.display = "" if rows else "none"
            more = len(rows) - MAX_RUNS
            self.empty.value = ("<small>No training runs in this workspace yet.</small>" if not rows else
                                f"<small>{more} older runs not shown.</small>" if more > 0 else "")

    def show_run(self, run_id: str) -> None:
        """Watch a run of the table (its settings, curves, evaluation and actions)."""
        self._guarded(lambda: self.watch(training_job(self.workspace, run_id)))

    def _run_cells(self, row: dict) -> list[W.Widget]:
        error = row.get("error") or ""
        status = _cell(badge(row["status"]) + (f" <small>{esc(error)}</small>" if error else ""),
                       title=f"{row['status']} {PLAIN_ERRORS.get(error, error)} {row.get('message') or ''}".strip(),
                       first=True)
        step_cell = _cell(_steps(row.get("step"), row.get("total_steps")))
        self.step_cells[row["id"]] = step_cell
        sae = f"{row.get('architecture') or ''} {row.get('d_sae') or ''} {row.get('sparsity') or ''}".strip()
        ev, dead = row.get("eval_explained_variance"), row.get("eval_dead_fraction")
        show = W.Button(description="Show", layout=W.Layout(width="52px", height="28px", padding="0px"),
                        tooltip="show this run: its settings, curves, evaluation and actions")
        show.on_click(lambda _b, run_id=row["id"]: self.show_run(run_id))
        return [status,
                _cell(breakable(short_run_id(row["id"])), title=row["id"], css="font-family:monospace;font-size:12px",
                      first=True),
                _cell(breakable(short_id(row.get("extraction") or "")), title=row.get("extraction") or "",
                      css="font-family:monospace;font-size:12px", first=True),
                _cell(breakable(row.get("hook_point") or ""), title=row.get("hook_point") or "", first=True),
                _cell(esc(sae), title=sae, first=True, wide=True), step_cell,
                _cell(_number(ev if ev is not None else row.get("explained_variance"), 2),
                      title="explained variance (evaluation when done, else the last training batch)"),
                _cell(_number(row.get("eval_l0") if row.get("eval_l0") is not None else row.get("l0"), 3)),
                _cell(_number(dead if dead is not None else row.get("dead_fraction"), 2),
                      title="dead latents (evaluation when done, else the training window's count)"),
                _cell(ago(row.get("created"))), show]


def short_run_id(run_id: str) -> str:
    """'sae_20261129_031502_1a2b3c' -> '031502_1a2b3c' (the full id is in the tooltip)."""
    match = re.fullmatch(r"sae_\d{8}_(\d{6}_\w+)", run_id)
    return match.group(1) if match else run_id


def _cell(text: str, title: str | None = None, css: str = "", first: bool = False, wide: bool = False) -> W.HTML:
    """One grid cell (``text`` is escaped HTML): it wraps, at most three lines (TRAIN_STYLE), the whole text in
    the tooltip. ``first``: it is on a run's first line when the grid folds (a rule above it); ``wide``: it spans
    two tracks then."""
    tip = f' title="{esc(title)}"' if title else ""
    style = f' style="{css}"' if css else ""
    cell = W.HTML(f'<div class="mistudio-cell"{tip}{style}>{text}</div>', layout=W.Layout(min_width="0"))
    if first:
        cell.add_class("mistudio-first")
    if wide:
        cell.add_class("mistudio-wide")
    return cell
