"""Reading a store that its job left part way (FAILED here): every view spans the committed rows only, so that
``len(ext.activations(hp))``, ``ext.latents(hp).shape[0]``, the dask and xarray forms and ``ext.committed_tokens()``
agree, and a read that reaches past the commit mark raises ``InputError`` instead of returning the zeros Zarr
gives for rows never written. And the sparse forms of SAE latents (``ext.latents(hp)`` and the dask array of
``ext.to_dask(hp + ".latents")``) answer ``mean``, ``max``, ``min`` and ``@`` like numpy on the dense latents."""
from __future__ import annotations

import numpy as np
import pytest

import mistudio as ms
from conftest import fail_at
from mistudio.errors import InputError
from test_latents import D_SAE, HP, LAYOUT, make_sae

LAT = f"{HP}.latents"


@pytest.fixture(scope="module")
def stopped(gpt2_dir, tmp_path_factory):
    """A store with an SAE's latents whose job failed at its sixth batch: rows committed, more planned."""
    root = tmp_path_factory.mktemp("stopped")
    make_sae(root / "sae", "standard")
    job = ms.Workspace(str(root / "ws")).submit(gpt2_dir, "sample", saes={HP: str(root / "sae")},
                                                before_batch=fail_at(5), **LAYOUT).wait(60)
    assert job.status == "FAILED"
    ext = ms.open_extraction(job.store.location)
    assert 0 < ext.committed_tokens() < ext.n_tokens
    return ext


# -- 1. one length: the committed rows -------------------------------------------------------------------------
def test_every_view_of_a_stopped_store_has_the_committed_length(stopped):
    ext, mark = stopped, stopped.committed_tokens()
    acts = ext.activations(HP)
    assert len(acts) == acts.shape[0] == mark
    assert acts.shape == (mark, 32) and acts.size == mark * 32
    assert ext.latents(HP).shape == (mark, D_SAE)
    index, values = ext.latent_arrays(HP)
    assert len(index) == len(values) == mark
    assert np.asarray(acts).shape == (mark, 32)
    assert ext.to_dask(HP).shape == (mark, 32)
    assert ext.to_dask(LAT).shape == (mark, D_SAE)
    assert ext.to_xarray()[HP].shape == (mark, 32)


def test_the_committed_view_reads_the_stored_rows(stopped):
    ext, mark = stopped, stopped.committed_tokens()
    acts, raw = ext.activations(HP), ext.activations(HP).zarr
    stored = np.asarray(raw[:mark])
    assert np.abs(stored).sum(axis=1).min() > 0  # real rows, no fill value among them
    np.testing.assert_array_equal(acts[:], stored)
    np.testing.assert_array_equal(acts[...], stored)
    np.testing.assert_array_equal(acts[-1], stored[-1])  # negative indices count from the committed end
    np.testing.assert_array_equal(acts[-3:], stored[-3:])
    np.testing.assert_array_equal(acts[..., 5], stored[:, 5])
    np.testing.assert_array_equal(acts[[0, -1, 3]], stored[[0, mark - 1, 3]])
    np.testing.assert_array_equal(ext.to_dask(HP).compute(), stored)
    np.testing.assert_array_equal(ext.latents(HP, slice(-4, None)).toarray(), ext.latents(HP).toarray()[-4:])


@pytest.mark.parametrize("read", [
    lambda ext, m: ext.activations(HP)[m:m + 3],
    lambda ext, m: ext.activations(HP)[m - 2:m + 2],
    lambda ext, m: ext.activations(HP)[m],
    lambda ext, m: ext.activations(HP)[[0, m]],
    lambda ext, m: ext.activations(HP)[0:ext.n_tokens, 0],
    lambda ext, m: ext.activations(HP).read_into(np.empty((4, 32), np.float32), m - 2, m + 2),
    lambda ext, m: ext.latents(HP, slice(0, ext.n_tokens)),
    lambda ext, m: ext.latents(HP, np.array([m])),
    lambda ext, m: ext.latent_arrays(HP)[1][m:m + 1],
], ids=["slice-past", "slice-across", "row", "row-list", "planned-length", "read_into", "latents-slice",
        "latents-rows", "latent-values"])
def test_a_read_past_the_commit_mark_raises_naming_the_committed_rows(stopped, read):
    mark = stopped.committed_tokens()
    with pytest.raises(InputError, match=rf"{mark:,} rows committed.*FAILED.*resume"):
        read(stopped, mark)


def test_an_index_past_the_plan_is_numpys_index_error(stopped):
    with pytest.raises(IndexError):
        stopped.activations(HP)[stopped.n_tokens + 5]
    with pytest.raises(IndexError):
        stopped.activations(HP)[-stopped.committed_tokens() - 1]


# -- 2. reductions and products of sparse latents ------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense(stopped):
    """The reference: the latents as a dense numpy matrix."""
    values = stopped.latents(HP).toarray()
    assert values.shape[0] == stopped.committed_tokens() and (values != 0).any() and (values == 0).any()
    return values


REDUCTIONS = {
    "mean0": lambda x: x.mean(axis=0), "mean1": lambda x: x.mean(axis=1), "mean": lambda x: x.mean(),
    "max0": lambda x: x.max(axis=0), "max1": lambda x: x.max(axis=1), "max": lambda x: x.max(),
    "min0": lambda x: x.min(axis=0), "min1": lambda x: x.min(axis=1), "min": lambda x: x.min(),
    "sum0": lambda x: x.sum(axis=0), "negmin0": lambda x: (-x).min(axis=0),
}
EXACT = {"max0", "max1", "max", "min0", "min1", "min", "negmin0"}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_dask_latents_reduce_like_numpy(stopped, dense, name):
    lazy = stopped.to_dask(LAT)
    assert lazy.numblocks[0] > 1  # the reduction combines blocks
    got, want = np.asarray(REDUCTIONS[name](lazy).compute()), REDUCTIONS[name](dense)
    assert got.shape == want.shape and got.dtype == want.dtype
    if name in EXACT:
        np.testing.assert_array_equal(got, want)
    else:  # sums: the same float32 values added in another order
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_in_memory_latents_reduce_like_numpy(stopped, dense, name):
    got, want = REDUCTIONS[name](stopped.latents(HP)), REDUCTIONS[name](dense)
    assert isinstance(got, (np.ndarray, np.generic)) and not isinstance(got, np.matrix), type(got)
    assert np.shape(got) == want.shape and got.dtype == want.dtype
    if name in EXACT:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_latents_times_a_dense_matrix(stopped, dense):
    w = np.random.default_rng(0).standard_normal((D_SAE, 5)).astype(np.float32)
    want = dense @ w
    lazy = stopped.to_dask(LAT) @ w
    assert lazy.shape == want.shape
    for got in (lazy.compute(), stopped.latents(HP) @ w, np.matmul(stopped.latents(HP), w)):
        assert isinstance(got, np.ndarray) and not isinstance(got, np.matrix) and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    decoded = (stopped.to_dask(LAT)[:7] @ w[:, 0]).compute()  # a vector: (rows,)
    np.testing.assert_allclose(decoded, dense[:7] @ w[:, 0], rtol=1e-5, atol=1e-5)


# -- a running job: the view is the rows committed when it was made; rows committed since are read --------------
def test_a_running_jobs_store_reads_its_committed_rows(gpt2_dir, tmp_path):
    from conftest import gate

    make_sae(tmp_path / "sae", "standard")
    hook, reached, release = gate(at_batch=6)
    job = ms.Workspace(str(tmp_path / "ws")).submit(gpt2_dir, "sample", saes={HP: str(tmp_path / "sae")},
                                                    before_batch=hook, **LAYOUT)
    try:
        assert reached.wait(60)
        ext = job.extraction()
        acts = ext.activations(HP)
        mark = len(acts)
        assert 0 < mark <= ext.committed_tokens() < ext.n_tokens
        np.testing.assert_array_equal(acts[:], np.asarray(acts.zarr[:mark]))
        assert mark <= ext.latents(HP).shape[0] <= ext.committed_tokens()  # the writer may still be committing
        with pytest.raises(InputError, match=r"past the [\d,]+ rows committed so far.*EXTRACTING.*still writing"):
            acts[:ext.n_tokens]
        release.set()
        assert job.wait(60).status == "COMPLETED"
        np.testing.assert_array_equal(acts[mark:ext.n_tokens], ext.activations(HP)[mark:])  # committed since
        assert len(acts) == mark  # the view keeps its length; a new one has every row
        assert len(ext.activations(HP)) == ext.n_tokens == ext.latents(HP).shape[0]
    finally:
        release.set()
        job.wait(60)
