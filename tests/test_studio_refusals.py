"""The Extract tab after a request refused before anything ran (a missing model, stride > window, a data file
that breaks while the job prepares its input): a form error that says no extraction was created, never a FAILED
job with a Retry button; and the estimate stays about the form shown."""
from __future__ import annotations

import json

import mistudio as ms

from test_widgets import make_studio, wait_for


def broken_jsonl(tmp_path) -> str:
    path = tmp_path / "mixed.jsonl"
    rows = [json.dumps({"text": f"row {i} says something"}) for i in range(30)]
    path.write_text("\n".join(rows[:20] + ["{not json"] + rows[20:]) + "\n")
    return str(path)


def assert_form_error(panel, *words) -> None:
    """The refusal reads as an error of the form: no job, no FAILED badge, no red bar, no Retry/Resume."""
    for word in words:
        assert word in panel.alert.value, panel.alert.value
    assert "No extraction was created" in panel.alert.value and "Extraction ext_" not in panel.alert.value
    assert panel.job is None
    assert "FAILED" not in panel.status.value and panel.progress.bar_style != "danger"
    assert panel.failure_box.layout.display == "" and panel.failure_actions.layout.display == "none"


def test_a_data_file_that_breaks_while_the_job_prepares_creates_no_extraction(gpt2_dir, workspace, tmp_path):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    studio.dataset_picker.source.value = "file"
    studio.dataset_picker.path.value = broken_jsonl(tmp_path)
    job = panel.launch()
    assert job is not None  # the job refuses the file while preparing its input
    job.wait(60)
    wait_for(lambda: panel.job is None)
    assert_form_error(panel, "not valid JSON")
    assert ms.Workspace(workspace).extractions().empty  # no store
    assert panel.launch_button.disabled is False and panel.cancel_button.disabled is True
    studio.dataset_picker.source.value = "sample"  # the form changed: the error was about the old one
    assert panel.failure_box.layout.display == "none" and panel.alert.value == ""


def test_a_refusal_before_any_job_is_a_form_error_without_retry(gpt2_dir, workspace):
    studio = make_studio(workspace, "/no/such/model")
    panel = studio.extraction_panel
    assert panel.launch() is None
    assert_form_error(panel, "does not exist")
    studio.model_picker.set_model(gpt2_dir)
    assert panel.failure_box.layout.display == "none"
    panel.window.value, panel.stride.value = 16, 32  # stride > window
    assert panel.launch() is None
    assert_form_error(panel, "Stride")
    panel.stride.value = 8
    job = panel.launch()  # Launch runs the corrected form
    assert job.wait(60).status == "COMPLETED"
    wait_for(lambda: panel.progress.bar_style == "success")
