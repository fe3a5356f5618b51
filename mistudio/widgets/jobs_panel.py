"""Jobs tab: every extraction in the workspace as a compact grid, live rows updated from job events,
per-row Cancel / Retry / Resume / Delete and the error on demand; Cleanup. Delete, and Retry of a COMPLETED row (a
full rerun), ask first; Retry of a FAILED or CANCELLED row (the usual recovery) is one click."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

import ipywidgets as W

from ..storage.metadata import LIVE_STATES, can_resume
from ..models import packaged_minilm_path
from ..workspace import Workspace, human_bytes
from .common import (PLAIN_ERRORS, ago, answers_no_request, badge, breakable, busy, error_box, esc, for_ui, guard,
                     note_box, short_id, stylesheet, summarise_hook_points)

HEADERS = ("status", "id", "model", "dataset", "hook points", "samples saved", "size", "age", "")
# The grid's tracks are in common.STYLE: nine columns where the panel is wide enough (about 980 px), else each
# job on two lines (status, id, model, dataset, hook points / samples, size, age, actions), so that every cell
# and the five action buttons stay whole at any width from ~450 px up (a file browser open, a split view).
MAX_ROWS = 60
THROTTLE_S = 0.5
SIZE_EVERY_S = 2.0
ICON = W.Layout(width="28px", height="28px", padding="0px", margin="0px")


def _cell_html(text: str, title: str | None = None, css: str = "", clamp: bool = False) -> str:
    """A grid cell's HTML: its text wraps (never clipped sideways); ``clamp``: at most three lines, the whole text
    in the tooltip."""
    tip = f' title="{esc(title)}"' if title else ""
    style = f' style="{css}"' if css else ""
    return f'<div class="mistudio-cell{" mistudio-clamp" if clamp else ""}"{tip}{style}>{text}</div>'


def _cell(text: str, title: str | None = None, css: str = "", clamp: bool = False, first: bool = False) -> W.HTML:
    """One grid cell (see :func:`_cell_html`); ``first``: it opens a job's first line (a rule above it when the
    grid folds each job into two lines)."""
    cell = W.HTML(_cell_html(text, title, css, clamp), layout=W.Layout(min_width="0"))
    if first:
        cell.add_class("mistudio-first")
    return cell


def progress_cell(saved: int, total: int | None, tokens: int, computed: int | None = None,
                  status: str = "") -> tuple[str, str]:
    """('120 / 400 · 30%', tooltip): samples saved (committed: what a crash keeps) of the planned total, and
    under it the samples computed when more than those are (the rest are saved at the next chunk boundary)."""
    if not total:
        if status in LIVE_STATES:
            return ("<i>preparing…</i>", "reading and tokenizing the dataset, loading the model: the counts appear "
                                         "once the store is allocated")
        return f"{saved:,} / ?", f"{saved:,} samples and {tokens:,} tokens saved"
    text = f"{saved:,} / {int(total):,} · {100 * saved / total:.0f}%"
    tip = f"{saved:,} samples and {tokens:,} tokens saved"
    if computed is not None and computed > saved:
        text += f"<br><small>{computed:,} computed</small>"
        tip += f"; {computed:,} samples computed (saved at the next chunk boundary)"
    return text, tip


class JobsPanel(W.VBox):
    """The Jobs tab. ``refresh()`` rebuilds the grid from the workspace on disk; job events of this workspace's
    folder (whichever Workspace object submitted the job) update live rows in place (throttled; the counts
    never go backwards within a run) and a new or ended job refreshes the grid (debounced, off the job's
    thread)."""

    def __init__(self, workspace: Workspace, on_job: Callable | None = None):
        self.workspace = workspace
        self.on_job = on_job  # called with a Job started here (retry/resume), e.g. to show it in Extract
        self._lock = threading.RLock()
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="auto"))
        self.cleanup_button = W.Button(description="Cleanup…", icon="trash", layout=W.Layout(width="auto"),
                                       tooltip="show what cleanup would delete (failed, cancelled, empty stores)")
        self.confirm_button = W.Button(description="Delete these", button_style="danger",
                                       layout=W.Layout(display="none", width="auto"))
        self.message = W.HTML()
        self.empty = W.HTML()
        self.details = W.HTML(layout=W.Layout(display="none"))
        self.details_for: str | None = None
        self.confirm_text = W.HTML()
        self.confirm_delete_button = W.Button(description="Delete permanently", button_style="danger",
                                              icon="trash", layout=W.Layout(width="auto"))
        self.keep_button = W.Button(description="Keep it", layout=W.Layout(width="auto"))
        self.confirm_box = W.VBox([self.confirm_text, W.HBox([self.confirm_delete_button, self.keep_button])],
                                  layout=W.Layout(display="none"))
        self.retry_text = W.HTML()  # Retry of a COMPLETED row: the same two-step question as Delete's
        self.confirm_retry_button = W.Button(description="Run it again", button_style="warning", icon="redo",
                                             layout=W.Layout(width="auto"))
        self.keep_retry_button = W.Button(description="Don't run", layout=W.Layout(width="auto"))
        self.retry_box = W.VBox([self.retry_text, W.HBox([self.confirm_retry_button, self.keep_retry_button])],
                                layout=W.Layout(display="none"))
        self.table = W.GridBox(layout=W.Layout(width="100%"))  # tracks: common.STYLE (two layouts by width)
        self.table.add_class("mistudio-jobs")
        self.refresh_button.on_click(guard(self._say, lambda b: self._busy(b, "Listing…", self.refresh)))
        self.cleanup_button.on_click(guard(self._say, lambda b: self._busy(b, "Checking…", self.preview_cleanup)))
        self.confirm_button.on_click(guard(self._say, lambda b: self._busy(b, "Deleting…", self.run_cleanup)))
        self.confirm_delete_button.on_click(guard(self._say, lambda b: self._busy(b, "Deleting…",
                                                                                  self.delete_confirmed)))
        self.keep_button.on_click(guard(self._say, lambda _: self.cancel_delete()))
        self.confirm_retry_button.on_click(guard(self._say, lambda b: self._busy(b, "Starting…",
                                                                                 self.retry_confirmed)))
        self.keep_retry_button.on_click(guard(self._say, lambda _: self.cancel_retry()))
        self.pending_delete: str | None = None
        self.pending_retry: str | None = None
        self.rows: list[dict] = []
        self.cells: dict[str, dict] = {}  # id -> {"status", "progress", "size", "details", "buttons"}
        self._drawn: dict[str, float] = {}
        self._sized: dict[str, float] = {}
        self._pending: dict[str, dict] = {}
        self._shown: dict[str, tuple[int, int]] = {}  # a live job's (saved, computed) last drawn: never back
        self._refresh_timer: threading.Timer | None = None
        where = workspace.root if workspace.remote else os.path.abspath(workspace.root)
        super().__init__([stylesheet(), W.HTML(f"<b>Jobs</b> <small>in the workspace <code>{breakable(where)}</code> "
                                               "(its stores are in extractions/)</small>"),
                          W.HBox([self.refresh_button, self.cleanup_button, self.confirm_button]), self.message,
                          self.confirm_box, self.retry_box, self.empty, self.table, self.details])
        self.add_class("mistudio-panel")
        self.add_class("mistudio-jobs-panel")
        workspace.subscribe(self._on_event)
        self.refresh()

    def _say(self, text: str) -> None:
        self.message.value = text

    @staticmethod
    def _busy(button: W.Button, text: str, action: Callable[[], object]) -> None:
        with busy(button, text):
            action()

    # -- the grid ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the grid from disk (interrupted jobs are marked first)."""
        with self._lock:
            self.workspace.recover()
            self.rows = [_display(r) for r in self.workspace.extractions().to_dict("records")]
            cells: list[W.Widget] = [_cell(f"<b>{h}</b>", first=i < 5) for i, h in enumerate(HEADERS[:-1])]
            head_end = _cell("")
            head_end.add_class("mistudio-actions")
            cells.append(head_end)
            live = {r["id"] for r in self.rows if r["status"] in LIVE_STATES}
            self._shown = {k: v for k, v in self._shown.items() if k in live}
            by_id: dict[str, dict] = {}
            for row in self.rows[:MAX_ROWS]:
                cells += self._row_cells(row, by_id)
            self.cells = by_id  # swapped whole: a reader on another thread sees the old grid or the new one
            self.table.children = cells
            if self.details_for in self.cells:  # the details shown follow the row's new state
                self.details.value = self.cells[self.details_for]["details"]
            else:
                self.details_for, self.details.layout.display = None, "none"
            self.table.layout.display = "" if self.rows else "none"
            more = len(self.rows) - MAX_ROWS
            self.empty.value = ("No extractions in this workspace yet: launch one in the Extract tab." if not self.rows
                                else f"<small>{more} older extractions not shown.</small>" if more > 0 else "")

    def _schedule_refresh(self) -> None:
        """Refresh soon, on a timer thread (a burst of events makes one refresh; the job's thread goes on)."""
        with self._lock:
            if self._refresh_timer is not None:
                return
            self._refresh_timer = threading.Timer(0.05, self._timed_refresh)
            self._refresh_timer.daemon = True
            self._refresh_timer.start()

    @answers_no_request
    def _timed_refresh(self) -> None:
        with self._lock:
            self._refresh_timer = None
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - never lost on a thread: said in the panel
            self._say(error_box(f"Refreshing the list failed: {esc(str(exc))}"))

    def _status_html(self, status: str, error: str = "") -> str:
        return badge(status) + (f" <small>{esc(error)}</small>" if error else "")

    def _row_cells(self, row: dict, by_id: dict[str, dict]) -> list[W.Widget]:
        ext_id, status = row["id"], row["status"]
        error = row.get("error") or ""
        status_cell = _cell(self._status_html(status, error),
                            title=f"{status} {PLAIN_ERRORS.get(error, error)}".strip(), first=True)
        saved, computed = row["samples_committed"], None
        if ext_id in self._shown:  # a live row drawn from events: keep what it showed
            saved, computed = max(saved, self._shown[ext_id][0]), self._shown[ext_id][1]
        text, tip = progress_cell(saved, row["samples_total"], row["tokens_committed"], computed, status)
        progress = _cell(text, title=tip)
        size = _cell(esc(row["size"]))
        buttons = self._buttons(row)
        by_id[ext_id] = {"status": status_cell, "progress": progress, "size": size,
                         "details": self._details_html(row), "buttons": buttons}
        actions = W.HBox(list(buttons.values()))
        actions.add_class("mistudio-actions")
        return [status_cell,
                _cell(esc(short_id(ext_id)), title=ext_id, css="font-family:monospace;font-size:12px",
                      first=True),
                _cell(breakable(row["model"]), title=row["model"], clamp=True, first=True),
                _cell(breakable(row["dataset"]), title=row["dataset"], clamp=True, first=True),
                _cell(esc(summarise_hook_points(row["hook_points"]) + (" + latents" if row.get("latents") else "")),
                      title=row["hook_points"] + (f"; the latents of {row['saes']}" if row.get("latents") else ""),
                      clamp=True, first=True),
                progress, size, _cell(row["age"], title=row["created_text"]), actions]

    @staticmethod
    def _details_html(row: dict) -> str:
        lines = []
        if row.get("message"):
            lines.append(f"<b>{esc(PLAIN_ERRORS.get(row['error'], row['error']))}</b>: "
                         f"{for_ui(row['message'])}")
        if row.get("problem"):
            lines.append(f"<b>Problem</b>: {esc(row['problem'])}")
        text, tip = progress_cell(row["samples_committed"], row["samples_total"], row["tokens_committed"])
        lines.append(f"<small>{esc(row['id'])} · {tip} · created {esc(row['created_text'])}"
                     f"{' · retry of ' + esc(row['retry_of']) if row.get('retry_of') else ''} · "
                     f"{esc(row['hook_points'])}</small>")
        return error_box("<br>".join(lines)) if row.get("message") else note_box("<br>".join(lines))

    def _buttons(self, row: dict) -> dict[str, W.Button]:
        status, ext_id = row["status"], row["id"]
        live = status in LIVE_STATES
        rerun = status == "COMPLETED"  # a full rerun of finished work: asks first
        specs = [("Cancel", "stop", live, "stop after the current batch; keeps what was saved", self.workspace.cancel),
                 ("Retry", "redo", status in ("FAILED", "CANCELLED", "COMPLETED"),
                  "run again as a new extraction with the same settings" + (" (asks first)" if rerun else ""),
                  self.ask_retry if rerun else self.workspace.retry),
                 ("Resume", "forward", self._resumable(row), "continue from the last saved sample",
                  self.workspace.resume),
                 ("Delete", "trash", not live, "delete this store (asks first)", self.ask_delete)]
        buttons = {}
        for name, icon, enabled, tip, action in specs:
            button = W.Button(icon=icon, disabled=not enabled, layout=ICON, tooltip=f"{name}: {tip}")
            button.on_click(guard(self._say, lambda _b, a=action, n=name: self._act(n, a, ext_id)))
            buttons[name] = button
        toggle = W.Button(icon="info-circle", layout=ICON, tooltip="Details: the error message, full id and counts",
                          button_style="danger" if row.get("message") else "")
        toggle.on_click(guard(self._say, lambda _b: self.toggle_details(ext_id)))
        buttons["Details"] = toggle
        return buttons

    def _resumable(self, row: dict) -> bool:
        if row["status"] != "FAILED":
            return can_resume(row["status"], None)
        try:
            return can_resume("FAILED", self.workspace.job(row["id"]).error)
        except Exception:  # noqa: BLE001 - gone or unreadable: nothing to resume
            return False

    def toggle_details(self, ext_id: str) -> None:
        """Show a row's details under the grid (error message, full id, counts, hook points); again: hide."""
        if self.details_for == ext_id and self.details.layout.display != "none":
            self.details_for, self.details.layout.display = None, "none"
            return
        self.details_for = ext_id
        self.details.value = self.cells[ext_id]["details"]
        self.details.layout.display = ""

    # -- live updates (worker thread) -------------------------------------------------------------
    @answers_no_request
    def _on_event(self, event: dict) -> None:
        if event.get("kind") == "training":  # the Train tab's runs: not rows of this grid
            return
        ext_id = event.get("job_id")
        with self._lock:
            cells = self.cells.get(ext_id)
            if event["event"] == "progress":
                if cells is None:  # a job this grid does not show yet (just submitted, or elsewhere): list it,
                    saved, computed = self._shown.get(ext_id, (0, 0))  # with the count computed so far
                    self._shown[ext_id] = (saved, max(computed, int(event["samples_done"])))
                    self._schedule_refresh()
                    return
                now = time.monotonic()
                final = event.get("samples_total") and event["samples_done"] >= event["samples_total"]
                wait = THROTTLE_S - (now - self._drawn.get(ext_id, 0.0))
                if not final and wait > 0:  # throttled: the latest event is drawn when the wait is over
                    if ext_id not in self._pending:
                        timer = threading.Timer(wait, self._flush, args=(ext_id,))
                        timer.daemon = True
                        timer.start()
                    self._pending[ext_id] = event
                    return
                self._pending.pop(ext_id, None)
                self._draw_progress(cells, event)
            elif event["event"] == "state":
                status = str(event.get("status"))
                if status == "QUEUED":  # a new run (a submit, a retry, a resume): its counts start again
                    self._shown.pop(ext_id, None)
                if cells is not None and status in LIVE_STATES and status != "QUEUED":
                    cells["status"].value = _cell_html(self._status_html(status))
                    self._live_buttons(cells["buttons"])
                else:  # a new job, or one that ended: its row changes in many places
                    self._schedule_refresh()

    @staticmethod
    def _live_buttons(buttons: dict) -> None:
        buttons["Cancel"].disabled = False
        for name in ("Retry", "Resume", "Delete"):
            buttons[name].disabled = True

    def _draw_progress(self, cells: dict, event: dict) -> None:
        """A live row: samples saved (the commit mark, from the job's record in memory) and computed (the event),
        each never below what the row showed; the size on disk every few seconds."""
        ext_id = event["job_id"]
        self._drawn[ext_id] = time.monotonic()
        computed, saved, tokens = int(event["samples_done"]), 0, 0
        try:
            progress = self.workspace.job(ext_id).record.progress
            saved, tokens = int(progress.samples_committed), int(progress.tokens_committed)
        except Exception:  # noqa: BLE001 - its store went away: the state event says what happened
            pass
        before = self._shown.get(ext_id, (0, 0))
        saved = max(saved, before[0])
        computed = max(computed, before[1], saved)
        self._shown[ext_id] = (saved, computed)
        text, tip = progress_cell(saved, event.get("samples_total"), tokens, computed, "EXTRACTING")
        cells["progress"].value = _cell_html(text, title=tip)
        cells["status"].value = _cell_html(self._status_html("EXTRACTING"))
        if time.monotonic() - self._sized.get(ext_id, 0.0) >= SIZE_EVERY_S:
            self._sized[ext_id] = time.monotonic()
            try:
                cells["size"].value = _cell_html(human_bytes(self.workspace.size_of(self.workspace.path_of(ext_id))))
            except Exception:  # noqa: BLE001 - best effort while files come and go
                pass

    @answers_no_request
    def _flush(self, ext_id: str) -> None:
        with self._lock:
            event, cells = self._pending.pop(ext_id, None), self.cells.get(ext_id)
            live = cells is not None and any(f">{s}<" in cells["status"].value for s in LIVE_STATES)
            if event is not None and live:
                self._draw_progress(cells, event)

    # -- actions ----------------------------------------------------------------------------------
    def _act(self, name: str, action: Callable, ext_id: str) -> None:
        try:
            result = action(ext_id)
        except Exception as exc:  # StoreBusy / InputError: say it here
            self.message.value = error_box(f"{name} {esc(ext_id)}: {for_ui(exc)}")
            return
        if action in (self.ask_delete, self.ask_retry):  # a question shown: nothing done yet
            return
        self.message.value = f"{esc(name)}: {esc(getattr(result, 'id', ext_id))}"
        if name in ("Retry", "Resume") and self.on_job is not None:
            self.on_job(result)
        self.refresh()

    def _listed(self, ext_id: str) -> dict | None:
        """The grid's row of ``ext_id``; None (and says to refresh) when it is no longer listed."""
        row = next((r for r in self.rows if r["id"] == ext_id), None)
        if row is None:
            self.message.value = error_box(f"{esc(ext_id)} is no longer listed: Refresh.")
        return row

    def ask_delete(self, ext_id: str) -> None:
        """First step of a row's Delete: say what would be lost and ask for a confirmation."""
        row = self._listed(ext_id)
        if row is None:
            return
        self.pending_delete = ext_id
        self._close_retry()
        if row["status"] == "COMPLETED":
            text = error_box(f"⚠ <b>Delete the COMPLETED extraction {esc(ext_id)}?</b> Its finished "
                             f"activations ({row['tokens_committed']:,} tokens of {esc(row['hook_points'])}, "
                             f"{esc(row['size'])}) are lost for good; there is no undo.")
        else:
            text = note_box(f"Delete {esc(ext_id)} ({esc(row['status'])}, {esc(row['size'])})? This removes the "
                            f"{row['samples_committed']:,} samples it saved; Retry or Resume will no longer be "
                            "possible.", colour="#fd7e14", background="#fff3e0")
        self.confirm_text.value = text
        self.confirm_delete_button.description = ("Delete finished activations" if row["status"] == "COMPLETED"
                                                  else "Delete permanently")
        self.confirm_box.layout.display = ""

    def ask_retry(self, ext_id: str) -> None:
        """First step of Retry on a COMPLETED row: say what a rerun costs and that the store is kept, and ask."""
        row = self._listed(ext_id)
        if row is None:
            return
        self.pending_retry = ext_id
        self._close_delete()  # one question at a time
        samples = row["samples_total"] or row["samples_committed"]
        self.retry_text.value = note_box(
            f"Run {esc(ext_id)} again as a new extraction? It recomputes {samples:,} samples "
            f"({row['tokens_committed']:,} tokens of {esc(row['hook_points'])}, about {esc(row['size'])} on disk) "
            "with the same settings; the completed store is kept.", colour="#fd7e14", background="#fff3e0")
        self.retry_box.layout.display = ""

    def _close_retry(self) -> None:
        self.pending_retry = None
        self.retry_box.layout.display = "none"

    def cancel_retry(self) -> None:
        self._close_retry()
        self.message.value = "Nothing was started."

    def retry_confirmed(self) -> None:
        """Second step: start the rerun the user confirmed (shown in the Extract tab, like any Retry)."""
        ext_id = self.pending_retry
        self._close_retry()
        if ext_id is not None:
            self._act("Retry", self.workspace.retry, ext_id)

    def _close_delete(self) -> None:
        self.pending_delete = None
        self.confirm_box.layout.display = "none"

    def cancel_delete(self) -> None:
        self._close_delete()
        self.message.value = "Nothing was deleted."

    def delete_confirmed(self) -> None:
        """Second step: delete the store the user confirmed (COMPLETED ones too: the user said so)."""
        ext_id = self.pending_delete
        self._close_delete()
        if ext_id is None:
            return
        try:
            freed = self.workspace.delete(ext_id, force=True)
        except Exception as exc:  # StoreBusy / InputError: say it here
            self.message.value = error_box(f"Delete {esc(ext_id)}: {for_ui(exc)}")
        else:
            self.message.value = f"Deleted {esc(ext_id)} ({human_bytes(freed)} freed)."
        self.refresh()

    def preview_cleanup(self) -> list[dict]:
        report = self.workspace.cleanup(dry_run=True).to_dict("records")
        if not report:
            self.message.value = "Nothing to clean up: no empty, failed or cancelled stores."
            self.confirm_button.layout.display = "none"
            return []
        total = sum(r["bytes"] for r in report)
        items = "".join(f"<li>{esc(r['id'])}: {esc(r['reason'])}, {esc(r['size'])}</li>" for r in report)
        self.message.value = (f"Cleanup would delete {len(report)} stores ({human_bytes(total)}); completed and "
                              f"running ones are never touched:<ul>{items}</ul>")
        self.confirm_button.layout.display = ""
        return list(report)

    def run_cleanup(self) -> None:
        report = self.workspace.cleanup(dry_run=False).to_dict("records")
        deleted = [r for r in report if r["deleted"]]
        kept = "".join(f"<li>{esc(r['id'])}: {esc(r['note'])}</li>" for r in report if not r["deleted"])
        self.message.value = (f"Deleted {len(deleted)} stores ({human_bytes(sum(r['bytes'] for r in deleted))})."
                              + (f" Kept:<ul>{kept}</ul>" if kept else ""))
        self.confirm_button.layout.display = "none"
        self.refresh()


def _display(row: dict) -> dict:
    """A listing row with the display cells the grid shows."""
    total = row["samples_total"]
    total = None if total is None or total != total else int(total)
    created = row["created"]
    bundled = packaged_minilm_path()
    if bundled and row["model"] == "/".join(Path(bundled).parts[-2:]):
        row = {**row, "model": "all-MiniLM-L6-v2"}
    return {**row, "samples_total": total, "samples_committed": int(row["samples_committed"] or 0),
            "tokens_committed": int(row["tokens_committed"] or 0),
            "age": ago(created.timestamp()) if created == created else "–",
            "created_text": f"{created:%Y-%m-%d %H:%M}" if created == created else "–"}
