"""Dataset-wide queries over real stores: feature_stats and top_examples against brute-force numpy, and the cache."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

import mistudio as ms
from mistudio.analysis import stats as analysis
from conftest import gate

HP = "layers.1.residual"
ARGS = dict(layers=[0, 1], hooks=["residual"], dtype="float32", chunk_mb=0.02, max_length=64)


@pytest.fixture(scope="module")
def made(gpt2_dir, tmp_path_factory):
    ext = ms.extract(gpt2_dir, ms.sample_texts()[:200], workspace=str(tmp_path_factory.mktemp("analysis")),
                     progress=False, **ARGS)
    assert ext.activations(HP).chunks[0] * 20 < ext.n_tokens
    return ext


@pytest.fixture
def ext(made, tmp_path):
    """A fresh copy of the store for each test, so caches do not leak between tests."""
    shutil.copytree(made.location, tmp_path / "copy.zarr")
    return ms.open_extraction(str(tmp_path / "copy.zarr"))


def brute_stats(x: np.ndarray, bins: int) -> dict:
    x = x.astype(np.float64)
    lo, hi = x.min(0), x.max(0)
    hist = np.stack([np.histogram(x[:, f], bins=bins, range=(lo[f], hi[f]))[0] for f in range(x.shape[1])])
    return {"mean": x.mean(0), "std": x.std(0), "max": hi, "min": lo, "frac_active": (x > 0).mean(0), "hist": hist}


def assert_stats(stats: analysis.FeatureStats, want: dict, n: int) -> None:
    assert stats.n_tokens == n and stats.hist.sum(1).tolist() == [n] * len(want["mean"])
    for name in ("mean", "std", "max", "min", "frac_active"):
        np.testing.assert_allclose(getattr(stats, name), want[name], rtol=1e-6, atol=1e-9, err_msg=name)
    # floating-point edges may put a value on the other side of a bin edge: allow a handful of moves
    assert np.abs(stats.hist - want["hist"]).sum() <= 0.001 * want["hist"].sum()


def brute_top(ext, feature: int, k: int) -> list[int]:
    col = ext.activations(HP)[:][:, feature].astype(np.float64)
    return sorted(range(len(col)), key=lambda t: (-col[t], t))[:k]


def test_feature_stats_equal_brute_force_and_are_cached(ext, monkeypatch):
    x = ext.activations(HP)[:]
    stats = ext.feature_stats(HP, bins=16)
    assert not stats.cached and stats.hist.shape == (32, 16) and stats.edges.shape == (32, 17)
    assert_stats(stats, brute_stats(x, 16), ext.n_tokens)
    meta_before = ext.metadata
    monkeypatch.setattr(analysis, "_moments", None)  # a second scan would fail: the answer must come from the cache
    again = ext.feature_stats(HP, bins=16)
    assert again.cached
    for name in analysis.STAT_ARRAYS:
        np.testing.assert_array_equal(getattr(again, name), getattr(stats, name))
    assert zarr.open_group(ext.location, path=f"analysis/feature_stats/{HP}/bins=16", mode="r").attrs["mark"] == \
        ext.n_tokens
    # the extraction's own arrays and metadata are untouched; xarray still opens it
    assert ext.metadata == meta_before
    np.testing.assert_array_equal(ext.activations(HP)[:], x)
    assert set(ext.to_xarray().data_vars) == set(ext.hook_points)


@pytest.mark.parametrize("damage", ["flipped bit", "wrong shape"])
def test_a_damaged_cache_is_a_miss_never_a_wrong_answer(ext, damage):
    """The analysis cache is checksummed like the arrays: a flipped bit in a cached mean, or a cached array of
    another shape, is recomputed; the mean_std loader never sees it (#16 point 7)."""
    from pathlib import Path

    x = ext.activations(HP)[:]
    ext.feature_stats(HP, bins=16)
    entry = Path(ext.location) / "analysis" / "feature_stats" / HP / "bins=16"
    if damage == "flipped bit":
        (chunk,) = [p for p in (entry / "mean").rglob("*") if p.is_file() and p.name != "zarr.json"]
        data = bytearray(chunk.read_bytes())
        data[5] ^= 0x80  # the sign bit of the first mean's low bytes' neighbour: a plausible wrong number
        chunk.write_bytes(bytes(data))
    else:
        group = zarr.open_group(str(entry), mode="r+")
        del group["mean"]
        group.create_array("mean", data=np.zeros(7), **analysis.array_codecs(True))
    again = ext.feature_stats(HP, bins=16)
    assert not again.cached
    assert_stats(again, brute_stats(x, 16), ext.n_tokens)
    batch = next(iter(ext.loader(HP, batch_size=256, shuffle=False, normalize="mean_std")))
    assert np.isfinite(batch.numpy()).all()
    np.testing.assert_allclose(batch.numpy(), (x[:256] - x.mean(0)) / x.std(0), rtol=1e-4, atol=1e-4)


def test_top_examples_equal_brute_force(ext):
    offsets, rows, ids = ext.sample_offsets, ext.sample_index, ext.store.group["tokens/input_ids"][:]
    x = ext.activations(HP)[:]
    top = ext.top_examples(HP, feature=5, k=7, context=3)
    assert not top.cached and [t["token_index"] for t in top] == brute_top(ext, 5, 7)
    for t in top:
        pos = t["sample_position"]
        start, stop = offsets[pos], offsets[pos + 1]
        assert start <= t["token_index"] < stop and t["row"] == rows[pos]
        assert t["position"] == t["token_index"] - start and t["value"] == pytest.approx(x[t["token_index"], 5])
        lo, hi = max(start, t["token_index"] - 3), min(stop, t["token_index"] + 4)
        assert t["context_start"] == lo - start and t["context_ids"] == ids[lo:hi].tolist()
        assert t["context_tokens"][t["position"] - t["context_start"]] == t["token"]
        np.testing.assert_allclose(t["context_values"], x[lo:hi, 5], rtol=1e-6)
        assert t["context_tokens"] == ext.tokenizer.convert_ids_to_tokens(t["context_ids"])
    several = ext.top_examples(HP, feature=[5, 9], k=7, context=3)
    assert several[5].cached and not several[9].cached
    assert [t["token_index"] for t in several[9]] == brute_top(ext, 9, 7)
    assert several[5] == top


def test_top_examples_cached_then_stale_cache_ignored(ext, monkeypatch):
    first = ext.top_examples(HP, 3, k=5)
    path = f"analysis/top_examples/{HP}/{analysis.EXAMPLES_KEY},feature=3,k=5,context=8"
    group = zarr.open_group(ext.location, path=path, mode="r+")
    assert json.loads(group.attrs["examples"]) == first
    real_top = analysis._top
    monkeypatch.setattr(analysis, "_top", None)
    hit = ext.top_examples(HP, 3, k=5)
    assert hit.cached and hit == first
    group.attrs["mark"] = ext.n_tokens - 1  # as if made before the last commit: must not be served
    monkeypatch.setattr(analysis, "_top", real_top)
    fresh = ext.top_examples(HP, 3, k=5)
    assert not fresh.cached and fresh == first


def test_read_only_store_skips_caching(ext, monkeypatch):
    real = zarr.open_group

    def read_only(*args, mode="r", **kw):
        if mode != "r":
            raise PermissionError("read-only file system")
        return real(*args, mode=mode, **kw)

    monkeypatch.setattr(analysis.zarr, "open_group", read_only)
    assert not ext.feature_stats(HP, bins=8).cached
    assert not ext.feature_stats(HP, bins=8).cached  # nothing was written, nothing is served
    assert ext.top_examples(HP, 1, k=3)


def test_live_job_is_not_cached(gpt2_dir, tmp_path):
    gate_hook, reached, release = gate(10)

    job = ms.Workspace(str(tmp_path)).submit(gpt2_dir, ms.sample_texts()[:200], batch_size=8, before_batch=gate_hook,
                                             **ARGS)
    try:
        assert reached.wait(60)
        ext = ms.open_extraction(job.store.location)
        stats = ext.feature_stats(HP, bins=4)
        assert 0 < stats.n_tokens < ext.n_tokens and not stats.cached
        assert "analysis" not in zarr.open_group(ext.location, mode="r")
    finally:
        release.set()
        job.wait(60)


def test_on_a_dask_cluster_same_answer(ext):
    from distributed import Client, LocalCluster

    local = analysis.feature_stats(ext, HP, bins=8)
    top = analysis.top_examples(ext, HP, [2, 4], k=4)
    shutil.rmtree(f"{ext.location}/analysis")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        remote = ext.feature_stats(HP, bins=8, cluster=client)
        remote_top = ext.top_examples(HP, [2, 4], k=4, cluster=client)
    assert not remote.cached and not remote_top[2].cached
    for name in analysis.STAT_ARRAYS:
        np.testing.assert_array_equal(getattr(remote, name), getattr(local, name), err_msg=name)
    assert remote_top == top


def test_bad_arguments(ext):
    with pytest.raises(ms.InputError, match="out of range"):
        ext.top_examples(HP, 32)
    with pytest.raises(ms.InputError, match="layers.0.residual"):
        ext.feature_stats("layers.7.mlp")


def test_exclude_special_store_keeps_contexts_and_loader_aligned(gpt2_dir, tmp_path):
    """Rows of an exclude_special store are not tokens: top examples map them back, the loader takes each once."""
    texts = [[0, *ids, 0] for ids in ([5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18])]  # eos at both ends
    ext = ms.extract(gpt2_dir, texts, workspace=str(tmp_path / "ws"), progress=False, exclude_special=True, **ARGS)
    special = ext.store.tokens("special")[:].astype(bool)
    assert special.sum() == 6 and ext.n_tokens == len(special) - 6
    x = ext.activations(HP)[:]
    examples = ext.top_examples(HP, 3, k=ext.n_tokens, context=20)
    for e in examples:
        assert e["token_index"] == e["input_index"] == int(ext.token_index(e["activation_row"])) and e["token_id"] != 0
        at = e["position"] - e["context_start"]
        assert e["context_values"][at] == pytest.approx(e["value"]) == pytest.approx(float(x[e["activation_row"], 3]))
        assert [v is None for v in e["context_values"]] == [i == 0 for i in e["context_ids"]]
    seen = np.concatenate([b["row"].numpy() for b in ext.loader(HP, batch_size=4, exclude_special=True,
                                                                  with_index=True)])
    assert sorted(seen.tolist()) == list(range(ext.n_tokens))


@pytest.mark.parametrize("url", [False, True])
def test_a_torn_feature_statistics_cache_entry_is_computed_again(ext, url):
    """An array's metadata in a feature_statistics cache entry left empty (a torn or disk-full write) is a cache
    miss, not Python's JSONDecodeError; through a file:// URL too (read through the guarded local store)."""
    from pathlib import Path

    want = ext.feature_statistics(HP, k=5)
    entries = [p for p in (Path(ext.location) / "analysis" / "featstats").rglob("zarr.json") if p.parent.name != HP]
    leaf = next(p for p in entries if json.loads(p.read_text()).get("node_type") == "array")
    leaf.write_text("")
    opened = ms.open_extraction(f"file://{ext.location}") if url else ext
    again = opened.feature_statistics(HP, k=5)
    np.testing.assert_array_equal(again.fire_count, want.fire_count)


def test_top_examples_break_ties_by_stored_order(gpt2_dir, tmp_path):
    """bfloat16 values tie often: the k largest are taken with ties to the earlier row, as documented (and as the
    feature statistics' top rows are), never an arbitrary one of the tied rows."""
    ext = ms.extract(gpt2_dir, ms.sample_texts()[:60], workspace=str(tmp_path), progress=False, layers=[1],
                     hooks=["residual"], dtype="bfloat16", chunk_mb=0.02, max_length=32)
    x = np.asarray(ext.activations(HP)[:], np.float64)
    features, tied = list(range(x.shape[1])), 0
    for k in (5, 10, 20):
        answers = ext.top_examples(HP, features, k=k, context=0)
        for f in features:
            want = np.lexsort((np.arange(len(x)), -x[:, f]))[:k]
            tied += int((x[:, f] == x[want[-1], f]).sum() > 1)
            assert [e["activation_row"] for e in answers[f]] == want.tolist(), (f, k)
    assert tied > 5  # the k-th value was shared with another row in many of the cases

