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
from .common import PLAIN_ERRORS, badge, error_box, progress_text

THROTTLE_S = 0.25


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
        self._finished: list[Callable[[Job], None]] = []
        style = {"description_width": "90px"}
        self.layers = W.SelectMultiple(options=[], description="Layers", rows=6, style=style)
        self.hooks = {k: W.Checkbox(value=k == "residual", description=k, indent=False) for k in HOOK_KINDS}
        self.batch_size = W.Dropdown(options=BATCH_SIZES, value=8, description="Batch size", style=style)
        self.dtype = W.Dropdown(options=STORAGE_DTYPES, value="float16", description="Store as", style=style)
        self.auto_retry = W.Checkbox(value=False, description="On out-of-memory, retry with half the batch",
                                     indent=False)
        self.launch_button = W.Button(description="Launch", button_style="primary", icon="play")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, description="Progress", bar_style="info", style=style,
                                      layout=W.Layout(width="60%"))
        self.status = W.HTML()
        self.alert = W.HTML()
        self.retry_batch_size = W.Dropdown(options=BATCH_SIZES, value=4, description="batch_size", style=style)
        self.retry_max_samples = W.IntText(value=0, description="max_samples", style=style)
        self.retry_button = W.Button(description="Retry", button_style="danger", icon="redo")
        self.resume_button = W.Button(description="Resume", button_style="success", icon="forward")
        self.failure_box = W.VBox([self.alert, W.HTML("Suggested retry parameters (editable):"),
                                   W.HBox([self.retry_batch_size, self.retry_max_samples]),
                                   W.HBox([self.retry_button, self.resume_button])],
                                  layout=W.Layout(display="none"))
        self.launch_button.on_click(lambda _: self.launch())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.retry_button.on_click(lambda _: self.retry())
        self.resume_button.on_click(lambda _: self.resume())
        self.model_picker.choice.observe(lambda _: self.refresh_layers(), "value")
        self.model_picker.on_inspect(lambda d: self.set_layer_count(d["n_layers"]))
        super().__init__([
            W.HTML("<b>Extract</b>"), self.layers, W.HBox([W.Label("Hooks:")] + list(self.hooks.values())),
            W.HBox([self.batch_size, self.dtype]), self.auto_retry,
            W.HBox([self.launch_button, self.cancel_button]), self.progress, self.status, self.failure_box])
        self.refresh_layers()

    # -- form -------------------------------------------------------------------------------------
    def on_finished(self, listener: Callable[[Job], None]) -> None:
        """Call ``listener(job)`` when a job launched here ends (any end state)."""
        self._finished.append(listener)

    def set_layer_count(self, n_layers: int) -> None:
        chosen = [i for i in self.layers.value if i < n_layers]
        self.layers.options = [(f"layer {i}", i) for i in range(n_layers)]
        self.layers.value = tuple(chosen) or (n_layers - 1,)

    def refresh_layers(self) -> None:
        """Read the chosen model's layer count from its config (fast, no weights)."""
        try:
            self.set_layer_count(n_layers_of(load_config(self.model_picker.spec())))
        except Exception:  # an unfinished path while typing: keep the old list
            pass

    def submit_arguments(self) -> dict:
        hooks = [k for k, box in self.hooks.items() if box.value]
        return {"model": self.model_picker.spec(), "dataset": self.dataset_picker.dataset(),
                "layers": list(self.layers.value), "hooks": hooks, "batch_size": self.batch_size.value,
                "dtype": self.dtype.value, "auto_retry_on_oom": self.auto_retry.value,
                **self.dataset_picker.options(), **self.extra_options}

    # -- actions ----------------------------------------------------------------------------------
    def launch(self) -> Job | None:
        """Validate the form and submit; errors show in the panel, never as a traceback."""
        try:
            job = self.workspace.submit(**self.submit_arguments())
        except InputError as exc:
            self._show_error("VALIDATION", str(exc), {})
            return None
        self.watch(job)
        return job

    def watch(self, job: Job) -> None:
        with self._lock:
            if self.job is not None:
                self.job.unsubscribe(self._on_event)
            self.job = job
            self.failure_box.layout.display = "none"
            self.progress.value, self.progress.max, self.progress.bar_style = 0, 1, "info"
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
        if self.job is None:
            return None
        overrides = {"batch_size": self.retry_batch_size.value}
        if self.retry_max_samples.value:
            overrides["max_samples"] = self.retry_max_samples.value
        try:
            job = self.job.retry(**overrides)
        except InputError as exc:
            self.alert.value = error_box(html.escape(str(exc)))
            return None
        self.watch(job)
        return job

    def resume(self) -> Job | None:
        if self.job is None:
            return None
        try:
            job = self.job.resume(batch_size=self.retry_batch_size.value)
        except Exception as exc:  # StoreBusy, InputError: say it in the panel
            self.alert.value = error_box(html.escape(str(exc)))
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
                final = event["samples_done"] >= event["samples_total"]
                now = time.monotonic()
                if not final and now - self._last_draw < THROTTLE_S:
                    return
                self._last_draw = now
                self.progress.max = max(1, event["samples_total"])
                self.progress.value = event["samples_done"]
                self.status.value = progress_text("EXTRACTING", event)
            elif kind == "retry":
                self.status.value = (f"{badge('RETRYING')} out of memory at batch {event['previous_batch_size']}: "
                                     f"continuing with batch_size={event['batch_size']}")
            elif kind == "state":
                self._on_state(event["status"])

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
            meta = job.meta
            self.status.value = (f"{badge('COMPLETED')} {html.escape(job.id)}: {meta['progress']['samples_total']:,} "
                                 f"samples, {meta['progress']['tokens_total']:,} tokens, "
                                 f"{meta['timings'].get('tokens_per_s', 0):,.0f} tokens/s")
        elif status == "CANCELLED":
            self.progress.bar_style = "warning"
            self.status.value = (f"{badge('CANCELLED')} {html.escape(job.id)}: {progress.get('samples_done', 0):,} "
                                 "samples kept. Resume continues from there.")
            self._show_failure_actions({})
        elif status == "FAILED":
            self.progress.bar_style = "danger"
            error = job.error or {}
            self._show_error(error.get("error_type", "UNKNOWN"), error.get("error_message", ""),
                             error.get("suggested_retry_params", {}))
        for listener in self._finished:
            try:
                listener(job)
            except Exception:  # a broken observer must not break the panel
                pass

    def _show_error(self, error_type: str, message: str, suggested: dict) -> None:
        self.alert.value = error_box(f"<b>{PLAIN_ERRORS.get(error_type, error_type)}</b> ({error_type}): "
                                     f"{html.escape(message)}")
        self.status.value = f"{badge('FAILED')} {PLAIN_ERRORS.get(error_type, error_type)}"
        self._show_failure_actions(suggested)

    def _show_failure_actions(self, suggested: dict) -> None:
        self.retry_batch_size.value = suggested.get("batch_size", self.batch_size.value)
        self.retry_max_samples.value = suggested.get("max_samples", 0) or 0
        self.resume_button.disabled = self.job is None
        self.retry_button.disabled = self.job is None
        self.failure_box.layout.display = ""
