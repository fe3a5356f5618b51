"""The host-side statistics kernels equal the numpy calls they replace, bin for bin (edges, their neighbours,
0, inf, subnormals), and merged accumulators still summarise to plain JSON lists."""
from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings, strategies as st

from mistudio.storage.stats import HookStats, norm_bins, row_medians

EDGES = HookStats.NORM_EDGES


def test_norm_bins_equal_searchsorted_at_every_edge_and_its_neighbours():
    at_edges = np.array([np.nextafter(EDGES, 0), EDGES, np.nextafter(EDGES, np.inf)])
    odd = np.array([[0.0, 5e-324, 1e-300, 1e-3, 1e7, 1e8, 1e300, np.inf]])
    for norms in (at_edges, odd, np.random.default_rng(0).lognormal(0, 8, size=(9, 4001))):
        np.testing.assert_array_equal(norm_bins(norms), np.searchsorted(EDGES, norms, side="left"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0, allow_nan=False, allow_infinity=True), min_size=1, max_size=64))
def test_norm_bins_equal_searchsorted_for_any_norms(values):
    norms = np.array([values])
    np.testing.assert_array_equal(norm_bins(norms), np.searchsorted(EDGES, norms, side="left"))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(0, 40), st.integers(0, 2**31), st.booleans())
def test_row_medians_equal_numpy_median(n_rows, n_cols, seed, with_nan):
    values = np.random.default_rng(seed).normal(size=(n_rows, n_cols))
    if with_nan and n_cols:
        values[0, seed % n_cols] = np.nan
    expected = np.median(values, axis=1, keepdims=True) if n_cols else np.full((n_rows, 1), np.nan)
    np.testing.assert_array_equal(row_medians(values), expected)


def test_merged_histograms_add_up_and_summarise_to_json():
    rng = np.random.default_rng(1)
    norms = np.abs(rng.normal(size=(3, 500))) * 5
    batches = [HookStats.from_sources(500 * 4, [[1.0, 2.0, 3.0, 0]] * 3, norms[:, i:i + 100], [None] * 3)
               for i in range(0, 500, 100)]
    acc = HookStats.empty()
    for i, batch in enumerate(batches):
        HookStats.merge(acc, batch[0], first_row=100 * i)
    whole = np.bincount(np.searchsorted(EDGES, norms[0]), minlength=len(EDGES) + 1)
    summary = HookStats.summary(acc)
    assert summary["norm_hist"] == whole.tolist() and json.loads(json.dumps(summary))["norm_hist"] == whole.tolist()
