"""``ms.Studio()``: the tabbed panel (Model · Dataset · Extract · Jobs · Browse · Features · Train), rebuilt from
the workspace.

It opens on the Model tab, with the form as it was last launched in this workspace (``<workspace>/studio.json``)
and, after a kernel restart, a banner that points at the job the restart interrupted. More tabs join with
``studio.add_tab(title, panel, on_open=...)``.

``studio.json`` and ``models.json`` are parsed through typed models (:class:`StudioSettings`,
:class:`~mistudio.widgets.model_picker.ModelFolders`): whatever is wrong in them (not JSON, the wrong types, a
folder or a device in their place ...) leaves the form at its defaults for those values, sets the file aside as
``<name>.bad-<timestamp>`` and is said in a note above the tabs; the Studio always opens.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal

import ipywidgets as W
from pydantic import BaseModel, ConfigDict

from ..storage.metadata import LIVE_STATES
from ..workspace import Workspace
from .browser import ActivationBrowser
from .common import answers_no_request, error_box, esc, guard, note_box, stylesheet
from .dataset_picker import DatasetPicker, DatasetState
from .extraction_panel import ExtractionPanel, ExtractState
from .features_panel import FeaturesPanel
from .jobs_panel import JobsPanel
from .model_picker import FOLDERS_FILE, ModelPicker
from .sidefiles import SettingText, SideFile
from .train_panel import TrainPanel

TABS = ("Model", "Dataset", "Extract", "Jobs", "Browse", "Features", "Train")  # the built-in tabs, in order
SETTINGS = "studio.json"


class StudioSettings(BaseModel):
    """``studio.json``: the form as last launched in the workspace, and the interrupted jobs whose banner was
    dismissed. Every field is optional (absent: the form's default); values are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: SettingText | None = None
    model_dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    dataset: DatasetState | None = None
    extract: ExtractState | None = None
    dismissed: list[SettingText] = []


class Studio(W.VBox):
    """Everything in one widget: a banner line and the tabs. Re-running the cell after a kernel restart shows
    the history on disk, with jobs that died with their kernel marked FAILED/INTERRUPTED and offered for Resume."""

    def __init__(self, workspace: str | os.PathLike | Workspace | None = None, model: str | None = None,
                 dataset: Any = None, **extract_options: Any):
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.settings_file = None if self.workspace.remote else Path(self.workspace.root) / SETTINGS
        # a note above the tabs for side files that could not be used (file name -> its HTML)
        self.files_note = W.HTML(layout=W.Layout(display="none"))
        self.files_note.add_class("mistudio-files-note")
        self._file_notes: dict[str, str] = {}
        self._dismissed: set[str] = set()
        side = SideFile(self.settings_file) if self.settings_file is not None else None
        saved = side.load(StudioSettings) if side is not None else StudioSettings()
        self._dismissed |= set(saved.dismissed)
        self.model_picker = ModelPicker(model or saved.model,
                                        workspace_root=None if self.workspace.remote else self.workspace.root,
                                        on_file_note=lambda text: self._note_file(FOLDERS_FILE, text))
        self.dataset_picker = DatasetPicker(dataset, tokenizer_for=self._tokenizer)
        problems: list[str] = []
        if dataset is None and saved.dataset is not None:
            problems += self.dataset_picker.set_state(saved.dataset)
        self.extraction_panel = ExtractionPanel(self.workspace, self.model_picker, self.dataset_picker,
                                                **extract_options)
        if saved.model_dtype is not None:
            self.model_picker.dtype.value = saved.model_dtype
        if saved.extract is not None:
            problems += self.extraction_panel.set_state(saved.extract)
        if side is not None:
            side.problems += problems
            self._report(side)
        self.extraction_panel.on_submitted(lambda _job: self.save_settings())
        self.jobs_panel = JobsPanel(self.workspace, on_job=self._show_job)
        self.browser = ActivationBrowser(self.workspace)
        # title -> panel, and what opening it does (a tab refreshes when opened; errors show in that tab)
        self.panels: dict[str, W.Widget] = {}
        self._on_open: dict[str, Callable[[], None]] = {}
        self.tabs = W.Tab()
        self.add_tab("Model", self.model_picker)
        self.add_tab("Dataset", self.dataset_picker)
        self.add_tab("Extract", self.extraction_panel, on_open=self._open_extract)
        self.add_tab("Jobs", self.jobs_panel, on_open=guard(self.jobs_panel._say, self.jobs_panel.refresh))
        self.add_tab("Browse", self.browser, on_open=guard(self.browser._say, self._open_browse))
        self.features_panel = FeaturesPanel(self.workspace, on_open_row=self._open_row_in_browse, load=False)
        self.add_tab("Features", self.features_panel,
                     on_open=guard(self.features_panel._say, self.features_panel.refresh))
        self.train_panel = TrainPanel(self.workspace, on_extract_with_sae=self._extract_with_sae)
        self.add_tab("Train", self.train_panel, on_open=guard(self.train_panel._say, self.train_panel.refresh))
        self.tabs.selected_index = 0
        self.banner = W.HTML()
        self.banner_resume = W.Button(description="Resume it", icon="forward", button_style="success",
                                      tooltip="continue the interrupted extraction from its last saved sample",
                                      layout=W.Layout(width="auto"))
        self.banner_dismiss = W.Button(description="Dismiss", layout=W.Layout(width="auto"),
                                       tooltip="hide this note (the Jobs tab still lists the job)")
        self.banner_box = W.HBox([self.banner, self.banner_resume, self.banner_dismiss],
                                 layout=W.Layout(display="none", align_items="center"))
        self.banner_box.add_class("mistudio-banner")
        self.banner_resume.on_click(guard(self._banner_say, lambda _: self.resume_interrupted()))
        self.banner_dismiss.on_click(guard(self._banner_say, lambda _: self.dismiss_interrupted()))
        self.interrupted: str | None = None
        super().__init__([stylesheet(), self.files_note, self.banner_box, self.tabs])
        self.add_class("mistudio-panel")
        self.add_class("mistudio-studio")
        # widgets are (re)built on the kernel's main path: when a tab is opened, not from the job thread
        self.tabs.observe(self._on_tab, "selected_index")
        self._tokenizers: dict[str, Any] = {}
        self._browsed: str | None = None  # the Extract tab's finished job Browse showed already
        self.workspace.subscribe(self._on_job_event)  # a resumed job, wherever it was resumed: the banner goes
        self.show_interrupted()

    def add_tab(self, title: str, panel: W.Widget, on_open: Callable[[], None] | None = None) -> None:
        """Add a tab (after the others); ``on_open()`` runs each time it is opened (guard it to show its errors in
        the panel)."""
        if title in self.panels:
            raise ValueError(f"the Studio already has a {title!r} tab")
        self.panels[title] = panel
        panel.add_class("mistudio-panel")  # the Studio's layout rules (rows wrap, text never cut) apply to it
        if on_open is not None:
            self._on_open[title] = on_open
        selected = self.tabs.selected_index
        self.tabs.children = list(self.panels.values())
        self.tabs.titles = tuple(self.panels)
        self.tabs.selected_index = selected

    def select(self, title: str) -> None:
        """Open the tab called ``title``."""
        self.tabs.selected_index = list(self.panels).index(title)

    # the Tab's selection, as when Studio was a Tab itself
    @property
    def selected_index(self) -> int | None:
        return self.tabs.selected_index

    @selected_index.setter
    def selected_index(self, index: int | None) -> None:
        self.tabs.selected_index = index

    def _tokenizer(self):
        """The Model tab's tokenizer when it is on this machine (a folder or the Hugging Face cache: no network,
        for the Dataset tab's token counts); None for a Hub id not downloaded yet."""
        from transformers import AutoTokenizer

        folder = self.model_picker.local_folder()
        if folder is None:
            return None
        if folder not in self._tokenizers:
            self._tokenizers[folder] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return self._tokenizers[folder]

    def _on_tab(self, change: dict) -> None:
        """Opening a tab refreshes it; an error shows in that tab."""
        titles = list(self.panels)
        index = change["new"]
        title = titles[index] if index is not None and 0 <= index < len(titles) else None
        if title in self._on_open:
            self._on_open[title]()

    def _open_extract(self) -> None:
        panel = self.extraction_panel
        guard(panel._say, panel.update_summary)()
        guard(panel._say_preset, panel.refresh_presets)()
        if panel.layers_known is False and not self.model_picker.busy:  # a Hub id: read its config, off the kernel
            self.model_picker.inspect_async()

    def _open_browse(self) -> None:
        """Browse lists the stores again; a job the Extract tab ran to completion is shown once (then the user's
        choice stays, with its plots, each time the tab is opened)."""
        job = self.extraction_panel.job
        try:
            done = job is not None and job.status == "COMPLETED"
        except Exception:  # noqa: BLE001 - its store was deleted (Cleanup, Delete): Browse says so
            done = False
        fresh = done and job.id != self._browsed
        if fresh:
            self._browsed = job.id
        self.browser.refresh(select=job.id if fresh else None)

    def open_in_browse(self, extraction_id: str, row: int, hook_point: str | None = None,
                       feature: int | None = None, note: str = "") -> bool:
        """Open the Browse tab on a dataset row of an extraction, plotted (for other tabs' "open this example")."""
        shown = self.browser.open_row(extraction_id, row, hook_point, feature, note)
        self.select("Browse")
        return shown

    def _open_row_in_browse(self, extraction_id: str, hook_point: str, row: int, feature: int) -> None:
        """The Features tab's "Open row in Browse": the feature for raw hook points; under latents (which Browse
        does not draw) the raw hook point the SAE read, its neuron 0, and a line that says so."""
        base = hook_point.removesuffix(".latents")
        if base == hook_point:
            self.open_in_browse(extraction_id, row, base, feature)
            return
        self.open_in_browse(extraction_id, row, base, 0, note=note_box(
            f"Latent {int(feature)} of {esc(hook_point)} is not drawn here: Browse shows raw hook points, so this is "
            f"the row's {esc(base)}, which the SAE read (neuron 0; the Features tab's page shows the latent on this "
            "row's tokens)."))

    def _extract_with_sae(self, arguments: dict) -> None:
        """The Train tab's "Extract with this SAE": the Extract form filled with the run's model, data and SAE."""
        self.extraction_panel.show_new_form(arguments)
        self.extraction_panel.show_saes()  # the SAE is in "More options": unfolded, and named in the summary line
        self.select("Extract")

    def _show_job(self, job) -> None:
        self.extraction_panel.watch(job)
        if job.id == self.interrupted:
            self._hide_banner()

    @answers_no_request
    def _on_job_event(self, event: dict) -> None:
        """Any job of this workspace (job thread): the interrupted job running again needs no banner."""
        if event.get("event") == "state" and event.get("job_id") == self.interrupted \
                and str(event.get("status")) in LIVE_STATES:
            self._hide_banner()

    def _hide_banner(self) -> None:
        self.interrupted = None
        self.banner_box.layout.display = "none"

    # -- remembered settings ----------------------------------------------------------------------
    def read_settings(self) -> StudioSettings:
        """``studio.json`` as typed settings (the defaults when there is none). A bad file is set aside and said in
        the note above the tabs; the values that could be read are kept."""
        if self.settings_file is None:
            return StudioSettings()
        side = SideFile(self.settings_file)
        settings = side.load(StudioSettings)
        if side.problems:
            self._report(side)
        return settings

    def load_settings(self) -> dict:
        """The form as last launched in this workspace, as JSON ({} when none; see :meth:`read_settings`)."""
        return self.read_settings().model_dump(mode="json", exclude_unset=True)

    def save_settings(self) -> bool:
        """Write the form to ``<workspace>/studio.json`` (model, dataset, extract options, dismissed banners)
        through a temporary file renamed over it (a link there is replaced, never followed). False, and the note
        says why, when it cannot be written."""
        if self.settings_file is None:
            return False
        state = {**self.load_settings(), "model": self.model_picker.name_or_path(),
                 "model_dtype": self.model_picker.dtype.value, "dataset": self.dataset_picker.state(),
                 "extract": self.extraction_panel.state()}
        return self._write_settings(state)

    def _write_settings(self, state: dict) -> bool:
        self._dismissed |= set(state.get("dismissed", []))
        if self._dismissed:
            state["dismissed"] = sorted(self._dismissed)
        side = SideFile(self.settings_file)
        if not side.save(state):
            self._report(side)
            return False
        return True

    def _report(self, side: SideFile) -> None:
        """Set a bad side file aside and say so above the tabs."""
        side.set_aside_if_bad()
        self._note_file(side.path.name, side.note("the Studio uses its defaults for what could not be read"))

    def _note_file(self, name: str, text: str) -> None:
        """Show (``text``) or clear ('') the note about one side file."""
        if text:
            self._file_notes[name] = text
        else:
            self._file_notes.pop(name, None)
        self.files_note.value = "".join(self._file_notes.values())
        self.files_note.layout.display = "" if self._file_notes else "none"

    # -- interrupted jobs -------------------------------------------------------------------------
    def _banner_say(self, text: str) -> None:
        self.banner.value = text
        self.banner_box.layout.display = ""

    def show_interrupted(self) -> str | None:
        """Point at the newest job a kernel restart or crash interrupted (not yet resumed, retried or dismissed)."""
        rows = self.workspace.extractions().to_dict("records")
        retried = {r["retry_of"] for r in rows if r.get("retry_of")}
        dismissed = self._dismissed | set(self.read_settings().dismissed)
        found = [r for r in rows if r["status"] == "FAILED" and r["error"] == "INTERRUPTED"
                 and r["id"] not in retried and r["id"] not in dismissed]
        if not found:
            self.interrupted = None
            self.banner_box.layout.display = "none"
            return None
        row = found[0]
        self.interrupted = row["id"]
        others = f" ({len(found) - 1} more in the Jobs tab)" if len(found) > 1 else ""
        self.banner.value = note_box(
            f"⚠ Extraction <b>{esc(row['id'])}</b> ({esc(row['model'])}) was interrupted: its "
            f"kernel was restarted or crashed. {self._saved_line(row)} Resume continues from the last saved sample"
            f"{others}.", colour="#fd7e14", background="#fff3e0")
        self.banner_resume.disabled = False
        self.banner_box.layout.display = ""
        return row["id"]

    def _saved_line(self, row: dict) -> str:
        """'120 of 400 samples were saved; 180 were computed when it stopped (60 not saved: Resume computes them
        again).' The computed count is known when the store's progress recorded it (``samples_computed``)."""
        saved, total = int(row["samples_committed"] or 0), row["samples_total"]
        known_total = total == total and total  # NaN when the store was never allocated
        text = f"{saved:,} of {int(total):,} samples were saved" if known_total else f"{saved:,} samples were saved"
        computed = self._computed_when_stopped(row["id"])
        if computed is not None and computed > saved:
            return (f"{text}; {computed:,} were computed when it stopped ({computed - saved:,} not saved yet: Resume "
                    "computes them again).")
        return f"{text}; what was computed after the last save was lost."

    def _computed_when_stopped(self, extraction_id: str) -> int | None:
        try:
            progress = self.workspace.job(extraction_id).record.progress
        except Exception:  # noqa: BLE001 - unreadable: not known
            return None
        return progress.samples_computed

    def resume_interrupted(self):
        """Resume the job the banner names and show it in the Extract tab (one already running again, e.g. resumed
        from the Jobs tab, is shown instead)."""
        if self.interrupted is None:
            return None
        target = self.interrupted
        try:
            current = self.workspace.job(target)
            if str(current.status) in LIVE_STATES:  # resumed meanwhile (another tab, another cell)
                self._hide_banner()
                self.extraction_panel.watch(current)
                self.select("Extract")
                return current
            job = self.workspace.resume(target)
        except Exception as exc:  # StoreBusy, InputError: say it in the banner
            self.banner.value = error_box(f"Resume {esc(target)}: {esc(str(exc))}")
            return None
        self.extraction_panel.watch(job)
        self._hide_banner()
        self.select("Extract")
        return job

    def dismiss_interrupted(self) -> None:
        """Hide the banner for this job (remembered in studio.json); the Jobs tab still lists it."""
        if self.interrupted and self.settings_file is not None:
            self._dismissed.add(self.interrupted)
            self._write_settings(self.load_settings())
        self._hide_banner()
