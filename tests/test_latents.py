"""SAE latents stored during the extraction: equal to SAELens's own encoding of the stored activations (every
architecture), a width that keeps each token's largest latents and counts what it drops, a by-feature index that
reads one latent's activations and that ``verify`` recomputes, resume equal to a clean run, an SAE swapped under a
store refused, and an estimate that counts the latents' bytes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio.errors import InputError, StoreCorrupted
from mistudio.storage.codec import record_committed

from conftest import DU_TOLERANCE, disk_usage, file_bytes

sl = pytest.importorskip("sae_lens")

HP = "layers.2.residual"
D_SAE = 128
LAYOUT = dict(layers=[2], hooks=["residual"], dtype="float32", max_length=40, max_samples=80, batch_size=4,
              chunk_mb=0.01, shard_mb=0.05)


def make_sae(folder, architecture: str, seed: int = 0, layer: int = 2, d_sae: int = D_SAE, hook_name: str | None = None,
             **cfg) -> "sl.SAE":
    """A SAELens SAE on ``layers.<layer>.residual`` of the tiny GPT-2 (width 32; or on ``hook_name``), random
    weights, saved to ``folder`` (other test files make theirs here too)."""
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": (sl.StandardSAE, sl.StandardSAEConfig), "topk": (sl.TopKSAE, sl.TopKSAEConfig),
               "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig), "gated": (sl.GatedSAE, sl.GatedSAEConfig)}
    cls, cfg_cls = classes[architecture]
    if architecture == "topk":
        cfg.setdefault("k", 8)
    hook_name = hook_name or f"blocks.{layer}.hook_resid_post"
    sae = cls(cfg_cls(d_in=32, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name), **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise.abs() * 0.5 if name == "threshold" else noise * (0.3 if name.startswith("W") else 0.1))
    sae.save_model(str(folder))
    return sae


def encoded(sae, ext) -> np.ndarray:
    """SAELens's dense encoding of the stored activations."""
    with torch.no_grad():
        return sae.encode(torch.from_numpy(ext.activations(HP)[:].astype(np.float32))).numpy()


def top_width(dense: np.ndarray, width: int) -> np.ndarray:
    """Each row's ``width`` largest non-zero values kept (what a store of that width holds)."""
    out = np.zeros_like(dense)
    order = np.argsort(-dense, axis=1, kind="stable")[:, :width]
    rows = np.arange(len(dense))[:, None]
    out[rows, order] = dense[rows, order]
    return out


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu", "gated"])
def test_latents_equal_saelens_encoding(architecture, gpt2_dir, workspace, tmp_path):
    sae = make_sae(tmp_path / "sae", architecture)
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, workspace=workspace, progress=False,
                     **LAYOUT)
    assert ext.latent_points == [f"{HP}.latents"]
    info = ext.latent_info(HP)
    assert (info.architecture, info.d_sae, info.hook_name) == (architecture, D_SAE, "blocks.2.hook_resid_post")
    want = encoded(sae, ext)
    l0 = (want != 0).sum(axis=1)
    if architecture == "topk":
        assert info.width == 8 and "top-8" in info.width_reason
    else:  # probed on the first batch: 1.5 x its most active token, in steps of 16
        assert info.width % 16 == 0 or info.width == D_SAE, info.width
        assert "first batch" in info.width_reason
    got = ext.latents(HP)
    assert got.shape == (ext.n_tokens, D_SAE)
    np.testing.assert_allclose(got.toarray(), top_width(want, info.width), rtol=1e-5, atol=1e-6)
    stats = ext.record.latent_statistics[HP]
    assert stats.rows == ext.n_tokens
    assert stats.dropped == int(np.maximum(l0 - info.width, 0).sum())
    assert stats.active == int(np.minimum(l0, info.width).sum())
    assert stats.mean_l0 == pytest.approx(stats.active / stats.rows)
    assert stats.max == pytest.approx(float(want.max()), rel=1e-6)
    assert ext.verify().ok
    for latent in [int(np.argmax(l0 > 0)), int(np.argmax((got.toarray() != 0).sum(0))), D_SAE - 1]:
        rows, values = ext.feature(HP, latent)
        column = got[:, latent].toarray().ravel()
        np.testing.assert_array_equal(rows, np.nonzero(column)[0])
        np.testing.assert_array_equal(values, column[rows])


def test_a_narrow_width_keeps_the_largest_and_counts_what_it_drops(gpt2_dir, workspace, tmp_path):
    sae = make_sae(tmp_path / "sae", "standard")
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, latent_width=4, workspace=workspace,
                     progress=False, **LAYOUT)
    want = encoded(sae, ext)
    l0 = (want != 0).sum(axis=1)
    assert (l0 > 4).any(), "the test needs tokens with more than 4 latents"
    info, stats = ext.latent_info(HP), ext.record.latent_statistics[HP]
    assert (info.width, info.width_reason) == (4, "latent_width=4")
    assert ext.latent_arrays(HP)[0].shape == (ext.n_tokens, 4)
    np.testing.assert_allclose(ext.latents(HP).toarray(), top_width(want, 4), rtol=1e-5, atol=1e-6)
    assert stats.dropped == int(np.maximum(l0 - 4, 0).sum()) > 0
    assert stats.rows_dropped == int((l0 > 4).sum())


def test_latents_dropped_for_want_of_width_are_warned_with_the_fix(gpt2_dir, workspace, tmp_path, capsys):
    """A width narrower than the tokens' L0 drops latents: ``ext.warnings()``, the progress bar's end line and the
    command line's end line say how many, on how many rows, what it does to the statistics, and the fix."""
    from mistudio import cli
    from mistudio.errors import render
    from mistudio.widgets.common import store_notes

    make_sae(tmp_path / "sae", "standard")
    sae = {HP: str(tmp_path / "sae")}
    ext = ms.extract(gpt2_dir, "sample", saes=sae, latent_width=4, workspace=workspace, progress=True, **LAYOUT)
    stats = ext.record.latent_statistics[HP]
    assert stats.dropped > 0
    lines = [render(w) for w in ext.warnings() if "dropped" in w]
    assert len(lines) == 1, ext.warnings()
    line = lines[0]
    share = f"{stats.dropped / stats.active:.1%}"
    assert f"{HP}.latents" in line and f"{stats.dropped:,}" in line and f"{stats.rows_dropped:,}" in line, line
    assert share in line and "4 largest" in line and "latent_width=" in line and f"{D_SAE}" in line, line
    assert "latent_coverage" in line, line
    assert "dropped" in capsys.readouterr().err  # the progress bar's end line
    assert "dropped for want of width" in store_notes(ext)  # the Browse tab
    from mistudio.analysis.feature_page import feature_page_html
    from mistudio.analysis.features import feature_page
    page = feature_page(ext, f"{HP}.latents", 0, n_token_means=0, logits=False)  # a page of that store says it
    assert page["caveats"] == [line] and "dropped for want of width" in feature_page_html(page)
    assert cli.main(["extract", "--workspace", workspace, "--model", gpt2_dir, "--layers", "2", "--max-samples", "4",
                     "--saes", f"{HP}={tmp_path / 'sae'}", "--latent-width", "4"]) == 0
    out = capsys.readouterr().out
    assert "dropped" in out and "--latent-width" in out and "--latent-coverage" in out, out
    wide = ms.extract(gpt2_dir, "sample", saes=sae, latent_width=D_SAE, workspace=workspace, progress=False,
                      **LAYOUT)
    assert wide.record.latent_statistics[HP].dropped == 0 and wide.warnings() == []
    assert feature_page(wide, f"{HP}.latents", 0, n_token_means=0, logits=False)["caveats"] == []
    ahead = ms.estimate(gpt2_dir, "sample", saes=sae, latent_width=4, probe=True, workspace=workspace, **LAYOUT)
    said = [w for w in ahead["warnings"] if "dropped" in w]  # the probe says so before the run
    assert len(said) == 1 and "on the probed batches" in said[0] and "would be dropped" in said[0], ahead["warnings"]
    assert "4 largest" in said[0] and "latent_width=" in said[0] and f"{HP}.latents" in said[0], said
    assert not [w for w in ms.estimate(gpt2_dir, "sample", saes=sae, latent_width=D_SAE, probe=True,
                                       workspace=workspace, **LAYOUT)["warnings"] if "dropped" in w]


def make_loud_sae(folder) -> None:
    """A standard SAE whose latents reach far past float16's ±65,504 on the tiny GPT-2 (its raw rows do not)."""
    sae = make_sae(folder, "standard")
    with torch.no_grad():
        sae.W_enc.mul_(1e6)
        sae.b_enc.mul_(1e6)
    sae.save_model(str(folder))


def test_latents_past_the_storage_range_are_counted_and_warned(gpt2_dir, workspace, tmp_path, capsys):
    """Latents over float16's range are stored as inf: counted in the latent statistics and warned with the fix,
    as raw hook points are; a bfloat16 store keeps them finite and says nothing."""
    from mistudio import cli
    from mistudio.errors import render
    from mistudio.widgets.common import store_notes

    make_loud_sae(tmp_path / "sae")
    sae = {HP: str(tmp_path / "sae")}
    options = {**LAYOUT, "dtype": "float16", "latent_width": D_SAE}
    ext = ms.extract(gpt2_dir, "sample", saes=sae, workspace=workspace, progress=True, **options)
    stats = ext.record.latent_statistics[HP]
    _, values = ext.latent_arrays(HP)
    n_inf = int(np.isinf(np.asarray(values[:], np.float32)).sum())
    assert stats.n_out_of_range == n_inf > 0 and stats.max > 65504 and stats.n_nan == 0
    assert not ext.record.statistics[HP].n_out_of_range  # the raw rows are in range
    lines = [render(w) for w in ext.warnings() if "range" in w]
    assert len(lines) == 1, ext.warnings()
    line = lines[0]
    assert f"{HP}.latents" in line and f"{n_inf:,}" in line and "float16's range" in line, line
    assert "dtype='bfloat16'" in line, line
    assert "float16's range" in capsys.readouterr().err  # the progress bar's end line
    assert "range and are stored as ±inf" in store_notes(ext)  # the Browse tab (HTML-escaped quotes)
    assert cli.main(["extract", "--workspace", workspace, "--model", gpt2_dir, "--layers", "2", "--max-samples", "4",
                     "--saes", f"{HP}={tmp_path / 'sae'}", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "float16's range" in out and "--dtype bfloat16" in out, out
    safe = ms.extract(gpt2_dir, "sample", saes=sae, workspace=workspace, progress=False,
                      **{**options, "dtype": "bfloat16"})
    assert safe.record.latent_statistics[HP].n_out_of_range == 0 and safe.warnings() == []
    ahead = ms.estimate(gpt2_dir, "sample", saes=sae, probe=True, workspace=workspace, **options)["warnings"]
    said = [w for w in ahead if "latents are past" in w]  # the probe says so before the run
    assert len(said) == 1 and f"{HP}.latents" in said[0] and "float16's range" in said[0], ahead
    assert "dtype='bfloat16'" in said[0], said
    assert not [w for w in ms.estimate(gpt2_dir, "sample", saes=sae, probe=True, workspace=workspace,
                                       **{**options, "dtype": "bfloat16"})["warnings"] if "past" in w]


def test_latents_out_of_range_of_a_stopped_run_resume_to_the_clean_count(gpt2_dir, tmp_path):
    from conftest import cancelled_at

    make_loud_sae(tmp_path / "sae")
    options = dict(saes={HP: str(tmp_path / "sae")}, **{**LAYOUT, "dtype": "float16"})
    clean = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "clean"), progress=False, **options)
    ws = ms.Workspace(tmp_path / "ws")
    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=9, **options)
    stopped = job.extraction().record.latent_statistics[HP]
    assert 0 < stopped.n_out_of_range < clean.record.latent_statistics[HP].n_out_of_range
    resumed = ws.resume(job.id).wait(120)
    assert resumed.status == "COMPLETED", resumed.error
    assert resumed.extraction().record.latent_statistics == clean.record.latent_statistics

def test_latent_coverage_sizes_the_width_by_a_quantile_of_the_first_batch(gpt2_dir, workspace, tmp_path):
    """A ReLU SAE's width from the share of tokens that must fit (not 1.5 x its busiest token): narrower, the
    largest latents kept, the rest counted; the estimate's probe says the same width."""
    sae = make_sae(tmp_path / "sae", "standard")
    args = dict(saes={HP: str(tmp_path / "sae")}, workspace=workspace, progress=False, **LAYOUT)
    default = ms.extract(gpt2_dir, "sample", **args)
    ext = ms.extract(gpt2_dir, "sample", latent_coverage=0.5, **args)
    want = encoded(sae, ext)
    l0 = (want != 0).sum(axis=1)
    info, stats = ext.latent_info(HP), ext.record.latent_statistics[HP]
    assert info.width < default.latent_info(HP).width and "latent_coverage=0.5" in info.width_reason, info
    np.testing.assert_allclose(ext.latents(HP).toarray(), top_width(want, info.width), rtol=1e-5, atol=1e-6)
    assert stats.dropped == int(np.maximum(l0 - info.width, 0).sum())
    assert stats.rows_dropped == int((l0 > info.width).sum())
    estimate = ms.estimate(gpt2_dir, "sample", latent_coverage=0.5, probe=True,
                           **{k: v for k, v in args.items() if k not in ("workspace", "progress")})
    assert estimate["bytes_on_disk"] < ms.estimate(gpt2_dir, "sample", probe=True, **{
        k: v for k, v in args.items() if k not in ("workspace", "progress")})["bytes_on_disk"]
    with pytest.raises(ms.InputError, match=r"latent_coverage=1.5.* at most 1"):
        ms.extract(gpt2_dir, "sample", latent_coverage=1.5, **args)
    with pytest.raises(ms.InputError, match=r"both set the latents kept per token"):
        ms.extract(gpt2_dir, "sample", latent_coverage=0.5, latent_width=4, **args)
    with pytest.raises(ms.InputError, match=r"no SAE is given"):
        ms.extract(gpt2_dir, "sample", latent_coverage=0.5, workspace=workspace, progress=False, **LAYOUT)


def test_latents_of_a_stopped_run_read_up_to_the_mark_and_resume_equals_a_clean_run(gpt2_dir, tmp_path):
    from conftest import cancelled_at

    make_sae(tmp_path / "sae", "jumprelu")
    options = dict(saes={HP: str(tmp_path / "sae")}, **LAYOUT)
    clean = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "clean"), progress=False, **options)
    ws = ms.Workspace(tmp_path / "ws")
    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=9, **options)
    stopped = job.extraction()
    mark = stopped.committed_tokens()
    assert 0 < mark < clean.n_tokens
    assert mark % stopped.latent_info(HP).block_rows, "the mark should cut an index block (read from its rows)"
    partial = stopped.latents(HP)
    assert partial.shape[0] == mark
    np.testing.assert_array_equal(partial.toarray(), clean.latents(HP)[:mark].toarray())
    for latent in range(0, D_SAE, 9):
        rows, values = stopped.feature(HP, latent)
        whole_rows, whole_values = clean.feature(HP, latent)
        keep = whole_rows < mark
        np.testing.assert_array_equal(rows, whole_rows[keep])
        np.testing.assert_array_equal(values, whole_values[keep])
    assert stopped.verify().ok
    resumed = ws.resume(job.id).wait(120)
    assert resumed.status == "COMPLETED", resumed.error
    ext = resumed.extraction()
    for name in ("indices", "values"):
        a, b = (e.latent_arrays(HP)[name == "values"][:] for e in (ext, clean))
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in ("feature_offsets", "feature_rows", "feature_values"):
        np.testing.assert_array_equal(ext.store.array(f"latents/{HP}/{name}")[:],
                                      clean.store.array(f"latents/{HP}/{name}")[:], err_msg=name)
    assert ext.record.latent_statistics == clean.record.latent_statistics
    assert ext.verify().ok


def test_a_width_past_a_top_k_saes_k_is_capped_at_k(gpt2_dir, workspace, tmp_path):
    """A top-k SAE never fires more than k latents: latent_width=100 would store 120 empty slots a token (the estimate
    said 7x the bytes); it keeps k, and the metadata says why, as the estimate counts it."""
    make_sae(tmp_path / "sae", "topk")
    sae = {HP: str(tmp_path / "sae")}
    ext = ms.extract(gpt2_dir, "sample", saes=sae, latent_width=100, workspace=workspace, progress=False, **LAYOUT)
    info = ext.latent_info(HP)
    assert info.width == 8 and info.width_reason == "latent_width=100, capped at 8 (the SAE's k, all a top-8 SAE fires)"
    assert ext.latent_arrays(HP)[0].shape == (ext.n_tokens, 8) and ext.record.latent_statistics[HP].dropped == 0
    assert ms.estimate(gpt2_dir, "sample", saes=sae, latent_width=100, **LAYOUT)["bytes_on_disk"] == \
        ms.estimate(gpt2_dir, "sample", saes=sae, **LAYOUT)["bytes_on_disk"]
    narrow = ms.extract(gpt2_dir, "sample", saes=sae, latent_width=4, workspace=workspace, progress=False, **LAYOUT)
    [line] = [w for w in narrow.warnings() if "dropped" in w]  # its fix: the SAE's k, not a width it would cap
    assert "«pass latent_width=8», the SAE's k (all a top-8 SAE fires)" in line and "coverage" not in line, line
    ahead = ms.estimate(gpt2_dir, "sample", saes=sae, latent_width=4, probe=True, workspace=workspace, **LAYOUT)
    assert any("the SAE's k (all a top-8 SAE fires)" in w for w in ahead["warnings"]), ahead["warnings"]
    make_sae(tmp_path / "relu", "standard")
    relu = ms.estimate(gpt2_dir, "sample", saes={HP: str(tmp_path / "relu")}, latent_width=10_000, **LAYOUT)
    assert relu["bytes_on_disk"] == ms.estimate(gpt2_dir, "sample", saes={HP: str(tmp_path / "relu")},
                                                latent_width=D_SAE, **LAYOUT)["bytes_on_disk"]  # at most d_sae


def test_a_crafted_feature_index_is_named_by_verify_and_refused_by_reads(gpt2_dir, workspace, tmp_path):
    make_sae(tmp_path / "sae", "topk")
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, workspace=workspace, progress=False,
                     **LAYOUT)
    rows, _ = ext.feature(HP, 3)
    assert len(rows)
    offsets = ext.store.array(f"latents/{HP}/feature_offsets")
    row = offsets[0]
    row[4], row[3] = row[3], row[4] + 1  # latent 3's entries out of order: written with valid checksums
    offsets[0] = row
    report = ms.open_extraction(ext.id, workspace=workspace).verify()
    assert not report.ok and "feature_offsets" in str(report), str(report)
    with pytest.raises(StoreCorrupted, match="by-feature index of block 0"):
        ms.open_extraction(ext.id, workspace=workspace).feature(HP, 3)
    row = offsets[0]  # now a crafted index that is in order but wrong: verify recomputes it
    row[3] = max(int(row[3]) - 1, 0)
    offsets[0] = row
    report = ms.open_extraction(ext.id, workspace=workspace).verify()
    assert not report.ok and "feature_offsets" in str(report), str(report)


def test_an_index_block_written_past_the_mark_is_not_damage_but_its_committed_entries_are_checked(
        gpt2_dir, workspace, tmp_path):
    """A job stopped after a block's index was written but before the mark moved past the block: the entries of
    committed rows are checked, those past the mark are resume's to rewrite (verify called the block damage)."""
    make_sae(tmp_path / "sae", "topk")
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, workspace=workspace, progress=False,
                     **LAYOUT)
    block_rows, offsets = ext.latent_info(HP).block_rows, ext.sample_offsets
    samples = int(np.searchsorted(offsets, block_rows // 2))  # a sample boundary inside block 0
    assert 0 < offsets[samples] < block_rows < ext.n_tokens
    store = ms.Workspace(workspace).store(ext.id, writable=True)
    store.update(status="FAILED", progress={"samples_committed": samples, "tokens_committed": int(offsets[samples])})
    report = ms.open_extraction(ext.id, workspace=workspace).verify()
    assert report.ok, str(report)
    index = ext.store.array(f"latents/{HP}/feature_rows")
    entries = index[:block_rows * ext.latent_info(HP).width]
    below = int(np.flatnonzero((entries >= 0) & (entries < offsets[samples]))[0])
    entries[below] = (entries[below] + 1) % int(offsets[samples])  # an entry of a committed row, moved
    index[:len(entries)] = entries
    report = ms.open_extraction(ext.id, workspace=workspace).verify()
    assert not report.ok and "by-feature index of block 0" in str(report), str(report)


def test_a_changed_sae_is_refused_on_resume(gpt2_dir, workspace, tmp_path):
    from conftest import cancelled_at

    make_sae(tmp_path / "sae", "topk", seed=0)
    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=3, saes={HP: str(tmp_path / "sae")}, **LAYOUT)
    make_sae(tmp_path / "sae", "topk", seed=1)  # retrained in place
    with pytest.raises(InputError, match="is not the one this store was made with"):
        ws.resume(job.id)
    assert ws.job(job.id).status == "CANCELLED"
    assert job.extraction().verify().ok  # what was stored is untouched
    make_sae(tmp_path / "sae", "topk", seed=0)  # the original back: it resumes
    assert ws.resume(job.id).wait(60).status == "COMPLETED"


def test_request_errors_name_the_value(gpt2_dir, workspace, tmp_path):
    make_sae(tmp_path / "sae", "topk")
    make_sae(tmp_path / "mid", "standard", hook_name="blocks.2.hook_resid_mid")  # the width of every hook point
    make_sae(tmp_path / "z", "standard", hook_name="blocks.2.attn.hook_z", reshape_activations="hook_z")
    cases = [
        (dict(saes={HP: str(tmp_path / "mid")}), "between block 2's attention and its MLP, which mistudio does not "
                                                 "capture"),
        (dict(saes={"layers.2.attention": str(tmp_path / "z")}, hooks=["residual", "attention"]),
         "attention heads' outputs before W_O"),
        (dict(saes={"layers.1.residual": str(tmp_path / "sae")}), "was trained on blocks.2.hook_resid_post"),
        (dict(saes={"layers.7.residual": str(tmp_path / "sae")}),
         "saes names layers.7.residual, but model .* has 3 layers: use a hook point of layers 0 to 2"),
        (dict(saes={"blocks.2": str(tmp_path / "sae")}), "not a hook point"),
        (dict(saes={HP: str(tmp_path / "nowhere")}), "not a folder"),
        (dict(saes={HP: str(tmp_path / "sae")}, latent_width=0), "latent_width"),
    ]
    for options, message in cases:
        with pytest.raises(InputError, match=message):
            ms.extract(gpt2_dir, "sample", workspace=workspace, progress=False, **{**LAYOUT, **options})
    assert not os.path.isdir(os.path.join(workspace, "extractions")) or not os.listdir(
        os.path.join(workspace, "extractions"))
    ext = ms.extract(gpt2_dir, "sample", workspace=workspace, progress=False, **LAYOUT)
    with pytest.raises(InputError, match="holds no SAE latents"):
        ext.latents(HP)


@pytest.mark.parametrize("architecture, probe", [("topk", False), ("standard", True)])
def test_the_estimate_counts_the_latents(architecture, probe, gpt2_dir, tmp_path):
    make_sae(tmp_path / "sae", architecture)
    options = dict(saes={HP: str(tmp_path / "sae")}, **LAYOUT)
    est = ms.estimate(gpt2_dir, "sample", probe=probe, workspace=str(tmp_path / "ws"), **options)
    ext = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "ws"), progress=False, **options)
    disk = file_bytes(ext.location)
    assert abs(disk - est["file_bytes"]) <= 0.01 * disk, (disk, est["file_bytes"])
    used = disk_usage(ext.location)
    assert abs(used - est["bytes_on_disk"]) <= DU_TOLERANCE * used, (used, est["bytes_on_disk"])
    plain = ms.estimate(gpt2_dir, "sample", workspace=str(tmp_path / "ws"), **LAYOUT)
    assert est["bytes_on_disk"] > plain["bytes_on_disk"]


def test_an_unprobed_estimate_says_the_width_is_a_guess(gpt2_dir, tmp_path):
    make_sae(tmp_path / "sae", "standard")
    est = ms.estimate(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, workspace=str(tmp_path / "ws"),
                      **LAYOUT)
    assert any("a guess" in w and "probe=True" in w for w in est["warnings"]), est["warnings"]


# -- feature statistics in the same pass --------------------------------------------------------------------
def _defaults() -> dict:
    from mistudio.storage.featstats import FeatureStatsAccumulator

    c = FeatureStatsAccumulator(1).config()
    return dict(k=c["k"], bins=c["bins"], exponents=(c["exponent_low"], c["exponent_high"]), bands=c["bands"],
                per_band=c["per_band"], cooccurrence=c["cooccurrence"],
                cooccurrence_per_token=c["cooccurrence_per_token"], seed=c["seed"])


STATISTICS = ("n_tokens", "fire_count", "nan_count", "sum", "fire_sum", "max", "min", "max_row", "min_row", "hist",
              "topk_values", "topk_rows", "topk_documents", "sample_rows", "sample_values", "co_features",
              "co_counts", "co_error")


def assert_same_statistics(a, b) -> None:
    for name in STATISTICS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_statistics_are_kept_in_the_pass_and_equal_brute_force(gpt2_dir, workspace, tmp_path, monkeypatch):
    from test_featstats import Brute, check

    from mistudio.storage import featfeed

    make_sae(tmp_path / "sae", "standard")
    monkeypatch.setattr(featfeed, "BLOCK_BYTES", 4096)  # many blocks of the grid, so the pass follows the mark
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, feature_statistics="on",
                     workspace=workspace, progress=False, **LAYOUT)
    assert featfeed.block_rows(ext.store, f"{HP}.latents") < ext.n_tokens // 4
    offsets = np.asarray(ext.activation_offsets)
    documents = np.searchsorted(offsets, np.arange(ext.n_tokens), side="right") - 1
    for key, dense in ((f"{HP}.latents", ext.latents(HP).toarray()), (HP, ext.activations(HP)[:])):
        rows, state = featfeed.load(ext.store, key, ext.n_tokens)  # saved by the extraction, to the last row
        assert rows == ext.n_tokens
        monkeypatch.setattr(featfeed, "accumulate", None)  # read from the snapshot: no pass over the rows
        stats = ext.feature_statistics(key)
        monkeypatch.undo()
        monkeypatch.setattr(featfeed, "BLOCK_BYTES", 4096)
        check(stats, Brute(dense, documents, **_defaults()), exact_cooccurrence=False)
        assert_same_statistics(stats, featfeed.compute(ext, key))  # a later pass on the same grid: bit-equal
    assert ext.verify().ok


def test_statistics_of_a_stopped_run_continue_exactly(gpt2_dir, tmp_path, monkeypatch):
    from conftest import cancelled_at

    from mistudio.storage import featfeed

    make_sae(tmp_path / "sae", "topk")
    monkeypatch.setattr(featfeed, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(featfeed, "SNAPSHOT_SECONDS", 0.0)  # a snapshot after every block
    options = dict(saes={HP: str(tmp_path / "sae")}, **LAYOUT)
    key = f"{HP}.latents"
    clean = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "clean"), progress=False, **options)
    ws = ms.Workspace(tmp_path / "ws")
    job = cancelled_at(ws, gpt2_dir, "sample", at_batch=12, **options)
    stopped = job.extraction()
    mark = stopped.committed_tokens()
    rows, _ = featfeed.load(stopped.store, key, mark)
    step = featfeed.block_rows(stopped.store, key)
    assert 0 < rows <= mark and rows % step == 0  # on the grid, at or below the mark
    partial = stopped.feature_statistics(key)  # continued from the snapshot to the mark
    assert partial.n_tokens == mark
    assert_same_statistics(partial, featfeed.compute(stopped, key, chunk_rows=step))
    resumed = ws.resume(job.id).wait(120)
    assert resumed.status == "COMPLETED", resumed.error
    assert_same_statistics(resumed.extraction().feature_statistics(key), clean.feature_statistics(key))


def test_a_crafted_width_or_latent_index_is_damage_never_fewer_rows(gpt2_dir, workspace, tmp_path):
    """The metadata's latent width disagreeing with the arrays made ext.feature return 64 rows of 2,382; a latent
    index past d_sae written through Zarr (checksums valid) gave an invalid sparse matrix without a word."""
    import json
    import shutil
    from pathlib import Path

    import zarr

    make_sae(tmp_path / "sae", "topk")
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, workspace=workspace, progress=False,
                     **LAYOUT)
    wide = Path(shutil.copytree(ext.location, tmp_path / "wide.zarr"))
    group = json.loads((wide / "zarr.json").read_text())
    group["attributes"]["mistudio"]["latents"][HP]["width"] = 10**12
    group.pop("consolidated_metadata", None)
    (wide / "zarr.json").write_text(json.dumps(group))
    with pytest.raises(ms.StoreCorrupted, match=r"latents/layers\.2\.residual/indices.*disagrees with the metadata"):
        ms.open_extraction(str(wide)).feature(HP, 5)
    past = Path(shutil.copytree(ext.location, tmp_path / "past.zarr"))
    indices = zarr.open_array(str(past), path=f"latents/{HP}/indices", mode="r+")
    values = zarr.open_array(str(past), path=f"latents/{HP}/values", mode="r+")
    d_sae = ext.latent_info(HP).d_sae
    indices[5, 0], values[5, 0] = d_sae + 72, 3.0
    record_committed([indices, values], 0, indices.shape[0])  # the chunk records agree: only the values can tell
    with pytest.raises(ms.StoreCorrupted, match=rf"latent index {d_sae + 72} is past the SAE's {d_sae} latents"):
        ms.open_extraction(str(past)).latents(HP)


@pytest.mark.parametrize("edit", ["n_tokens", "exponents", "block_rows -1", "block_rows 0", "d"])
def test_edited_snapshot_attributes_are_recomputed_never_trusted(gpt2_dir, workspace, tmp_path, edit):
    """A snapshot's numbers live in its zarr.json attributes: an edited count, bin exponents, grid or width is
    found by their digest and the statistics are computed again (a hostile user's cases: density 10, histogram
    edges moved, 0 rows, a raw ValueError, an 8 GB allocation)."""
    import json
    from pathlib import Path

    from mistudio.storage import featfeed

    make_sae(tmp_path / "sae", "topk")
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, workspace=workspace, progress=False,
                     **LAYOUT)
    key = f"{HP}.latents"
    want = ext.feature_statistics(key)
    parent = Path(ext.location) / "statistics" / key
    snapshot = json.loads((parent / "zarr.json").read_text())["attributes"]["snapshot"]

    def change(file: Path, fn) -> None:
        group = json.loads(file.read_text())
        fn(group["attributes"])
        file.write_text(json.dumps(group))

    edits = {"n_tokens": (snapshot, lambda a: a.__setitem__("n_tokens", a["n_tokens"] // 10)),
             "exponents": (snapshot, lambda a: a.update(exponent_low=a["exponent_low"] + 4,
                                                         exponent_high=a["exponent_high"] + 4)),
             "block_rows -1": ("", lambda a: a.__setitem__("block_rows", -1)),
             "block_rows 0": ("", lambda a: a.__setitem__("block_rows", 0)),
             "d": (snapshot, lambda a: a.__setitem__("d", 10**9))}
    where, fn = edits[edit]
    change(parent / where / "zarr.json", fn)
    assert featfeed.load(ms.open_extraction(ext.location).store, key, ext.n_tokens) is None
    got = ms.open_extraction(ext.location).feature_statistics(key)
    assert got.n_tokens == ext.n_tokens and float(np.max(got.density)) <= 1.0
    assert_same_statistics(got, want)


def test_feature_statistics_off_saves_none_and_reads_compute_them(gpt2_dir, workspace, tmp_path):
    from mistudio.storage import featfeed

    make_sae(tmp_path / "sae", "topk")
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, feature_statistics="off",
                     workspace=workspace, progress=False, **LAYOUT)
    assert featfeed.load(ext.store, f"{HP}.latents", ext.n_tokens) is None
    assert ext.record.params.feature_statistics == "off"
    assert ext.feature_statistics(f"{HP}.latents").n_tokens == ext.n_tokens
    with pytest.raises(InputError, match="'layers.1.residual.latents' is not in extraction"):
        ext.feature_statistics("layers.1.residual.latents")


CHILD = """
import json, os, sys, time
import mistudio as ms
from mistudio.storage import featfeed
featfeed.BLOCK_BYTES, featfeed.SNAPSHOT_SECONDS = 4096, 0.0  # many blocks, a snapshot after each
workspace, model, counter, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ws = ms.Workspace(workspace)

def computed(index, _size):
    with open(counter + ".tmp", "w") as f:  # replaced whole: a kill never leaves it empty
        f.write(str(index))
    os.replace(counter + ".tmp", counter)
    time.sleep(0.03)
    while index >= int(os.environ["HOLD_AT"]):  # held here until killed: the statistics catch up meanwhile
        time.sleep(1)

job = ws.resume(sys.argv[5], before_batch=computed) if len(sys.argv) > 5 else \\
    ws.submit(model, "sample", before_batch=computed, **options)
print(job.id, flush=True)
job.wait()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_twice_then_resumed_equals_a_clean_run(gpt2_dir, tmp_path):
    import json
    import signal
    import time

    from zygote import Zygote, alive

    make_sae(tmp_path / "sae", "jumprelu")
    options = dict(saes={HP: str(tmp_path / "sae")}, **{**LAYOUT, "batch_size": 2})
    key = f"{HP}.latents"
    clean = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "clean"), progress=False, **options)
    workspace, counter, job_id = str(tmp_path / "ws"), tmp_path / "computed", None
    from mistudio.storage import featfeed

    def snapshot_saved() -> bool:
        store = ms.Workspace(workspace, recover=False).open(job_id).store
        return featfeed.load(store, key, store.record.progress.tokens_committed) is not None

    zygote = Zygote(CHILD)  # each run a fork of one warm process: a real process of its own, SIGKILLed
    for round_, after in enumerate((6, 12)):
        counter.write_text("0")
        argv = [workspace, gpt2_dir, str(counter), json.dumps(options)]
        pid, job_id = zygote.start(*argv, *([job_id] if job_id else []), env={"HOLD_AT": str(after)})
        deadline = time.monotonic() + 120
        # killed once it holds at batch `after` and its statistics thread has saved a snapshot under the mark (the
        # thread follows the commit mark: on a loaded machine it lags the batches)
        while int(counter.read_text() or 0) < after or not snapshot_saved():
            assert alive(pid), f"round {round_}: the child ended"
            assert time.monotonic() < deadline, f"round {round_}: no batch {after} or no snapshot in 120 s"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.005)
    zygote.close()
    ws = ms.Workspace(workspace)  # the dead job is marked FAILED/INTERRUPTED
    stopped = ws.open(job_id)
    assert 0 < stopped.committed_tokens() < clean.n_tokens
    assert featfeed.load(stopped.store, key, stopped.committed_tokens()) is not None  # snapshots were saved
    resumed = ws.resume(job_id).wait(120)
    assert resumed.status == "COMPLETED", resumed.error
    ext = resumed.extraction()
    for name in ("indices", "values", "feature_offsets", "feature_rows", "feature_values"):
        np.testing.assert_array_equal(ext.store.array(f"latents/{HP}/{name}")[:],
                                      clean.store.array(f"latents/{HP}/{name}")[:], err_msg=name)
    assert ext.record.latent_statistics == clean.record.latent_statistics
    assert_same_statistics(ext.feature_statistics(key), featfeed.compute(clean, key, chunk_rows=featfeed.block_rows(
        ext.store, key)))
    assert ext.verify().ok


# -- feature pages of latents -----------------------------------------------------------------------------------
def test_pages_and_table_of_latents_equal_numpy(gpt2_dir, workspace, tmp_path):
    from mistudio.analysis import feature_view
    from mistudio.analysis.features import FeatureTable, feature_hook_points, feature_page

    make_sae(tmp_path / "sae", "standard")
    ext = ms.extract(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")}, workspace=workspace, progress=False,
                     **LAYOUT)
    key = f"{HP}.latents"
    assert feature_hook_points(ext) == [HP, key]
    dense = ext.latents(HP).toarray().astype(np.float64)
    ids = np.asarray(ext.store.tokens("input_ids")[:])
    fired = (dense > 0).sum(0)
    f = int(np.flatnonzero((fired > 20) & (fired < len(dense) // 2))[0])
    col = dense[:, f]
    # the seam
    rows = np.array([len(dense) - 1, 3, 3, 0, 1500])
    np.testing.assert_array_equal(feature_view.values_at(ext, key, f, rows), col[rows].astype(np.float32))
    np.testing.assert_array_equal(feature_view.rows_at(ext, key, rows), dense[rows].astype(np.float32))
    summed = np.zeros((len(dense), 2))
    for r, v in feature_view.columns_blocks(ext, key, [f, 0]):
        np.add.at(summed, r, v)
    np.testing.assert_array_equal(summed, dense[:, [f, 0]])
    with pytest.raises(InputError, match=f"pass feature={D_SAE - 1} or less"):
        feature_view.values_at(ext, key, D_SAE, [0])
    # the page
    page = feature_page(ext, key, f, k=10, context=3, n_token_means=5, min_count=2)
    assert page["kind"] == "latent" and page["d"] == D_SAE and page["n_tokens"] == len(col)
    assert page["fire_count"] == int((col > 0).sum()) and page["mean"] == pytest.approx(col.mean())
    best = np.lexsort((np.arange(len(col)), -col))[:10]
    assert [e["row"] for e in page["top"]] == best.tolist()
    assert [e["value"] for e in page["top"]] == pytest.approx(col[best].tolist())
    sums, counts = np.bincount(ids, weights=col), np.bincount(ids)
    seen = np.flatnonzero(counts >= 2)
    want = seen[np.lexsort((seen, -(sums[seen] / counts[seen])))][:5]
    assert [m["token_id"] for m in page["token_means"]] == want.tolist()
    # the table
    table = FeatureTable(ext, key)
    table.arrange("density", True, (0.0, 1.0), False)
    first = table.page(0, size=5)
    order = np.lexsort((np.arange(D_SAE), -fired))[:5]
    assert [r["feature"] for r in first] == order.tolist()
    assert [r["density"] for r in first] == pytest.approx((fired[order] / len(dense)).tolist())
