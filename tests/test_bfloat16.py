"""bfloat16 storage is the model's bits; values past float16's range are counted and reported, not hidden."""
from __future__ import annotations

import html
import os

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio import cli
from mistudio.analysis.exports import export_neuronpedia, to_hf_dataset
from mistudio.models import load_model
from mistudio.specs import ModelSpec

TEXTS = ms.sample_texts()[:24]


def test_bfloat16_store_equals_the_models_output_bits(gpt2_dir, workspace):
    ext = ms.extract(gpt2_dir, TEXTS, layers=[1], hooks=["residual"], dtype="bfloat16", model_dtype="bfloat16",
                     max_length=40, workspace=workspace, progress=False, device="cpu")  # as the reference below
    a = ext.activations("layers.1.residual")
    assert str(a.dtype) == "bfloat16" and a.zarr.dtype == np.uint16 and ext.verify().ok
    loaded = load_model(ModelSpec(name_or_path=gpt2_dir, dtype="bfloat16", device="cpu"))
    for row in ext.rows()[:6]:
        sample = ext.sample(int(row), tokens=False)
        ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)[None]
        with torch.inference_mode():
            want = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        got = sample["activations"]["layers.1.residual"]
        assert np.array_equal(got.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16)), row
    batch = next(iter(ext.loader("layers.1.residual", batch_size=64, dtype="bfloat16")))
    assert batch.dtype == torch.bfloat16 and batch.shape == (64, 32)
    np.testing.assert_array_equal(ext.to_dask("layers.1.residual")[:5].compute(), a[:5])
    lazy = ext.to_xarray()["layers.1.residual"]  # the values, not Zarr's uint16 bits (a mean of 31,256 once)
    assert lazy.dtype == a.dtype and np.array_equal(lazy[:5].values.view(np.uint16), a[:5].view(np.uint16))
    exported = to_hf_dataset(ext, "layers.1.residual").with_format("numpy")[0]["layers.1.residual"]
    np.testing.assert_array_equal(exported, ext.sample(int(ext.rows()[0]))["activations"]["layers.1.residual"]
                                  .astype(np.float32))  # float32, exactly (Arrow has no bfloat16: it crashed)
    assert ext.feature_stats("layers.1.residual").n_tokens == ext.n_tokens


@pytest.fixture
def loud_model(gpt2_dir, tmp_path):
    """The tiny GPT-2 with embeddings scaled by 1e6: its residual stream is far past float16's ±65,504."""
    import shutil

    from transformers import AutoModel

    folder = tmp_path / "loud"
    shutil.copytree(gpt2_dir, folder)
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.wte.weight.mul_(1e6)
        model.wpe.weight.mul_(1e6)
    model.save_pretrained(folder)
    return str(folder)


def test_values_past_float16_are_counted_and_reported(loud_model, workspace, capsys):
    ext = ms.extract(loud_model, TEXTS, layers=[0], hooks=["residual", "mlp"], dtype="float16", max_length=40,
                     workspace=workspace, progress=False)
    stats = ext.record.statistics["layers.0.residual"]
    stored = ext.activations("layers.0.residual")[:]
    assert stats.n_out_of_range == int(np.isinf(stored).sum()) > 0 and stats.max_abs > 65504
    warnings = ext.range_warnings()
    assert any("layers.0.residual" in w and "float16's range" in w and "dtype='bfloat16'" in w for w in warnings)
    est = ms.estimate(loud_model, TEXTS, layers=[0], max_length=40, workspace=workspace, probe=True)
    assert any("past float16's range" in w and "dtype='bfloat16'" in w for w in est["warnings"])
    assert cli.main(["extract", "--workspace", workspace, "--model", loud_model, "--layers", "0",
                     "--max-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "past float16's range" in out and "--dtype bfloat16" in out  # the end line says it, as a flag
    safe = ms.extract(loud_model, TEXTS, layers=[0], dtype="bfloat16", max_length=40, workspace=workspace,
                      progress=False)
    assert safe.record.statistics["layers.0.residual"].n_out_of_range == 0 and not safe.range_warnings()


def test_a_neuronpedia_export_refuses_features_stored_as_inf_and_keeps_the_last_export(loud_model, workspace,
                                                                                         tmp_path):
    """Neuronpedia's records need numbers: ±inf was written as 0, a feature's strongest tokens showing 0."""
    from mistudio.analysis.features import export_pages

    ext = ms.extract(loud_model, TEXTS[:8], layers=[0], hooks=["residual"], dtype="float16", max_length=24,
                     workspace=workspace, progress=False)
    stored = np.asarray(ext.activations("layers.0.residual")[:]).astype(np.float32)
    loud = [int(f) for f in np.flatnonzero(np.isposinf(stored).any(axis=0))]  # their pages' maximum: +inf
    quiet = [int(f) for f in np.flatnonzero(np.isfinite(stored).all(axis=0))][:2]
    assert loud and quiet
    root = export_neuronpedia(export_pages(ext, "layers.0.residual", quiet), tmp_path, "tiny", "res")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(ms.InputError) as refused:
        export_neuronpedia(export_pages(ext, "layers.0.residual", quiet + loud), tmp_path, "tiny", "res",
                           overwrite=True)
    said = str(refused.value)
    assert f"feature(s) {', '.join(map(str, loud[:20]))}" in said and "past the store's range" in said
    assert "dtype='bfloat16'" in said
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # the last export, as it was
    assert os.listdir(root.parent) == [root.name]  # and no half-written folder beside it


def test_the_studio_says_so_at_the_end_line_and_in_browse(loud_model, workspace):
    import time

    studio = ms.Studio(workspace=workspace, model=loud_model)
    studio.dataset_picker.max_samples.value = 6
    panel = studio.extraction_panel
    panel.layers.value = (0,)
    panel.launch_button.click()
    assert panel.job.wait(120).status == "COMPLETED"
    deadline = time.monotonic() + 30
    while "COMPLETED" not in panel.status.value and time.monotonic() < deadline:
        time.sleep(0.05)
    end_line = panel.status.value
    studio.selected_index = 4  # Browse
    for shown in (end_line, studio.browser.info.value):
        text = html.unescape(shown)
        assert "layers.0.residual" in text and "past float16's range" in text, text
        assert "set 'Store as' to bfloat16" in text and "dtype=" not in text, text  # the Studio's words
        assert "6 samples from 6 rows" in text and "cut at 'Max length'" in text, text  # and the data report
