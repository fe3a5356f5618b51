"""Feature pages, the feature table, features from a token and from a prompt, notes: real models, real stores,
every number checked against numpy over the stored activations (or the model's weights)."""
from __future__ import annotations

import re
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import mistudio as ms
from mistudio.analysis import feature_view, features
from mistudio.analysis.feature_page import check_page, feature_page_html
from mistudio.analysis.features import (FeatureTable, feature_page, features_for_token, get_note, match_tokens,
                                        notes, parse_features, set_note)
from mistudio.analysis.prompt import prompt_features, top_features
from mistudio.errors import InputError
from mistudio.saes import SAE

from conftest import _configs

HP = "layers.1.residual"


@pytest.fixture(scope="module")
def causal_gpt2(tmp_path_factory, tokenizer_dir):
    """A tiny GPT-2 with its LM head (tied) whose final norm has a random gain, so a missing gain shows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))["gpt2"]
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.transformer.ln_f.weight.copy_(torch.rand(32) * 2 + 0.2)
    folder = tmp_path_factory.mktemp("causal_gpt2")
    model.save_pretrained(folder)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, folder / f.name)
    return str(folder)


@pytest.fixture(scope="module")
def store(causal_gpt2, tmp_path_factory):
    """An extraction of two hook points, float32 so that numpy comparisons are exact."""
    return ms.extract(model=causal_gpt2, dataset=ms.sample_texts()[:60], layers=[1], hooks=["residual", "mlp"],
                      max_length=48, dtype="float32", workspace=str(tmp_path_factory.mktemp("ws")))


@pytest.fixture(scope="module")
def dense(store):
    """The stored activations of HP and the token id of each row, read whole (the store is small)."""
    return np.asarray(store.activations(HP)[:], np.float64), np.asarray(store.store.tokens("input_ids")[:])


def test_page_numbers_equal_numpy(store, dense):
    values, ids = dense
    f = 7
    col = values[:, f]
    page = feature_page(store, HP, f, k=10, context=3)
    check_page(page)
    assert page["kind"] == "neuron" and page["d"] == 32 and page["n_tokens"] == len(col)
    assert page["fire_count"] == int((col > 0).sum()) and page["density"] == pytest.approx((col > 0).mean())
    assert page["mean"] == pytest.approx(col.mean()) and page["max"] == pytest.approx(col.max())
    assert page["mean_active"] == pytest.approx(col[col > 0].mean())
    assert sum(page["histogram"]["counts"]) == len(col)
    assert page["histogram"]["edges"][0] == -np.inf and page["histogram"]["edges"][-1] == np.inf
    best = np.lexsort((np.arange(len(col)), -col))[:10]
    assert [e["row"] for e in page["top"]] == best.tolist()
    assert [e["value"] for e in page["top"]] == pytest.approx(col[best].tolist())
    offsets, rows = store.sample_offsets, store.sample_index
    for e in page["top"]:
        s = int(np.searchsorted(offsets, e["row"], side="right")) - 1
        assert (e["sample"], e["dataset_row"], e["position"]) == (s, int(rows[s]), e["row"] - int(offsets[s]))
        lo = int(offsets[s]) + e["context_start"]
        window = np.arange(lo, lo + len(e["tokens"]))
        assert e["tokens"] == store.tokenizer.convert_ids_to_tokens(ids[window].tolist())
        assert e["values"] == pytest.approx(col[window].tolist())
        assert window[e["peak"]] == e["row"] and len(e["tokens"]) <= 7
        assert window[0] >= offsets[s] and window[-1] < offsets[s + 1]  # the context stays in its sample
    for band in page["bands"]:  # quantile-band examples: real rows with their own values
        for e in band["examples"]:
            assert e["value"] == pytest.approx(col[e["row"]]) and e["value"] > 0
    assert [b["quantiles"] for b in page["bands"]] == [[0.0, 0.5], [0.5, 0.9], [0.9, 0.99], [0.99, 1.0]]
    for c in page["correlated"]:
        assert c["fraction"] == pytest.approx(c["count"] / page["fire_count"]) and c["feature"] != f
    assert (page["prev"], page["next"]) == (6, 8)
    assert feature_page(store, HP, 0)["prev"] is None and feature_page(store, HP, 31)["next"] is None
    html = feature_page_html(page)
    assert 'class="msfp-hist-svg"' in html and "<rect" in html and "Logit effects" in html


def test_the_seam_reads_values_at_any_rows(store, dense):
    values, _ = dense
    rows = np.array([2000, 3, 3, 1500, 0, len(values) - 1])
    np.testing.assert_array_equal(feature_view.values_at(store, HP, 9, rows), values[rows, 9].astype(np.float32))
    np.testing.assert_array_equal(feature_view.rows_at(store, HP, rows), values[rows].astype(np.float32))
    blocks = list(feature_view.columns_blocks(store, HP, [4, 1]))
    np.testing.assert_array_equal(np.concatenate([r for r, _ in blocks]), np.arange(len(values)))
    np.testing.assert_array_equal(np.concatenate([v for _, v in blocks]), values[:, [4, 1]])
    with pytest.raises(InputError, match=f"activation row {len(values)} is outside the {len(values):,} committed"):
        feature_view.values_at(store, HP, 1, [len(values)])
    with pytest.raises(InputError, match="pass feature=31 or less"):
        feature_view.values_at(store, HP, 32, [0])


def test_token_means_equal_numpy_and_are_cached(store, dense):
    values, ids = dense
    f = 3
    sums = np.bincount(ids, weights=values[:, f])
    counts = np.bincount(ids)
    seen = np.flatnonzero(counts >= 3)
    means = sums[seen] / counts[seen]
    expected = seen[np.lexsort((seen, -means))][:6]
    page = feature_page(store, HP, f, n_token_means=6, min_count=3)
    got = page["token_means"]
    assert [m["token_id"] for m in got] == expected.tolist()
    assert [m["mean"] for m in got] == pytest.approx((sums[expected] / counts[expected]).tolist())
    assert [m["count"] for m in got] == counts[expected].tolist() and page["min_count"] == 3
    cached = Path(store.location) / "analysis" / "token_means" / HP / "feature=3,n=6,min=3"
    assert cached.is_dir()
    assert feature_view.token_means(store, HP, f, 6, 3) == got  # read back from the store's cache
    assert feature_page(store, HP, f, n_token_means=0)["token_means"] == []


def test_token_means_of_many_features_share_one_pass(store, dense, monkeypatch):
    values, ids = dense
    passes = []
    real = feature_view.columns_blocks
    monkeypatch.setattr(feature_view, "columns_blocks", lambda ext, hp, fs: passes.append(list(fs)) or real(ext, hp, fs))
    got = feature_view.token_means_many(store, "layers.1.mlp", [9, 2, 9, 30], n=4, min_count=2)
    assert passes == [[9, 2, 30]] and sorted(got) == [2, 9, 30]
    mlp = np.asarray(store.activations("layers.1.mlp")[:], np.float64)
    counts = np.bincount(ids)
    for f, means in got.items():
        sums = np.bincount(ids, weights=mlp[:, f])
        seen = np.flatnonzero(counts >= 2)
        best = seen[np.lexsort((seen, -(sums[seen] / counts[seen])))][:4]
        assert [m["token_id"] for m in means] == best.tolist()
    assert feature_view.token_means(store, "layers.1.mlp", 2, n=4, min_count=2) == got[2] and len(passes) == 1
    pages = list(features.export_pages(store, "layers.1.mlp", [2, 30, 5], n_token_means=4, min_count=2))
    assert [p["feature"] for p in pages] == [2, 30, 5] and passes[1:] == [[5]]  # only the one not cached yet
    assert pages[1]["token_means"] == got[30]


def test_logit_effects_in_the_page_equal_numpy_from_the_weights(store, causal_gpt2):
    weights = load_file(str(Path(causal_gpt2) / "model.safetensors"))
    gain = weights["transformer.ln_f.weight"].astype(np.float64)
    W_U = weights["transformer.wte.weight"].astype(np.float64).T  # tied: the head is the embedding
    assert not np.allclose(gain, 1.0)
    for f in (0, 11):
        logits = gain[f] * W_U[f]  # the unit vector e_f through diag(gain) @ W_U
        page = feature_page(store, HP, f, n_logits=5)
        top, bottom = np.argsort(-logits)[:5], np.argsort(logits)[:5]
        assert [e["token_id"] for e in page["logits"]["promoted"]] == top.tolist()
        assert [e["token_id"] for e in page["logits"]["suppressed"]] == bottom.tolist()
        np.testing.assert_allclose([e["value"] for e in page["logits"]["promoted"]], logits[top], rtol=1e-5)
        np.testing.assert_allclose([e["value"] for e in page["logits"]["suppressed"]], logits[bottom], rtol=1e-5)
        assert page["logits_note"] is None
    html = feature_page_html(page)
    assert "promoted" in html and "suppressed" in html


def test_latent_logits_use_the_decoder_row(store, causal_gpt2):
    sae = random_sae(32, 48)
    weights = load_file(str(Path(causal_gpt2) / "model.safetensors"))
    folded = weights["transformer.ln_f.weight"][:, None] * weights["transformer.wte.weight"].T
    effect = features.feature_logits(store, f"{HP}.latents", 9, k=4, sae=sae)
    logits = sae.W_dec[9].numpy().astype(np.float64) @ folded
    assert [e["token_id"] for e in effect["promoted"]] == np.argsort(-logits)[:4].tolist()
    with pytest.raises(InputError, match="feature=48"):
        features.feature_logits(store, f"{HP}.latents", 48, sae=sae)
    with pytest.raises(InputError, match="applied no SAE at layers.1.residual"):
        features.sae_for(store, f"{HP}.latents")


def test_encoder_pages_say_why_there_are_no_logits(minilm_dir, tmp_path):
    ext = ms.extract(model=minilm_dir, dataset=ms.sample_texts()[:12], layers=[0], max_length=24,
                     exclude_special=True, workspace=str(tmp_path))
    page = feature_page(ext, "layers.0.residual", 5, context=4)
    assert page["logits"] is None and "encoder" in page["logits_note"]
    assert page["scheme"] == "wordpiece"
    assert "encoder" in feature_page_html(page)
    # exclude_special: [CLS]/[SEP] have no row, so no value; every other context value is the stored one
    for e in page["top"] + [x for b in page["bands"] for x in b["examples"]]:
        sample = ext.sample(e["dataset_row"], ["layers.0.residual"])
        lo = e["context_start"]
        acts = sample["activations"]["layers.0.residual"][lo:lo + len(e["tokens"]), 5]
        assert e["special"] == sample["special"][lo:lo + len(e["tokens"])].tolist()
        for value, stored, special in zip(e["values"], acts, e["special"]):
            assert (value is None) == bool(special)
            if value is not None:
                assert value == pytest.approx(float(stored))


def test_one_per_document_and_argument_errors(store):
    page = feature_page(store, HP, 4, k=15, one_per_document=True)
    samples = [e["sample"] for e in page["top"]]
    assert len(samples) == len(set(samples)) and page["one_per_document"]
    assert "one per document" in feature_page_html(page)
    with pytest.raises(InputError, match=r"feature=32 is not a feature of layers.1.residual: it has 32 features \(0 to 31\): pass feature=31"):
        feature_page(store, HP, 32)
    with pytest.raises(InputError, match="feature=True"):
        feature_page(store, HP, True)
    with pytest.raises(InputError, match="context=-1"):
        feature_page(store, HP, 1, context=-1)
    with pytest.raises(InputError, match="not in extraction"):
        feature_page(store, "layers.2.residual", 1)


def test_notes_are_saved_in_the_store_and_escaped(store):
    evil = "<img src=x onerror=alert(1)> fires on fox"
    set_note(store, HP, 5, evil)
    set_note(store, HP, 6, "second")
    again = ms.Workspace(str(Path(store.location).parents[1])).open(store.id)  # another reader of the same store
    assert notes(again, HP) == {5: evil, 6: "second"} and get_note(again, "layers.1.mlp", 5) == ""
    page = feature_page(again, HP, 5)
    assert page["note"] == evil
    html = feature_page_html(page)
    assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    set_note(store, HP, 6, "  ")  # blank: deleted
    assert notes(store, HP) == {5: evil}
    assert (Path(store.location) / "analysis" / "notes" / HP / "zarr.json").exists()
    with pytest.raises(InputError, match="20,000"):
        set_note(store, HP, 5, "x" * 20_001)
    with pytest.raises(InputError, match="not in extraction"):
        set_note(store, "layers.9.mlp", 5, "x")
    with pytest.raises(InputError, match="not text"):
        set_note(store, HP, 5, 3)
    set_note(store, HP, 5, "")
    assert notes(store, HP) == {}


def test_feature_table_sorts_filters_and_pages(store, dense):
    values, ids = dense
    table = FeatureTable(store, "layers.1.mlp")
    mlp = np.asarray(store.activations("layers.1.mlp")[:], np.float64)
    density = (mlp > 0).mean(0)
    for sort, column in (("density", density), ("max", mlp.max(0)), ("mean", mlp.mean(0))):
        assert table.arrange(sort, descending=True) == 32
        expected = np.lexsort((np.arange(32), -column))
        listed = [r["feature"] for i in range(table.n_pages(10)) for r in table.page(i, 10)]
        assert listed == expected.tolist(), sort  # every feature once, in order, over the pages
    table.arrange("feature", descending=False)
    assert [r["feature"] for r in table.page(1, 5)] == [5, 6, 7, 8, 9]
    lo, hi = np.sort(density)[8], np.sort(density)[20]
    n = table.arrange("density", descending=False, density_range=(lo, hi))
    kept = [r["feature"] for r in table.page(0, 100)]
    assert n == len(kept) == int(((density >= lo) & (density <= hi)).sum())
    assert all(lo <= density[f] <= hi for f in kept) and [density[f] for f in kept] == sorted(density[f] for f in kept)
    row = table.page(0, 1)[0]
    f = row["feature"]
    assert row["density"] == pytest.approx(density[f]) and row["max"] == pytest.approx(mlp[:, f].max())
    top_ids = ids[np.lexsort((np.arange(len(mlp)), -mlp[:, f]))[:8]]
    texts = features.token_texts(store)
    expected_tokens = list(dict.fromkeys(texts[i] for i in top_ids))[:3]
    assert row["top_tokens"] == expected_tokens
    set_note(store, "layers.1.mlp", kept[0], "noted")
    assert table.arrange("feature", False, noted_only=True) == 1 and table.page(0, 5)[0]["note"]
    set_note(store, "layers.1.mlp", kept[0], "")
    with pytest.raises(InputError, match="sort='size'"):
        table.arrange("size")
    with pytest.raises(InputError, match="density_range"):
        table.arrange("density", density_range=(0.5, 0.2))


def test_features_for_a_token_equal_numpy(store, dense):
    values, ids = dense
    texts = features.token_texts(store)
    common = int(np.bincount(ids).argmax())
    word = texts[common]
    exact = [i for i, t in enumerate(texts) if t == word] if word[:1].isspace() else \
        [i for i, t in enumerate(texts) if t.strip() == word.strip()]
    assert common in exact
    result = features_for_token(store, HP, word, n=5)
    assert result["token_ids"] == exact == match_tokens(store, word)
    rows = np.flatnonzero(np.isin(ids, exact))
    means = values[rows].mean(0)
    assert result["n_rows"] == result["n_read"] == len(rows)
    assert [r["feature"] for r in result["features"]] == np.lexsort((np.arange(32), -means))[:5].tolist()
    assert [r["mean"] for r in result["features"]] == pytest.approx(np.sort(means)[::-1][:5].tolist())
    capped = features_for_token(store, HP, word, n=5, max_rows=4)
    assert capped["n_read"] == 4 and capped["n_rows"] == len(rows)
    assert result["pieces"] == [] and capped["pieces"] == []
    missing = features_for_token(store, HP, "zzqqxx-not-a-token")
    assert missing["features"] == [] and missing["token_ids"] == []  # no token reads it; the pieces it reads as:
    assert missing["pieces"] == store.tokenizer("zzqqxx-not-a-token", add_special_tokens=False)["input_ids"]
    assert len(missing["pieces"]) > 1
    with pytest.raises(InputError, match="names no token"):
        features_for_token(store, HP, "   ")


def test_typed_tokens_match_with_or_without_their_space(store):
    texts = features.token_texts(store)
    spaced = next(i for i, t in enumerate(texts) if t.startswith(" ") and t.strip().isalpha() and len(t) > 3
                  and t.strip() in texts)
    bare = texts.index(texts[spaced].strip())
    assert match_tokens(store, texts[spaced]) == [spaced]  # a leading space: that token only
    assert set(match_tokens(store, texts[spaced].strip())) >= {spaced, bare}
    assert spaced in match_tokens(store, texts[spaced].strip().upper())  # no exact match: case ignored


def test_parse_features():
    assert parse_features("3, 17, 40-42, 17", 100) == [3, 17, 40, 41, 42]
    for bad, why in (("3,x", "not a feature number"), ("5-2", "backwards"), ("100", "outside 0..99"), ("", "no feat")):
        with pytest.raises(InputError, match=why):
            parse_features(bad, 100)


def test_prompt_features_equal_the_stored_activations(store):
    row = int(store.rows()[0])
    text = ms.sample_texts()[:60][row]
    result = prompt_features(store, HP, text, k=4)
    stored = store.sample(row, [HP])
    assert result["token_ids"] == stored["input_ids"].tolist() and result["n_cut"] == 0
    np.testing.assert_allclose(result["values"], stored["activations"][HP], rtol=1e-5, atol=1e-5)
    for values, top in zip(result["values"], result["top"]):
        assert [t["feature"] for t in top] == np.lexsort((np.arange(32), -values))[:4].tolist()
    long = prompt_features(store, HP, " ".join([text] * 20), k=2)
    assert len(long["token_ids"]) == 48 and long["n_cut"] > 0  # cut at the extraction's max_length
    with pytest.raises(InputError, match="prompt=''"):
        prompt_features(store, HP, "  ")
    with pytest.raises(InputError, match="k=0"):
        prompt_features(store, HP, "hello", k=0)


def random_sae(d_in: int, d_sae: int) -> SAE:
    sae = SAE("topk", d_in, d_sae, k=6, hook_point=HP)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return sae


def test_prompt_latents_run_the_recorded_sae(causal_gpt2, tmp_path):
    sae = random_sae(32, 48)
    sae.save(tmp_path / "sae")
    ext = ms.extract(model=causal_gpt2, dataset=ms.sample_texts()[:8], layers=[1], max_length=32,
                     saes={HP: str(tmp_path / "sae")}, workspace=str(tmp_path / "ws"))
    assert features.feature_hook_points(ext) == [HP, f"{HP}.latents"]
    raw = prompt_features(ext, HP, "The quick brown fox", k=3)
    latent = prompt_features(ext, f"{HP}.latents", "The quick brown fox", k=3)
    expected = sae.encode(torch.from_numpy(raw["values"])).numpy()
    assert latent["values"].shape == (len(raw["token_ids"]), 48)
    np.testing.assert_allclose(latent["values"], expected, rtol=1e-5, atol=1e-6)
    assert (latent["values"] > 0).sum(1).max() <= 6  # top-k SAE
    assert latent["top"] == top_features(expected, 3)


@pytest.mark.slow
def test_benchmark_runs_quick(tmp_path):
    """benchmarks/bench_features.py end to end on a small store (a smoke run: no timing is asserted)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "features.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_features.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tokens"] == 16384 and results["features"] == 1024
    assert all(e["examples"] > 0 and e["page_s"] > 0 for e in results["pages"])
    assert results["table_first_rows"] and "table first paint" in proc.stdout


# -- an encoder's dense neurons (MiniLM): co-firing, quantile bands, WordPiece spellings -----------------------
MINI_HP = "layers.1.residual"


@pytest.fixture(scope="module")
def mini(minilm_dir, tmp_path_factory):
    """A MiniLM store (384 dense neurons, about half of them > 0 on any token) and its activations, read whole."""
    ext = ms.extract(model=minilm_dir, dataset=ms.sample_texts()[:40], layers=[1], max_length=32, dtype="float32",
                     workspace=str(tmp_path_factory.mktemp("mini")))
    return ext, np.asarray(ext.activations(MINI_HP)[:], np.float64)


def test_cofiring_of_dense_neurons_is_the_true_share(mini):
    ext, x = mini
    f = 0
    fires = x[:, f] > 0
    truth = (x[fires] > 0).mean(axis=0)
    truth[f] = -1
    page = feature_page(ext, MINI_HP, f, n_token_means=0, logits=False)
    basis = page["correlated_basis"]
    assert basis == {"kind": "sample", "tokens": int(fires.sum()), "rows": len(x), "per_token": 16}
    assert [c["feature"] for c in page["correlated"]] == np.lexsort((np.arange(384), -truth))[:10].tolist()
    for c in page["correlated"]:  # the real share (the top-16 counts gave well under 5% here)
        assert c["fraction"] == pytest.approx(truth[c["feature"]]) and c["fraction"] > 0.3
        assert c["density"] == pytest.approx((x[:, c["feature"]] > 0).mean())
    html = unescape(feature_page_html(page))
    assert f"share of this feature's {int(fires.sum()):,} firing tokens in all {len(x):,} tokens where the other " \
           "fires too" in html and "overall" in html
    assert "1 in" not in re.search(r'<div class="msfp-stats">(.*?)</div>', html).group(1)  # density ~50%


def test_cofiring_from_a_sample_of_a_larger_store(mini, monkeypatch):
    ext, x = mini
    monkeypatch.setattr(features, "COFIRING_ROWS", 400)
    features.drop_cached()
    try:
        sample = features.cofiring_sample(ext, MINI_HP)
        assert sample.shape == (400, 384)
        page = feature_page(ext, MINI_HP, 0, n_token_means=0, logits=False)
        basis = page["correlated_basis"]
        assert basis["kind"] == "sample" and basis["rows"] == 400 and basis["tokens"] == int(sample[:, 0].sum())
        fires = x[:, 0] > 0
        for c in page["correlated"]:  # an estimate from ~200 firing tokens: close to the share over the store
            assert abs(c["fraction"] - (x[fires, c["feature"]] > 0).mean()) < 0.15
        assert "in a sample of 400 tokens" in feature_page_html(page)
    finally:
        features.drop_cached()


def test_cofiring_without_enough_sampled_tokens_says_it_counts_each_tokens_top_features(mini, monkeypatch):
    ext, x = mini
    monkeypatch.setattr(features, "COFIRING_MIN", len(x) + 1)  # as for a feature too rare for the sample
    page = feature_page(ext, MINI_HP, 0, n_token_means=0, logits=False)
    stats = features.load_statistics(ext, MINI_HP)
    error = int(stats.co_error[0])  # the dense neuron fires with more others than the statistics' counters
    assert page["correlated_basis"] == {"kind": "top", "tokens": page["fire_count"], "rows": len(x), "per_token": 16,
                                        "error": error} and error > 0
    assert [(c["feature"], c["count"]) for c in page["correlated"]] == stats.cooccurring(0, 10)
    assert "where both are among the token's top-16 firing features" in unescape(feature_page_html(page))


def test_band_examples_lie_in_their_stated_range_brute_force(mini):
    ext, x = mini
    outside, checked = [], 0
    for f in range(60):
        col = x[:, f]
        firing = np.sort(col[col > 0])
        page = feature_page(ext, MINI_HP, f, n_token_means=0, logits=False, n_correlated=0)
        for band in page["bands"]:
            (q0, q1), (v0, v1) = band["quantiles"], band["values"]
            # the stated range is the histogram's estimate of the quantiles: within a quarter octave of numpy's
            for q, v in ((q0, v0), (q1, v1)):
                if 0 < q < 1:
                    assert np.quantile(firing, q) / 2 ** 0.25 <= v <= np.quantile(firing, q) * 2 ** 0.25
            for e in band["examples"]:
                checked += 1
                assert e["value"] == pytest.approx(col[e["row"]])
                if not v0 <= col[e["row"]] <= v1:
                    outside.append((f, band["quantiles"], v0, v1, col[e["row"]]))
    assert checked > 500 and outside == []


def test_wordpiece_continuations_are_found_as_the_tokenizer_spells_them(mini):
    ext, _ = mini
    tok = ext.tokenizer
    ids = np.unique(features.row_token_ids(ext))
    piece = next(int(i) for i in ids if tok.convert_ids_to_tokens(int(i)).startswith("##")
                 and " " + tok.convert_ids_to_tokens(int(i))[2:] in features.token_texts(ext))
    spelled = tok.convert_ids_to_tokens(piece)  # '##ing': what Browse and ext.sample() show
    assert match_tokens(ext, spelled) == [piece]  # the continuation piece alone, not the word
    assert piece in match_tokens(ext, spelled[2:]) and len(match_tokens(ext, spelled[2:])) >= 2
    assert match_tokens(ext, spelled.upper()) == [piece]  # case ignored when nothing matches
    result = features_for_token(ext, MINI_HP, spelled)
    assert result["token_ids"] == [piece] and result["n_rows"] == int((features.row_token_ids(ext) == piece).sum())


def random_top_k_store(model: str, tmp_path, k: int, seed: int, n_texts: int):
    """An extraction of ``n_texts`` sample texts with a random top-k SAE (d_sae 96) at HP whose every top-k
    latent fires (positive encoder biases)."""
    sae = SAE("topk", 32, 96, k=k, hook_point=HP)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=generator))
        sae.b_enc.copy_(torch.rand(sae.b_enc.shape, generator=generator) + 1)
    sae.save(tmp_path / "sae")
    return ms.extract(model=model, dataset=ms.sample_texts()[:n_texts], layers=[1], max_length=32,
                      saes={HP: str(tmp_path / "sae")}, workspace=str(tmp_path / "ws"))


def test_cofiring_of_a_narrow_top_k_sae_whose_counts_the_statistics_cut_is_the_true_share(causal_gpt2, tmp_path,
                                                                                         monkeypatch):
    """A top-k SAE with k = 6 pairs every firing latent in the statistics, but a latent firing with more others
    than the statistics keep counters for gets counts cut short (``co_error``): its shares are counted exactly on
    the stored latents instead; where too rare for that, the page says how low a count may read."""
    ext = random_top_k_store(causal_gpt2, tmp_path, k=6, seed=5, n_texts=60)
    point = f"{HP}.latents"
    dense = ext.latents(point).toarray() > 0
    stats = features.load_statistics(ext, point)
    f = int(np.argmax(dense.sum(axis=0)))
    assert stats.co_error[f] > 0 and float(stats.density.sum()) <= 16  # the case: all paired, counts cut
    truth = dense[dense[:, f]].mean(axis=0)
    truth[f] = -1
    features.drop_cached()
    page = feature_page(ext, point, f, n_token_means=0, logits=False)
    assert page["correlated_basis"]["kind"] == "sample" and page["correlated_basis"]["tokens"] == dense[:, f].sum()
    assert [c["feature"] for c in page["correlated"]] == np.lexsort((np.arange(96), -truth))[:10].tolist()
    for c in page["correlated"]:
        assert c["fraction"] == pytest.approx(truth[c["feature"]])
    monkeypatch.setattr(features, "COFIRING_MIN", len(dense) + 1)  # as for a feature too rare for the sample
    page = feature_page(ext, point, f, n_token_means=0, logits=False)
    error = int(stats.co_error[f])
    assert page["correlated_basis"] == {"kind": "top", "tokens": int(dense[:, f].sum()), "rows": len(dense),
                                        "per_token": 16, "error": error}
    for c in page["correlated"]:  # a lower bound, low by at most the error
        together = int((dense[:, f] & dense[:, c["feature"]]).sum())
        assert together - error <= c["count"] <= together
    assert f"each count may read low by up to {error}" in unescape(feature_page_html(page))


def test_cofiring_of_a_wide_top_k_sae_is_the_true_share(causal_gpt2, tmp_path, monkeypatch):
    """A top-k SAE with k = 32 fires more latents a token than the statistics pair up (16): its co-firing shares are
    counted on a sample of the stored latents, exactly, as a raw hook point's dense neurons are."""
    ext = random_top_k_store(causal_gpt2, tmp_path, k=32, seed=11, n_texts=30)
    point = f"{HP}.latents"
    dense = ext.latents(point).toarray() > 0
    assert (dense.sum(axis=1) == 32).all()
    f = int(np.argmax(dense.sum(axis=0)))
    truth = dense[dense[:, f]].mean(axis=0)
    truth[f] = -1
    features.drop_cached()
    page = feature_page(ext, point, f, n_token_means=0, logits=False)
    assert page["correlated_basis"] == {"kind": "sample", "tokens": int(dense[:, f].sum()), "rows": len(dense),
                                        "per_token": 16}
    assert [c["feature"] for c in page["correlated"]] == np.lexsort((np.arange(96), -truth))[:10].tolist()
    for c in page["correlated"]:
        assert c["fraction"] == pytest.approx(truth[c["feature"]])
    monkeypatch.setattr(features, "COFIRING_LATENT_ROWS", 64)  # a larger store: whole chunks, spread over it
    features.drop_cached()
    sample = features.cofiring_sample(ext, point)
    assert sample.shape == (64, 96) and (np.asarray(sample.sum(axis=1)).ravel() == 32).all()
    features.drop_cached()
