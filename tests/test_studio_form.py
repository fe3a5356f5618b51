"""The Extract tab's lines stay about the form shown: "Extract with this SAE" (the Train tab filling the form for
another run) or a preset leaves no estimate or finished run of the form before on screen as if it were current."""
from __future__ import annotations

import pytest

import mistudio as ms
from test_widgets import make_studio, wait_for


def test_extract_with_this_sae_clears_the_previous_estimate_and_run(gpt2_dir, workspace, tmp_path):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    assert panel.estimate() is not None and "Estimate" in panel.estimate_line.value
    job = panel.launch()
    assert job.wait(60).status == "COMPLETED"
    wait_for(lambda: "COMPLETED" in panel.status.value)
    assert "Estimate" in panel.estimate_line.value
    sae = tmp_path / "run" / "sae"
    # what the Train tab's button hands to the Studio: the run's model, data and SAE
    studio.train_panel.on_extract_with_sae({"model": gpt2_dir, "dataset": "sample", "layers": [1],
                                            "hooks": ["residual"], "saes": {"layers.1.residual": str(sae)}})
    assert "run/sae" in panel.summary.value
    assert "on disk" not in panel.estimate_line.value and "Estimate again" in panel.estimate_line.value
    assert "COMPLETED" not in panel.status.value and job.id not in panel.status.value
    assert panel.progress.value == 0 and panel.progress.bar_style != "success"
    assert panel.form_arguments()["saes"] == {"layers.1.residual": str(sae)}


def test_a_preset_filling_the_form_makes_the_estimate_stale(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    panel.batch_size.value = 4
    panel.preset_name.value = "small"
    assert panel.save_preset() == "small"
    panel.batch_size.value = 16
    assert panel.estimate() is not None
    panel.preset.value = "small"
    assert panel.batch_size.value == 4 and "Form filled" in panel.preset_status.value
    assert "on disk" not in panel.estimate_line.value and "Estimate again" in panel.estimate_line.value


def test_the_estimate_line_warns_of_a_token_budget_below_every_row(gpt2_dir, workspace):
    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    panel.max_batch_tokens.value = 2
    assert panel.estimate() is not None
    line = panel.estimate_line.value
    assert "each batch will hold one row and exceed the budget" in line and "Max batch tokens" in line
    assert "warning(s)" not in line


def test_the_model_tab_gives_a_small_models_weights_in_megabytes(gpt2_dir, workspace):
    from mistudio.widgets.model_picker import memory_words

    studio = make_studio(workspace, gpt2_dir)
    details = studio.model_picker.inspect()
    info = studio.model_picker.info.value
    assert details["memory_gb"] < 0.01 and "0.00 GB" not in info
    assert f"{details['memory_gb'] * 1000:.1f} MB" in info
    assert memory_words(0.000220) == "0.2 MB" and memory_words(0.5) == "500.0 MB"
    assert memory_words(1.0) == "1.00 GB" and memory_words(14.96) == "14.96 GB"


def test_more_options_shows_the_saes_one_hook_point_a_line(gpt2_dir, workspace, tmp_path):
    import ipywidgets as W

    studio = make_studio(workspace, gpt2_dir)
    panel = studio.extraction_panel
    first, second = tmp_path / "run_a" / "sae", tmp_path / "run_b" / "sae"
    first.mkdir(parents=True), second.mkdir(parents=True)
    studio.train_panel.on_extract_with_sae({"model": gpt2_dir, "layers": [0, 1],
                                            "saes": {"layers.0.residual": str(first),
                                                     "layers.1.residual": str(second)}})
    field = panel.options["saes"][1]
    assert isinstance(field, W.Textarea)  # several lines, not a one-line field that cuts the JSON off
    assert field.value == f"layers.0.residual={first}\nlayers.1.residual={second}"
    assert panel.form_arguments()["saes"] == {"layers.0.residual": str(first), "layers.1.residual": str(second)}
    assert "with the SAEs" in panel.summary.value
    field.value = f"layers.1.residual={second}\n"  # typed: one a line, JSON and comma-separated pairs as before
    assert panel.form_arguments()["saes"] == {"layers.1.residual": str(second)}
    field.value = f'{{"layers.0.residual": "{first}"}}'
    assert panel.form_arguments()["saes"] == {"layers.0.residual": str(first)}
    field.value = f"layers.0.residual={first},layers.1.residual={second}"
    assert len(panel.form_arguments()["saes"]) == 2
    field.value = f"layers.1.residual={first}\nlayers.1.residual={second}"  # one hook point twice: not one dropped
    with pytest.raises(ms.InputError, match="names layers.1.residual twice"):
        ms.Request.build(**{**panel.form_arguments(), "dataset": "sample"})
    assert panel.launch() is None and "twice" in panel.alert.value
    field.value = f'{{"layers.1.residual": "{first}", "layers.1.residual": "{second}"}}'  # JSON: not the last kept
    with pytest.raises(ms.InputError, match="names layers.1.residual twice"):
        ms.Request.build(**{**panel.form_arguments(), "dataset": "sample"})
    panel.show_arguments({"saes": {"layers.0.residual": "/odd,folder"}})  # a comma in a folder: JSON keeps it
    assert panel.form_arguments()["saes"] == {"layers.0.residual": "/odd,folder"}
