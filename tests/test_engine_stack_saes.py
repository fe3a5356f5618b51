"""Hostile checks of the grouped engine with SAEs (on stored and on unstored hook points, several at once), resume
after a cancel (statistics continue exactly), the estimate's probe, autobatch and the prompt analysis."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mistudio as ms
from conftest import cancelled_at

from stats_reference import reference_rows

sl = pytest.importorskip("sae_lens")

TEXTS = ms.sample_texts()[:40]


def make_sae(folder, layer: int, seed: int, d_sae: int = 64, architecture: str = "standard"):
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": (sl.StandardSAE, sl.StandardSAEConfig), "topk": (sl.TopKSAE, sl.TopKSAEConfig)}
    cls, cfg_cls = classes[architecture]
    extra = {"k": 6} if architecture == "topk" else {}
    sae = cls(cfg_cls(d_in=32, d_sae=d_sae, metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"),
                      **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.1))
    sae.save_model(str(folder))
    return sae


def _dense(sae, rows):
    with torch.no_grad():
        return sae.encode(torch.from_numpy(rows.astype(np.float32))).numpy()


@pytest.mark.parametrize("batching", [dict(batch_size=4), dict(batch_size=8, micro_batch_size=3),
                                      dict(batch_size=4, window=8, stride=4)])
def test_saes_on_stored_and_unstored_hook_points(gpt2_dir, workspace, tmp_path, batching):
    """SAEs on layers 0 (stored), 1 (not stored: an SAE-only group) and 2 (not stored); stored hook points of
    other kinds beside them. Latents must equal SAELens's encoding of single-sample forwards."""
    saes = {f"layers.{i}.residual": make_sae(tmp_path / f"sae{i}", i, seed=i, architecture=("topk", "standard")[i % 2])
            for i in range(3)}
    ext = ms.extract(gpt2_dir, TEXTS, layers=[0, 2], hooks=["residual", "mlp"], dtype="float32", max_length=24,
                     saes={hp: str(tmp_path / f"sae{i}") for i, hp in enumerate(saes)}, latent_width=64,
                     workspace=workspace, progress=False, device="cpu", **batching)
    assert "layers.1.residual" not in ext.hook_points and "layers.0.residual" in ext.hook_points
    points = sorted(set(ext.hook_points) | set(saes))
    ref = reference_rows(gpt2_dir, ext, points, window=batching.get("window"), stride=batching.get("stride"))
    for hp in ext.hook_points:
        np.testing.assert_allclose(ext.activations(hp)[:], ref[hp], rtol=1e-4, atol=1e-5, err_msg=hp)
    for hp, sae in saes.items():
        want = _dense(sae, ref[hp])
        got = ext.latents(hp).toarray()
        assert got.shape == want.shape, hp
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=hp)
        stats = ext.record.latent_statistics[hp]
        l0 = (want > 0).sum(axis=1)
        assert stats.rows == len(want), hp
        assert stats.active == int(l0.sum()), hp
        assert stats.max == pytest.approx(float(want.max()), rel=1e-4), hp


def test_resume_after_cancel_continues_statistics_exactly(gpt2_dir, workspace, tmp_path):
    """A resumed run's statistics (moments, histogram, outliers), latents and rows equal a clean run's."""
    make_sae(tmp_path / "sae", 1, seed=3)
    options = dict(layers="all", hooks=["residual", "mlp", "attention"], dtype="bfloat16", max_length=24,
                   batch_size=4, saes={"layers.1.residual": str(tmp_path / "sae")}, latent_width=16, chunk_mb=0.01,
                   max_samples=40)
    clean = ms.extract(gpt2_dir, TEXTS, workspace=workspace, progress=False, device="cpu", **options)
    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, gpt2_dir, TEXTS, at_batch=4, device="cpu", **options)
    partial = job.extraction().record.progress.samples_committed
    assert 0 < partial < 40
    resumed = ws.resume(job.id)
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    ext = resumed.extraction()
    for hp in clean.hook_points:
        a, b = clean.metadata["statistics"][hp], ext.metadata["statistics"][hp]
        for key in ("count", "zeros", "n_nan", "n_out_of_range", "norm_hist", "n_outliers", "outliers", "max_abs"):
            assert a[key] == b[key], (hp, key)
        assert a["sum"] == pytest.approx(b["sum"], rel=1e-9, abs=1e-9)
        assert a["sum_sq"] == pytest.approx(b["sum_sq"], rel=1e-9)
        np.testing.assert_array_equal(clean.activations(hp)[:].view(np.uint16), ext.activations(hp)[:].view(np.uint16))
    assert clean.record.latent_statistics == ext.record.latent_statistics


def test_estimate_probe_and_autobatch_with_every_hook_and_an_unstored_sae(gpt2_dir, workspace, tmp_path):
    make_sae(tmp_path / "sae", 2, seed=5)
    est = ms.estimate(gpt2_dir, TEXTS, layers=[0, 1], hooks=["residual", "mlp", "attention"], max_length=24,
                      saes={"layers.2.residual": str(tmp_path / "sae")}, workspace=workspace, probe=True)
    assert est  # ran the probe's forwards through forward_batches
    ext = ms.extract(gpt2_dir, TEXTS, layers=[0, 1], hooks=["residual", "mlp", "attention"], max_length=24,
                     saes={"layers.2.residual": str(tmp_path / "sae")}, batch_size="auto", workspace=workspace,
                     progress=False, device="cpu", dtype="float32")
    assert ext.record.params.batch_size_auto["chosen"] >= 1
    ref = reference_rows(gpt2_dir, ext, ext.hook_points)
    for hp in ext.hook_points:
        np.testing.assert_allclose(ext.activations(hp)[:], ref[hp], rtol=1e-4, atol=1e-5, err_msg=hp)


def test_prompt_values_equal_stored_rows(gpt2_dir, workspace):
    from mistudio.analysis import prompt

    ext = ms.extract(gpt2_dir, TEXTS[:6], layers="all", hooks=["residual", "mlp", "attention"], dtype="float32",
                     max_length=24, batch_size=4, workspace=workspace, progress=False, device="cpu")
    text = ext.tokenizer.decode(ext.sample(0, tokens=False)["input_ids"])
    for hp in ["layers.0.mlp", "layers.2.attention", "layers.1.residual"]:
        out = prompt.prompt_features(ext, hp, text)
        want = ext.sample(0, tokens=False)["activations"][hp]
        np.testing.assert_allclose(out["values"][:len(want)], want, rtol=1e-4, atol=1e-5, err_msg=hp)
