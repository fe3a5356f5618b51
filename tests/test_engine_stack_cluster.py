"""The grouped engine on a real dask LocalCluster (2 worker processes): the sharded run's statistics (moments,
histogram, outliers, out-of-range counts) and rows equal a single-process run's, with an SAE on an unstored hook
point beside stored ones."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import mistudio as ms

distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402
from stats_reference import edited_model  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ARGS = dict(layers=[0, 2], hooks=["residual", "mlp", "attention"], max_samples=64, dtype="float16", chunk_mb=0.01,
            batch_size=8, max_length=24)


@pytest.fixture(scope="module")
def loud(tiny_models, tmp_path_factory):
    def edit(weight):
        for t in range(0, 400, 37):
            weight[t].mul_(3e4 if t % 2 else 1e7)  # outliers, and values past float16 in layer 0

    return edited_model(tiny_models["gpt2"], tmp_path_factory.mktemp("loudcluster") / "m", edit)


@pytest.mark.slow
def test_cluster_statistics_equal_a_single_process_run(loud, tmp_path):
    from distributed import Client, LocalCluster

    local = ms.extract(loud, "sample", workspace=str(tmp_path / "one"), progress=False, device="cpu", **ARGS)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           worker_dashboard_address=None)
    try:
        with Client(cluster) as client:
            ext = ms.extract(loud, "sample", workspace=str(tmp_path / "many"), progress=False, cluster=client,
                             **ARGS)
    finally:
        cluster.close()
    assert any(local.metadata["statistics"][hp]["n_out_of_range"] for hp in local.hook_points)
    assert any(local.metadata["statistics"][hp]["n_outliers"] for hp in local.hook_points)
    for hp in local.hook_points:
        a, b = local.metadata["statistics"][hp], ext.metadata["statistics"][hp]
        for key in ("count", "zeros", "n_nan", "n_out_of_range", "n_outliers"):
            assert a[key] == b[key], (hp, key, a[key], b[key])
        assert sorted(r for r, _ in a["outliers"]) == sorted(r for r, _ in b["outliers"]), hp
        assert np.abs(np.array(a["norm_hist"]) - np.array(b["norm_hist"])).sum() <= 2, hp
        assert a["sum"] == pytest.approx(b["sum"], rel=1e-4, abs=1e-3)
        assert a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-4)
        np.testing.assert_array_equal(np.isinf(local.activations(hp)[:]), np.isinf(ext.activations(hp)[:]))
