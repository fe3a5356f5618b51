"""``ms.Studio()``: the tabbed panel (Model · Dataset · Extract · Jobs · Browse), rebuilt from the workspace.

It opens on the Model tab, with the form as it was last launched in this workspace (``<workspace>/studio.json``)
and, after a kernel restart, a banner that points at the job the restart interrupted.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import ipywidgets as W

from ..workspace import Workspace
from .browser import ActivationBrowser
from .common import error_box, guard, note_box
from .dataset_picker import DatasetPicker
from .extraction_panel import ExtractionPanel
from .jobs_panel import JobsPanel
from .model_picker import ModelPicker

TABS = ("Model", "Dataset", "Extract", "Jobs", "Browse")
SETTINGS = "studio.json"


class Studio(W.VBox):
    """Everything in one widget: a banner line and the tabs. Re-running the cell after a kernel restart shows
    the history on disk, with jobs that died with their kernel marked FAILED/INTERRUPTED and offered for Resume."""

    def __init__(self, workspace: str | os.PathLike | Workspace | None = None, model: str | None = None,
                 dataset: Any = None, **extract_options: Any):
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.settings_file = None if self.workspace.remote else Path(self.workspace.root) / SETTINGS
        saved = self.load_settings()
        self.model_picker = ModelPicker(model or saved.get("model"),
                                        workspace_root=None if self.workspace.remote else self.workspace.root)
        self.dataset_picker = DatasetPicker(dataset, tokenizer_for=self._tokenizer)
        if dataset is None and saved.get("dataset"):
            self.dataset_picker.set_state(saved["dataset"])
        self.extraction_panel = ExtractionPanel(self.workspace, self.model_picker, self.dataset_picker,
                                                **extract_options)
        if saved.get("model_dtype") in self.model_picker.dtype.options:
            self.model_picker.dtype.value = saved["model_dtype"]
        if saved.get("extract"):
            self.extraction_panel.set_state(saved["extract"])
        self.extraction_panel.on_submitted(lambda _job: self.save_settings())
        self.jobs_panel = JobsPanel(self.workspace, on_job=self._show_job)
        self.browser = ActivationBrowser(self.workspace)
        self.tabs = W.Tab(children=[self.model_picker, self.dataset_picker, self.extraction_panel, self.jobs_panel,
                                    self.browser], titles=TABS)
        self.tabs.selected_index = 0
        self.banner = W.HTML()
        self.banner_resume = W.Button(description="Resume it", icon="forward", button_style="success",
                                      tooltip="continue the interrupted extraction from its last saved sample")
        self.banner_dismiss = W.Button(description="Dismiss", layout=W.Layout(width="auto"))
        self.banner_box = W.HBox([self.banner, self.banner_resume, self.banner_dismiss],
                                 layout=W.Layout(display="none", align_items="center"))
        self.banner_box.add_class("mistudio-banner")
        self.banner_resume.on_click(guard(self._banner_say, lambda _: self.resume_interrupted()))
        self.banner_dismiss.on_click(guard(self._banner_say, lambda _: self.dismiss_interrupted()))
        self.interrupted: str | None = None
        super().__init__([self.banner_box, self.tabs])
        # widgets are (re)built on the kernel's main path: when a tab is opened, not from the job thread
        self.tabs.observe(self._on_tab, "selected_index")
        self._tokenizers: dict[str, Any] = {}
        self.show_interrupted()

    # the Tab's selection, as when Studio was a Tab itself
    @property
    def selected_index(self) -> int | None:
        return self.tabs.selected_index

    @selected_index.setter
    def selected_index(self, index: int | None) -> None:
        self.tabs.selected_index = index

    def _tokenizer(self):
        from transformers import AutoTokenizer

        name = self.model_picker.name_or_path()
        if name not in self._tokenizers:
            self._tokenizers[name] = AutoTokenizer.from_pretrained(name)
        return self._tokenizers[name]

    def _on_tab(self, change: dict) -> None:
        """Opening a tab refreshes it; an error shows in that tab."""
        title = TABS[change["new"]] if change["new"] is not None else None
        if title == "Extract":
            guard(self.extraction_panel._say, self.extraction_panel.update_summary)()
            guard(self.extraction_panel._say_preset, self.extraction_panel.refresh_presets)()
        elif title == "Jobs":
            guard(self.jobs_panel._say, self.jobs_panel.refresh)()
        elif title == "Browse":
            guard(self.browser._say, self._open_browse)()

    def _open_browse(self) -> None:
        job = self.extraction_panel.job
        try:
            done = job is not None and job.status == "COMPLETED"
        except Exception:  # noqa: BLE001 - its store was deleted (Cleanup, Delete): Browse says so
            done = False
        self.browser.refresh(select=job.id if done else None)

    def _show_job(self, job) -> None:
        self.extraction_panel.watch(job)

    # -- remembered settings ----------------------------------------------------------------------
    def load_settings(self) -> dict:
        """The form as last launched in this workspace ({} when none, or unreadable)."""
        try:
            return json.loads(self.settings_file.read_text()) if self.settings_file else {}
        except (OSError, ValueError):
            return {}

    def save_settings(self) -> None:
        """Write the form to ``<workspace>/studio.json`` (model, dataset, extract options, dismissed banners)."""
        if self.settings_file is None:
            return
        state = {**self.load_settings(), "model": self.model_picker.name_or_path(),
                 "model_dtype": self.model_picker.dtype.value, "dataset": self.dataset_picker.state(),
                 "extract": self.extraction_panel.state()}
        self.settings_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.settings_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.settings_file)

    # -- interrupted jobs -------------------------------------------------------------------------
    def _banner_say(self, text: str) -> None:
        self.banner.value = text
        self.banner_box.layout.display = ""

    def show_interrupted(self) -> str | None:
        """Point at the newest job a kernel restart or crash interrupted (not yet resumed, retried or dismissed)."""
        rows = self.workspace.extractions().to_dict("records")
        retried = {r["retry_of"] for r in rows if r.get("retry_of")}
        dismissed = set(self.load_settings().get("dismissed", []))
        found = [r for r in rows if r["status"] == "FAILED" and r["error"] == "INTERRUPTED"
                 and r["id"] not in retried and r["id"] not in dismissed]
        if not found:
            self.interrupted = None
            self.banner_box.layout.display = "none"
            return None
        row = found[0]
        self.interrupted = row["id"]
        total = row["samples_total"]
        saved = f"{int(row['samples_committed']):,} of {int(total):,}" if total == total and total else \
            f"{int(row['samples_committed']):,}"
        others = f" ({len(found) - 1} more in the Jobs tab)" if len(found) > 1 else ""
        self.banner.value = note_box(
            f"⚠ Extraction <b>{html.escape(row['id'])}</b> ({html.escape(row['model'])}) was interrupted: its "
            f"kernel was restarted or crashed. {saved} samples were saved; Resume continues from there{others}.",
            colour="#fd7e14", background="#fff3e0")
        self.banner_resume.disabled = False
        self.banner_box.layout.display = ""
        return row["id"]

    def resume_interrupted(self):
        """Resume the job the banner names and show it in the Extract tab."""
        if self.interrupted is None:
            return None
        try:
            job = self.workspace.resume(self.interrupted)
        except Exception as exc:  # StoreBusy, InputError: say it in the banner
            self.banner.value = error_box(f"Resume {html.escape(self.interrupted)}: {html.escape(str(exc))}")
            return None
        self.extraction_panel.watch(job)
        self.banner_box.layout.display = "none"
        self.interrupted = None
        self.tabs.selected_index = 2
        return job

    def dismiss_interrupted(self) -> None:
        """Hide the banner for this job (remembered in studio.json); the Jobs tab still lists it."""
        if self.interrupted and self.settings_file is not None:
            state = self.load_settings()
            state["dismissed"] = sorted(set(state.get("dismissed", [])) | {self.interrupted})
            self.settings_file.parent.mkdir(parents=True, exist_ok=True)
            self.settings_file.write_text(json.dumps(state, indent=1))
        self.banner_box.layout.display = "none"
        self.interrupted = None
