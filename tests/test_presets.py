"""Presets: saved submit arguments in <workspace>/presets/<name>.json, round-tripped through the API."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

import mistudio as ms
from mistudio.errors import InputError


def test_save_list_submit_export_import_delete(gpt2_dir, workspace, tmp_path):
    ws = ms.Workspace(workspace)
    assert ws.presets() == {}
    saved = ws.save_preset("small-run", model=gpt2_dir, dataset="sample", layers=range(2), hooks=("residual", "mlp"),
                           max_samples=20, batch_size=4, dtype="float32")
    assert saved["layers"] == [0, 1] and saved["hooks"] == ["residual", "mlp"]
    assert os.path.exists(os.path.join(workspace, "presets", "small-run.json"))
    assert ws.presets() == {"small-run": saved}

    ext = ms.extract(preset="small-run", workspace=workspace, batch_size=8, progress=False)  # an override
    record = ext.store.record
    assert record.params.batch_size == 8 and record.params.max_samples == 20
    assert ext.hook_points == ["layers.0.residual", "layers.0.mlp", "layers.1.residual", "layers.1.mlp"]
    assert ext.store.meta["preset"] == "small-run"
    assert ms.estimate(preset="small-run", workspace=workspace)["samples"] == 20
    job = ws.submit(preset="small-run", layers=[2]).wait(120)
    assert job.status == "COMPLETED" and job.record.hook_points == ["layers.2.residual", "layers.2.mlp"]

    exported = ws.export_preset("small-run", tmp_path / "shared.json")
    assert json.loads(open(exported).read())["arguments"] == saved
    other = ms.Workspace(str(tmp_path / "other"))
    assert other.import_preset(exported) == "small-run"
    assert other.import_preset(exported, name="copy") == "copy"
    assert other.presets() == {"small-run": saved, "copy": saved}
    with pytest.raises(InputError, match="already exists.*overwrite=True"):
        other.import_preset(exported)
    other.delete_preset("copy")
    assert list(other.presets()) == ["small-run"]
    with pytest.raises(InputError, match="no preset 'copy'.*saved presets are \\['small-run'\\]"):
        other.submit(preset="copy")


def test_bad_presets_are_refused(gpt2_dir, workspace, tmp_path):
    ws = ms.Workspace(workspace)
    for name in ("../evil", "a/b", "", ".hidden", 3):
        with pytest.raises(InputError, match="is not a preset name"):
            ws.save_preset(name, model=gpt2_dir)
    with pytest.raises(InputError, match="in-memory list, which a preset cannot hold"):
        ws.save_preset("texts", model=gpt2_dir, dataset=["a text"])
    with pytest.raises(InputError, match="in-memory dataframe"):
        ws.save_preset("frame", model=gpt2_dir, dataset=pd.DataFrame({"text": ["a"]}))
    with pytest.raises(InputError, match="batch_size=3 is not allowed"):  # the usual message, nothing saved
        ws.save_preset("bad", model=gpt2_dir, batch_size=3)
    with pytest.raises(InputError, match="layer index 9 is out of range"):
        ws.save_preset("bad", model=gpt2_dir, layers=[9])
    with pytest.raises(InputError, match="before_batch cannot be saved in a preset"):
        ws.save_preset("bad", model=gpt2_dir, before_batch=lambda i, b: None)
    with pytest.raises(InputError, match="has no model"):
        ws.save_preset("bad", layers=[0])
    assert ws.presets() == {}
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    with pytest.raises(InputError, match="is not a preset file"):
        ws.import_preset(junk)
    with pytest.raises(InputError, match="model is missing.*preset="):
        ws.submit()
