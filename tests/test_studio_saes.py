"""The Studio's feature loop, clicked through as a researcher would: train an SAE in the Train tab, "Extract with
this SAE" fills the Extract tab, Launch stores its latents, the Features tab opens a latent's page."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mistudio as ms

from test_widgets import wait_for

HP = "layers.1.residual"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_train_then_extract_with_the_sae_then_browse_its_features(gpt2_dir, workspace):
    ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual"], max_samples=60, max_length=48, dtype="float32",
               workspace=workspace, progress=False)
    studio = ms.Studio(workspace=workspace, model=gpt2_dir)
    assert studio.tabs.titles[-2:] == ("Features", "Train")
    studio.select("Train")
    train = studio.train_panel
    train.hook_point.value = HP
    train.architecture.value = "topk"
    train.size_by.value, train.size.value = "d_sae", 64
    train.sparsity["k"].value = 4
    train.lr.value, train.batch_size.value = 3e-3, 128
    train.length_by.value, train.length.value = "n_tokens", float(128 * 40)
    train.launch_button.click()
    run = train.job
    assert run is not None and run.wait(240).status == "COMPLETED", run.error
    wait_for(lambda: not train.extract_button.disabled)
    train.extract_button.click()  # the Extract tab, filled with the SAE
    assert studio.tabs.titles[studio.tabs.selected_index] == "Extract"
    panel = studio.extraction_panel
    arguments = panel.form_arguments()
    assert arguments["saes"] == {HP: str(run.sae_path)} and arguments["model"] == gpt2_dir
    assert f"with the SAE <b title='{run.sae_path}'>{run.id}/sae</b>" in panel.summary.value  # the run, not 'sae'
    panel.dtype.value = "float32"  # the SAE reads the model's float32 rows: stored as they are, for the check below
    panel.launch_button.click()
    job = panel.job
    assert job is not None and job.wait(180).status == "COMPLETED", job.error
    ext = job.extraction()
    assert ext.latent_points == [f"{HP}.latents"]
    listed = ms.Workspace(workspace).extractions().set_index("id")
    assert listed.loc[ext.id, "latents"] == f"{HP}.latents"  # which store holds an SAE's latents, in the listing
    from mistudio.widgets.common import extraction_label

    assert listed.loc[ext.id, "saes"] == str(run.sae_path)  # and from which SAE, so two such stores read apart
    studio.jobs_panel.refresh()
    grid = " ".join(getattr(c, "value", "") for c in studio.jobs_panel.table.children)
    assert "× residual + latents" in grid and f"the latents of {run.sae_path}" in grid  # the Jobs tab says so too
    studio.browser.feature.value = 7  # a stale neuron from before: not carried over as if it were the latent
    studio._open_row_in_browse(ext.id, f"{HP}.latents", int(ext.rows()[0]), 5)  # a latent page's "Open row"
    browser = studio.browser
    assert browser.hook_point.value == HP and browser.feature.value == 0
    assert f"Latent 5 of {HP}.latents is not drawn here" in browser.info.value, browser.info.value
    assert extraction_label(listed.loc[ext.id].to_dict()).endswith(f" + latents of {run.id}/sae")  # the dropdowns
    sae = ms.load_sae(run.sae_path)
    with torch.no_grad():  # the stored latents are the SAE's encoding of the stored rows
        want = sae.encode(torch.from_numpy(np.asarray(ext.activations(HP)[:], np.float32))).numpy()
    np.testing.assert_allclose(ext.latents(HP).toarray(), want, rtol=1e-4, atol=1e-5)
    studio.select("Features")
    features = studio.features_panel
    assert features.wait(120)
    features.refresh(select=ext.id)
    assert features.wait(120)
    features.hook_point.value = f"{HP}.latents"
    assert features.wait(120)
    fired = np.flatnonzero(np.asarray((ext.latents(HP) != 0).sum(axis=0)).ravel())
    assert features.open_feature(int(fired[0])) and features.wait(120)
    assert features.page is not None and features.page["kind"] == "latent"
    assert features.page["fire_count"] == int((ext.latents(HP)[:, int(fired[0])] != 0).sum())
    assert "Top activations" in features.page_html.value or "top" in features.page_html.value.lower()
