"""Streaming feature statistics (mistudio.storage.featstats) against a brute-force numpy pass over the same values."""
from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr

import mistudio as ms
from mistudio.storage import featfeed
from mistudio.errors import InputError
from mistudio.storage.featfeed import compute
from mistudio.storage.featstats import (CSR, FeatureStatistics, FeatureStatsAccumulator, histogram_edges,
                                sample_keys)

from conftest import TEXTS

OPTIONS = dict(k=5, bins=4, exponents=(-24, 24), bands=2, per_band=3, cooccurrence=64, cooccurrence_per_token=3,
               seed=7)


# -- data ------------------------------------------------------------------------------------------------------
def dense_data(n=300, d=12, seed=0, dtype=np.float16):
    """Signed values over many magnitudes, ~half exactly zero; float16 makes ties common."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, d)) * np.exp(rng.normal(0, 2, (n, d)))
    values[rng.random((n, d)) < 0.5] = 0
    values[rng.random((n, d)) < 0.05] = 1.0  # exact ties in every feature
    return values.astype(dtype)


def documents_of(n, seed=0, longest=40):
    rng = np.random.default_rng(seed + 100)
    lengths = rng.integers(1, longest, n)
    return np.repeat(np.arange(n), lengths)[:n]


def sparse_data(n=400, d=40, active=5, seed=1):
    """Top-k-like SAE latents: ``active`` distinct features per row, positive, float16-rounded (ties)."""
    rng = np.random.default_rng(seed)
    indices = np.concatenate([rng.choice(d, active, replace=False) for _ in range(n)])
    values = np.abs(rng.standard_normal(n * active) * 3).astype(np.float16).astype(np.float32)
    values[rng.random(n * active) < 0.05] = 2.0
    offsets = np.arange(n + 1) * active
    dense = np.zeros((n, d), np.float32)
    dense[np.repeat(np.arange(n), active), indices] = values
    return CSR(offsets, indices, values), dense


def csr_rows(csr: CSR, a: int, b: int) -> CSR:
    lo, hi = csr.offsets[a], csr.offsets[b]
    return CSR(csr.offsets[a:b + 1] - lo, csr.indices[lo:hi], csr.values[lo:hi])


def stream(values, docs, cuts, first_row=0, acc=None, **options):
    """Feed rows in batches ending at ``cuts``."""
    acc = acc or FeatureStatsAccumulator(len(values[0]) if not isinstance(values, CSR) else options.pop("d"),
                                         **options)
    n = len(docs)
    start = 0
    for stop in list(cuts) + [n]:
        if stop <= start:
            continue
        part = csr_rows(values, start, stop) if isinstance(values, CSR) else values[start:stop]
        acc.update(first_row + start, part, docs[start:stop])
        start = stop
    return acc


SPLITS = [[], [1, 2, 3, 50, 51, 150], list(range(7, 400, 7)), [64, 128, 192, 256]]


# -- brute force -------------------------------------------------------------------------------------------------
def brute_bins(v: np.ndarray, bins: int, exponents) -> np.ndarray:
    """Bin of each value by searching the documented edges (NaN: -1)."""
    edges = histogram_edges(bins, exponents)
    mags = edges[len(edges) // 2 + 1:]
    zero = len(edges) // 2
    size = np.searchsorted(mags, np.abs(v.astype(np.float64)), side="right") + 1
    size = np.where(v == 0, 0, size)
    out = np.where(v < 0, zero - size, zero + size)
    return np.where(np.isnan(v), -1, out)


def strata_table(bins, exponents, bands):
    n_log = (exponents[1] - exponents[0]) * bins
    per = bins // bands
    return np.concatenate([[0], 1 + np.arange(n_log) // per, [n_log // per + 1]])


class Brute:
    """Every statistic from the whole (n, d) float32 matrix at once, the obvious way."""

    def __init__(self, v, docs, first_row=0, k=5, one_per_document=False, bins=4, exponents=(-24, 24), bands=2,
                 per_band=3, cooccurrence=64, cooccurrence_per_token=3, seed=7):
        self.v, self.docs, self.k, self.seed = v.astype(np.float32), np.asarray(docs), k, seed
        self.rows = first_row + np.arange(len(v))
        v = self.v
        nan = np.isnan(v)
        clean = np.where(nan, 0, v)
        self.fire = clean > 0
        self.fire_count, self.nan_count = self.fire.sum(0), nan.sum(0)
        self.sum = clean.astype(np.float64).sum(0)
        self.fire_sum = np.where(self.fire, clean, 0).astype(np.float64).sum(0)
        high, low = np.where(nan, -np.inf, v), np.where(nan, np.inf, v)
        self.max, self.min = high.max(0), low.min(0)
        self.max_row = np.where(self.max > 0, self.rows[np.argmax(high == self.max, 0)], -1)
        self.min_row = np.where(self.min < 0, self.rows[np.argmax(low == self.min, 0)], -1)
        self.bins = brute_bins(v, bins, exponents)
        n_bins = len(histogram_edges(bins, exponents)) + 1
        self.hist = np.stack([np.bincount(b[b >= 0], minlength=n_bins) for b in self.bins.T])
        table = strata_table(bins, exponents, bands)
        self.stratum = np.where(self.bins > n_bins // 2, table[np.maximum(self.bins - n_bins // 2 - 1, 0)], -1)
        self.n_strata = table[-1] + 1
        self.one_per_document, self.per_band, self.m = one_per_document, per_band, cooccurrence_per_token

    def top(self, f):
        r = np.flatnonzero(self.fire[:, f])
        vals = self.v[r, f]
        order = np.lexsort((self.rows[r], -vals))
        r, vals = r[order], vals[order]
        if self.one_per_document:
            _, first = np.unique(self.docs[r], return_index=True)  # the best (first in order) row per document
            keep = np.sort(first)
            r, vals = r[keep], vals[keep]
        return self.rows[r[:self.k]], vals[:self.k]

    def samples(self, f, stratum):
        r = np.flatnonzero(self.stratum[:, f] == stratum)
        keys = sample_keys(self.rows[r], self.seed)
        return self.rows[r[np.argsort(keys)[:self.per_band]]]

    def band_rows(self, f, ranges, per_band):
        """The rule of FeatureStatistics.quantile_examples: each stratum's sample (the smallest keys of its rows),
        the sampled rows with a value within the band's (low, high), then the smallest keys of those; a band left
        short takes the top examples (largest first) within its range that it does not hold yet."""
        sampled = np.concatenate([self.samples(f, s) for s in range(self.n_strata)]) - self.rows[0]
        top = self.top(f)[0] - self.rows[0]
        out = []
        for low, high in ranges:
            r = sampled[(self.v[sampled, f] >= low) & (self.v[sampled, f] <= high)]
            pick = r[np.argsort(sample_keys(self.rows[r], self.seed))[:per_band]]
            more = [t for t in top if low <= self.v[t, f] <= high and t not in pick]
            pick = np.concatenate([pick, np.asarray(more[:per_band - len(pick)], dtype=pick.dtype)])
            vals = self.v[pick, f]
            out.append(self.rows[pick][np.lexsort((self.rows[pick], -vals))])
        return out

    def pairs(self) -> dict[int, collections.Counter]:
        counts = collections.defaultdict(collections.Counter)
        for i in range(len(self.v)):
            f = np.flatnonzero(self.fire[i])
            f = f[np.lexsort((f, -self.v[i, f]))][:self.m]
            for a in f:
                for b in f:
                    if a != b:
                        counts[int(a)][int(b)] += 1
        return counts


def check(stats: FeatureStatistics, brute: Brute, exact_cooccurrence: bool = True, sample_bands=True) -> None:
    d = brute.v.shape[1]
    assert stats.n_tokens == len(brute.v)
    np.testing.assert_array_equal(stats.fire_count, brute.fire_count)
    np.testing.assert_array_equal(stats.nan_count, brute.nan_count)
    np.testing.assert_allclose(stats.sum, brute.sum, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.fire_sum, brute.fire_sum, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(stats.max, brute.max)
    np.testing.assert_array_equal(stats.min, brute.min)
    np.testing.assert_array_equal(stats.max_row, brute.max_row)
    np.testing.assert_array_equal(stats.min_row, brute.min_row)
    np.testing.assert_array_equal(stats.hist, brute.hist)
    for f in range(d):
        rows, vals = brute.top(f)
        np.testing.assert_array_equal(stats.top_rows(f), rows, err_msg=f"top rows of feature {f}")
        np.testing.assert_array_equal(stats.top_values(f), vals)
        if brute.one_per_document:
            np.testing.assert_array_equal(stats.topk_documents[f][:len(rows)], brute.docs[rows - brute.rows[0]])
        for s in range(brute.n_strata):
            held = stats.sample_rows[f, s]
            np.testing.assert_array_equal(held[held >= 0], brute.samples(f, s), err_msg=f"samples {f}, {s}")
        if sample_bands:
            bands = ((0, .5), (.5, .9), (.9, .99), (.99, 1))
            got = stats.quantile_examples(f, bands=bands, per_band=brute.per_band)
            for band, want in zip(got, brute.band_rows(f, [b["values"] for b in got], brute.per_band)):
                np.testing.assert_array_equal(band["rows"], want)
                np.testing.assert_array_equal(band["activations"], brute.v[want - brute.rows[0], f])
                low, high = band["values"]
                assert np.all((band["activations"] >= low) & (band["activations"] <= high)), band
    true = brute.pairs()
    for f in range(d):
        got = dict(stats.cooccurring(f, n=stats.co_features.shape[1]))
        if exact_cooccurrence:
            assert got == dict(true[f]), f"co-occurrence of feature {f}"
            assert stats.co_error[f] == 0
            want = sorted(true[f].items(), key=lambda item: (-item[1], item[0]))
            assert stats.cooccurring(f, n=3) == want[:3]
        else:  # Misra-Gries bounds: count <= true <= count + error, exact iff few enough partners
            for g in set(got) | set(true[f]):
                assert got.get(g, 0) <= true[f][g] <= got.get(g, 0) + stats.co_error[f], (f, g)
            assert (stats.co_error[f] == 0) == (len(true[f]) <= stats.co_features.shape[1])


# -- tests -------------------------------------------------------------------------------------------------------
def test_sample_keys_agree_in_torch_and_numpy():
    from mistudio.storage.featstats import _keys

    rows = np.concatenate([np.arange(1000), [2**31, 2**32 + 5, 2**40, 2**62, 2**63 - 1]]).astype(np.int64)
    for seed in (0, 1, 2**40):
        keys = sample_keys(rows, seed)
        np.testing.assert_array_equal(_keys(torch.from_numpy(rows), seed).numpy(), keys)
        assert len(np.unique(keys)) == len(rows)  # a bijection: keys never tie
    assert not np.array_equal(sample_keys(rows, 0), sample_keys(rows, 1))


def test_histogram_bins_match_the_documented_edges():
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**-24, -(2.0**-24), 2.0**-25, 2.0**24, 2.0**24 * 0.999,
                        1e-40, -1e-40, 3e38, -3e38, 1.0, 1.25, 1.2499999, -1.25, 65504.0], np.float32)
    edges = histogram_edges(4, (-24, 24)).astype(np.float32)
    values = np.concatenate([special, edges, np.nextafter(edges, np.float32(np.inf)),
                             np.nextafter(edges, np.float32(-np.inf))]).astype(np.float32)
    acc = FeatureStatsAccumulator(1, bins=4, exponents=(-24, 24))
    got = acc._bins(torch.from_numpy(values)).numpy()
    want = brute_bins(values, 4, (-24, 24))
    np.testing.assert_array_equal(np.where(got == acc.n_bins, -1, got), want)
    # every finite non-zero float16 lands in a log bin: none under- or overflows
    half = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    half = half[np.isfinite(half) & (half != 0)]
    bins = acc._bins(torch.from_numpy(half)).numpy()
    zero = acc.n_bins // 2
    assert not np.isin(bins, [0, zero - 1, zero + 1, acc.n_bins - 1]).any()
    assert len(edges) == acc.n_bins - 1 and np.all(np.diff(edges.astype(np.float64)) >= 0)


def test_quantiles_of_a_bin_holding_the_maximum_stay_inside_it():
    """Values in [1, 1.05] all fall in the log bin [1, 2**0.25): interpolated over the whole bin, every quantile from
    the 30th up read above the maximum and was cut to it (a top band [max, max], holding one token); the bin's range
    ends at the maximum now."""
    values = np.linspace(1.0, 1.05, 1001, dtype=np.float32)[:, None]
    stats = stream(values, np.arange(len(values)), [500]).result()
    for q in (0.3, 0.5, 0.9, 0.99):
        want = float(np.quantile(values[:, 0], q))
        assert abs(stats.quantile(0, q) - want) < 0.003, (q, stats.quantile(0, q), want)
    assert stats.quantile(0, 0.99) < stats.quantile(0, 1.0) == float(values.max())
    # values packed in [1.019, 1.021] (and zeros): the bin's range starts at the smallest sampled firing value, so
    # the low quantiles are not read near the bin's edge 1.0, where no value lies
    packed = np.concatenate([np.linspace(1.019, 1.021, 2000), np.zeros(2000)]).astype(np.float32)[:, None]
    stats = stream(packed, np.arange(len(packed)), [1000]).result()
    firing = packed[packed > 0]
    for q in (0.0, 0.5, 0.9):
        assert abs(stats.quantile(0, q) - float(np.quantile(firing, q))) < 1e-4, (q, stats.quantile(0, q))


@pytest.mark.parametrize("cuts", SPLITS)
@pytest.mark.parametrize("one_per_document", [False, True])
def test_dense_stream_equals_brute_force(cuts, one_per_document):
    values = dense_data()
    docs = documents_of(len(values))
    acc = stream(values, docs, cuts, first_row=1000, one_per_document=one_per_document, **OPTIONS)
    check(acc.result(), Brute(values, docs, first_row=1000, one_per_document=one_per_document, **OPTIONS))


@pytest.mark.parametrize("cuts", SPLITS)
@pytest.mark.parametrize("one_per_document", [False, True])
def test_sparse_stream_equals_brute_force(cuts, one_per_document):
    csr, dense = sparse_data()
    docs = documents_of(len(dense), seed=3)
    options = dict(OPTIONS, cooccurrence_per_token=4)
    acc = stream(csr, docs, cuts, d=dense.shape[1], one_per_document=one_per_document, **options)
    check(acc.result(), Brute(dense, docs, one_per_document=one_per_document, **options))
    # the same values given dense give the same statistics
    again = stream(dense, docs, cuts, one_per_document=one_per_document, **options).result()
    mine = acc.result()
    for name in ("fire_count", "hist", "max", "max_row", "min", "topk_rows", "sample_rows", "co_features",
                 "co_counts"):
        np.testing.assert_array_equal(getattr(again, name), getattr(mine, name), err_msg=name)


def misra_gries(values: np.ndarray, cuts: list[int], c: int, m: int) -> tuple[list[dict], np.ndarray]:
    """Mergeable Misra-Gries in plain Python, batch by batch: add a batch's pair counts to a feature's counters,
    subtract the (c+1)-th largest count when there are more than c, keep the positive ones."""
    d = values.shape[1]
    counters, error = [dict() for _ in range(d)], np.zeros(d, np.int64)
    bounds = [0] + [x for x in cuts if 0 < x < len(values)] + [len(values)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        batch = Brute(values[a:b], np.zeros(b - a), cooccurrence_per_token=m).pairs()
        for f, partners in batch.items():
            combined = dict(counters[f])
            for g, x in partners.items():
                combined[g] = combined.get(g, 0) + x
            cut = sorted(combined.values(), reverse=True)[c] if len(combined) > c else 0
            counters[f] = {g: x - cut for g, x in combined.items() if x > cut}
            error[f] += cut
    return counters, error


@pytest.mark.parametrize("c", [1, 4, 9])
def test_many_features_per_token_are_cut_to_the_most_active(c):
    values = np.abs(dense_data(n=240, d=24, seed=5))  # every non-zero fires: ~12 per token, m = 5
    docs = documents_of(len(values))
    options = dict(OPTIONS, cooccurrence=c, cooccurrence_per_token=5)  # fewer counters than partners
    cuts = [40, 80, 81, 200]
    stats = stream(values, docs, cuts, **options).result()
    check(stats, Brute(values, docs, **options), exact_cooccurrence=False)
    assert (stats.co_error > 0).any()
    counters, error = misra_gries(values, cuts, c, 5)
    np.testing.assert_array_equal(stats.co_error, error)
    for f in range(values.shape[1]):
        assert dict(stats.cooccurring(f, n=c)) == counters[f]


def test_nan_inf_and_extreme_magnitudes_in_float32():
    values = dense_data(n=200, d=6, seed=9, dtype=np.float32)
    values[3, 0], values[4, 1], values[5, 2], values[6, 3] = np.nan, np.inf, -np.inf, 1e-30
    values[7, 4], values[8, 5], values[9, 5] = 1e30, -0.0, -1e-40
    values[:, 5][values[:, 5] > 0] = 0  # a feature that never fires
    docs = documents_of(len(values))
    stats = stream(values, docs, [10, 100], **OPTIONS).result()
    check(stats, Brute(values, docs, **OPTIONS))
    assert stats.nan_count[0] == 1 and stats.top_rows(5).size == 0 and stats.max_row[5] == -1
    assert stats.quantile_examples(5)[0]["rows"].size == 0 and np.isnan(stats.quantile(5, 0.5))
    assert stats.hist[1, -1] >= 1 and stats.hist[4, -1] >= 1 and stats.hist[2, 0] >= 1  # +inf, 1e30, -inf
    # the same rows as CSR, listing the non-zero values and some explicit zeros
    listed = (values != 0) | (np.random.default_rng(1).random(values.shape) < 0.1)
    csr = CSR(np.concatenate([[0], np.cumsum(listed.sum(1))]), np.nonzero(listed)[1], values[listed])
    sparse = stream(csr, docs, [10, 100], d=values.shape[1], **OPTIONS).result()
    check(sparse, Brute(values, docs, **OPTIONS))
    np.testing.assert_array_equal(sparse.hist, stats.hist)


def test_bfloat16_and_torch_inputs_are_computed_as_float32():
    base = dense_data(n=64, d=8, seed=4, dtype=np.float32).astype(ml_dtypes.bfloat16)
    docs = documents_of(len(base))
    want = stream(base.astype(np.float32), docs, [32], **OPTIONS).result()
    for values in (base, torch.from_numpy(base.astype(np.float32)).to(torch.bfloat16)):
        got = stream(values, docs, [32], **OPTIONS).result()
        for name in ("hist", "topk_rows", "topk_values", "sum", "sample_rows", "co_counts"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("sparse", [False, True])
def test_resume_from_a_stored_state_is_bit_equal(tmp_path, sparse):
    if sparse:
        values, dense = sparse_data()
        d = dense.shape[1]
    else:
        values = dense_data()
        d = values.shape[1]
    n = 300
    docs = documents_of(400)[:n]
    options = dict(OPTIONS, one_per_document=True)
    cuts = [37, 90, 150, 151, 230]
    whole = stream(values, docs, cuts, d=d, **options) if sparse else stream(values[:n], docs, cuts, **options)

    first = FeatureStatsAccumulator(d, **options)
    part = (lambda a, b: csr_rows(values, a, b)) if sparse else (lambda a, b: values[a:b])
    for a, b in [(0, 37), (37, 90), (90, 150)]:
        first.update(a, part(a, b), docs[a:b])
    group = zarr.open_group(str(tmp_path / "state.zarr"), mode="w")  # as the writer stores it at a commit
    for key, value in first.state_dict().items():
        if isinstance(value, np.ndarray):
            group.create_array(key, data=value)
        else:
            group.attrs[key] = value
    group = zarr.open_group(str(tmp_path / "state.zarr"), mode="r")
    loaded = {key: group[key][...] for key in group.array_keys()} | dict(group.attrs)
    resumed = FeatureStatsAccumulator.from_state_dict(loaded)
    for a, b in [(150, 151), (151, 230), (230, n)]:
        resumed.update(a, part(a, b), docs[a:b])
    _states_equal(resumed.state_dict(), whole.state_dict())
    assert torch.equal(resumed._sample_limit, whole._sample_limit)  # the loaded state filters candidates as well
    with pytest.raises(InputError, match="overlap"):  # feeding a saved row again is refused
        resumed.update(100, part(100, 101), docs[100:101])


@pytest.mark.parametrize("one_per_document", [False, True])
def test_merge_of_two_halves_equals_one_pass(one_per_document):
    values = dense_data()
    docs = documents_of(len(values))
    options = dict(OPTIONS, one_per_document=one_per_document)
    h = 133  # inside a document
    late = stream(values[h:], docs[h:], [50], first_row=h, **options)
    early = stream(values[:h], docs[:h], [60], **options)
    late.merge(early)  # merged out of row order
    check(late.result(), Brute(values, docs, **options))
    np.testing.assert_array_equal(late.result().ranges, [[0, len(values)]])
    with pytest.raises(InputError, match="overlap"):
        late.merge(early)


def test_samples_and_cooccurrence_can_be_left_out(tmp_path):
    values = dense_data()
    docs = documents_of(len(values))
    options = dict(OPTIONS, per_band=0, cooccurrence=0)
    acc = FeatureStatsAccumulator(values.shape[1], **options)
    empty = acc.state_dict()  # an empty state stores and loads too
    group = zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    for key, value in empty.items():
        if isinstance(value, np.ndarray):
            group.create_array(key, data=value)
    loaded = {key: group[key][...] for key in group.array_keys()} | {k: v for k, v in empty.items()
                                                                     if not isinstance(v, np.ndarray)}
    acc = FeatureStatsAccumulator.from_state_dict(loaded)
    stream(values, docs, [100], acc=acc)
    stats = acc.result()
    brute = Brute(values, docs, **options)
    np.testing.assert_array_equal(stats.hist, brute.hist)
    for f in range(values.shape[1]):
        np.testing.assert_array_equal(stats.top_rows(f), brute.top(f)[0])
        assert stats.cooccurring(f) == []
    assert stats.sample_rows.shape == (values.shape[1], acc.n_strata, 0) and stats.co_features.shape[1] == 0
    with pytest.raises(InputError, match="per_band=0"):
        stats.quantile_examples(0)
    assert acc.nbytes < FeatureStatsAccumulator(values.shape[1], **OPTIONS).nbytes


def test_memory_is_fixed_by_features_not_rows():
    small, large = FeatureStatsAccumulator(100), FeatureStatsAccumulator(100)
    values = dense_data(n=2000, d=100, seed=2)
    small.update(0, values[:10])
    for a in range(0, 2000, 500):
        large.update(a, values[a:a + 500])
    assert small.nbytes == large.nbytes
    state = large.state_dict()
    assert all(v.shape[0] == 100 * (large.n_strata if k.startswith("sample") else 1)
               for k, v in state.items() if isinstance(v, np.ndarray) and k != "ranges")


def test_streamed_pass_over_a_real_store(gpt2_dir, workspace):
    ext = ms.extract(gpt2_dir, TEXTS * 3, layers=[1], hooks=["mlp", "residual"], batch_size=4, max_length=32,
                     exclude_special=True, workspace=workspace)
    assert ext.status == "COMPLETED"
    offsets = np.asarray(ext.activation_offsets)
    for hp in ("layers.1.mlp", "layers.1.residual"):
        values = ext.activations(hp)[:]
        docs = np.searchsorted(offsets, np.arange(len(values)), side="right") - 1
        options = dict(OPTIONS, one_per_document=True, cooccurrence=32, cooccurrence_per_token=4)
        stats = compute(ext, hp, chunk_rows=13, **options)
        brute = Brute(values, docs, **options)
        check(stats, brute, exact_cooccurrence=False)
        default_chunks = compute(ext, hp, **options)
        for name in ("hist", "topk_rows", "sample_rows", "co_features", "co_counts", "co_error"):
            np.testing.assert_array_equal(getattr(default_chunks, name), getattr(stats, name))


def test_feature_statistics_are_cached_for_the_next_kernel(gpt2_dir, workspace, monkeypatch):
    ext = ms.extract(gpt2_dir, TEXTS * 3, layers=[1], hooks=["mlp"], batch_size=4, max_length=32, workspace=workspace,
                     progress=False)
    first = ext.feature_statistics("layers.1.mlp")
    assert first.nan_count.sum() == 0  # an all-zero array: its chunks must be written to be read back

    def no_pass(*_args, **_kw):
        raise AssertionError("a second pass: the cache was not read")
    monkeypatch.setattr(featfeed, "accumulate", no_pass)  # analysis.stats calls featfeed.accumulate
    again = ms.open_extraction(ext.id, workspace=workspace).feature_statistics("layers.1.mlp")
    for name in ("density", "hist", "topk_rows", "topk_values"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name), err_msg=name)


def test_wrong_inputs_are_refused_naming_the_value():
    acc = FeatureStatsAccumulator(4, one_per_document=True)
    with pytest.raises(InputError, match="documents"):
        acc.update(0, np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match=r"\(rows, 4\)"):
        acc.update(0, np.ones((3, 5), np.float32), [0, 0, 0])
    with pytest.raises(InputError, match="dtype int64"):
        acc.update(0, np.ones((3, 4), np.int64), [0, 0, 0])
    with pytest.raises(InputError, match="3 rows"):
        acc.update(0, np.ones((3, 4), np.float32), [0, 0])
    with pytest.raises(InputError, match="same feature twice"):
        acc.update(0, CSR([0, 2], [1, 1], [1.0, 2.0]), [0])
    with pytest.raises(InputError, match="features 0..3"):
        acc.update(0, CSR([0, 1], [4], [1.0]), [0])
    with pytest.raises(InputError, match="first_row"):
        acc.update(-1, np.ones((1, 4), np.float32), [0])
    with pytest.raises(InputError, match="bins=3"):
        FeatureStatsAccumulator(4, bins=3)
    with pytest.raises(InputError, match="bands=8"):
        FeatureStatsAccumulator(4, bins=4, bands=8)
    with pytest.raises(InputError, match="exponents"):
        FeatureStatsAccumulator(4, exponents=(5, 5))
    acc.update(0, np.ones((2, 4), np.float32), [0, 0])
    with pytest.raises(InputError, match=r"'k': \(20, 5\)"):
        FeatureStatsAccumulator(4, k=5, one_per_document=True).load_state_dict(acc.state_dict())
    with pytest.raises(InputError, match="per_band=4"):
        acc.result().quantile_examples(0, per_band=4)
    with pytest.raises(InputError, match="feature=9"):
        acc.result().top_rows(9)
    with pytest.raises(InputError, match="bands="):
        acc.result().quantile_examples(0, bands=((0.5, 0.2),))
