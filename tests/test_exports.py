"""Exports: an HTML file that makes no request in a real browser, Neuronpedia's bulk-import records, a store as a
Hugging Face dataset (raw hook points and SAE latents), and SAELens's cached-activations layout read back by SAELens
itself."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import mistudio as ms
from mistudio.analysis.stats import describe_examples
from mistudio.errors import InputError, StoreCorrupted
from mistudio.analysis.exports import (NEURONPEDIA_OPTIONAL, NEURONPEDIA_REQUIRED, _freq_hist, count_latents,
                                       export_html, export_neuronpedia, to_hf_dataset, to_saelens_cache,
                                       transformer_lens_name)
from mistudio.analysis.feature_view import display_pieces
from mistudio.analysis.logit_effects import Unembedding, neuron_logit_effects

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
EOT = "<|endoftext|>"


def texts() -> list[str]:
    return ms.sample_texts()[:24] + [f"First part.{EOT}Second part, after the end of text.",
                                     f"{EOT}Starts with a special token and ends with one{EOT}"]


@pytest.fixture(scope="module")
def store(gpt2_dir, tmp_path_factory):
    return ms.extract(gpt2_dir, texts(), layers=[1], hooks=["residual", "mlp"], max_length=48,
                      workspace=str(tmp_path_factory.mktemp("ws")), progress=False)


@pytest.fixture(scope="module")
def special_store(gpt2_dir, tmp_path_factory):
    """exclude_special: the special tokens have no activation rows."""
    return ms.extract(gpt2_dir, texts(), layers=[0], hooks=["residual"], max_length=48, exclude_special=True,
                      workspace=str(tmp_path_factory.mktemp("ws_special")), progress=False)


# -- a real feature page, assembled here from a store the simple way (the tiny store fits in memory) ------------
def page_example(ext, hook_point: str, e: dict) -> dict:
    peak = int(e["position"]) - int(e["context_start"])
    start = int(e["input_index"]) - peak
    special = ext.store.tokens("special")[start:start + len(e["context_tokens"])].astype(bool).tolist()
    return {"value": e["value"], "row": e["activation_row"], "sample": e["sample_position"], "dataset_row": e["row"],
            "position": e["position"], "context_start": e["context_start"], "tokens": e["context_tokens"],
            "values": e["context_values"], "special": special, "peak": peak}


def signed_log_histogram(col: np.ndarray) -> dict:
    pos = np.array([0.001, 0.01, 0.1, 1.0, 10.0, np.inf])
    edges = np.concatenate([-pos[::-1], [0.0], [0.0], pos])
    counts = [int(((col >= a) & (col < b)).sum()) for a, b in zip(edges[:-1], edges[1:]) if a != 0 or b != 0]
    counts.insert(len(pos), int((col == 0).sum()))  # the [0, 0] bin: exact zeros
    return {"edges": edges.tolist(), "counts": counts}


def make_page(ext, hook_point: str, feature: int, unembedding=None, note: str = "") -> dict:
    acts = ext.activations(hook_point)[:].astype(np.float64)
    col = acts[:, feature]
    fired = col > 0
    top = [page_example(ext, hook_point, e) for e in ext.top_examples(hook_point, feature, k=4, context=5)]
    bands = []
    for lo, hi in ((0.5, 0.9), (0.9, 1.0)):
        v0, v1 = np.quantile(col, [lo, hi])
        rows = np.flatnonzero((col >= v0) & (col <= v1))[:2]
        best = np.stack([col[rows], rows], axis=1)
        bands.append({"quantiles": [lo, hi], "values": [float(v0), float(v1)],
                      "examples": [page_example(ext, hook_point, e)
                                   for e in describe_examples(ext, hook_point, feature, best, 5)]})
    ids = np.asarray(ext.store.tokens("input_ids")[:])[np.asarray(ext.token_index(np.arange(len(col))))]
    sums, counts = np.bincount(ids, weights=col), np.bincount(ids)
    seen = np.flatnonzero(counts >= 2)
    order = seen[np.argsort(-(sums[seen] / counts[seen]))][:6]
    names = ext.tokenizer.convert_ids_to_tokens([int(i) for i in order])
    token_means = [{"token_id": int(i), "token": n, "mean": float(sums[i] / counts[i]), "count": int(counts[i])}
                   for i, n in zip(order, names)]
    co = ((acts > 0) & fired[:, None]).sum(0)
    co[feature] = 0
    partners = np.argsort(-co)[:3]
    return {"extraction": ext.id, "hook_point": hook_point, "feature": feature, "kind": "neuron", "d": acts.shape[1],
            "n_tokens": len(col), "fire_count": int(fired.sum()), "density": float(fired.mean()),
            "mean": float(col.mean()), "mean_active": float(col[fired].mean()) if fired.any() else 0.0,
            "max": float(col.max()), "histogram": signed_log_histogram(col), "top": top, "bands": bands,
            "token_means": token_means, "min_count": 2,
            "logits": neuron_logit_effects([feature], unembedding, k=5)[0] if unembedding else None,
            "correlated": [{"feature": int(p), "count": int(co[p]), "fraction": float(co[p] / max(fired.sum(), 1))}
                           for p in partners],
            "note": note, "prev": feature - 1 if feature else None, "next": feature + 1}


@pytest.fixture(scope="module")
def pages(store, gpt2_dir):
    unembedding = Unembedding.from_model(gpt2_dir)
    return [make_page(store, "layers.1.residual", f, unembedding, note="fires on punctuation" if f == 3 else "")
            for f in (2, 3, 5)]


# -- HTML ----------------------------------------------------------------------------------------------------
def browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None if os.path.exists(CHROMIUM) else "Debian's chromium is not installed (apt-get install -y chromium)"


@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_export_html_renders_in_chromium_without_a_request(pages, tmp_path):
    from playwright.sync_api import sync_playwright

    path = export_html(pages, tmp_path / "pages.html", title="tiny gpt2 <features>")
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and not re.search(r"\bsrc\s*=|href\s*=\s*[\"']?(https?:)?//", text, re.I)
    assert "tiny gpt2 &lt;features&gt;" in text and text.count('<a href="#p') == 3
    bare = tmp_path / "no-csp.html"  # the same file without its Content-Security-Policy: the markup alone asks nothing
    bare.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text), encoding="utf-8")
    assert "Content-Security-Policy" not in bare.read_text(encoding="utf-8")
    top = pages[0]["top"][0]
    peak_text = display_pieces(top["tokens"])[top["peak"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            for target in (path, bare):
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                requests, routed = [], []
                page.on("request", lambda r: requests.append(r.url))
                page.route("**/*", lambda route: (routed.append(route.request.url), route.continue_()))
                page.goto(target.as_uri())
                page.wait_for_load_state("load")
                assert requests == [target.as_uri()], requests  # the document itself, nothing else
                assert all(u == target.as_uri() for u in routed), routed
                peak = page.locator("#p0 .msfp-top summary .msfp-peak").first
                assert peak.is_visible() and peak.inner_text() == peak_text
                full = page.locator("#p0 .msfp-top .msfp-full").first
                assert not full.is_visible()
                page.locator("#p0 .msfp-top summary").first.click()  # <details> opens the whole context
                assert full.is_visible()
                page.locator('a[href="#p2"]').click()
                assert page.evaluate("location.hash") == "#p2"
                assert "fires on punctuation" in page.inner_text("#p1")
                page.close()
        finally:
            browser.close()


def test_export_html_refuses_nothing_and_bad_pages(pages, tmp_path):
    with pytest.raises(InputError, match="no pages"):
        export_html([], tmp_path / "x.html")
    broken = dict(pages[0])
    del broken["top"]
    with pytest.raises(InputError, match="lacks \\['top'\\]"):
        export_html([broken], tmp_path / "x.html")


def test_export_html_of_a_page_with_no_values_yet(pages, tmp_path):
    """A store stopped before its first commit gives a page with no max: the index shows a dash, not a raw
    TypeError."""
    empty = dict(pages[0], max=None)
    text = export_html([empty], tmp_path / "empty.html").read_text()
    assert '<td class="num">–</td>' in text


# -- Neuronpedia -------------------------------------------------------------------------------------------------
PY_TYPES = {"String": str, "Int": int, "Float": float, "Boolean": bool, "Visibility": str}


def check_type(table: str, name: str, prisma: str, value) -> None:
    nullable, is_list = prisma.endswith("?"), prisma.rstrip("?").endswith("[]")
    base = PY_TYPES[prisma.rstrip("?").removesuffix("[]")]
    if value is None:
        assert nullable, f"{table}.{name} is null but {prisma} is required"
        return
    items = value if is_list else [value]
    if is_list:
        assert isinstance(value, list), f"{table}.{name} should be a list ({prisma})"
    for item in items:
        ok = isinstance(item, base) and not (base is int and isinstance(item, bool)) or \
            (base is float and isinstance(item, int) and not isinstance(item, bool))
        assert ok, f"{table}.{name}={item!r} is not {prisma}"
    if prisma.startswith("Visibility"):
        assert value in ("PUBLIC", "PRIVATE", "UNLISTED")


def read_jsonl(path: Path) -> list[dict]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    def no_nan(x):
        raise AssertionError(f"{path} holds {x}, not valid JSON for Postgres")
    return [json.loads(line, parse_constant=no_nan) for line in raw.decode("utf-8").splitlines()]


def test_neuronpedia_layout_and_records_follow_the_schema(pages, store, tmp_path):
    root = export_neuronpedia(pages, tmp_path / "exports", model_id="tiny-gpt2", source_set="res-mistudio",
                              tokenizer=store.tokenizer, dataset="mistudio/sample", n_layers=3, release="mistudio-test",
                              batch_size=2)
    assert root == tmp_path / "exports" / "tiny-gpt2" / "1-res-mistudio"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["activations/batch-0.jsonl.gz", "activations/batch-1.jsonl.gz", "explanations/batch-0.jsonl.gz",
                     "features/batch-0.jsonl.gz", "features/batch-1.jsonl.gz", "model.jsonl", "release.jsonl",
                     "source.jsonl", "sourceset.jsonl"]
    tables = {"features": "Neuron", "activations": "Activation", "explanations": "Explanation", "model.jsonl": "Model",
              "sourceset.jsonl": "SourceSet", "source.jsonl": "Source", "release.jsonl": "SourceRelease"}
    records: dict[str, list[dict]] = {t: [] for t in tables.values()}
    for name in files:
        table = tables[name.split("/")[0]]
        lines = read_jsonl(root / name)
        assert len({tuple(sorted(r)) for r in lines}) == 1, f"{name}: every line needs the first line's columns"
        required, optional = NEURONPEDIA_REQUIRED[table], NEURONPEDIA_OPTIONAL[table]
        for record in lines:
            assert set(required) <= set(record) <= set(required) | set(optional), (name, set(record) ^ set(required))
            for key, value in record.items():
                check_type(table, key, {**required, **optional}[key], value)
        records[table] += lines
    neurons, acts = records["Neuron"], records["Activation"]
    assert [n["index"] for n in neurons] == ["2", "3", "5"] and {n["layer"] for n in neurons} == {"1-res-mistudio"}
    assert {n["sourceSetName"] for n in neurons} == {"res-mistudio"}
    n_examples = sum(len(p["top"]) + sum(len(b["examples"]) for b in p["bands"]) for p in pages)
    assert len(acts) == n_examples and len({a["id"] for a in acts}) == n_examples
    assert [e["description"] for e in records["Explanation"]] == ["fires on punctuation"]
    assert records["Explanation"][0]["index"] == "3"
    # one top activation, checked field by field against its page example
    page, example, record = pages[0], pages[0]["top"][0], acts[0]
    assert record["tokens"] == [store.tokenizer.convert_tokens_to_string([t]) for t in example["tokens"]]
    assert record["values"] == [0.0 if v is None else v for v in example["values"]]
    assert record["qualifyingTokenIndex"] == example["peak"] and record["values"][example["peak"]] == example["value"]
    assert record["maxValue"] == max(record["values"]) == record["values"][record["maxValueTokenIndex"]]
    assert (record["binMin"], record["binMax"], record["binContains"]) == (-1.0, page["max"], -1.0)
    assert record["dataIndex"] == str(example["dataset_row"]) and record["dataSource"] == "mistudio/sample"
    band = [a for a in acts if a["binContains"] != -1.0 and a["index"] == "2"]
    # SAEDashboard's CONTAINS: the band's share of all tokens (40% of the firing ones), not of the firing ones
    assert band[0]["binMin"] == page["bands"][0]["values"][0]
    values = store.activations(page["hook_point"])[:, page["feature"]]
    truth = float(((values >= band[0]["binMin"]) & (values <= band[0]["binMax"])).mean())
    # SAEDashboard's CONTAINS: the share of all tokens inside [binMin, binMax] (this page's bins are decades: read
    # from them it is 0.33 for a true 0.40; a band's width times the density read 0.21)
    assert abs(band[0]["binContains"] - truth) <= 0.1, (band[0]["binContains"], truth)
    first = neurons[0]
    assert first["pos_values"] == [e["value"] for e in page["logits"]["promoted"]]
    assert first["neg_str"] == [store.tokenizer.convert_tokens_to_string([e["token"]])
                                for e in page["logits"]["suppressed"]]
    assert first["frac_nonzero"] == page["density"] and first["maxActApprox"] == page["max"]
    positive = [c for a, b, c in zip(page["histogram"]["edges"], page["histogram"]["edges"][1:],
                                     page["histogram"]["counts"]) if a >= 0 and b > 0]
    assert sum(first["freq_hist_data_bar_heights"]) == pytest.approx(sum(positive), abs=0.01) and \
        sum(positive) == page["fire_count"]
    centres = first["freq_hist_data_bar_values"]
    assert len(centres) == 40 and np.allclose(np.diff(centres), centres[1] - centres[0])  # equal widths
    assert records["Model"][0]["neuronsPerLayer"] == 32 and records["Source"][0]["id"] == "1-res-mistudio"
    assert records["SourceSet"][0]["releaseName"] == records["SourceRelease"][0]["name"] == "mistudio-test"


def test_neuronpedia_refusals_and_overwrite(pages, store, tmp_path):
    with pytest.raises(InputError, match="model_id='gpt2 small' is not a Neuronpedia name"):
        export_neuronpedia(pages, tmp_path, model_id="gpt2 small", source_set="res")
    mixed = pages[:1] + [make_page(store, "layers.1.mlp", 0)]
    with pytest.raises(InputError, match="several hook points"):
        export_neuronpedia(mixed, tmp_path / "mixed", model_id="m", source_set="res")
    with pytest.raises(InputError, match="no pages"):
        export_neuronpedia([], tmp_path, model_id="m", source_set="res")
    root = export_neuronpedia(pages[:1], tmp_path / "out", model_id="m", source_set="res")
    with pytest.raises(InputError, match="already holds an export"):
        export_neuronpedia(pages[:1], tmp_path / "out", model_id="m", source_set="res")
    again = export_neuronpedia(pages[1:], tmp_path / "out", model_id="m", source_set="res", overwrite=True)
    assert again == root and [r["index"] for r in read_jsonl(root / "features" / "batch-0.jsonl.gz")] == ["3", "5"]
    assert not (root / "release.jsonl").exists()  # no release asked: none written, and no releaseName pointing at one
    assert read_jsonl(root / "sourceset.jsonl")[0]["releaseName"] is None


def test_neuronpedia_histogram_spreads_log_bins_over_equal_widths():
    """Neuronpedia draws (values, heights) as bars on a linear axis: a log bin's count goes to the equal-width bins
    it overlaps, in proportion, so a bin twice as wide does not read twice as tall."""
    page = {"histogram": {"edges": [-1.0, 0.0, 1.0, 2.0, 4.0, 8.0], "counts": [5, 0, 10, 10, 0]}, "max": 4.0}
    heights, values = _freq_hist(page, n_bins=4)
    assert values == pytest.approx([1.375, 2.125, 2.875, 3.625])  # [1, 4] in four bins of 0.75
    assert heights == pytest.approx([7.5, 5.0, 3.75, 3.75])  # [1,2): 10 over 1 wide; [2,4): 10 over 2 wide
    assert _freq_hist({"histogram": {"edges": [0.0, 1.0], "counts": [0]}, "max": None}) == ([], [])
    spike = {"histogram": {"edges": [2.0, 2.5], "counts": [7]}, "max": 2.0}  # every firing value is 2.0
    assert _freq_hist(spike) == ([7.0], [2.0])


def test_neuronpedia_batches_of_one_and_ids_per_extraction(pages, tmp_path):
    root = export_neuronpedia(pages, tmp_path / "one", model_id="m", source_set="res", batch_size=1)
    files = sorted(p.name for p in (root / "features").iterdir())
    assert files == ["batch-0.jsonl.gz", "batch-1.jsonl.gz", "batch-2.jsonl.gz"]
    assert [len(read_jsonl(root / "features" / f)) for f in files] == [1, 1, 1]
    ids = {a["id"] for f in (root / "activations").iterdir() for a in read_jsonl(f)}
    again = export_neuronpedia(pages, tmp_path / "again", model_id="m", source_set="res")
    assert {a["id"] for a in read_jsonl(again / "activations" / "batch-0.jsonl.gz")} == ids  # the same store: same
    other = [{**p, "extraction": "ext_20260101_000000_000000"} for p in pages]  # another store's pages
    moved = export_neuronpedia(other, tmp_path / "other", model_id="m", source_set="res")
    assert not ids & {a["id"] for a in read_jsonl(moved / "activations" / "batch-0.jsonl.gz")}


# -- Hugging Face datasets -------------------------------------------------------------------------------------
def assert_same_as_sample(ext, dataset, hook_points) -> None:
    assert len(dataset) == len(ext.sample_index)
    assert sorted(dataset["dataset_row"]) == sorted(int(r) for r in ext.sample_index)
    for row in dataset:
        sample = ext.sample(row["dataset_row"])
        np.testing.assert_array_equal(row["input_ids"], sample["input_ids"])
        np.testing.assert_array_equal(row["special"], sample["special"])
        np.testing.assert_array_equal(row["kept"], sample["kept"])
        if "tokens" in row:
            assert row["tokens"] == sample["tokens"]
        for hp in hook_points:
            got = np.asarray(row[hp], dtype=sample["activations"][hp].dtype)
            np.testing.assert_array_equal(got, sample["activations"][hp])  # NaN rows where no activation


def test_hf_dataset_round_trip(store, tmp_path):
    import datasets

    saved = to_hf_dataset(store, path=tmp_path / "hf", tokens=True, block_rows=50)  # blocks of a few samples
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert loaded.features["layers.1.mlp"] == datasets.Array2D(shape=(None, 32), dtype="float16")
    assert saved["dataset_row"] == loaded["dataset_row"] == [int(r) for r in store.sample_index]  # stored order
    assert_same_as_sample(store, loaded, store.hook_points)
    only = to_hf_dataset(store, hook_points="layers.1.mlp", cache_dir=tmp_path / "cache")  # no path: a cache
    again = to_hf_dataset(store, hook_points="layers.1.mlp", cache_dir=tmp_path / "cache")
    assert again.cache_files == only.cache_files  # keyed by the store, its commit mark and the options: reused
    assert "layers.1.residual" not in only.column_names and "tokens" not in only.column_names
    assert_same_as_sample(store, only, ["layers.1.mlp"])
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        to_hf_dataset(store, path=tmp_path / "hf")
    with pytest.raises(InputError, match=r"hook points \['layers.9.mlp'\] are not in extraction"):
        to_hf_dataset(store, hook_points=["layers.9.mlp"])


def test_hf_dataset_of_an_exclude_special_store(special_store, tmp_path):
    import datasets

    to_hf_dataset(special_store, path=tmp_path / "hf", block_rows=1)
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert not all(all(k) for k in loaded["kept"])  # some tokens have no activation row
    assert_same_as_sample(special_store, loaded, ["layers.0.residual"])


# -- SAE latents as a Hugging Face dataset ---------------------------------------------------------------------
LATENT_HP = "layers.1.residual"
D_SAE = 64


def make_sae(folder, architecture: str = "standard") -> None:
    """A SAELens SAE on layers.1.residual of the tiny GPT-2, random weights, saved to ``folder``."""
    pytest.importorskip("sae_lens")
    from test_latents import make_sae as make_latents_sae

    make_latents_sae(folder, architecture, seed=1, layer=1, d_sae=D_SAE, **({"k": 6} if architecture == "topk" else {}))


@pytest.fixture(scope="module")
def latent_store(gpt2_dir, tmp_path_factory):
    """A store with an SAE's latents beside the raw hook points, exclude_special (some tokens have no row), and a
    width that leaves empty slots (a ReLU SAE: the width is probed on the first batch)."""
    sae = tmp_path_factory.mktemp("sae")
    make_sae(sae)
    return ms.extract(gpt2_dir, texts(), layers=[1], hooks=["residual", "mlp"], max_length=48, exclude_special=True,
                      saes={LATENT_HP: str(sae)}, batch_size=8, workspace=str(tmp_path_factory.mktemp("ws_lat")),
                      progress=False)


def rebuilt_csr(dataset, hook_point: str, d_sae: int):
    """The latents of a dataset export back as one CSR matrix: the kept tokens' lists, rows in dataset order."""
    from scipy import sparse

    indices, values, counts = [], [], []
    for kept, idx, val in zip(dataset["kept"], dataset[f"{hook_point}.indices"], dataset[f"{hook_point}.values"]):
        assert len(idx) == len(val) == len(kept)
        for k, i, v in zip(kept, idx, val):
            assert k or not i, "a token without an activation row has no latents"
            if k:
                indices += i
                values += v
                counts.append(len(i))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return sparse.csr_matrix((np.asarray(values, np.float32), np.asarray(indices, np.int64), indptr),
                             shape=(len(counts), d_sae))


def test_hf_dataset_of_sae_latents_round_trips_to_the_csr(latent_store, tmp_path):
    import datasets

    ext, lat = latent_store, f"{LATENT_HP}.latents"
    info = ext.latent_info(LATENT_HP)
    slots = ext.latent_arrays(LATENT_HP)[1][:]
    assert (slots == 0).any() and slots.shape[1] == info.width  # empty slots: they must not be exported
    to_hf_dataset(ext, [lat, "layers.1.mlp"], path=tmp_path / "hf", block_rows=40)  # mixed, blocks of a few samples
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert loaded.column_names == ["dataset_row", "input_ids", "special", "kept", f"{lat}.indices", f"{lat}.values",
                                   "layers.1.mlp"]
    assert loaded.features[f"{lat}.indices"].feature.feature.dtype == "int32"
    assert loaded.features[f"{lat}.values"].feature.feature.dtype == "float32"
    assert loaded["dataset_row"] == [int(r) for r in ext.sample_index]  # stored order
    assert not all(all(k) for k in loaded["kept"])  # some tokens have no activation row
    want, got = ext.latents(lat), rebuilt_csr(loaded, lat, info.d_sae)
    assert want.nnz == int((slots != 0).sum()) == ext.record.latent_statistics[LATENT_HP].active
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)  # every value, bit for bit
    assert_same_as_sample(ext, loaded, ["layers.1.mlp"])  # the raw column beside it is the raw export's
    assert count_latents(loaded, lat) == want.nnz
    # the SAE is named where a reader of the dataset finds it
    for text in (loaded.info.description, (tmp_path / "hf" / "dataset_info.json").read_text()):
        for fact in (info.sae, info.fingerprint, "architecture standard", f"d_sae {D_SAE}"):
            assert fact in text, fact
    meta = json.loads((tmp_path / "hf" / "mistudio_export.json").read_text())
    assert meta["latents"][lat] == {"sae": info.sae, "fingerprint": info.fingerprint, "architecture": "standard",
                                    "d_sae": D_SAE, "k": None, "hook_name": "blocks.1.hook_resid_post",
                                    "width": info.width, "width_reason": info.width_reason, "non_zero": want.nnz}
    assert meta["rows"] == len(ext.sample_index) and meta["tokens"] == int(ext.sample_offsets[-1])
    assert meta["bytes"] == sum(p.stat().st_size for p in (tmp_path / "hf").glob("data-*.arrow")) > 0
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        to_hf_dataset(ext, lat, path=tmp_path / "hf")


def test_hf_dataset_default_holds_the_latents_and_the_refusals(latent_store, tmp_path):
    lat = f"{LATENT_HP}.latents"
    whole = to_hf_dataset(latent_store, cache_dir=tmp_path / "cache")  # every raw hook point and the latents
    assert {LATENT_HP, "layers.1.mlp", f"{lat}.indices", f"{lat}.values"} <= set(whole.column_names)
    assert latent_store.latent_info(LATENT_HP).sae in whole.info.description
    assert count_latents(whole, lat) == latent_store.latents(lat).nnz
    with pytest.raises(InputError, match="has no column 'layers.1.mlp.latents.indices'"):
        count_latents(whole, "layers.1.mlp.latents")
    with pytest.raises(InputError, match=r"\['layers.1.mlp.latents'\] are not in extraction .*latents"):
        to_hf_dataset(latent_store, "layers.1.mlp.latents")
    with pytest.raises(InputError, match="name one twice"):
        to_hf_dataset(latent_store, [lat, lat])
    with pytest.raises(InputError, match="holds SAE latents, and this export writes dense activations: pass "
                                         "'layers.1.residual'"):
        to_saelens_cache(latent_store, lat, tmp_path / "sl")
    assert not (tmp_path / "sl").exists()


def test_a_damaged_latent_chunk_says_so(gpt2_dir, tmp_path):
    """A latent chunk lost below the commit mark: the store's StoreCorrupted, and no export left behind."""
    make_sae(tmp_path / "sae")
    ext = ms.extract(gpt2_dir, texts(), layers=[1], max_length=48, saes={LATENT_HP: str(tmp_path / "sae")},
                     chunk_mb=0.01, shard_mb=0.01, workspace=str(tmp_path / "ws"), progress=False)
    chunks = sorted(p for p in (Path(ext.location) / "latents" / LATENT_HP / "values").rglob("*")
                    if p.is_file() and p.name != "zarr.json")
    assert len(chunks) > 2
    chunks[1].unlink()
    with pytest.raises(StoreCorrupted):
        to_hf_dataset(ext, f"{LATENT_HP}.latents", path=tmp_path / "hf", block_rows=30)
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mistudio-export-")]


def test_latent_pages_carry_what_neuronpedia_needs(latent_store, tmp_path):
    """A latent's page exports to Neuronpedia as a neuron's does: the source is the SAE's layer, the neurons per
    layer are d_sae, the top activations are the latent's own values."""
    from mistudio.analysis.features import export_pages

    lat = f"{LATENT_HP}.latents"
    rows, values = latent_store.feature(LATENT_HP, 3)
    assert len(rows), "latent 3 should fire"
    pages = list(export_pages(latent_store, lat, [3, 7], n_token_means=0))
    root = export_neuronpedia(pages, tmp_path / "np", model_id="tiny-gpt2", source_set="res-sae",
                              tokenizer=latent_store.tokenizer)
    assert root.name == "1-res-sae"
    model = read_jsonl(root / "model.jsonl")[0]
    neurons = read_jsonl(root / "features" / "batch-0.jsonl.gz")
    acts = read_jsonl(root / "activations" / "batch-0.jsonl.gz")
    assert model["neuronsPerLayer"] == D_SAE and [n["index"] for n in neurons] == ["3", "7"]
    assert neurons[0]["maxActApprox"] == pytest.approx(float(values.max()))
    assert neurons[0]["frac_nonzero"] == pytest.approx(len(rows) / latent_store.committed_tokens())
    top = [a for a in acts if a["index"] == "3" and a["binContains"] == -1.0]
    assert top[0]["values"][top[0]["qualifyingTokenIndex"]] == pytest.approx(float(values.max()))
    assert "SAE" in read_jsonl(root / "sourceset.jsonl")[0]["description"]


def test_latents_dropped_for_want_of_width_are_refused_by_neuronpedia_and_named_by_the_dataset(gpt2_dir, tmp_path):
    """A store kept too narrow for its SAE counts only each token's largest latents: Neuronpedia would show those
    densities and histograms as exact, so the export refuses them unless told (and then says so in the source's
    notes); the dataset export names the caveat and the storage dtype."""
    from mistudio.analysis.features import export_pages

    make_sae(tmp_path / "sae")
    ext = ms.extract(gpt2_dir, texts(), layers=[1], hooks=["residual"], max_length=48, saes={LATENT_HP:
                     str(tmp_path / "sae")}, latent_width=2, dtype="bfloat16", batch_size=8,
                     workspace=str(tmp_path / "ws"), progress=False)
    dropped = ext.record.latent_statistics[LATENT_HP].dropped
    assert dropped > 0, "a ReLU SAE of 64 latents should fire more than 2 a token"
    pages = list(export_pages(ext, f"{LATENT_HP}.latents", [0, 1], n_token_means=0))
    assert pages[0]["dropped_latents"] == dropped
    with pytest.raises(InputError, match=rf"left out {dropped:,} firing latents for want of width.*latent_width.*"
                                         "allow_dropped=True"):
        export_neuronpedia(pages, tmp_path / "np", model_id="m", source_set="res-sae")
    assert not (tmp_path / "np" / "m" / "1-res-sae").exists()
    root = export_neuronpedia(pages, tmp_path / "np", model_id="m", source_set="res-sae", allow_dropped=True)
    assert f"{dropped:,} firing latents left out for want of width" in read_jsonl(root / "source.jsonl")[0]["notes"]
    dataset = to_hf_dataset(ext, [f"{LATENT_HP}.latents", LATENT_HP], path=tmp_path / "hf")
    info = json.loads((tmp_path / "hf" / "mistudio_export.json").read_text())
    assert info["dtype"] == "bfloat16" and "Stored as bfloat16 (exported as float32" in dataset.info.description
    assert "dropped for want of width" in info["caveats"][f"{LATENT_HP}.latents"][0]
    assert "Caveat: layers.1.residual.latents:" in dataset.info.description


# -- SAELens -------------------------------------------------------------------------------------------------
def saelens_rows(path: Path, hook_name: str, context_size: int, d: int, n_rows: int):
    """Every row of the cache through sae_lens's own ActivationsStore, built from a training config that points at
    the folder (use_cached_activations=True), in order; and one batch of its shuffling training loader."""
    import datasets
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore

    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=d, d_sae=2 * d), model_name="tiny-gpt2", hook_name=hook_name,
        dataset_path="unused", use_cached_activations=True, cached_activations_path=str(path),
        context_size=context_size, store_batch_size_prompts=1, train_batch_size_tokens=8, n_batches_in_buffer=2,
        training_tokens=n_rows * context_size, device="cpu", act_store_device="cpu", dtype="float32",
        logger=LoggingConfig(log_to_wandb=False))
    # with cached activations the store reads no model and no text: the tokenized rows only satisfy its dataset check
    cache = datasets.load_from_disk(str(path))
    tokens = datasets.Dataset.from_dict({"input_ids": [list(map(int, r)) for r in cache["token_ids"]]})
    act_store = ActivationsStore.from_config(None, cfg, override_dataset=tokens)
    acts, ids = [], []
    while True:
        try:
            a, t = act_store.get_raw_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            break
        acts.append(a)
        ids.append(t)
    return torch.cat(acts).numpy(), torch.cat(ids).numpy(), next(act_store).numpy()


@pytest.mark.filterwarnings("ignore:The training dataset contains fewer samples")
def test_saelens_reads_the_cache_exactly(store, tmp_path):
    pytest.importorskip("sae_lens")
    hp, C = "layers.1.mlp", 16
    dataset = to_saelens_cache(store, hp, tmp_path / "cache", context_size=C, block_rows=40)
    hook_name = transformer_lens_name(hp)
    assert hook_name == "blocks.1.hook_mlp_out" and dataset.column_names == [hook_name, "token_ids"]
    mark = store.committed_tokens()
    n_rows = mark // C
    info = json.loads((tmp_path / "cache" / "mistudio_export.json").read_text())
    assert (info["n_rows"], info["tokens_left_out"], info["d_in"]) == (n_rows, mark - n_rows * C, 32)
    acts, ids, batch = saelens_rows(tmp_path / "cache", hook_name, C, 32, n_rows)
    stored = store.activations(hp)[:n_rows * C].astype(np.float32)
    np.testing.assert_array_equal(acts, stored)  # every packed row, in order, bit for bit
    np.testing.assert_array_equal(ids, store.store.tokens("input_ids")[:n_rows * C])
    rows = {r.tobytes() for r in stored}
    assert batch.shape == (8, 32) and all(r.tobytes() in rows for r in batch.astype(np.float32))


@pytest.mark.filterwarnings("ignore:The training dataset contains fewer samples")
def test_saelens_cache_of_an_exclude_special_store(special_store, tmp_path):
    pytest.importorskip("sae_lens")
    C = 8
    to_saelens_cache(special_store, "layers.0.residual", tmp_path / "cache", context_size=C, dtype="float32")
    n_rows = special_store.committed_tokens() // C
    acts, ids, _ = saelens_rows(tmp_path / "cache", "blocks.0.hook_resid_post", C, 32, n_rows)
    np.testing.assert_array_equal(acts, special_store.activations("layers.0.residual")[:n_rows * C].astype(np.float32))
    all_ids = special_store.store.tokens("input_ids")[:]
    kept_ids = all_ids[~special_store.store.tokens("special")[:].astype(bool)]
    assert len(kept_ids) < len(all_ids)
    np.testing.assert_array_equal(ids, kept_ids[:n_rows * C])  # only tokens with activation rows are packed


def test_saelens_cache_refusals(store, tmp_path):
    with pytest.raises(InputError, match="fewer than context_size=100000"):
        to_saelens_cache(store, "layers.1.mlp", tmp_path / "a", context_size=100000)
    with pytest.raises(InputError, match="context_size=0 is not a positive integer"):
        to_saelens_cache(store, "layers.1.mlp", tmp_path / "a", context_size=0)
    with pytest.raises(InputError, match="dtype='bfloat16'"):
        to_saelens_cache(store, "layers.1.mlp", tmp_path / "a", dtype="bfloat16")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="exists and is not an empty folder"):
        to_saelens_cache(store, "layers.1.mlp", tmp_path / "full")
    assert transformer_lens_name("layers.4.attention") == "blocks.4.hook_attn_out"
    assert transformer_lens_name("layers.4.residual.sae") is None


def test_a_damaged_store_says_so(gpt2_dir, tmp_path):
    """A missing chunk is the store's StoreCorrupted, not datasets' generation error, and leaves no export."""
    ext = ms.extract(gpt2_dir, texts(), layers=[0], hooks=["residual"], max_length=48, dtype="float32", chunk_mb=0.01,
                     workspace=str(tmp_path / "ws"), progress=False)
    chunks = sorted(p for p in (Path(ext.location) / "activations" / "layers.0.residual").rglob("*")
                    if p.is_file() and p.name != "zarr.json")
    assert len(chunks) > 2
    chunks[1].unlink()
    with pytest.raises(StoreCorrupted):
        to_hf_dataset(ext, path=tmp_path / "hf")
    with pytest.raises(StoreCorrupted):
        to_saelens_cache(ext, "layers.0.residual", tmp_path / "cache", context_size=8)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "cache").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mistudio-export-")]  # scratch removed
