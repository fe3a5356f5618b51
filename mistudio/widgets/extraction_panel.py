"""Extract tab: layers, hooks, batch size, dtype, OOM auto-retry; Launch, live progress, Cancel, Retry/Resume."""
from __future__ import annotations

import html
import threading
import time
from typing import Any, Callable

import ipywidgets as W

from ..specs import BATCH_SIZES, HOOK_KINDS, STORAGE_DTYPES
from ..errors import InputError
from ..jobs import Job
from ..models import load_config, n_layers_of
from ..workspace import Workspace
from .common import PLAIN_ERRORS, badge, error_box, for_ui, guard, progress_text

THROTTLE_S = 0.25
RETRY_HELP = ("<small><b>Retry</b> starts a new extraction with the form as it is now (fix the model, dataset or "
              "batch size first). <b>Resume</b> continues the same extraction from its last saved sample.</small>")


def resumable(job: Job | None) -> bool:
    """Resume can succeed: a cancelled job, or a failure whose record offers it (never a bad input)."""
    if job is None:
        return False
    if job.status == "CANCELLED":
        return True
    error = job.error or {}
    return job.status == "FAILED" and bool(error.get("resume_available")) and error.get("error_type") != "VALIDATION"


class ExtractionPanel(W.VBox):
    """The Extract tab. Job events arrive on the worker thread; updates are throttled and lock-guarded."""

    def __init__(self, workspace: Workspace, model_picker, dataset_picker, **extra_options: Any):
        self.workspace = workspace
        self.model_picker = model_picker
        self.dataset_picker = dataset_picker
        self.extra_options = extra_options  # passed to submit (e.g. timeout_s, before_batch in tests)
        self.job: Job | None = None
        self._lock = threading.RLock()
        self._last_draw = 0.0
        self._pending: dict | None = None
        self._finished: list[Callable[[Job], None]] = []
        self._submitted: list[Callable[[Job], None]] = []
        style = {"description_width": "90px"}
        self.summary = W.HTML()
        self.layers = W.SelectMultiple(options=[], description="Layers", rows=6, style=style)
        self.hooks = {k: W.Checkbox(value=k == "residual", description=k, indent=False,
                                    layout=W.Layout(width="auto")) for k in HOOK_KINDS}
        self.batch_size = W.Dropdown(options=BATCH_SIZES, value=8, description="Batch size", style=style)
        self.dtype = W.Dropdown(options=STORAGE_DTYPES, value="float16", description="Store as", style=style)
        self.auto_retry = W.Checkbox(value=False, description="On out-of-memory, retry with half the batch size",
                                     indent=False, layout=W.Layout(width="auto"))
        self.launch_button = W.Button(description="Launch", button_style="primary", icon="play",
                                      tooltip="start a new extraction with the model, dataset and options shown")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop", disabled=True,
                                      tooltip="stop after the current batch; what was saved is kept")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="0%", bar_style="info", style=style,
                                      layout=W.Layout(width="60%"))
        self.status = W.HTML()
        self.alert = W.HTML()
        self.retry_button = W.Button(description="Retry", icon="redo", button_style="info",
                                     tooltip="new extraction with the form as it is now")
        self.resume_button = W.Button(description="Resume", button_style="success", icon="forward",
                                      tooltip="continue this extraction from its last saved sample")
        self.failure_box = W.VBox([self.alert, W.HTML(RETRY_HELP), W.HBox([self.retry_button, self.resume_button])],
                                  layout=W.Layout(display="none"))
        self.launch_button.on_click(guard(self._say, lambda _: self.launch()))
        self.cancel_button.on_click(guard(self._say, lambda _: self.cancel()))
        self.retry_button.on_click(guard(self._say, lambda _: self.retry()))
        self.resume_button.on_click(guard(self._say, lambda _: self.resume()))
        self.model_picker.choice.observe(guard(self._say, lambda _: self.refresh_layers()), "value")
        self.model_picker.on_inspect(lambda d: self.set_layer_count(d["n_layers"]))
        for widget in (self.dataset_picker.source, self.dataset_picker.path, self.dataset_picker.hub_name,
                       self.dataset_picker.hub_split, self.dataset_picker.max_samples, self.dataset_picker.max_length):
            widget.observe(guard(self._say, lambda _: self.update_summary()), "value")
        super().__init__([
            W.HTML("<b>Extract</b>"), self.summary, self.layers,
            W.HBox([W.Label("Hooks:")] + list(self.hooks.values())),
            W.HBox([self.batch_size, self.dtype]), self.auto_retry,
            W.HBox([self.launch_button, self.cancel_button]), self.progress, self.status, self.failure_box])
        self.refresh_layers()

    def _say(self, text: str) -> None:
        """Where a callback's unexpected error shows: the failure box of this panel."""
        self.alert.value = text
        self.failure_box.layout.display = ""

    # -- form -------------------------------------------------------------------------------------
    def on_finished(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` when a job launched here ends (any end state)."""
        self._finished.append(listener)

    def on_submitted(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` after Launch or Retry started a job (the Studio saves the form then)."""
        self._submitted.append(listener)

    def update_summary(self) -> None:
        """The line that says which model and dataset Launch will use."""
        self.summary.value = (f"Runs <b>{html.escape(self.model_picker.label() or '(no model)')}</b> on "
                              f"<b>{html.escape(self.dataset_picker.describe())}</b> "
                              "<small>(set in the Model and Dataset tabs)</small>")

    def set_layer_count(self, n_layers: int) -> None:
        chosen = [i for i in self.layers.value if i < n_layers]
        self.layers.options = [(f"layer {i}", i) for i in range(n_layers)]
        self.layers.value = tuple(chosen) or (n_layers - 1,)

    def refresh_layers(self) -> None:
        """Read the chosen model's layer count from its config (fast, no weights)."""
        self.update_summary()
        try:
            self.set_layer_count(n_layers_of(load_config(self.model_picker.spec())))
        except Exception:  # an unfinished path while typing: keep the old list (Launch names the problem)
            pass

    def state(self) -> dict:
        """The extract options as a JSON-able dict (what ``studio.json`` remembers)."""
        return {"layers": list(self.layers.value), "hooks": [k for k, b in self.hooks.items() if b.value],
                "batch_size": self.batch_size.value, "dtype": self.dtype.value, "auto_retry": self.auto_retry.value}

    def set_state(self, state: dict) -> None:
        """Fill the options from a saved state or a job's parameters (unknown values are skipped)."""
        layers = [i for i in state.get("layers") or [] if i in {v for _, v in self.layers.options}]
        if layers:
            self.layers.value = tuple(layers)
        if state.get("hooks"):
            for kind, box in self.hooks.items():
                box.value = kind in state["hooks"]
        for name in ("batch_size", "dtype", "auto_retry"):
            if state.get(name) is not None and (name == "auto_retry" or state[name] in getattr(self, name).options):
                getattr(self, name).value = state[name]

    def prefill(self, meta: dict, suggested: dict | None = None) -> None:
        """Show a job's settings in the form (model, dataset, options), then the suggested retry parameters."""
        model = meta.get("model", {}).get("name_or_path")
        if model:
            self.model_picker.set_model(model)
        params = meta.get("params", {})
        if params.get("model_dtype") in self.model_picker.dtype.options:
            self.model_picker.dtype.value = params["model_dtype"]
        if meta.get("dataset"):
            self.dataset_picker.set_from_description(meta["dataset"])
        self.set_state({**params, "auto_retry": params.get("auto_retry_on_oom")})
        suggested = suggested or {}
        if suggested.get("batch_size") in BATCH_SIZES:
            self.batch_size.value = suggested["batch_size"]
        if suggested.get("max_samples"):
            self.dataset_picker.max_samples.value = int(suggested["max_samples"])
        self.update_summary()

    def submit_arguments(self) -> dict:
        """What Launch and Retry pass to the workspace: the form as it is now."""
        hooks = [k for k, box in self.hooks.items() if box.value]
        model = self.model_picker.spec()
        return {"model": model.name_or_path, "model_dtype": model.dtype, "device": model.device,
                "dataset": self.dataset_picker.dataset(), "layers": list(self.layers.value), "hooks": hooks,
                "batch_size": self.batch_size.value, "dtype": self.dtype.value,
                "auto_retry_on_oom": self.auto_retry.value, **self.dataset_picker.options(), **self.extra_options}

    def _check_model_first(self) -> None:
        """No layers to choose usually means the model cannot be read: say that, not 'layers is empty'."""
        if not self.layers.value:
            self.set_layer_count(n_layers_of(load_config(self.model_picker.spec())))  # raises the model problem
            raise InputError("choose at least one layer")

    # -- actions ----------------------------------------------------------------------------------
    def launch(self) -> Job | None:
        """Validate the form and submit; errors show in the panel, never as a traceback."""
        try:
            self._check_model_first()
            job = self.workspace.submit(**self.submit_arguments())
        except Exception as exc:  # InputError, DiskFull, ...: no job exists, so Retry/Resume target nothing
            self._failed_before_job(exc)
            return None
        self._started(job)
        return job

    def _failed_before_job(self, exc: Exception) -> None:
        with self._lock:
            if self.job is not None:
                self.job.unsubscribe(self._on_event)
            self.job = None
            self.progress.value, self.progress.bar_style, self.progress.description = 0, "danger", "0%"
        kind = "VALIDATION" if isinstance(exc, InputError) else type(exc).__name__
        self._show_error(kind, str(exc), {}, job=None)

    def _started(self, job: Job) -> None:
        self.watch(job)
        for listener in self._submitted:
            try:
                listener(job)
            except Exception:  # saving settings must never stop a job from showing
                pass

    def watch(self, job: Job) -> None:
        with self._lock:
            if self.job is not None:
                self.job.unsubscribe(self._on_event)
            self.job = job
            self.failure_box.layout.display = "none"
            self.progress.value, self.progress.max, self.progress.bar_style = 0, 1, "info"
            self.progress.description = "0%"
            self.status.value = f"{badge(job.status)} {html.escape(job.id)}"
            self.cancel_button.disabled = False
            self.launch_button.disabled = True
        job.subscribe(self._on_event)
        if job.done:  # it may have ended before we subscribed
            self._on_event({"event": "state", "status": job.status, "job_id": job.id})

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.value = f"{badge('CANCELLING')} stopping after the current batch…"

    def retry(self) -> Job | None:
        """A new job from the form as it is now, linked to the failed one (if a job failed; else a fresh Launch)."""
        if self.job is None:
            return self.launch()
        try:
            self._check_model_first()
            job = self.workspace.retry(self.job.id, **self.submit_arguments())
        except Exception as exc:  # the corrected form may still be wrong: say it, keep the target
            self.alert.value = error_box(f"<b>Retry failed</b>: {for_ui(str(exc))}")
            return None
        self._started(job)
        return job

    def resume(self) -> Job | None:
        if not resumable(self.job):
            self.alert.value = error_box("Nothing to resume: use Retry (with the form corrected) instead.")
            return None
        try:
            job = self.job.resume(batch_size=self.batch_size.value)
        except Exception as exc:  # StoreBusy, InputError: say it in the panel
            self.alert.value = error_box(for_ui(str(exc)))
            return None
        self.watch(job)
        return job

    # -- events (worker thread) -------------------------------------------------------------------
    def _on_event(self, event: dict) -> None:
        kind = event["event"]
        with self._lock:
            if self.job is None or event.get("job_id") != self.job.id:
                return
            if kind == "progress":
                total = event.get("samples_total") or 0
                final = total and event["samples_done"] >= total
                wait = THROTTLE_S - (time.monotonic() - self._last_draw)
                if not final and wait > 0:  # throttled: the latest event is drawn when the wait is over
                    if self._pending is None:
                        timer = threading.Timer(wait, self._flush)
                        timer.daemon = True
                        timer.start()
                    self._pending = event
                    return
                self._pending = None
                self._draw_progress(event)
            elif kind == "retry":
                self.status.value = (f"{badge('RETRYING')} out of memory at batch {event['previous_batch_size']}: "
                                     f"continuing with batch_size={event['batch_size']}")
            elif kind == "state":
                try:
                    self._on_state(event["status"])
                except Exception as exc:  # noqa: BLE001 - e.g. the store was deleted meanwhile
                    self._say(error_box(f"<b>{type(exc).__name__}</b>: {html.escape(str(exc))}"))

    def _draw_progress(self, event: dict) -> None:
        self._last_draw = time.monotonic()
        total = event.get("samples_total") or 0
        self.progress.max = max(1, total)
        self.progress.value = event["samples_done"]
        self.progress.description = f"{100 * event['samples_done'] / max(1, total):.0f}%"
        self.status.value = progress_text("EXTRACTING", event)

    def _flush(self) -> None:
        """The throttled latest event (timer thread); skipped when the job moved on meanwhile."""
        with self._lock:
            event, self._pending = self._pending, None
            job = self.job
            if event is None or job is None or event.get("job_id") != job.id:
                return
            try:
                if job.status == "EXTRACTING":
                    self._draw_progress(event)
            except Exception:  # noqa: BLE001 - its store went away: the state event says what happened
                pass

    def _on_state(self, status: str) -> None:
        job = self.job
        if status in ("QUEUED", "LOADING", "SAVING"):
            self.status.value = f"{badge(status)} {html.escape(job.id)}"
            return
        if status == "EXTRACTING":
            return
        self.cancel_button.disabled = True
        self.launch_button.disabled = False
        progress = job.progress
        if status == "COMPLETED":
            self.progress.max = max(1, progress.get("samples_total") or 1)
            self.progress.value = self.progress.max
            self.progress.bar_style = "success"
            self.progress.description = "100%"
            meta = job.meta
            self.status.value = (f"{badge('COMPLETED')} {html.escape(job.id)}: {meta['progress']['samples_total']:,} "
                                 f"samples, {meta['progress']['tokens_total']:,} tokens, "
                                 f"{meta['timings'].get('tokens_per_s') or 0:,.0f} tokens/s")
        elif status == "CANCELLED":
            self.progress.bar_style = "warning"
            self.status.value = (f"{badge('CANCELLED')} {html.escape(job.id)}: {progress.get('samples_done', 0):,} "
                                 "samples kept. Resume continues from there.")
            self.alert.value = ""
            self._show_failure_actions()
        elif status == "FAILED":
            self.progress.bar_style = "danger"
            error = job.error or {}
            suggested = error.get("suggested_retry_params", {}) or {}
            self.prefill(job.meta, suggested)
            self._show_error(error.get("error_type", "UNKNOWN"), error.get("error_message", ""), suggested, job=job)
        for listener in self._finished:
            try:
                listener(job)
            except Exception:  # a broken observer must not break the panel
                pass

    def _show_error(self, error_type: str, message: str, suggested: dict, job: Job | None) -> None:
        plain = PLAIN_ERRORS.get(error_type, error_type)
        hint = ""
        if suggested:
            hint = ("<br>Suggested for the retry (already set in the form): "
                    + ", ".join(f"{html.escape(k)}={html.escape(str(v))}" for k, v in suggested.items()))
        if job is None:
            hint += "<br>No extraction was created. Correct the form, then Launch (or Retry)."
        self.alert.value = error_box(f"<b>{plain}</b> ({html.escape(error_type)}): {for_ui(message)}{hint}")
        self.status.value = f"{badge('FAILED')} {html.escape(plain)}"
        self._show_failure_actions()

    def _show_failure_actions(self) -> None:
        can_resume = resumable(self.job)
        self.resume_button.layout.display = "" if can_resume else "none"
        self.resume_button.disabled = not can_resume
        self.retry_button.disabled = False
        self.failure_box.layout.display = ""
