"""``ms.Studio()``: the tabbed panel (Model · Dataset · Extract · Jobs · Browse), rebuilt from the workspace."""
from __future__ import annotations

import os
from typing import Any

import ipywidgets as W

from ..workspace import Workspace
from .browser import ActivationBrowser
from .dataset_picker import DatasetPicker
from .extraction_panel import ExtractionPanel
from .jobs_panel import JobsPanel
from .model_picker import ModelPicker

TABS = ("Model", "Dataset", "Extract", "Jobs", "Browse")


class Studio(W.Tab):
    """Everything in one widget. Re-running the cell after a kernel restart shows the history on disk,
    with jobs that died with their kernel marked FAILED/INTERRUPTED."""

    def __init__(self, workspace: str | os.PathLike | Workspace | None = None, model: str | None = None,
                 dataset: Any = None, **extract_options: Any):
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.model_picker = ModelPicker(model, workspace_root=None if self.workspace.remote else self.workspace.root)
        self.dataset_picker = DatasetPicker(dataset, tokenizer_for=self._tokenizer)
        self.extraction_panel = ExtractionPanel(self.workspace, self.model_picker, self.dataset_picker,
                                                **extract_options)
        self.jobs_panel = JobsPanel(self.workspace, on_job=self._show_job)
        self.browser = ActivationBrowser(self.workspace)
        super().__init__(children=[self.model_picker, self.dataset_picker, self.extraction_panel, self.jobs_panel,
                                   self.browser], titles=TABS)
        self.selected_index = 2
        # widgets are (re)built on the kernel's main path: when a tab is opened, not from the job thread
        self.observe(self._on_tab, "selected_index")
        self._tokenizers: dict[str, Any] = {}

    def _tokenizer(self):
        from transformers import AutoTokenizer

        name = self.model_picker.choice.value.strip()
        if name not in self._tokenizers:
            self._tokenizers[name] = AutoTokenizer.from_pretrained(name)
        return self._tokenizers[name]

    def _on_tab(self, change: dict) -> None:
        title = TABS[change["new"]] if change["new"] is not None else None
        if title == "Jobs":
            self.jobs_panel.refresh()
        elif title == "Browse":
            job = self.extraction_panel.job
            self.browser.refresh(select=job.id if job is not None and job.status == "COMPLETED" else None)

    def _show_job(self, job) -> None:
        self.extraction_panel.watch(job)
