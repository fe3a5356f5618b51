"""An SAE trained on another model than the one it is applied to (same width, so nothing refuses it) is applied
with a warning the researcher sees before the run (the estimate) and after it (the store, the CLI's summary,
Browse): by the weights' fingerprint for SAEs mistudio trained, by name for SAELens and sparsify SAEs."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import mistudio as ms
from mistudio.cli import _summary
from mistudio.saes import SAE, other_model_warning
from mistudio.widgets.common import store_notes

HP = "layers.1.residual"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(model, workspace, **kw):
    return ms.extract(str(model), "sample", layers=[1], hooks=["residual"], max_samples=24, batch_size=8,
                      dtype="float32", workspace=str(workspace), progress=False, **kw)


def retrained(gpt2_dir: str, folder: Path) -> Path:
    """The model re-saved after "more training": the same files and width, other weights."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gpt2_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    shutil.copytree(gpt2_dir, folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(gpt2_dir, tmp_path_factory):
    """An SAE mistudio trained as a job on an extraction of the tiny GPT-2."""
    ws = ms.Workspace(tmp_path_factory.mktemp("provenance"))
    job = ws.train_sae(run(gpt2_dir, ws.root), HP, architecture="topk", d_sae=64, k=4, batch_size=64, n_tokens=64 * 8,
                       progress_every_steps=4, checkpoint_every_steps=0)
    assert job.wait(120).status == "COMPLETED", job.error
    return ws, job


def test_an_sae_mistudio_trained_records_the_weights_and_is_quiet_on_its_own_model(trained, gpt2_dir):
    ws, job = trained
    sae = ms.load_sae(job.sae_path)
    name, weights = sae.trained_model
    source = ms.open_extraction(job.record.extraction.id, workspace=str(ws.root))
    assert name == gpt2_dir and weights == source.record.model.fingerprint["weights"]
    same = run(gpt2_dir, ws.root, saes={HP: job})
    assert same.record.latents[HP].trained_weights == weights
    assert same.warnings() == [] and "⚠" not in store_notes(same)


def test_other_weights_of_the_same_width_warn_before_and_after_the_run(trained, gpt2_dir, tmp_path):
    ws, job = trained
    other = retrained(gpt2_dir, tmp_path / Path(gpt2_dir).name)  # same folder name: only the weights tell
    plan = ms.estimate(str(other), "sample", layers=[1], hooks=["residual"], max_samples=24, batch_size=8,
                       dtype="float32", saes={HP: str(job.sae_path)}, workspace=str(tmp_path / "ws"))
    [said] = [w for w in plan["warnings"] if "weight files differ" in w]
    assert HP in said and str(job.sae_path) in said
    ext = run(other, tmp_path / "ws", saes={HP: str(job.sae_path)})
    assert ext.status == "COMPLETED"  # applied: transfer to a fine-tune is a thing researchers do on purpose
    [line] = ext.warnings()
    assert line.startswith(f"{HP}: the SAE at {job.sae_path} was trained on a model whose weight files differ")
    assert "Apply an SAE trained on this model" in line
    assert "weight files differ" in _summary(ext)
    assert "weight files differ" in store_notes(ext)  # the Browse tab and the Extract tab's end
    reopened = ms.open_extraction(ext.id, workspace=str(tmp_path / "ws"))
    assert reopened.warnings() == [line]  # from the store's metadata, in a later session


def saelens_sae(folder: Path, model_name: str) -> Path:
    torch.manual_seed(1)
    sae = SAE("standard", 32, 48, hook_name="blocks.1.hook_resid_post", metadata={"model_name": model_name})
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    sae.save(folder)
    return folder


def test_a_saelens_sae_is_checked_by_the_model_name_it_records(tiny_models, tmp_path):
    gpt2 = shutil.copytree(tiny_models["gpt2"], tmp_path / "models" / "gpt2")
    sae = saelens_sae(tmp_path / "sae", "gpt2-small")  # TransformerLens's name of the Hub's gpt2
    assert run(gpt2, tmp_path / "ws", saes={HP: str(sae)}).warnings() == []
    llama = shutil.copytree(tiny_models["llama"], tmp_path / "models" / "Llama-3.2-1B")  # width 32 as well
    ext = run(llama, tmp_path / "ws", saes={HP: str(sae)})
    [line] = ext.sae_warnings()
    assert f"says it was trained on gpt2-small, and this model is {llama}" in line
    unnamed = SAE("standard", 32, 48, hook_name="blocks.1.hook_resid_post")
    unnamed.save(tmp_path / "unnamed")
    assert run(llama, tmp_path / "ws", saes={HP: str(tmp_path / "unnamed")}).warnings() == []


@pytest.mark.parametrize("trained_on, model, warns", [
    ("gpt2-small", "openai-community/gpt2", False),
    ("EleutherAI/pythia-70m-deduped", "/models/pythia-70m-deduped/", False),
    ("google/gemma-2-2b", "gemma-2-2b", False),
    ("gpt2-small", "gpt2-medium", True),
    ("pythia-70m", "pythia-70m-deduped", True),
    ("someorg/gpt2a", "/cache/hub/models--someorg--gpt2a/snapshots/607a30d1", False),  # the Hub cache's folder
    ("gpt2-small", "/cache/hub/models--gpt2/snapshots/607a30d1", False),  # ... of a model without organisation
    ("mistral-7b", "mistralai/Mistral-7B-v0.1", False),  # a TransformerLens alias
    ("mistral-7b", "mistralai/Mixtral-8x7B-v0.1", True),
    ("pythia-70m-deduped", "/models/EleutherAI--pythia-70m-deduped-v0", True),
])
def test_names_compare_without_organisation_or_folder(trained_on, model, warns, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # not needed (importing it takes 10 s)
    assert bool(other_model_warning("the SAE", (trained_on, None), model, None)) is warns
    # weights decide when both sides know them, whatever the names
    assert other_model_warning("the SAE", (trained_on, "a" * 64), model, "a" * 64) is None
    assert other_model_warning("the SAE", (model, "a" * 64), model, "b" * 64) is not None


def test_a_link_to_the_model_folder_is_that_model(tmp_path):
    (tmp_path / "gpt2a").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "gpt2a")
    assert other_model_warning("the SAE", ("gpt2a", None), str(tmp_path / "current"), None) is None
    assert other_model_warning("the SAE", ("gpt2b", None), str(tmp_path / "current"), None) is not None


def test_the_shipped_transformer_lens_names_are_the_installed_ones():
    """The table of TransformerLens's names mistudio ships equals the installed transformer_lens's (when it is)."""
    loading = pytest.importorskip("transformer_lens.loading_from_pretrained")
    from mistudio.saes import _transformer_lens_names

    assert _transformer_lens_names() == loading.make_model_alias_map(), (
        "transformer_lens changed its model names: run `python scripts/build_model_aliases.py`")
