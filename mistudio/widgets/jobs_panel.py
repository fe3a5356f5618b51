"""Jobs tab: every extraction in the workspace with per-row Cancel / Retry / Resume / Delete, and Cleanup."""
from __future__ import annotations

import html
from typing import Callable

import ipywidgets as W

from ..metadata import LIVE_STATES
from ..workspace import Workspace, human_bytes
from .common import badge, error_box

COLUMNS = ("status", "id", "model", "dataset", "hook_points", "samples", "tokens", "size", "created", "retry_of")


class JobsPanel(W.VBox):
    """The Jobs tab. ``refresh()`` rebuilds the table from the workspace on disk."""

    def __init__(self, workspace: Workspace, on_job: Callable | None = None):
        self.workspace = workspace
        self.on_job = on_job  # called with a Job started here (retry/resume), e.g. to show it in Extract
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.cleanup_button = W.Button(description="Cleanup…", icon="trash", tooltip="show what cleanup would delete")
        self.confirm_button = W.Button(description="Delete these", button_style="danger",
                                       layout=W.Layout(display="none"))
        self.message = W.HTML()
        self.table = W.GridBox(layout=W.Layout(grid_template_columns="repeat(10, auto) 260px", grid_gap="2px 10px"))
        self.refresh_button.on_click(lambda _: self.refresh())
        self.cleanup_button.on_click(lambda _: self.preview_cleanup())
        self.confirm_button.on_click(lambda _: self.run_cleanup())
        self.confirm_delete_button = W.Button(description="Delete permanently", button_style="danger",
                                              layout=W.Layout(display="none", width="auto"))
        self.confirm_delete_button.on_click(lambda _: self.delete_confirmed())
        self.pending_delete: str | None = None
        self.rows: list[dict] = []
        super().__init__([W.HTML("<b>Jobs</b>"), W.HBox([self.refresh_button, self.cleanup_button,
                                                         self.confirm_button]), self.message,
                          self.confirm_delete_button, self.table])
        self.refresh()

    def refresh(self) -> None:
        self.workspace.recover()
        self.rows = [_display(r) for r in self.workspace.extractions().to_dict("records")]
        cells = [W.HTML(f"<b>{c}</b>") for c in COLUMNS] + [W.HTML("<b>actions</b>")]
        for row in self.rows:
            status = row["status"]
            label = badge(status) + (f" <small>{html.escape(row['error'])}</small>" if row.get("error") else "")
            cells.append(W.HTML(label))
            cells += [W.HTML(html.escape(str(row.get(c, "")))) for c in COLUMNS[1:]]
            cells.append(W.HBox(self._buttons(row)))
        self.table.children = cells
        if not self.rows:
            self.message.value = "No extractions in this workspace yet."

    def _buttons(self, row: dict) -> list[W.Button]:
        status, ext_id = row["status"], row["id"]
        live = status in LIVE_STATES
        ended = status in ("FAILED", "CANCELLED")
        specs = [("Cancel", live, self.workspace.cancel), ("Retry", ended or status == "COMPLETED", self.workspace.retry),
                 ("Resume", ended, self.workspace.resume), ("Delete", not live, self.ask_delete)]
        buttons = []
        for name, enabled, action in specs:
            button = W.Button(description=name, disabled=not enabled, layout=W.Layout(width="60px"),
                              tooltip=f"{name} {ext_id}")
            button.on_click(lambda _b, a=action, n=name: self._act(n, a, ext_id))
            buttons.append(button)
        return buttons

    def _act(self, name: str, action: Callable, ext_id: str) -> None:
        try:
            result = action(ext_id)
        except Exception as exc:  # StoreBusy / InputError: say it here
            self.message.value = error_box(f"{name} {html.escape(ext_id)}: {html.escape(str(exc))}")
            return
        if name == "Delete":
            return
        else:
            self.message.value = f"{name}: {html.escape(getattr(result, 'id', ext_id))}"
            if name in ("Retry", "Resume") and self.on_job is not None:
                self.on_job(result)
        self.refresh()

    def ask_delete(self, ext_id: str) -> None:
        """First step of a row's Delete: say what would be lost and show the confirmation button."""
        row = next((r for r in self.rows if r["id"] == ext_id), {"status": "?", "size": "?", "samples": "?"})
        lost = ("its finished activations" if row["status"] == "COMPLETED"
                else f"the {row['samples']} samples it saved")
        self.pending_delete = ext_id
        self.message.value = (f"Delete {html.escape(ext_id)} ({row['status']}, {row['size']})? This removes "
                              f"{lost} for good.")
        self.confirm_delete_button.layout.display = ""

    def delete_confirmed(self) -> None:
        """Second step: delete the store the user confirmed (COMPLETED ones too: the user said so)."""
        ext_id, self.pending_delete = self.pending_delete, None
        self.confirm_delete_button.layout.display = "none"
        if ext_id is None:
            return
        try:
            freed = self.workspace.delete(ext_id, force=True)
        except Exception as exc:  # StoreBusy / InputError: say it here
            self.message.value = error_box(f"Delete {html.escape(ext_id)}: {html.escape(str(exc))}")
        else:
            self.message.value = f"Deleted {html.escape(ext_id)} ({human_bytes(freed)} freed)."
        self.refresh()

    def preview_cleanup(self) -> list[dict]:
        report = self.workspace.cleanup(dry_run=True).to_dict("records")
        if not report:
            self.message.value = "Nothing to clean up: no empty, failed or cancelled stores."
            self.confirm_button.layout.display = "none"
            return []
        total = sum(r["bytes"] for r in report)
        items = "".join(f"<li>{html.escape(r['id'])}: {html.escape(r['reason'])}, {r['size']}</li>" for r in report)
        self.message.value = (f"Cleanup would delete {len(report)} stores ({human_bytes(total)}); completed and "
                              f"running ones are never touched:<ul>{items}</ul>")
        self.confirm_button.layout.display = ""
        return list(report)

    def run_cleanup(self) -> None:
        report = self.workspace.cleanup(dry_run=False).to_dict("records")
        deleted = [r for r in report if r["deleted"]]
        kept = "".join(f"<li>{html.escape(r['id'])}: {html.escape(r['note'])}</li>" for r in report if not r["deleted"])
        self.message.value = (f"Deleted {len(deleted)} stores ({human_bytes(sum(r['bytes'] for r in deleted))})."
                              + (f" Kept:<ul>{kept}</ul>" if kept else ""))
        self.confirm_button.layout.display = "none"
        self.refresh()


def _display(row: dict) -> dict:
    """A listing row with the display cells the table shows."""
    total = row["samples_total"]
    return {**row, "samples": f"{row['samples_committed']}/{'?' if total is None or total != total else int(total)}",
            "tokens": f"{int(row['tokens_committed']):,}", "created": f"{row['created']:%Y-%m-%d %H:%M}"}
