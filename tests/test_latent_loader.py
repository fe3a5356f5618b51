"""SAE latents through the training loader and dask, over real stores: sparse batches equal the stored latents
row for row, dense and fixed forms agree, every row once over ranks and workers, exact resume, raw and latent
rows aligned, a store still being written read up to its mark, damage refused, dask blocks equal ext.latents."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import mistudio as ms
from mistudio.storage.codec import record_committed
from conftest import gate
from test_latents import make_sae as make_latents_sae, top_width

sl = pytest.importorskip("sae_lens")

RAW = "layers.1.residual"
LAT = f"{RAW}.latents"
D_SAE = 96
EOS = "<|endoftext|>"
LAYOUT = dict(layers=[1], hooks=["residual"], dtype="float32", max_length=40, batch_size=8, chunk_mb=0.01,
              shard_mb=0.04)


def texts(start: int, stop: int) -> list[str]:
    """Sample texts, every third with the tokenizer's special token inside, so exclude_special has work."""
    return [f"{t} {EOS} more" if i % 3 == 0 else t for i, t in enumerate(ms.sample_texts()[start:stop])]


def make_sae(folder: Path, architecture: str, seed: int = 0):
    """A SAELens SAE on layers.1.residual of the tiny GPT-2, random weights, saved to ``folder``."""
    return make_latents_sae(folder, architecture, seed, layer=1, d_sae=D_SAE)


@pytest.fixture(scope="module")
def store(gpt2_dir, tmp_path_factory):
    """(extraction with a top-k SAE's latents, the SAE, its latents as a dense array, the special-token mask)."""
    root = tmp_path_factory.mktemp("latloader")
    sae = make_sae(root / "sae", "topk")
    ext = ms.extract(gpt2_dir, texts(0, 120), saes={RAW: str(root / "sae")}, workspace=str(root / "ws"),
                     progress=False, **LAYOUT)
    dense = ext.latents(LAT).toarray()
    special = np.isin(ext.store.tokens("input_ids")[:], ext.tokenizer.all_special_ids)
    index = ext.latent_arrays(LAT)[0]
    assert index.chunks[0] != ext.activations(RAW).chunks[0], "latents and raw rows should be chunked apart"
    assert index.chunks[0] * 6 < ext.n_tokens and 0 < special.sum() < len(special)
    return ext, sae, dense, special


def drain(batches) -> dict[str, np.ndarray]:
    """Every batch's columns (sparse latents made dense) concatenated in yielded order."""
    out: dict[str, list] = {}
    for batch in batches:
        for key, value in batch.items():
            value = value.to_dense() if value.layout == torch.sparse_csr else value
            out.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(parts) for key, parts in out.items()}


@pytest.mark.parametrize("mode", ["in process", "num_workers=2"])
def test_a_sparse_epoch_equals_the_stored_latents_row_for_row(store, mode):
    ext, _, dense, _ = store
    width = ext.latent_info(LAT).width
    loader = ext.loader(LAT, batch_size=100, with_index=True, buffer_tokens=500,
                        num_workers=2 if mode == "num_workers=2" else 0)
    batches = list(loader)
    first = batches[0][LAT]
    assert first.layout == torch.sparse_csr and first.shape == (100, D_SAE) and first.dtype == torch.float32
    crow, col = first.crow_indices().numpy(), first.col_indices().numpy()
    for r in range(len(crow) - 1):  # each row: its fired latents, ascending
        assert np.all(np.diff(col[crow[r]:crow[r + 1]]) > 0)
    got = drain(batches)
    np.testing.assert_array_equal(np.sort(got["token_index"]), np.arange(ext.n_tokens))
    np.testing.assert_array_equal(got[LAT], dense[got["token_index"]])
    if mode == "in process":  # the buffer holds the fixed-width rows, never d_sae-wide ones
        it = iter(loader)
        next(it)
        assert {key: a.shape[1] for key, a in it.pool.items()} == {(LAT, "indices"): width, (LAT, "values"): width}
        assert width < D_SAE
        it.close()


def test_dense_and_fixed_forms_equal_the_sparse_one(store):
    ext, _, _, _ = store
    kw = dict(batch_size=64, seed=3, exclude_special=True)
    sparse = list(ext.loader(LAT, **kw))
    dense = list(ext.loader(LAT, latents="dense", **kw))
    fixed = list(ext.loader(LAT, latents="fixed", dtype="float64", **kw))
    assert len(sparse) == len(dense) == len(fixed) > 3
    stored = [a[:] for a in ext.latent_arrays(LAT)]
    for batch in ext.loader(LAT, latents="fixed", num_workers=2, with_index=True, **kw):  # lists in transit
        assert type(batch[LAT]) is tuple
        for got, want in zip(batch[LAT], stored):
            np.testing.assert_array_equal(got.numpy(), want[batch["token_index"].numpy()])
    for s, d, (index, values) in zip(sparse, dense, fixed):
        assert d.layout == torch.strided and d.shape == s.shape
        torch.testing.assert_close(s.to_dense(), d, rtol=0, atol=0)
        assert index.dtype == torch.int64 and values.dtype == torch.float64
        assert index.shape == values.shape == (len(d), ext.latent_info(LAT).width)
        rebuilt = torch.zeros(d.shape, dtype=torch.float64).scatter_add_(1, index, values)  # empty slots add 0
        torch.testing.assert_close(rebuilt.float(), d, rtol=0, atol=0)
    bf16 = next(iter(ext.loader(LAT, batch_size=64, dtype="bfloat16")))
    assert bf16.layout == torch.sparse_csr and bf16.dtype == torch.bfloat16


def test_every_row_once_over_ranks_and_workers(store):
    ext, _, dense, special = store
    kept = np.flatnonzero(~special)
    seen = []
    for rank in range(3):
        loader = ms.loader(ext, [RAW, LAT], batch_size=50, exclude_special=True, with_index=True, rank=rank,
                           world_size=3, num_workers=2, even_batches=False, buffer_tokens=400)
        got = drain(loader)
        np.testing.assert_array_equal(got[LAT], dense[got["token_index"]])
        np.testing.assert_array_equal(got[RAW], ext.activations(RAW)[:][got["token_index"]])
        seen.append(got["token_index"])
    everything = np.concatenate(seen)
    assert len(everything) == len(np.unique(everything))
    np.testing.assert_array_equal(np.sort(everything), kept)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_resumes_mid_epoch_exactly(store, workers):
    ext, _, _, _ = store
    kw = dict(batch_size=70, seed=9, exclude_special=True, with_index=True, buffer_tokens=600, num_workers=workers)
    full = list(ext.loader([LAT, RAW], **kw))
    it = iter(ext.loader([LAT, RAW], **kw))
    head = [next(it) for _ in range(len(full) // 2)]
    state = pickle.loads(pickle.dumps(it.state_dict()))
    it.close()
    resumed = iter(ext.loader([LAT, RAW], **kw))
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        assert got.keys() == want.keys()
        torch.testing.assert_close(got[LAT].to_dense(), want[LAT].to_dense(), rtol=0, atol=0)
        for key in (RAW, "token_index", "row", "store"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_a_mixed_batch_holds_the_same_tokens(store):
    """The latents of a batch are the SAE's encoding of the raw rows beside them (its largest ``width``)."""
    ext, sae, _, _ = store
    width = ext.latent_info(LAT).width
    batch = next(iter(ext.loader([RAW, LAT], batch_size=256, seed=1, latents="dense", with_index=True)))
    assert set(batch) == {RAW, LAT, "store", "row", "token_index"}
    with torch.no_grad():
        want = top_width(sae.encode(batch[RAW]).numpy(), width)
    np.testing.assert_allclose(batch[LAT].numpy(), want, rtol=1e-5, atol=1e-6)
    assert (batch[LAT] != 0).sum(1).float().mean() > 1  # latents that fired, not an empty batch


def test_stores_with_other_latent_widths_load_together(gpt2_dir, tmp_path):
    """Float16 stores of one SAE, 12 and 5 latents a token: the buffer holds 12, the narrow rows padded empty."""
    make_sae(tmp_path / "sae", "standard")
    kw = dict(saes={RAW: str(tmp_path / "sae")}, workspace=str(tmp_path / "ws"), progress=False,
              **{**LAYOUT, "dtype": "float16"})
    wide = ms.extract(gpt2_dir, texts(0, 30), latent_width=12, **kw)
    narrow = ms.extract(gpt2_dir, texts(30, 60), latent_width=5, **kw)
    loader = ms.loader([narrow, wide], LAT, batch_size=64, with_index=True)
    assert loader.row_widths == {(LAT, "indices"): 12, (LAT, "values"): 12}
    got = drain(loader)
    assert narrow.latent_arrays(LAT)[1].dtype == np.float16 and got[LAT].dtype == np.float32
    for s, ext in enumerate([narrow, wide]):
        mine = got["store"] == s
        np.testing.assert_array_equal(np.sort(got["token_index"][mine]), np.arange(ext.n_tokens))
        np.testing.assert_array_equal(got[LAT][mine], ext.latents(LAT).toarray()[got["token_index"][mine]])


def test_a_store_being_written_is_read_up_to_its_mark(gpt2_dir, tmp_path):
    make_sae(tmp_path / "sae", "topk")
    hook, reached, release = gate(at_batch=8)
    job = ms.Workspace(str(tmp_path / "ws")).submit(gpt2_dir, texts(0, 120), saes={RAW: str(tmp_path / "sae")},
                                                    before_batch=hook, **LAYOUT)
    try:
        assert reached.wait(60)
        ext = ms.open_extraction(job.store.location)
        loader = ext.loader([LAT, RAW], batch_size=64, with_index=True)
        mark = loader.limits[0]
        assert 0 < mark < ext.n_tokens
        got = drain(loader)
        np.testing.assert_array_equal(np.sort(got["token_index"]), np.arange(mark))
        np.testing.assert_array_equal(got[LAT], ext.latents(LAT, slice(0, mark)).toarray()[got["token_index"]])
        lazy = ext.to_dask(LAT)  # up to the mark when it is made (the writer may have moved it since)
        assert mark <= lazy.shape[0] <= ext.committed_tokens() < ext.n_tokens
        np.testing.assert_array_equal(lazy.compute().toarray(), ext.latents(LAT, slice(0, lazy.shape[0])).toarray())
    finally:
        release.set()
        job.wait(60)


def test_to_dask_equals_the_stored_latents(store):
    import dask.array as da

    ext, _, dense, _ = store
    lazy = ext.to_dask(LAT)
    index = ext.latent_arrays(LAT)[0]
    assert lazy.shape == (ext.n_tokens, D_SAE) and lazy.dtype == np.float32
    assert lazy.chunks[0][0] == index.chunks[0] and lazy.numblocks[0] == -(-ext.n_tokens // index.chunks[0])
    whole = lazy.compute()
    assert whole.format == "csr"
    np.testing.assert_array_equal(whole.toarray(), dense)
    np.testing.assert_allclose(lazy.sum(axis=0).compute(), dense.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(lazy.sum(axis=1).compute(), dense.sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(lazy.sum().compute(), dense.sum(), rtol=1e-5)
    np.testing.assert_array_equal((lazy > 0).sum(axis=0).compute(), (dense > 0).sum(axis=0))
    np.testing.assert_array_equal(da.count_nonzero(lazy, axis=0).compute(), (dense != 0).sum(axis=0))
    np.testing.assert_array_equal(lazy[37:555].compute().toarray(), dense[37:555])
    l0 = lazy.map_blocks(lambda b: np.diff(b.indptr)[:, None], dtype=np.int64, chunks=(lazy.chunks[0], (1,)),
                         meta=np.empty((0, 0), np.int64))
    np.testing.assert_array_equal(l0.compute().ravel(), (dense != 0).sum(axis=1))
    w = np.random.default_rng(0).standard_normal((D_SAE, 3)).astype(np.float32)
    np.testing.assert_allclose(da.tensordot(lazy, w, axes=1).compute(), dense @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ext.to_dask(LAT, latents="dense").compute(), dense)
    indices, values = ext.to_dask(LAT, latents="fixed")
    stored = ext.latent_arrays(LAT)
    np.testing.assert_array_equal(indices.compute(), stored[0][:])
    np.testing.assert_array_equal(values.compute(), stored[1][:])
    restored = pickle.loads(pickle.dumps(lazy))  # blocks reopen the store by location (dask.distributed)
    np.testing.assert_allclose(restored.sum(axis=0).compute(scheduler="sync"), dense.sum(axis=0), rtol=1e-5)


def test_a_latent_index_past_d_sae_is_damage(store, tmp_path):
    ext, _, _, _ = store
    past = Path(shutil.copytree(ext.location, tmp_path / "past.zarr"))
    indices = zarr.open_array(str(past), path=f"latents/{RAW}/indices", mode="r+")
    values = zarr.open_array(str(past), path=f"latents/{RAW}/values", mode="r+")
    row = ext.n_tokens - 3
    indices[row, 0], values[row, 0] = D_SAE + 7, 2.0
    record_committed([indices, values], 0, indices.shape[0])  # the chunk records agree: only the values can tell
    bad = ms.open_extraction(str(past))
    for form in ("sparse", "dense", "fixed"):
        with pytest.raises(ms.StoreCorrupted, match=rf"latents/{RAW}/indices.*latent index {D_SAE + 7} is past "
                                                    rf"the SAE's {D_SAE} latents \(row {row}\)"):
            list(bad.loader(LAT, batch_size=64, latents=form))
    with pytest.raises(ms.StoreCorrupted, match=rf"latent index {D_SAE + 7} is past") as caught:
        list(bad.loader([RAW, LAT], batch_size=64, num_workers=2))
    assert str(caught.value).startswith(f"store {past}") and "Traceback" not in str(caught.value)  # the message
    with pytest.raises(ms.StoreCorrupted, match=rf"latent index {D_SAE + 7} is past"):
        bad.to_dask(LAT).sum(axis=0).compute()
    with pytest.raises(ms.StoreCorrupted, match=rf"latent index {D_SAE + 7} is past"):
        bad.to_dask(LAT, latents="fixed")[0].compute()


def test_options_that_do_not_apply_are_refused(store):
    ext, _, _, _ = store
    with pytest.raises(ms.InputError, match=r"normalize='mean_std' does not apply to SAE latents "
                                            rf"\({RAW}\.latents\): pass normalize=None"):
        ext.loader([RAW, LAT], normalize="mean_std")
    with pytest.raises(ms.InputError, match=r"latents='csr' must be one of \('sparse', 'dense', 'fixed'\)"):
        ext.loader(LAT, latents="csr")
    with pytest.raises(ms.InputError, match=r"'layers\.0\.residual\.latents' holds no SAE latents"):
        ext.loader("layers.0.residual.latents")
    with pytest.raises(ms.InputError, match=r"latents='fixed' is for SAE latents.*raw hook point"):
        ext.to_dask(RAW, latents="fixed")
    with pytest.raises(ms.InputError, match=r"latents='coo' must be one of"):
        ext.to_dask(LAT, latents="coo")
