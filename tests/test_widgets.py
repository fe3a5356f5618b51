"""The notebook panels driven without a browser: real widgets, real jobs, real stores."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import mistudio as ms

pytest.importorskip("matplotlib")


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def make_studio(workspace, model, **options):
    studio = ms.Studio(workspace=workspace, model=model, **options)
    studio.dataset_picker.max_samples.value = 40
    return studio


def test_launch_progress_complete_browse(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    assert [v for _, v in panel.layers.options] == [0, 1, 2]  # read from the model's config
    panel.layers.value = (0, 2)
    panel.hooks["mlp"].value = True
    panel.batch_size.value = 4
    seen = []
    panel.progress.observe(lambda c: seen.append(c["new"]), "value")
    panel.launch_button.click()
    job = panel.job
    assert job is not None and panel.cancel_button.disabled is False
    job.wait(60)
    wait_for(lambda: panel.progress.bar_style == "success")
    assert job.status == "COMPLETED"
    assert panel.progress.value == panel.progress.max == 40
    assert len(seen) >= 2 and seen == sorted(seen)  # it moved, monotonically
    assert "COMPLETED" in panel.status.value and "tokens/s" in panel.status.value
    assert panel.launch_button.disabled is False and panel.cancel_button.disabled is True

    studio.selected_index = 3  # Jobs tab refreshes from disk
    assert [r["id"] for r in studio.jobs_panel.rows] == [job.id]
    studio.selected_index = 4  # Browse tab selects the finished job
    browser = studio.browser
    assert browser.extraction.value == job.id
    assert set(browser.hook_point.options) == {"layers.0.residual", "layers.0.mlp", "layers.2.residual",
                                               "layers.2.mlp"}
    browser.row.value = int(browser.ext.rows()[3])
    browser.feature.value = 5
    browser.plot_button.click()
    for name, image in browser.images.items():
        assert image.value[:8] == b"\x89PNG\r\n\x1a\n", name
    assert browser.top_table.value.count("<tr>") == 16  # header + top 15
    assert "Plotted layers.2.residual" in browser.info.value


def test_cancel_from_panel(gpt2_dir, workspace):
    reached, release = threading.Event(), threading.Event()

    def gate(index, _):
        if index == 2:
            reached.set()
            release.wait(30)

    studio = make_studio(workspace, gpt2_dir, before_batch=gate)
    panel = studio.extraction_panel
    panel.batch_size.value = 4
    panel.launch_button.click()
    assert reached.wait(60)
    panel.cancel_button.click()
    release.set()
    panel.job.wait(60)
    wait_for(lambda: panel.progress.bar_style == "warning")
    assert panel.job.status == "CANCELLED" and "CANCELLED" in panel.status.value
    assert panel.failure_box.layout.display == ""  # resume offered
    panel.extra_options.clear()
    panel.resume_button.click()
    panel.job.wait(60)
    wait_for(lambda: panel.progress.bar_style == "success")
    assert panel.job.status == "COMPLETED"


def test_failure_then_retry_with_suggested_batch(gpt2_dir, workspace):
    def boom(index, batch_size):
        if batch_size == 8 and index == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    studio = make_studio(workspace, gpt2_dir, before_batch=boom)
    panel = studio.extraction_panel
    panel.launch_button.click()
    first = panel.job
    first.wait(60)
    wait_for(lambda: panel.failure_box.layout.display == "")
    assert "Out of memory" in panel.alert.value and "batch_size=4" in panel.alert.value
    assert panel.retry_batch_size.value == 4  # the suggestion, editable
    panel.retry_batch_size.value = 2
    panel.retry_button.click()
    second = panel.job
    assert second.id != first.id
    second.wait(60)
    wait_for(lambda: panel.progress.bar_style == "success")
    assert second.meta["retry_of"] == first.id and second.meta["params"]["batch_size"] == 2


def test_bad_input_shows_in_panel_not_traceback(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    studio.dataset_picker.source.value = "file"
    studio.dataset_picker.path.value = "/no/such/file.jsonl"
    assert studio.extraction_panel.launch() is None
    assert "does not exist" in studio.extraction_panel.alert.value
    assert "Bad input" in studio.extraction_panel.alert.value


def test_model_and_dataset_tabs(gpt2_dir, workspace, minilm_dir):
    studio = make_studio(workspace, minilm_dir)
    picker = studio.model_picker
    assert minilm_dir in picker.choice.options
    details = picker.inspect()
    assert details["architecture"] == "BertModel" and details["n_layers"] == 6 and details["hidden_size"] == 384
    assert 20e6 < details["n_parameters"] < 25e6 and "parameters" in picker.info.value
    assert [v for _, v in studio.extraction_panel.layers.options] == list(range(6))
    picker.choice.value = "./missing/model"
    assert picker.inspect() is None and "does not exist" in picker.info.value
    picker.choice.value = gpt2_dir
    picker.remember_folder()
    assert gpt2_dir in ms.ModelPicker(workspace_root=studio.workspace.root).choice.options

    rows = studio.dataset_picker.show_preview()
    assert len(rows) == 5 and all(r["tokens"] > 0 for r in rows)
    assert "<th>tokens</th>" in studio.dataset_picker.preview.value
    studio.dataset_picker.source.value = "hub"
    studio.dataset_picker.hub_name.value = "nobody/nothing"
    assert studio.dataset_picker.show_preview() == []
    assert "could not load Hub dataset" in studio.dataset_picker.preview.value


def test_jobs_tab_actions_and_rebuild_after_restart(gpt2_dir, workspace, tmp_path):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    panel.launch_button.click()
    panel.job.wait(60)
    # a store left by a kernel that died mid-job: live status, dead pid
    ws = ms.Workspace(workspace)
    ghost = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=5, before_batch=lambda i, b: time.sleep(0.05))
    ghost.wait(60)
    ghost.store.update(status="EXTRACTING", heartbeat={"pid": 999999, "host": __import__("socket").gethostname(),
                                                       "time": 0, "proc_start": "0"})
    rebuilt = ms.Studio(workspace=workspace, model=gpt2_dir)  # what re-running the cell does
    jobs = rebuilt.jobs_panel
    statuses = {r["id"]: (r["status"], r["error"]) for r in jobs.rows}
    assert statuses[ghost.id] == ("FAILED", "INTERRUPTED")
    assert statuses[panel.job.id] == ("COMPLETED", "")
    html_cells = "".join(getattr(c, "value", "") for c in jobs.table.children)
    assert "INTERRUPTED" in html_cells and "FAILED" in html_cells
    preview = jobs.preview_cleanup()
    assert [r["id"] for r in preview] == [ghost.id] and "Delete these" == jobs.confirm_button.description
    jobs.confirm_button.click()
    assert [r["id"] for r in jobs.rows] == [panel.job.id]
    # per-row Retry on the completed one starts a linked job and shows it in the Extract tab
    row_buttons = jobs.table.children[-1].children
    retry = next(b for b in row_buttons if b.description == "Retry")
    retry.click()
    new = rebuilt.extraction_panel.job
    assert new is not None and new.meta["retry_of"] == panel.job.id
    new.wait(60)
