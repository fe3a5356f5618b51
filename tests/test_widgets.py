"""The notebook panels driven without a browser: real widgets, real jobs, real stores."""
from __future__ import annotations

import html
import re
import threading
import time

import numpy as np
import pytest
import torch

import mistudio as ms
from conftest import fail_at, gate, held_until

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
    ext, rows = browser.ext, browser.ext.sample_index
    listed = [int(r) for r in re.findall(r"<tr><td[^>]*>[^<]*</td><td[^>]*>([\d,]+)</td>", browser.top_table.value)]
    assert len(set(listed)) == len(listed) == 15 and "(one per document or context)" in browser.top_table.value
    browser.one_per_document.value = False  # every token: the same top list the feature column gives
    browser.plot_button.click()
    column = np.asarray(ext.activations("layers.2.residual")[:, 5], np.float64)
    top = np.lexsort((np.arange(len(column)), -column))[:15]
    assert [int(r) for r in re.findall(r"<tr><td[^>]*>[^<]*</td><td[^>]*>([\d,]+)</td>", browser.top_table.value)] \
        == [int(rows[np.searchsorted(ext.sample_offsets, ext.token_index(int(t)), side="right") - 1]) for t in top]


def launch_then_cancel(workspace: str, gpt2_dir: str):
    """A Studio whose launched job is cancelled from the panel at its third batch; returns the Studio."""
    gate_hook, reached, release = gate(2)

    studio = make_studio(workspace, gpt2_dir, before_batch=gate_hook)
    panel = studio.extraction_panel
    panel.batch_size.value = 4
    panel.launch_button.click()
    assert reached.wait(60)
    panel.cancel_button.click()
    release.set()
    panel.job.wait(60)
    return studio


def test_cancel_from_panel(gpt2_dir, workspace):
    studio = launch_then_cancel(workspace, gpt2_dir)
    panel = studio.extraction_panel
    wait_for(lambda: panel.progress.bar_style == "warning")
    assert panel.job.status == "CANCELLED" and "CANCELLED" in panel.status.value
    assert panel.failure_box.layout.display == ""  # resume offered
    panel.extra_options.clear()
    panel.resume_button.click()
    panel.job.wait(60)
    wait_for(lambda: panel.progress.bar_style == "success")
    assert panel.job.status == "COMPLETED"


def test_the_jobs_tab_says_which_workspace_it_lists(gpt2_dir, workspace):
    import os

    studio = make_studio(workspace, gpt2_dir)
    header = studio.jobs_panel.children[1].value
    assert "in the workspace" in header and os.path.abspath(workspace) in header.replace("<wbr>", "")


def test_resume_after_the_model_folder_moved(gpt2_dir, workspace, tmp_path):
    """The store's model folder moved: Resume says so and keeps the store; pointed at the new place in the Model
    tab, Resume reads the model there (the same files) and completes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(gpt2_dir, model)
    studio = launch_then_cancel(workspace, str(model))
    panel = studio.extraction_panel
    cancelled = panel.job
    moved = model.rename(tmp_path / "moved")
    panel.extra_options.clear()
    panel.resume_button.click()
    assert "cannot resume yet" in panel.alert.value and "does not exist" in panel.alert.value
    assert panel.job is cancelled and cancelled.status == "CANCELLED"
    studio.model_picker.set_model(str(moved))
    panel.resume_button.click()
    assert panel.job.id == cancelled.id
    assert panel.job.wait(60).status == "COMPLETED", panel.job.error
    assert panel.job.extraction().record.model.name_or_path == str(moved)


def failed_out_of_memory(gpt2_dir, workspace):
    """A Studio whose launch with batch size 8 ran out of memory at its second batch, the failure shown; (studio,
    the failed job)."""
    def boom(index, batch_size):
        if batch_size == 8 and index == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    studio = make_studio(workspace, gpt2_dir, before_batch=boom)
    panel = studio.extraction_panel
    panel.launch_button.click()
    first = panel.job
    first.wait(60)
    wait_for(lambda: panel.failure_box.layout.display == "")
    return studio, first


def test_failure_then_retry_with_suggested_batch(gpt2_dir, workspace):
    studio, first = failed_out_of_memory(gpt2_dir, workspace)
    panel = studio.extraction_panel
    assert "Out of memory" in panel.alert.value and "batch_size=4" in panel.alert.value
    assert panel.batch_size.value == 4  # the suggestion, in the form, editable
    assert panel.resume_button.layout.display == ""  # the first batch was saved: Resume is offered
    panel.batch_size.value = 2
    panel.retry_button.click()
    second = panel.job
    assert second.id != first.id, (panel.alert.value, panel.status.value, panel.estimate_line.value)
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


def test_model_and_dataset_tabs(gpt2_dir, workspace, minilm_dir, tmp_path):
    studio = make_studio(workspace, minilm_dir)
    picker = studio.model_picker
    assert picker.choice.value == "all-MiniLM-L6-v2 (bundled)" and picker.name_or_path() == minilm_dir
    assert "all-MiniLM-L6-v2 (bundled)" in picker.choice.options  # no machine path on screen
    details = picker.inspect()
    assert details["architecture"] == "BertModel" and details["n_layers"] == 6 and details["hidden_size"] == 384
    assert 20e6 < details["n_parameters"] < 25e6 and "parameters" in picker.info.value
    assert [v for _, v in studio.extraction_panel.layers.options] == list(range(6))
    picker.choice.value = "./missing/model"
    assert picker.inspect() is None and "does not exist" in picker.info.value
    picker.choice.value = gpt2_dir
    picker.remember_folder()
    assert gpt2_dir in ms.ModelPicker(workspace_root=studio.workspace.root).choice.options
    assert picker.inspect()["saved_as"] is None and "body" not in picker.info.value  # saved as what it runs
    from transformers import AutoConfig, GPT2LMHeadModel

    GPT2LMHeadModel(AutoConfig.from_pretrained(gpt2_dir)).save_pretrained(tmp_path / "with-head")
    picker.choice.value = str(tmp_path / "with-head")  # a checkpoint with its LM head, as the Hub's are
    details = picker.inspect()
    assert details["architecture"] == "GPT2Model" and details["saved_as"] == "GPT2LMHeadModel"
    assert "GPT2Model (gpt2; the body of the folder's GPT2LMHeadModel, which extraction runs)" in picker.info.value
    picker.choice.value = gpt2_dir  # back to a folder with its tokenizer, for the preview below

    rows = studio.dataset_picker.show_preview()
    assert len(rows) == 10 and all(r["tokens"] > 0 for r in rows)
    assert ">tokens</th>" in studio.dataset_picker.preview.value
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
    assert rebuilt.interrupted == ghost.id and ghost.id in rebuilt.banner.value  # point 6: the banner
    assert "INTERRUPTED" in html_cells and "FAILED" in html_cells
    preview = jobs.preview_cleanup()
    assert [r["id"] for r in preview] == [ghost.id] and "Delete these" == jobs.confirm_button.description
    jobs.confirm_button.click()
    assert [r["id"] for r in jobs.rows] == [panel.job.id]
    # per-row Retry on the completed one (asks first: a full rerun) starts a linked job and shows it in Extract
    jobs.cells[panel.job.id]["buttons"]["Retry"].click()
    jobs.confirm_retry_button.click()
    new = rebuilt.extraction_panel.job
    assert new is not None and new.meta["retry_of"] == panel.job.id
    new.wait(60)


# -- issue 11, "Studio, round 2" -------------------------------------------------------------------
def broken_model(gpt2_dir, tmp_path):
    """A folder whose config reads but whose weights do not exist: the job fails while LOADING."""
    import shutil
    from pathlib import Path

    folder = tmp_path / "broken-model"
    folder.mkdir()
    for f in Path(gpt2_dir).iterdir():
        if not f.name.startswith("model") and not f.name.endswith(".safetensors") and not f.name.endswith(".bin"):
            shutil.copy(f, folder / f.name)
    return str(folder)


def cells_text(jobs) -> str:
    return "".join(getattr(c, "value", "") for c in jobs.table.children)


def test_point1_a_model_refused_by_its_job_is_a_form_error_and_launch_takes_the_corrected_form(gpt2_dir, workspace,
                                                                                               tmp_path):
    """Weights missing: the job refuses the model while loading it and leaves no store, so the tab shows an error of
    the form, not a failed extraction to retry (Retry of a job with a store: test_start_window.py)."""
    bad = broken_model(gpt2_dir, tmp_path)
    studio = make_studio(workspace, bad)
    panel = studio.extraction_panel
    panel.layers.value = (1,)
    panel.launch_button.click()
    first = panel.job
    first.wait(60)
    wait_for(lambda: panel.failure_box.layout.display == "")
    assert first.status == "FAILED" and panel.job is None
    assert "No extraction was created" in panel.alert.value and first.id not in panel.alert.value
    assert panel.failure_actions.layout.display == "none"  # no Retry / Resume: nothing ran
    assert ms.Workspace(workspace).extractions().empty
    studio.model_picker.set_model(gpt2_dir)  # fix it in the Model tab
    assert panel.failure_box.layout.display == "none"
    panel.launch_button.click()
    second = panel.job
    assert second.id != first.id
    second.wait(60)
    assert second.status == "COMPLETED"
    assert second.meta["model"]["name_or_path"] == gpt2_dir and second.meta["params"]["layers"] == [1]


def test_point1_failures_before_a_job_create_nothing(gpt2_dir, workspace):
    studio = make_studio(workspace, "/no/such/model")
    panel = studio.extraction_panel
    assert panel.layers.options == ()  # nothing to choose: the model cannot be read
    assert panel.launch() is None
    assert "does not exist" in panel.alert.value and "layers is empty" not in panel.alert.value
    assert "No extraction was created" in panel.alert.value
    assert ms.Workspace(workspace).extractions().empty  # no store
    assert panel.job is None and panel.resume_button.layout.display == "none"
    # fix the model, Launch runs the form as it is now (no Retry: nothing ran)
    assert panel.failure_actions.layout.display == "none"
    studio.model_picker.set_model(gpt2_dir)
    panel.launch_button.click()
    job = panel.job
    job.wait(60)
    assert job.status == "COMPLETED" and job.meta["model"]["name_or_path"] == gpt2_dir
    # a later dataset error resets the target: Retry/Resume no longer point at the previous job
    studio.dataset_picker.source.value = "file"
    studio.dataset_picker.path.value = "/no/such/data.jsonl"
    assert panel.launch() is None
    assert panel.job is None and "does not exist" in panel.alert.value
    assert panel.resume_button.layout.display == "none"


def test_point1_resume_only_where_it_can_succeed():
    from types import SimpleNamespace

    from mistudio.widgets.extraction_panel import resumable

    def job(status, **error):
        return SimpleNamespace(status=status, error=error or None)

    assert resumable(job("CANCELLED"))
    assert resumable(job("FAILED", error_type="INTERRUPTED", resume_available=True))
    assert not resumable(job("FAILED", error_type="VALIDATION", resume_available=False))  # a bad request
    # a store whose rows stand, its model moved or changed since: the record offers resume (put the files back)
    assert resumable(job("FAILED", error_type="VALIDATION", resume_available=True))
    assert not resumable(job("FAILED", error_type="OOM", resume_available=False))
    assert not resumable(None)


def test_point1_every_callback_error_shows_in_its_panel(gpt2_dir, workspace, monkeypatch):
    studio = make_studio(workspace, gpt2_dir)
    jobs, browser = studio.jobs_panel, studio.browser

    def boom(*a, **k):
        raise OSError("disk went away")

    monkeypatch.setattr(studio.workspace, "extractions", boom)
    jobs.refresh_button.click()  # no exception escapes: it shows in the Jobs panel
    assert "disk went away" in jobs.message.value and "OSError" in jobs.message.value
    browser.refresh_button.click()
    assert "disk went away" in browser.info.value
    monkeypatch.setattr(studio.model_picker, "inspect", boom)
    studio.model_picker.inspect_button.click()  # the lookup runs on a thread: its error shows when it ends
    wait_for(lambda: not studio.model_picker.busy, 30)
    assert "disk went away" in studio.model_picker.info.value


def test_point2_browse_after_cleanup_removed_its_store(gpt2_dir, workspace):
    studio = launch_then_cancel(workspace, gpt2_dir)
    panel = studio.extraction_panel
    cancelled = panel.job.id
    studio.selected_index = 4
    assert studio.browser.extraction.value == cancelled  # it holds data: listed
    studio.selected_index = 3
    studio.jobs_panel.preview_cleanup()
    studio.jobs_panel.confirm_button.click()
    studio.selected_index = 4  # the Extract tab's job is gone now
    browser = studio.browser
    assert cancelled not in [v for _, v in browser.extraction.options]
    assert "no longer in the workspace" in browser.info.value and "Error" not in browser.info.value


def test_point3_jobs_grid_compact_and_live(gpt2_dir, workspace):
    gate_hook, reached, release = gate(3)
    listed = threading.Event()  # its first batch waits for its row: its progress events find the row

    studio = make_studio(workspace, gpt2_dir)
    jobs = studio.jobs_panel
    assert "No extractions" in jobs.empty.value and jobs.table.layout.display == "none"
    panel = studio.extraction_panel
    panel.layers.value = (0, 2)
    panel.hooks["mlp"].value = True
    panel.launch_button.click()
    done = panel.job
    done.wait(60)
    # a slow one, watched live from the grid (no Refresh)
    panel.extra_options["before_batch"] = held_until(listed, gate_hook)
    panel.batch_size.value = 4
    panel.launch_button.click()
    live = panel.job
    wait_for(lambda: live.id in jobs.cells)  # its row appeared from the job's events
    listed.set()
    assert reached.wait(60)
    wait_for(lambda: "8 computed" in jobs.cells[live.id]["progress"].value or
             "12 computed" in jobs.cells[live.id]["progress"].value)  # computed, not yet saved (one chunk)
    assert "0 / 40 · 0%" in jobs.cells[live.id]["progress"].value
    assert "EXTRACTING" in jobs.cells[live.id]["status"].value
    assert not jobs.cells[live.id]["buttons"]["Cancel"].disabled
    jobs.cells[live.id]["buttons"]["Cancel"].click()
    release.set()
    live.wait(60)
    wait_for(lambda: "CANCELLED" in jobs.cells.get(live.id, {}).get("status", W_EMPTY).value)
    text = cells_text(jobs)
    assert jobs.empty.value == "" and jobs.table.layout.display == ""
    assert "layers 0,2 × residual, mlp" in text  # summarised, one line
    assert "40 / 40 · 100%" in text
    assert "just now" in text
    row = next(r for r in jobs.rows if r["id"] == live.id)
    assert row["samples_committed"] < 40 and f"{row['samples_committed']} / 40" in jobs.cells[live.id]["progress"].value
    assert f"{done.progress['tokens_done']:,} tokens" in jobs.cells[done.id]["progress"].value  # separators
    assert jobs.table.layout.grid_template_columns is None  # the tracks are the stylesheet's (two layouts)
    assert all(b.description == "" and b.tooltip for b in jobs.cells[done.id]["buttons"].values())  # icons


W_EMPTY = type("Empty", (), {"value": ""})()


def test_point3_failed_row_shows_its_message_on_demand(gpt2_dir, workspace, tmp_path):
    studio = make_studio(workspace, gpt2_dir, before_batch=fail_at(0, "the forward broke"))
    studio.extraction_panel.launch_button.click()
    job = studio.extraction_panel.job
    job.wait(60)
    jobs = studio.jobs_panel
    jobs.refresh()
    details = jobs.details
    assert details.layout.display == "none"
    jobs.cells[job.id]["buttons"]["Details"].click()
    assert details.layout.display == "" and jobs.details_for == job.id
    assert "mistudio-error" in details.value and html.escape(job.error["error_message"][:30]) in details.value
    jobs.cells[job.id]["buttons"]["Details"].click()
    assert details.layout.display == "none"
    assert jobs.cells[job.id]["buttons"]["Resume"].disabled is False  # allocated: resume can retry the batch
    assert "danger" == jobs.cells[job.id]["buttons"]["Details"].button_style  # the row has a message


def test_point4_delete_asks_and_warns_for_completed(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    studio.extraction_panel.launch_button.click()
    job = studio.extraction_panel.job
    job.wait(60)
    jobs = studio.jobs_panel
    jobs.refresh()
    jobs.cells[job.id]["buttons"]["Delete"].click()
    assert jobs.confirm_box.layout.display == "" and jobs.pending_delete == job.id
    assert "COMPLETED" in jobs.confirm_text.value and "lost for good" in jobs.confirm_text.value
    assert "mistudio-error" in jobs.confirm_text.value  # shown as a warning, in red
    assert [r["id"] for r in jobs.rows] == [job.id]  # nothing deleted yet
    jobs.keep_button.click()
    assert jobs.confirm_box.layout.display == "none" and "Nothing was deleted" in jobs.message.value
    assert not ms.Workspace(workspace).extractions().empty
    jobs.cells[job.id]["buttons"]["Delete"].click()
    jobs.confirm_delete_button.click()
    assert jobs.rows == [] and "Deleted" in jobs.message.value


def test_point5_plots_window_marked_labelled_same_width(gpt2_dir, workspace):
    from matplotlib.patches import Rectangle

    from mistudio import plots

    ext = ms.extract(gpt2_dir, "sample", layers=[0, 2], max_samples=30, workspace=workspace)
    row = int(ext.rows()[1])
    fig = plots.heatmap(ext, row, "layers.2.residual", feature=20, max_features=16)
    ax = fig.axes[0]
    assert "features 12–27 of 32" in ax.get_title() and "feature 20 outlined" in ax.get_title()
    assert any(isinstance(p, Rectangle) and p.get_x() == 20 - 12 - 0.5 for p in ax.patches)
    assert fig.axes[1].get_ylabel().startswith("activation (range ±")  # the colour bar says what it shows
    assert plots.feature_window(None, 384) == slice(0, 64) and plots.feature_window(380, 384) == slice(320, 384)
    top = plots.top_tokens(ext, "layers.2.residual", 3, k=5, context=20)
    figures = [fig, plots.layer_norms(ext, row), plots.feature_histogram(ext, "layers.2.residual", 3),
               plots.top_tokens_figure(ext, "layers.2.residual", 3, top=top)]
    assert len({f.get_figwidth() for f in figures}) == 1  # one scale
    labels = [t.get_text() for t in figures[3].axes[0].get_yticklabels()]
    assert all(label.startswith("row ") and len(label) <= 64 for label in labels)
    png = plots.to_png(figures[3])
    from PIL import Image
    import io

    image = Image.open(io.BytesIO(png)).convert("L")
    import numpy as np

    left = np.asarray(image)[:, :3]
    assert left.min() > 200  # nothing drawn against the left edge: labels are not cut


def test_extract_with_this_sae_names_the_sae_in_the_summary(gpt2_dir, workspace, tmp_path):
    """The Train tab's "Extract with this SAE" (its callback, as the Studio wires it): the Extract tab's summary line
    names the SAE and its hook point, the section holding the SAEs field is unfolded; emptying the field takes the
    SAE out of the line again, and a half-typed field says so."""
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    assert "SAE" not in panel.summary.value and panel.advanced.selected_index is None
    sae = tmp_path / "sae_20261201_191208_78208b"
    sae.mkdir()
    studio.train_panel.on_extract_with_sae({"model": gpt2_dir, "saes": {"layers.1.residual": str(sae)},
                                            "layers": [1]})
    assert studio.tabs.titles[studio.tabs.selected_index] == "Extract"
    summary = panel.summary.value
    assert "Runs <b>" in summary and "with the SAE <b title=" in summary, summary
    assert f">{sae.name}</b> at <b>layers.1.residual</b>" in summary and "layers.1.residual.latents" in summary
    assert panel.advanced.selected_index == 1  # "More options", where the SAEs field is, unfolded
    field = panel.options["saes"][1]
    field.value = f"layers.0.residual={sae},layers.1.residual={sae}"
    assert "with the SAEs" in panel.summary.value and "<b>layers.0.residual</b>" in panel.summary.value
    field.value = '{"layers.1.residual": '
    assert "not a {hook point: folder} mapping yet" in panel.summary.value
    field.value = ""
    assert "SAE" not in panel.summary.value


def test_point6_opens_on_model_remembers_form_and_summary(gpt2_dir, workspace):
    import json
    from pathlib import Path

    studio = make_studio(workspace, gpt2_dir)
    assert studio.selected_index == 0 and studio.tabs.selected_index == 0  # the Model tab
    panel = studio.extraction_panel
    summary = panel.summary.value
    assert "bundled sample" in summary and "up to 40 rows" in summary
    assert gpt2_dir.split("/")[-1] in summary
    panel.layers.value = (1, 2)
    panel.batch_size.value = 16
    studio.dataset_picker.max_samples.value = 12
    panel.launch_button.click()
    panel.job.wait(60)
    saved = json.loads((Path(workspace) / "studio.json").read_text())
    assert saved["extract"]["layers"] == [1, 2] and saved["dataset"]["max_samples"] == 12
    again = ms.Studio(workspace=workspace)  # after a kernel restart: no arguments
    assert again.model_picker.name_or_path() == gpt2_dir
    assert again.extraction_panel.layers.value == (1, 2) and again.extraction_panel.batch_size.value == 16
    assert again.dataset_picker.max_samples.value == 12
    assert again.banner_box.layout.display == "none"  # nothing was interrupted


def test_point6_interrupted_banner_resumes(gpt2_dir, workspace):
    import socket

    ws = ms.Workspace(workspace)
    ghost = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=8, batch_size=2)
    ghost.wait(60)
    ghost.store.update(status="EXTRACTING", heartbeat={"pid": 999999, "host": socket.gethostname(), "time": 0,
                                                       "proc_start": "0"})
    studio = ms.Studio(workspace=workspace, model=gpt2_dir)
    assert studio.banner_box.layout.display == "" and ghost.id in studio.banner.value
    assert "interrupted" in studio.banner.value
    studio.banner_resume.click()
    job = studio.extraction_panel.job
    assert job is not None and job.id == ghost.id and studio.selected_index == 2
    job.wait(60)
    assert job.status == "COMPLETED"
    assert ms.Studio(workspace=workspace).banner_box.layout.display == "none"


def test_point7_small_things(gpt2_dir, workspace, tmp_path):
    studio = make_studio(workspace, gpt2_dir)
    picker, panel, browser = studio.dataset_picker, studio.extraction_panel, studio.browser
    texts = "".join(getattr(c, "value", "") for c in picker.children)
    assert "0 = all rows" in texts
    assert panel.retry_button.button_style != "danger" and panel.retry_button.tooltip and panel.resume_button.tooltip
    assert "Retry" in "".join(getattr(c, "value", "") for c in panel.failure_actions.children)  # help text
    assert panel.auto_retry.description.endswith("half the batch size") and panel.auto_retry.layout.width == "auto"
    picker.show_preview()
    assert "<table" in picker.preview.value
    picker.source.value = "file"
    assert picker.preview.value == ""  # cleared when the source changes
    data = tmp_path / "other.jsonl"
    data.write_text('{"body": "hello there"}\n')
    picker.path.value = str(data)
    assert picker.show_preview() == []
    assert "Text column" in picker.preview.value and "text_column=" not in picker.preview.value  # UI words
    assert all(box.layout.display == "none" for box in browser._boxes.values())  # no empty image boxes
    picker.source.value = "sample"
    panel.launch_button.click()
    panel.job.wait(60)
    wait_for(lambda: panel.progress.description == "100%")  # the percentage by the bar


def test_point8_examples_html_pure():
    from mistudio.analysis.feature_view import display_pieces, examples_html

    assert display_pieces(["The", "Ġquick", "Ġbrown", "Ċ"]) == ["The", " quick", " brown", "↵"]
    assert display_pieces(["[CLS]", "play", "##ing", "games", "[SEP]"]) == ["[CLS]", " play", "ing", " games",
                                                                              " [SEP]"]
    example = {"value": 2.0, "row": 1234, "position": 3, "context_start": 0,
               "context_tokens": ["[CLS]", "play", "##ing", "games", "[SEP]"],
               "context_values": [0.0, 0.5, 1.0, 2.0, -1.0]}
    out = examples_html([example], special_tokens=["[CLS]", "[SEP]"], scheme="wordpiece")
    assert "row 1,234" in out and "<b>2</b>" in out and "<details" in out and "<summary>" in out
    assert out.count("ms-peak") == 2  # outlined in the short line and in the full context
    assert "outline:2px solid" in out and "opacity:0.45" in out  # peak outlined, specials dimmed
    assert "background:rgba(220,70,30,0.85)" in out  # the peak is the darkest
    assert "background:rgba(40,100,220" in out  # negative values in blue
    assert ">ing<" in out and "##" not in out.split("title=")[0]
    example["context_values"][0] = None  # a special token with no activation row (exclude_special)
    assert "no activation" in examples_html([example], scheme="wordpiece")


def test_point8_feature_view_with_excluded_special_tokens(minilm_dir, workspace):
    from mistudio.analysis.feature_view import feature_view, feature_view_html

    ext = ms.extract(minilm_dir, "sample", layers=[1], max_samples=20, exclude_special=True, workspace=workspace)
    view = feature_view(ext, "layers.1.residual", 3, k=5, context=4)
    assert {m["token"] for m in view["token_means"]}.isdisjoint({"[CLS]", "[SEP]"})  # no rows, no means
    assert all(e["token"] not in ("[CLS]", "[SEP]") for e in view["top"])
    assert "ms-peak" in feature_view_html(view, ["[CLS]", "[SEP]"], "wordpiece")


def test_point8_feature_view_in_browse(gpt2_dir, workspace):
    pytest.importorskip("mistudio.analysis")
    from mistudio.analysis.feature_view import feature_view

    ext = ms.extract(gpt2_dir, "sample", layers=[1], max_samples=60, workspace=workspace)
    view = feature_view(ext, "layers.1.residual", 4, k=10, context=5)
    assert len(view["top"]) == 10 and not view["cached"]
    assert [b["quantiles"] for b in view["bands"]] == [[0.0, 0.5], [0.5, 0.9], [0.9, 0.99], [0.99, 1.0]]
    assert all(len(b["examples"]) <= 3 for b in view["bands"]) and sum(len(b["examples"]) for b in view["bands"])
    assert view["token_means"] and view["token_means"][0]["mean"] >= view["token_means"][-1]["mean"]
    assert sum(view["hist"]) == view["n_tokens"] == ext.committed_tokens()
    assert feature_view(ext, "layers.1.residual", 4, k=10, context=5)["cached"]  # from the store's analysis/
    studio = make_studio(workspace, gpt2_dir)
    studio.selected_index = 4
    browser = studio.browser
    browser.feature.value = 4
    browser.view_button.click()
    assert "ms-peak" in browser.feature_html.value and "background:rgba(" in browser.feature_html.value
    assert "Quantiles" in browser.feature_html.value and "mean activation per token" in browser.feature_html.value
    assert browser.feature_hist.value[:4] == b"\x89PNG"
    browser.feature.value = 999
    browser.view_button.click()
    assert "out of range" in browser.info.value


# -- issue 10: plan and run real models from the Studio ---------------------------------------------------
def test_issue10_estimate_shown_and_short_disk_refused_until_confirmed(gpt2_dir, workspace, monkeypatch):
    import sys

    estimate_module = sys.modules["mistudio.plan"]  # the package's `estimate` is the function
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    panel.estimate_button.click()
    assert "Estimate" in panel.estimate_line.value and "on disk" in panel.estimate_line.value
    assert panel.last_estimate["samples"] == 40 and panel.confirm_disk.layout.display == "none"
    panel.probe.value = True  # the timed run: the model is loaded and a few batches timed
    panel.estimate_button.click()
    assert panel.last_estimate["seconds"] is not None and "~" in panel.last_estimate["summary"]
    panel.probe.value = False
    panel.layers.value = (1,)  # the form changed: the estimate shown is stale
    assert panel.last_estimate is None and "Estimate again" in panel.estimate_line.value

    monkeypatch.setattr(estimate_module, "_free_disk", lambda workspace: 1000)  # a disk with 1 KB free
    panel.launch_button.click()
    assert panel.job is None and not ms.Workspace(workspace).extractions().shape[0]
    assert "Not launched" in panel.estimate_line.value and "1000 B" in html.unescape(panel.estimate_line.value)
    assert panel.confirm_disk.layout.display == ""  # "Launch anyway" offered
    panel.confirm_disk.value = True
    panel.launch_button.click()
    assert panel.job is not None and panel.confirm_disk.value is False  # confirmed for this launch only
    panel.job.wait(60)
    assert panel.job.status == "COMPLETED"


def test_issue10_auto_batch_and_advanced_options_reach_submit(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    assert "auto" in panel.batch_size.options
    panel.batch_size.value = "auto"
    panel.window.value, panel.stride.value = 16, 8
    panel.exclude_special.value = True
    panel.micro_batch_size.value = 2
    args = panel.submit_arguments()
    assert (args["batch_size"], args["window"], args["stride"], args["micro_batch_size"]) == ("auto", 16, 8, 2)
    assert args["exclude_special"] is True and args["max_batch_tokens"] is None and args["chat_template"] is None
    panel.chat_template.value = "{{ messages }}"
    assert panel.submit_arguments()["chat_template"] == "{{ messages }}"
    panel.chat_auto.value = True
    assert panel.submit_arguments()["chat_template"] == "auto"
    panel.chat_auto.value, panel.chat_template.value = False, ""
    panel.launch_button.click()
    job = panel.job
    job.wait(120)
    wait_for(lambda: panel.progress.bar_style == "success")
    chosen = job.meta["params"]["batch_size_auto"]["chosen"]
    assert f"batch size {chosen} (auto" in panel.status.value
    assert job.meta["params"]["window"] == 16 and job.meta["params"]["exclude_special"] is True
    panel.max_batch_tokens.value = 64  # with auto: refused with the spec's message, in the panel
    panel.launch_button.click()
    assert "pass one of them" in panel.alert.value


def test_issue10_presets_save_fill_launch_delete(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    panel.save_preset_button.click()
    assert "Type a name" in panel.preset_status.value
    panel.layers.value = (1,)
    panel.hooks["mlp"].value = True
    panel.batch_size.value = 4
    panel.window.value = 32
    panel.preset_name.value = "bad name!"
    panel.save_preset_button.click()
    assert "Preset not saved" in panel.preset_status.value
    panel.preset_name.value = "mid"
    panel.save_preset_button.click()
    assert "Saved preset" in panel.preset_status.value
    assert [v for _, v in panel.preset.options] == ["", "mid"] and panel.preset.value == "mid"
    assert ms.Workspace(workspace).preset("mid")["window"] == 32

    panel.preset.value = ""  # change the form, then choose the preset: it fills the form back
    panel.layers.value = (0,)
    panel.batch_size.value = 16
    panel.window.value = 0
    panel.preset.value = "mid"
    assert (panel.layers.value, panel.batch_size.value, panel.window.value) == ((1,), 4, 32)
    assert panel.hooks["mlp"].value and "Form filled from preset" in panel.preset_status.value
    ms.Workspace(workspace).save_preset("nosum", **{**ms.Workspace(workspace).preset("mid"), "checksum": False})
    panel.refresh_presets()
    panel.preset.value = "nosum"  # every argument has its field: checksum is in "More options"
    assert panel.options["checksum"][1].value is False and panel.form_arguments()["checksum"] is False
    panel.preset_name.value = "nosum2"
    panel.save_preset_button.click()
    assert ms.Workspace(workspace).preset("nosum2")["checksum"] is False
    job = panel.launch()
    job.wait(60)
    assert job.status == "COMPLETED" and job.meta["params"]["batch_size"] == 4
    assert job.meta["params"]["checksum"] is False
    assert job.extraction().hook_points == ["layers.1.residual", "layers.1.mlp"]

    panel.delete_preset_button.click()
    assert "again to confirm" in panel.preset_status.value and ms.Workspace(workspace).presets()
    panel.delete_preset_button.click()
    assert "nosum2" not in ms.Workspace(workspace).presets() and panel.preset.value == ""


def test_issue10_browse_hides_special_and_outlier_tokens(minilm_dir, workspace, monkeypatch):
    studio = make_studio(workspace, minilm_dir)
    studio.dataset_picker.max_samples.value = 8
    panel = studio.extraction_panel
    panel.layers.value = (5,)
    job = panel.launch()
    job.wait(120)
    assert job.status == "COMPLETED"
    studio.selected_index = 4
    browser = studio.browser
    hp = browser.hook_point.value
    assert "norm quantiles" in browser.info.value and "outlier" in browser.info.value
    browser.row.value = int(browser.ext.rows()[0])
    assert browser.plot()
    shown = {name: image.value for name, image in browser.images.items()}
    n_special = int(browser.ext.sample(browser.row.value, [hp])["special"].sum())
    assert n_special >= 2  # [CLS] ... [SEP]

    browser.hide_special.value = True
    assert browser.plot()
    assert browser.hidden["row_tokens"] == n_special
    assert browser.hidden["rows"] == int(browser.ext.store.tokens("special")[:].sum())
    assert 'title="[CLS]"' not in browser.top_table.value and 'title="[SEP]"' not in browser.top_table.value
    for name in ("heatmap", "norms"):  # the histogram: in the feature view (tests/test_studio_leftovers.py)
        assert browser.images[name].value != shown[name], name

    browser.hide_special.value = False  # outliers: a store's statistics, made low here so some tokens pass them
    real = browser.ext.outliers(hp)
    first = browser.ext.activation_range(browser.row.value)[0]
    norms = np.linalg.norm(browser.ext.sample(browser.row.value, [hp])["activations"][hp].astype(np.float32), axis=1)
    monkeypatch.setattr(browser.ext, "outliers", lambda point: {**real, "threshold": float(np.median(norms)),
                                                                "rows": np.array([first, first + 1])})
    browser.hide_outliers.value = True
    assert browser.plot()
    assert browser.hidden["row_tokens"] == int((norms > np.median(norms)).sum()) > 0
    assert browser.hidden["rows"] == 2 and "Hidden:" in browser.info.value


# -- issue 19: "Studio and first run, round 3" (and issue 18, point 4: Browse on long rows) ------------------
def grid_rows(jobs) -> list[list]:
    """The grid's cells, nine per line (the header first)."""
    cells = list(jobs.table.children)
    return [cells[i:i + 9] for i in range(0, len(cells), 9)]


def test_issue19_p1_jobs_grid_folds_instead_of_clipping(gpt2_dir, workspace):
    from mistudio.widgets.common import STYLE

    ws = ms.Workspace(workspace)
    ws.submit(gpt2_dir, "sample", layers=[0, 2], max_samples=8).wait(60)
    studio = make_studio(workspace, gpt2_dir)
    jobs = studio.jobs_panel
    assert "mistudio-jobs-panel" in jobs._dom_classes and jobs.children[0].value.startswith("<style>")
    # nine tracks where the panel is wide enough; two lines per job below that, from the panel's own width
    wide = re.search(r"\.mistudio-jobs \{[^}]*grid-template-columns:([^;]+);", STYLE).group(1)
    needs = sum(int(n) for n in re.findall(r"(\d+)px", wide)) + 8 * 8
    narrow = re.search(r"@container \(max-width: (\d+)px\)", STYLE)
    assert narrow and needs <= int(narrow.group(1)) + 1, (needs, narrow.group(1))
    folded = STYLE[narrow.start():]
    assert "grid-column: span 2" in folded and folded.count("minmax(") == 5  # five tracks, actions span two
    header, row = grid_rows(jobs)
    assert ["mistudio-first" in c._dom_classes for c in row[:9]] == [True] * 5 + [False] * 4
    actions = row[8]
    assert "mistudio-actions" in actions._dom_classes and len(actions.children) == 5
    assert all(b.tooltip and b.layout.width == "28px" for b in actions.children)
    for cell in row[:8]:  # text wraps, never cut sideways (the whole text is in the tooltip too)
        text = re.sub(r'<span class="mistudio-badge"[^>]*>', "", cell.value)  # a badge is one word: whole
        assert "nowrap" not in text and "ellipsis" not in text
    from mistudio.widgets.common import breakable

    assert breakable("my_data/set.jsonl") == "my_<wbr>data/<wbr>set<wbr>.jsonl"  # names break at separators


def test_issue19_p2_typing_a_hub_id_looks_nothing_up(minilm_dir, workspace, monkeypatch, caplog):
    studio = make_studio(workspace, minilm_dir)
    picker, panel = studio.model_picker, studio.extraction_panel
    assert picker.choice.continuous_update is False  # the field sends its value when left, not per keystroke
    picker.inspect()
    assert "BertModel" in picker.info.value and picker.details
    started = time.monotonic()
    for typed in ("g", "gp", "gpt", "gpt2"):
        picker.choice.value = typed
    assert time.monotonic() - started < 5.0 and picker.lookups == 1  # only the inspect above
    assert picker.info.value == "" and picker.details is None  # MiniLM's facts went with it
    assert panel.layers_known is False and "Load / inspect" in panel.summary.value
    thread = picker.inspect_async()  # the button: off the kernel's main path, busy meanwhile
    assert picker.inspect_button.disabled and "Reading the config" in picker.info.value
    thread.join(30)
    assert not picker.inspect_button.disabled and "mistudio-error" in picker.info.value
    assert "local Hugging Face cache" in picker.info.value and "HF_HUB_OFFLINE" in picker.info.value
    # with the Hub "on" but unreachable (no network here) or the id unknown: one short request, no retries
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    picker.choice.value = "mistudio-tests/no-such-model"
    started = time.monotonic()
    picker.inspect_async().join(60)
    assert time.monotonic() - started < 15
    assert "could not be reached" in picker.info.value or "has no model" in picker.info.value
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    # the bundled model again: its facts and layers come back (the lookup's listener sets the layers)
    picker.choice.value = "all-MiniLM-L6-v2 (bundled)"
    assert panel.layers_known and [v for _, v in panel.layers.options] == list(range(6))


def long_row_extraction(gpt2_dir, workspace, tokens=3000):
    """A store with one ~3,000-token document (windows of 128) among short ones."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    texts, long = ms.sample_texts(), ""
    for text in texts:
        long += text + " "
        if len(tok(long)["input_ids"]) >= tokens:
            break
    data = [long] + texts[:20]
    ext = ms.extract(gpt2_dir, data, layers=[0, 2], window=128, stride=64, workspace=workspace, progress=False)
    return ext, len(tok(long)["input_ids"])


def test_issue19_p3_long_rows_plot_a_window_fast_and_say_so(gpt2_dir, workspace):
    ext, n_long = long_row_extraction(gpt2_dir, workspace)
    assert n_long >= 3000
    studio = make_studio(workspace, gpt2_dir)
    studio.selected_index = 4
    browser = studio.browser
    browser.hook_point.value = "layers.2.residual"
    browser.feature.value = 5
    states = []
    browser.plot_button.observe(lambda c: states.append(c["new"]), "disabled")
    # this process's CPU time (other processes' load does not count), best of up to three rounds (a round
    # disturbed by this process's own stragglers, e.g. the garbage collector, is measured again)
    times: dict[int, float] = {}
    for attempt in range(3):
        for row in (0, 3):  # the long document, then a short one
            browser.row.value = row
            started = time.process_time()
            assert browser.plot()
            times[row] = min(times.get(row, float("inf")), time.process_time() - started)
            assert f"row {row} (" in browser.info.value  # the row plotted, not the previous one
        if times[0] < 4 * times[3] + 1.0:
            break
    assert states == [True, False] * 2 * (attempt + 1)  # busy (disabled, spinner) while each plot was drawn
    # the long row: 64 tokens around the feature's peak, every label readable; as fast as a short row
    browser.row.value = 0
    assert browser.plot()
    assert browser.window.stop - browser.window.start == 64
    assert f"of {n_long} around the feature's peak" in browser.info.value
    sample = ext.sample(0, ["layers.2.residual"])
    peak = int(np.nanargmax(sample["activations"]["layers.2.residual"][:, 5]))
    assert browser.window.start <= peak < browser.window.stop
    assert times[0] < 4 * times[3] + 1.0, times  # was 35-38 s against ~1 s
    from mistudio import plots

    fig = plots.heatmap(ext, 0, "layers.2.residual", feature=5)
    assert len(fig.axes[0].get_yticklabels()) == 64 and f"of {n_long}" in fig.axes[0].get_title()
    norms = plots.layer_norms(ext, 0, "residual", tokens=browser.window)
    assert len(norms.axes[0].get_xticklabels()) == 64
    # a failed plot does not leave the previous row's plots or line on screen
    browser.row.value = 3
    browser.feature.value = 10_000
    assert not browser.plot()
    assert "not plotted" in browser.info.value and "Plotted" not in browser.info.value
    assert all(box.layout.display == "none" for box in browser._boxes.values())


def test_issue19_p3_colour_range_not_taken_by_one_dimension():
    from mistudio import plots

    rng = np.random.default_rng(0)
    values = rng.normal(size=(64, 64)).astype(np.float32)
    values[:, 7] *= 1000  # one massive dimension
    limit, beyond = plots.colour_limit(values)
    assert beyond == [7] and limit < 5  # the others keep their colours; the big one is named and saturated
    assert plots.colour_limit(np.full((4, 4), np.nan))[0] == 1.0
    assert plots.token_window(3000, 2990) == slice(2936, 3000) and plots.token_window(10, 3) == slice(0, 10)


def test_issue19_p4_saved_and_computed_apart_never_backwards(gpt2_dir, workspace):
    from mistudio.widgets.common import RateMeter
    from mistudio.widgets.jobs_panel import progress_cell

    gate_hook, reached, release = gate(4)
    listed = threading.Event()  # its first batch waits for its row: its progress events find the row
    studio = make_studio(workspace, gpt2_dir, before_batch=held_until(listed, gate_hook))
    jobs, panel = studio.jobs_panel, studio.extraction_panel
    panel.batch_size.value = 4
    seen = []
    panel.launch_button.click()
    job = panel.job
    wait_for(lambda: job.id in jobs.cells)
    jobs.cells[job.id]["progress"].observe(lambda c: seen.append(c["new"]), "value")
    listed.set()
    assert reached.wait(60)
    wait_for(lambda: "16 computed" in jobs.cells[job.id]["progress"].value)
    cell = jobs.cells[job.id]
    before_gate = len(seen)  # the repaints seen so far; under load the panel coalesces them, so few or none
    at_gate = cell["progress"].value  # the job waits at its gate: this value holds still
    saved = job.record.progress.samples_committed
    assert f"{saved} / 40" in cell["progress"].value  # saved (one chunk holds them all: none yet) and computed
    assert "16 / 40 samples computed (40%)" in panel.status.value and f"{saved} saved" in panel.status.value
    store_size = studio.workspace.size_of(studio.workspace.path_of(job.id))
    from mistudio.workspace import human_bytes

    wait_for(lambda: human_bytes(studio.workspace.size_of(studio.workspace.path_of(job.id))) in cell["size"].value)
    assert store_size > 4096  # the allocated token arrays: the size moved while it ran
    release.set()
    job.wait(60)
    wait_for(lambda: "40 / 40 · 100%" in jobs.cells.get(job.id, {}).get("progress", W_EMPTY).value)
    final = jobs.cells[job.id]["progress"].value
    timeline = seen[:before_gate] + [at_gate] + seen[before_gate:] + [final]
    pairs = []
    for text in timeline:
        kept = re.search(r"([\d,]+) / 40", text)
        done = re.search(r"([\d,]+) computed", text)
        pairs.append((int(kept.group(1)), int(done.group(1)) if done else int(kept.group(1))))
    assert (saved, 16) in pairs and pairs[-1] == (40, 40)  # a value mid-job and the last: the checks below compare
    assert [p[0] for p in pairs] == sorted(p[0] for p in pairs)  # saved never goes back
    assert [p[1] for p in pairs] == sorted(p[1] for p in pairs)  # computed never goes back
    assert progress_cell(0, None, 0, None, "LOADING")[0] == "<i>preparing…</i>"  # not "0 / ?" while it plans
    meter = RateMeter()
    for t in range(10):
        meter.update(100 * t, at=float(t))
    assert meter.eta(1000) == pytest.approx(10, rel=0.01)
    meter.update(1900, at=10.0)  # one batch ten times as fast moves the ETA a little, not to a tenth
    assert 7 < meter.eta(1000) < 10
    seeded = RateMeter()  # the engine's first-batch rate, 7x the job's (a short job's writes not yet waited on)
    assert seeded.update(40, at=0.0, first_rate=700) == 700
    for t in range(1, 6):
        seeded.update(40 + 100 * t, at=2.0 * t)
    assert seeded.rate == pytest.approx(50)  # measured from the second update on, the seed not blended in


def test_issue19_p4_restart_banner_says_saved_and_computed(gpt2_dir, workspace):
    import socket

    ws = ms.Workspace(workspace)
    ghost = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=8, batch_size=2)
    ghost.wait(60)
    ghost.store.update(status="EXTRACTING", heartbeat={"pid": 999999, "host": socket.gethostname(), "time": 0,
                                                       "proc_start": "0"},
                       progress={"samples_committed": 2, "tokens_committed": 20, "samples_computed": None})
    studio = ms.Studio(workspace=workspace, model=gpt2_dir)  # (a store from before heartbeats counted them)
    assert "2 of 8 samples were saved" in studio.banner.value
    assert "computed after the last save was lost" in studio.banner.value
    ghost.store.refresh()  # (the Studio marked it FAILED/INTERRUPTED on disk)
    ghost.store.update(progress={"samples_computed": 6})  # where the store recorded it
    assert studio.show_interrupted() == ghost.id
    assert "6 were computed when it stopped (4 not saved yet" in studio.banner.value


def test_issue19_p5_jobs_from_another_cell_update_their_row(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    jobs = studio.jobs_panel
    other = ms.Workspace(workspace)  # what `ms.Workspace().submit(...)` in another cell does
    gate_hook, reached, release = gate(2)
    listed = threading.Event()  # its first batch waits for its row: its progress events find the row
    job = other.submit(gpt2_dir, "sample", layers=[1], max_samples=24, batch_size=4,
                       before_batch=held_until(listed, gate_hook))
    # listed, updated and ended without Refresh: only the folder's events change the grid (no poll), so a deadline
    # for a loaded machine (2 s on an idle one) still fails when they do not reach it
    wait_for(lambda: job.id in jobs.cells, 30)
    listed.set()
    assert reached.wait(60)
    wait_for(lambda: "EXTRACTING" in jobs.cells[job.id]["status"].value and
             "8 computed" in jobs.cells[job.id]["progress"].value, 30)
    release.set()
    job.wait(60)
    wait_for(lambda: "COMPLETED" in jobs.cells.get(job.id, {}).get("status", W_EMPTY).value, 30)
    assert "24 / 24 · 100%" in jobs.cells[job.id]["progress"].value


def test_issue19_p5_progress_before_the_row_is_listed_is_kept(gpt2_dir, workspace, monkeypatch):
    """A progress event of a job whose row is not listed yet (the refresh that lists it is debounced on a timer)
    keeps its computed count for that row: dropped, a job then waiting (a gate, a long batch) showed none."""
    from mistudio.widgets.jobs_panel import JobsPanel

    ws = ms.Workspace(workspace)
    jobs = JobsPanel(ws)
    gate_hook, reached, release = gate(3)
    timed_refresh = jobs._timed_refresh

    def starved_refresh():  # the debounce timer's thread gets no CPU until the job computed three batches (load)
        reached.wait(60)
        timed_refresh()

    monkeypatch.setattr(jobs, "_timed_refresh", starved_refresh)
    job = ws.submit(gpt2_dir, "sample", layers=[1], max_samples=24, batch_size=4, before_batch=gate_hook)
    try:
        assert reached.wait(60)
        wait_for(lambda: job.id in jobs.cells, 30)
        assert "EXTRACTING" in jobs.cells[job.id]["status"].value
        wait_for(lambda: "12 computed" in jobs.cells[job.id]["progress"].value, 10)  # what the job had computed
    finally:
        release.set()
        job.wait(60)


def test_issue19_p6_stale_state_goes(gpt2_dir, workspace, tmp_path):
    import socket

    ws = ms.Workspace(workspace)
    ghost = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=8, batch_size=2)
    ghost.wait(60)
    ghost.store.update(status="EXTRACTING", heartbeat={"pid": 999999, "host": socket.gethostname(), "time": 0,
                                                       "proc_start": "0"})
    studio = make_studio(workspace, gpt2_dir)
    assert studio.banner_box.layout.display == "" and studio.interrupted == ghost.id
    # Resume from the Jobs tab: the banner goes (its "Resume it" would say the job is already extracting)
    studio.selected_index = 3
    studio.jobs_panel.cells[ghost.id]["buttons"]["Resume"].click()
    assert studio.banner_box.layout.display == "none" and studio.interrupted is None
    studio.extraction_panel.job.wait(60)
    # a resume from another cell hides it too (the workspace's events), and "Resume it" never resumes twice
    ghost.store.update(status="EXTRACTING", heartbeat={"pid": 999999, "host": socket.gethostname(), "time": 0,
                                                       "proc_start": "0"})
    studio2 = make_studio(workspace, gpt2_dir)
    assert studio2.interrupted == ghost.id
    again = ws.resume(ghost.id)
    wait_for(lambda: studio2.banner_box.layout.display == "none")
    again.wait(60)

    panel, picker = studio.extraction_panel, studio.dataset_picker
    # a failure of the form (no job) goes when another dataset is chosen or estimated
    picker.source.value = "file"
    picker.path.value = str(tmp_path / "missing.jsonl")
    assert panel.launch() is None and panel.failure_box.layout.display == ""
    picker.source.value = "sample"
    assert panel.failure_box.layout.display == "none" and panel.alert.value == ""
    picker.source.value = "file"
    assert panel.launch() is None and panel.failure_box.layout.display == ""
    picker.source.value = "sample"  # (hidden again by the change) and an estimate of it keeps it hidden
    assert panel.estimate() is not None and panel.failure_box.layout.display == "none"
    # "Saved preset" goes with the next change of the form; "Form filled" stays while the preset fills it
    panel.preset_name.value = "p1"
    panel.save_preset_button.click()
    assert "Saved preset" in panel.preset_status.value
    panel.batch_size.value = 16
    assert panel.preset_status.value == ""
    panel.preset.value = "p1"
    assert "Form filled from preset" in panel.preset_status.value and panel.batch_size.value == 8
    # the Model tab's facts go when the model field changes
    studio.model_picker.inspect()
    assert "architecture" in studio.model_picker.info.value
    studio.model_picker.choice.value = "all-MiniLM-L6-v2 (bundled)"
    assert studio.model_picker.info.value == "" and studio.model_picker.details is None


def test_issue19_p7_buttons_keep_their_text(gpt2_dir, workspace):
    from mistudio.widgets.common import STYLE

    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    for button in (studio.banner_resume, studio.banner_dismiss, panel.save_preset_button,
                   panel.delete_preset_button, panel.estimate_button, studio.browser.plot_button,
                   studio.dataset_picker.preview_button, studio.model_picker.inspect_button):
        assert button.layout.width == "auto", button.description  # sized by their text
    assert ".jupyter-button { flex: 0 0 auto" in STYLE and "flex-wrap: wrap" in STYLE  # rows wrap, never squeeze
    assert all("mistudio-panel" in p._dom_classes for p in studio.panels.values())
    assert list(studio.panels) == ["Model", "Dataset", "Extract", "Jobs", "Browse", "Features", "Train"]
    extra = ms.widgets.JobsPanel(studio.workspace)  # a later tab joins the same way
    opened = []
    studio.add_tab("More", extra, on_open=lambda: opened.append(1))
    studio.select("More")
    assert studio.tabs.titles[-1] == "More" and opened == [1]


def test_issue19_p8_browse_entries_tell_extractions_apart(gpt2_dir, minilm_dir, workspace):
    ws = ms.Workspace(workspace)
    ws.submit(gpt2_dir, "sample", layers=[0, 1], max_samples=8).wait(60)
    ws.submit(minilm_dir, "sample", layers=[0, 1], max_samples=8).wait(60)
    browser = make_studio(workspace, gpt2_dir).browser
    labels = [label for label, _ in browser.extraction.options]
    assert len(labels) == 2 and len(set(labels)) == 2
    assert "all-MiniLM-L6-v2" in labels[0] and gpt2_dir.split("/")[-1] in labels[1]
    for label in labels:  # date and time, model, dataset, hook points; short enough for a narrow window
        assert "sample" in label and "layers 0,1 × residual" in label and re.match(r"\d\d-\d\d \d\d:\d\d:\d\d ", label)
        assert len(label) <= 72 and "COMPLETED" not in label
    assert browser.extraction.value in browser.about.value and "created 20" in browser.about.value


def test_issue19_p9_feature_view_honours_options(minilm_dir, workspace):
    ext = ms.extract(minilm_dir, "sample", layers=[5], max_samples=60, workspace=workspace, progress=False)
    studio = make_studio(workspace, minilm_dir)
    studio.selected_index = 4
    browser = studio.browser
    assert "top_tokens" not in browser.images  # the bars repeated the table: only the table stays
    hp = "layers.5.residual"
    # a feature whose top values sit on [CLS]/[SEP] in every row
    cls_rows = np.flatnonzero(np.asarray(ext.store.tokens("special")[:], bool))
    acts = np.asarray(ext.activations(hp)[:], np.float32)
    feature = int(np.argmax(acts[cls_rows].mean(0) - acts.mean(0)))
    browser.feature.value = feature
    browser.one_per_document.value = False
    browser.hide_special.value = False
    assert browser.show_feature()
    assert "ms-special" in browser.feature_html.value
    browser.hide_special.value = True
    assert browser.show_feature()
    shown = browser.feature_html.value
    assert "ms-special" not in shown and "[CLS]" not in shown and "[SEP]" not in shown
    browser.hide_special.value = False
    browser.one_per_document.value = True
    assert browser.show_feature()
    best = browser._top_rows(hp, feature, browser.top_k.value)
    documents = np.searchsorted(ext.activation_offsets, best[:, 1].astype(int), side="right") - 1
    assert len(set(documents.tolist())) == len(documents) == browser.top_k.value  # one per document
    assert list(best[:, 0]) == sorted(best[:, 0], reverse=True)
    shown = re.findall(r'<details class="ms-example"><summary>.*?</summary>', browser.feature_html.value)
    top = shown[:browser.top_k.value]
    contexts = [re.sub(r'<span class="ms-meta".*?</span>', "", line) for line in top]
    assert len(set(contexts)) == len(contexts)  # no context twice (near-identical rows show once)
    assert "one example per document" in browser.info.value
    browser.min_count.value = 12
    assert browser.show_feature()
    table = browser.feature_html.value.split("ms-token-means")[1]
    counts = [int(c.replace(",", "")) for c in re.findall(r"text-align:right'>([\d,]+)</td></tr>", table)]
    assert counts and min(counts) >= 12 and "seen at least 12 times" in browser.feature_html.value
    assert "padding:2px 14px" in table  # room between the columns


def test_issue19_p10_dataset_preview_pages_counts_and_marks(minilm_dir, workspace, tmp_path):
    import json

    studio = make_studio(workspace, minilm_dir)
    picker = studio.dataset_picker
    picker.max_length.value = 16
    rows = picker.show_preview()
    assert len(rows) == 10 and "of 2,077 rows" in picker.preview.value and "first 40 are used" in picker.preview.value
    cut = [r for r in rows if r["truncated"]]
    assert cut and all(r["tokens"] > 16 for r in cut) and picker.preview.value.count("mistudio-truncated") == len(cut)
    assert "longer than Max length (16 tokens)" in picker.preview.value
    assert picker.prev_button.disabled and not picker.next_button.disabled
    picker.next_button.click()
    assert [r["row"] for r in picker.show_preview()] == list(range(10, 20))
    picker.preview_rows.value = 25
    assert len(picker.show_preview()) == 25
    picker.preview_rows.value = 10
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                        {"role": "assistant", "content": f"answer {i}."}]})
                               for i in range(30)) + "\n")
    picker.source.value = "file"
    picker.path.value = str(chats)
    assert picker.page_start == 0 and picker.preview.value == ""  # another dataset: from the top
    rows = picker.show_preview()
    assert len(rows) == 10 and rows[0]["messages"][1]["content"] == "answer 0."
    assert "<b>user</b>: question 0?" in picker.preview.value and "<b>assistant</b>: answer 0." in picker.preview.value
    assert "of 30 rows" in picker.preview.value and "Chat data" in picker.preview.value


def test_issue19_open_a_row_in_browse_from_elsewhere(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    first = ws.submit(gpt2_dir, "sample", layers=[0, 2], max_samples=12).wait(60)
    ws.submit(gpt2_dir, "sample", layers=[1], max_samples=8).wait(60)
    studio = make_studio(workspace, gpt2_dir)
    assert studio.open_in_browse(first.id, 5, "layers.0.residual", 3)  # another tab's "open this example"
    browser = studio.browser
    assert studio.tabs.selected_index == 4 and browser.extraction.value == first.id
    assert "Plotted layers.0.residual, row 5" in browser.info.value and "feature 3" in browser.info.value
    assert all(box.layout.display == "" for box in browser._boxes.values())
    studio.select("Jobs")
    studio.select("Browse")  # opening the tab again keeps what it shows
    assert browser.extraction.value == first.id and browser._boxes["heatmap"].layout.display == ""
    assert not browser.open_row("ext_nothing", 0) and "not in this workspace" in browser.info.value
    assert browser.extraction.value == first.id  # the store shown stays
