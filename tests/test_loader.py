"""The training loader over real stores: once per epoch, shuffled, deterministic, resumable, sharded, bounded."""
from __future__ import annotations

import copy
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

import mistudio as ms
from mistudio.analysis.loader import LoaderIterator
from conftest import gate

HPS = ["layers.0.residual", "layers.1.residual"]
EOS = "<|endoftext|>"
ARGS = dict(layers=[0, 1], hooks=["residual"], dtype="float32", chunk_mb=0.02, max_length=64, progress=False)


def texts(start: int, stop: int) -> list[str]:
    """Sample texts, every third with the tokenizer's special token inside, so exclude_special has work."""
    return [f"{t} {EOS} more" if i % 3 == 0 else t for i, t in enumerate(ms.sample_texts()[start:stop])]


@pytest.fixture(scope="module")
def store(gpt2_dir, tmp_path_factory):
    ext = ms.extract(gpt2_dir, texts(0, 200), workspace=str(tmp_path_factory.mktemp("loader")), **ARGS)
    ids = ext.store.group["tokens/input_ids"][:]
    special = np.isin(ids, ext.tokenizer.all_special_ids)
    assert ext.activations(HPS[0]).chunks[0] * 20 < ext.n_tokens and 0 < special.sum() < len(ids)
    return ext, {hp: ext.activations(hp)[:] for hp in HPS}, special


@pytest.fixture(scope="module")
def second(gpt2_dir, tmp_path_factory):
    return ms.extract(gpt2_dir, texts(300, 360), workspace=str(tmp_path_factory.mktemp("loader2")), **ARGS)


def drain(batches) -> dict[str, np.ndarray]:
    """Every batch's columns, concatenated in yielded order."""
    out: dict[str, list] = {}
    for batch in batches:
        for key, value in batch.items():
            out.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(parts) for key, parts in out.items()}


def assert_once(got: dict, ref: dict, expected: np.ndarray) -> None:
    """The yielded token indices are exactly ``expected`` (each once) and each row is the stored row."""
    np.testing.assert_array_equal(np.sort(got["token_index"]), expected)
    for hp in HPS:
        np.testing.assert_array_equal(got[hp], ref[hp][got["token_index"]])


@pytest.mark.parametrize("exclude_special", [False, True])
@pytest.mark.parametrize("mode", ["in process", "torch DataLoader, 2 workers", "num_workers=2"])
def test_every_token_once_per_epoch(store, mode, exclude_special):
    ext, ref, special = store
    expected = np.flatnonzero(~special) if exclude_special else np.arange(ext.n_tokens)
    kw = dict(batch_size=256, seed=3, exclude_special=exclude_special, with_index=True)
    if mode == "in process":
        loader = ext.loader(HPS, **kw)
        batches = list(loader)
    elif mode == "num_workers=2":
        loader = ext.loader(HPS, num_workers=2, **kw)
        batches = list(loader)
    else:
        loader = ext.loader(HPS, **kw)
        loader.set_epoch(0)
        batches = list(DataLoader(loader, batch_size=None, num_workers=2))
    got = drain(batches)
    assert_once(got, ref, expected)
    assert all(len(b["token_index"]) == 256 for b in batches[:-2])  # each worker's last batch may be partial
    assert (got["store"] == 0).all() and batches[0][HPS[0]].dtype == torch.float32


def test_workers_forked_while_a_job_runs_leave_it_alone(store, gpt2_dir, tmp_path, capfd):
    """DataLoader workers forked while an extraction runs in this process inherit its runner but not its thread:
    at their exit they must not wait for that job (torch's 5 s join timeout a worker, every epoch) nor tell the
    user to press Ctrl-C to cancel it."""
    ext, ref, _ = store
    hook, reached, release = gate(1)
    job = ms.Workspace(tmp_path / "ws").submit(gpt2_dir, texts(0, 40), batch_size=4, before_batch=hook,
                                               **{k: v for k, v in ARGS.items() if k != "progress"})
    try:
        assert reached.wait(60), job.error
        got = drain(ext.loader(HPS, batch_size=256, seed=1, with_index=True, num_workers=2))
    finally:
        release.set()
    assert_once(got, ref, np.arange(ext.n_tokens))
    assert job.wait(120).status == "COMPLETED", job.error
    assert "waiting for" not in capfd.readouterr().err


def test_workers_split_the_chunks(store):
    ext, _, _ = store
    loader = ext.loader(HPS[0], batch_size=128, with_index=True, buffer_tokens=128)
    shares = []
    for worker in range(2):
        it = LoaderIterator(loader, 0, worker, 2)
        shares.append({int(t) // loader.chunk_rows[0] for b in it for t in b["token_index"]})
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == loader.n_chunks


def test_order_depends_on_seed_and_epoch_only(store):
    ext, _, _ = store

    def order(seed, epoch=None, loader=None):
        loader = loader or ext.loader(HPS[0], batch_size=512, seed=seed, with_index=True)
        if epoch is not None:
            loader.set_epoch(epoch)
        return drain(loader)["token_index"]

    first = order(0)
    np.testing.assert_array_equal(first, order(0))
    np.testing.assert_array_equal(first, order(0, epoch=0))
    assert not np.array_equal(first, order(1))
    assert not np.array_equal(first, order(0, epoch=1))
    counting = ext.loader(HPS[0], batch_size=512, seed=0, with_index=True)  # each iter() is the next epoch
    epochs = [drain(counting)["token_index"] for _ in range(2)]
    np.testing.assert_array_equal(epochs[0], first)
    np.testing.assert_array_equal(epochs[1], order(0, epoch=1))


def test_shuffled_rows_are_rarely_stored_neighbours(store):
    ext, ref, _ = store
    shuffled = drain(ext.loader(HPS[0], batch_size=64, with_index=True))["token_index"]
    assert np.mean(np.abs(np.diff(shuffled)) == 1) < 0.02
    plain = drain(ext.loader(HPS[0], batch_size=100, shuffle=False, with_index=True))
    np.testing.assert_array_equal(plain["token_index"], np.arange(ext.n_tokens))
    batches = list(ext.loader(HPS[0], batch_size=100, shuffle=False))
    assert all(isinstance(b, torch.Tensor) and b.shape == (100, 32) for b in batches[:-1])
    np.testing.assert_array_equal(torch.cat(batches).numpy(), ref[HPS[0]])


def test_drop_last_and_dtype(store):
    ext, _, _ = store
    batches = list(ext.loader(HPS[0], batch_size=500, drop_last=True, dtype="bfloat16"))
    assert len(batches) == ext.n_tokens // 500 and all(b.shape == (500, 32) for b in batches)
    assert batches[0].dtype == torch.bfloat16


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_mid_epoch_continues_identically(store, shuffle):
    ext, _, _ = store
    kw = dict(batch_size=100, seed=5, shuffle=shuffle, exclude_special=True, with_index=True, buffer_tokens=1000)
    full = list(ext.loader(HPS, **kw))
    it = iter(ext.loader(HPS, **kw))
    head = [next(it) for _ in range(7)]
    state = pickle.loads(pickle.dumps(it.state_dict()))
    it.close()
    resumed = iter(ext.loader(HPS, **kw))
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_buffer_is_bounded(store):
    ext, ref, _ = store
    loader = ext.loader(HPS[0], batch_size=64, buffer_tokens=300, with_index=True)
    it = iter(loader)
    got = drain(it)
    run = loader.slot_rows  # one chunk here (an unsharded store)
    assert run == loader.chunk_rows[0] and loader.lanes == -(-300 // run)  # lanes hold >= 300 rows, < 300 + a run
    assert 300 <= it.peak_rows <= loader.lanes * run < 300 + run
    assert it.capacity == (loader.lanes + 2) * run  # + 2 runs read ahead (prefetch)
    np.testing.assert_array_equal(np.sort(got["token_index"]), np.arange(ext.n_tokens))
    assert loader.buffer_tokens == 300 and loader.prefetch == 2


def test_in_progress_store_only_up_to_the_commit_mark(gpt2_dir, tmp_path):
    gate_hook, reached, release = gate(12)

    job = ms.Workspace(str(tmp_path)).submit(gpt2_dir, texts(0, 200), batch_size=8, before_batch=gate_hook,
                                             **{k: v for k, v in ARGS.items() if k != "progress"})
    try:
        assert reached.wait(60)
        ext = ms.open_extraction(job.store.location)
        assert ext.status == "EXTRACTING"
        loader = ext.loader(HPS, batch_size=64, with_index=True)
        mark = loader.limits[0]  # the commit mark when the loader was made (the writer may still move it)
        assert 0 < mark <= ext.committed_tokens() < ext.n_tokens
        got = drain(loader)
        np.testing.assert_array_equal(np.sort(got["token_index"]), np.arange(mark))
        np.testing.assert_array_equal(got[HPS[1]], ext.activations(HPS[1])[:mark][got["token_index"]])
    finally:
        release.set()
        job.wait(60)


def test_two_stores_together(store, second, tmp_path, gpt2_dir):
    ext, ref, _ = store
    got = drain(ms.loader([ext, second], HPS, batch_size=256, with_index=True))
    assert len(got["store"]) == ext.n_tokens + second.n_tokens
    for s, (e, rows) in enumerate([(ext, ref), (second, {hp: second.activations(hp)[:] for hp in HPS})]):
        mine = got["store"] == s
        np.testing.assert_array_equal(np.sort(got["token_index"][mine]), np.arange(e.n_tokens))
        for hp in HPS:
            np.testing.assert_array_equal(got[hp][mine], rows[hp][got["token_index"][mine]])
    other = ms.extract(gpt2_dir, texts(0, 10), workspace=str(tmp_path), **{**ARGS, "layers": [2]})
    with pytest.raises(ms.InputError, match="layers.0.residual"):
        ms.loader([ext, other], HPS)


def test_stored_special_mask_is_used_when_present(store, tmp_path):
    ext, ref, _ = store
    copy_path = tmp_path / "copy.zarr"
    shutil.copytree(ext.location, copy_path)
    marked = np.zeros(ext.n_tokens, bool)
    marked[::7] = True  # the loader reads the stored mask (every new store has one), not the tokenizer
    zarr.open_group(str(copy_path), mode="r+")["tokens"].create_array("special", data=marked, overwrite=True)
    got = drain(ms.open_extraction(str(copy_path)).loader(HPS, batch_size=256, exclude_special=True,
                                                          with_index=True))
    assert_once(got, ref, np.flatnonzero(~marked))


def test_normalize_is_a_function_of_the_call(store, tmp_path):
    """mean_std is per feature whether or not feature_stats are cached: the same call gives the same numbers
    before and after a feature page cached them, and a state taken before resumes onto the same values."""
    ext, ref, _ = store
    copy_path = tmp_path / "copy.zarr"  # feature_stats are cached below: keep the fixture's store clean
    shutil.copytree(ext.location, copy_path)
    other = ms.open_extraction(str(copy_path))
    kw = dict(batch_size=512, seed=1, with_index=True)
    it = iter(other.loader(HPS, normalize="mean_std", **kw))
    next(it)
    state = it.state_dict()
    before = drain(it)
    for hp in HPS:
        x = ref[hp].astype(np.float64)
        np.testing.assert_allclose(before[hp], (x[before["token_index"]] - x.mean(0)) / x.std(0), rtol=1e-4,
                                   atol=1e-4)
    unit = drain(other.loader(HPS, normalize="unit_norm", **kw))
    assert abs(np.mean(np.sum(unit[HPS[0]].astype(np.float64) ** 2, axis=1)) - 1) < 1e-3
    for hp in HPS:
        other.feature_stats(hp, bins=8)  # what a feature page computes and caches in the store
    resumed = iter(other.loader(HPS, normalize="mean_std", **kw))
    resumed.load_state_dict(state)
    after = drain(resumed)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    again = drain(other.loader(HPS, normalize="unit_norm", **kw))
    for key in unit:
        np.testing.assert_array_equal(again[key], unit[key])


def test_normalize_with_exclude_special_uses_the_rows_it_yields(store, tmp_path):
    """With exclude_special, the constants come from the kept rows alone: special tokens (a BOS can have a norm
    far above the rest) move neither the per-feature mean and std nor the unit_norm factor."""
    ext, ref, special = store
    copy_path = tmp_path / "copy.zarr"  # the constants are cached below: keep the fixture's store clean
    shutil.copytree(ext.location, copy_path)
    other = ms.open_extraction(str(copy_path))
    kw = dict(batch_size=512, seed=2, with_index=True, exclude_special=True)
    got = drain(other.loader(HPS, normalize="mean_std", **kw))
    kept = ~special
    for hp in HPS:
        x = ref[hp].astype(np.float64)
        mean, std = x[kept].mean(0), x[kept].std(0)
        rows = x[got["token_index"]]
        assert not np.allclose((rows - x.mean(0)) / x.std(0), (rows - mean) / std, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[hp], (rows - mean) / std, rtol=1e-4, atol=1e-4)
    unit = drain(other.loader(HPS, normalize="unit_norm", **kw))
    for hp in HPS:
        assert abs(np.mean(np.sum(unit[hp].astype(np.float64) ** 2, axis=1)) - 1) < 1e-3
    again = drain(other.loader(HPS, normalize="unit_norm", **kw))  # from the cache now: the same values
    for key in unit:
        np.testing.assert_array_equal(again[key], unit[key])


def test_a_state_records_what_its_rows_are(store):
    """Hook points, normalize (and its constants) and dtype are in a state: resuming with others is refused by
    name; a state from before they were recorded resumes (the rest checked)."""
    ext, _, _ = store
    kw = dict(batch_size=256, seed=3, with_index=True)
    it = iter(ext.loader(HPS, **kw))
    next(it)
    state = it.state_dict()
    rest = drain(it)
    for hook_points, change, needle in [(HPS[::-1], {}, r"hook_points=\['layers.0.residual', 'layers.1.residual'\]"),
                                        (HPS[:1], {}, r"loader with hook_points=\['layers.0"),
                                        (HPS, {"normalize": "mean_std"}, "loader with normalize=None"),
                                        (HPS, {"dtype": "float16"}, "loader with dtype='float32'")]:
        with pytest.raises(ms.InputError, match=needle) as exc:
            iter(ext.loader(hook_points, **{**kw, **change})).load_state_dict(state)
        assert exc.value.param == "state"
    normalized = iter(ext.loader(HPS, normalize="unit_norm", **kw))
    next(normalized)
    tampered = normalized.state_dict()
    assert len(tampered["settings"]["norm_constants"]) == 16
    tampered["settings"]["norm_constants"] = "0" * 16
    with pytest.raises(ms.InputError, match="other normalization constants"):
        iter(ext.loader(HPS, normalize="unit_norm", **kw)).load_state_dict(tampered)
    old = copy.deepcopy(state)
    for key in ("hook_points", "normalize", "dtype", "norm_constants"):
        del old["settings"][key]
    resumed = iter(ext.loader(HPS, **kw))
    resumed.load_state_dict(old)
    got = drain(resumed)
    for key in rest:
        np.testing.assert_array_equal(got[key], rest[key])
    for made, into, needle in [(0, 2, "taken by a loader made with num_workers=0 .*, this is a loader made with "
                                         "num_workers=2 .*: resume with the num_workers it was taken with"),
                               (2, 0, "taken by a loader made with num_workers=2"), (2, 3, "num_workers=3")]:
        taken = iter(ext.loader(HPS, num_workers=made, **kw)) if made else iter(ext.loader(HPS, **kw))
        with pytest.raises(ms.InputError, match=needle):  # num_workers named, not a field of the state
            iter(ext.loader(HPS, num_workers=into, **kw) if into else ext.loader(HPS, **kw)).load_state_dict(
                taken.state_dict())
        getattr(taken, "close", lambda: None)()
    del old["settings"]["seed"]  # the older states' other settings are still all there
    with pytest.raises(ms.InputError, match="not a dict with keys"):
        iter(ext.loader(HPS, **kw)).load_state_dict(old)
    partial = copy.deepcopy(state)
    del partial["settings"]["dtype"]  # one of them missing is not an older state
    with pytest.raises(ms.InputError, match="not a dict with keys"):
        iter(ext.loader(HPS, **kw)).load_state_dict(partial)


def test_loader_pickles_for_spawned_workers(store):
    ext, _, _ = store
    loader = ext.loader(HPS[0], batch_size=256, with_index=True)
    clone = pickle.loads(pickle.dumps(loader))
    np.testing.assert_array_equal(drain(clone)["token_index"], drain(loader)["token_index"])


def test_remote_store_through_fsspec(gpt2_dir):
    ext = ms.extract(gpt2_dir, texts(0, 40), workspace="memory://mistudio-loader/ws", **ARGS)
    ref = ext.activations(HPS[0])[:]
    got = drain(ms.open_extraction(ext.location).loader([HPS[0]], batch_size=128, with_index=True))
    np.testing.assert_array_equal(np.sort(got["token_index"]), np.arange(ext.n_tokens))
    np.testing.assert_array_equal(got[HPS[0]], ref[got["token_index"]])
    assert not ext.feature_stats(HPS[0], bins=4).cached and ext.feature_stats(HPS[0], bins=4).cached
    np.testing.assert_allclose(ext.feature_stats(HPS[0], bins=4).max, ref.max(0))


@pytest.mark.parametrize("buffer_tokens", [128, 2000])
def test_resume_from_every_batch(store, second, buffer_tokens):
    """A state taken after any batch (the first, the last, after the end) resumes exactly; over two stores."""
    ext, _, _ = store
    kw = dict(batch_size=1024, seed=2, exclude_special=True, with_index=True, buffer_tokens=buffer_tokens)
    full = [b["token_index"].numpy() for b in ms.loader([ext, second], HPS[0], **kw)]
    for cut in range(len(full) + 1):
        it = iter(ms.loader([ext, second], HPS[0], **kw))
        for _ in range(cut):
            next(it)
        state = it.state_dict()
        resumed = iter(ms.loader([ext, second], HPS[0], **kw))
        for again in range(2 if cut == 1 else 1):  # an iterator that has finished can load a state again
            resumed.load_state_dict(state)
            tail = [b["token_index"].numpy() for b in resumed]
            assert len(tail) == len(full) - cut
            for got, want in zip(tail, full[cut:]):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_token_index_is_the_token_on_an_exclude_special_store(gpt2_dir, tmp_path, second, num_workers):
    """A store made with exclude_special=True has no row for its special tokens: ``token_index`` is the token
    (the index into tokens/*), ``row`` the activation row, with another store (a row per token) alongside."""
    ext = ms.extract(gpt2_dir, texts(0, 60), exclude_special=True, workspace=str(tmp_path), **ARGS)
    ids, special = ext.store.tokens("input_ids")[:], ext.store.tokens("special")[:].astype(bool)
    assert special.sum() > 0 and ext.n_tokens == len(ids) - special.sum()
    x = ext.activations(HPS[0])[:]
    got = drain(ms.loader([ext, second], HPS, batch_size=100, with_index=True, num_workers=num_workers))
    mine = got["store"] == 0
    rows, tokens = got["row"][mine], got["token_index"][mine]
    np.testing.assert_array_equal(np.sort(rows), np.arange(ext.n_tokens))
    np.testing.assert_array_equal(tokens, ext.token_index(rows))
    assert not special[tokens].any() and (tokens != rows).any()
    np.testing.assert_array_equal(got[HPS[0]][mine], x[rows])
    np.testing.assert_array_equal(got["token_index"][~mine], got["row"][~mine])  # a row per token there
    np.testing.assert_array_equal(got[HPS[0]][~mine], second.activations(HPS[0])[:][got["row"][~mine]])
    if num_workers:
        return
    for e in ext.top_examples(HPS[0], 5, k=10, context=3):  # the same meaning in top examples
        assert e["token_index"] == e["input_index"] == int(ext.token_index(e["activation_row"]))
        assert int(ids[e["token_index"]]) == e["token_id"] and e["value"] == float(x[e["activation_row"], 5])
    assert any(e["token_index"] != e["activation_row"] for e in ext.top_examples(HPS[0], 5, k=10, context=3))


def test_top_examples_cached_with_the_old_meaning_are_not_served(store, tmp_path):
    """An entry cached when ``token_index`` was the activation row is computed again, not served."""
    from mistudio.analysis import stats
    ext, _, _ = store
    copy_path = tmp_path / "copy.zarr"
    shutil.copytree(ext.location, copy_path)
    other = ms.open_extraction(str(copy_path))
    old = [{"value": 1e9, "token_index": 0, "input_index": 0}]
    assert stats.cache_write(other, stats.cache_path("top_examples", HPS[0], "feature=5,k=3,context=2"),
                             other.committed_tokens(), {"examples": json.dumps(old)}, {})
    top = other.top_examples(HPS[0], 5, k=3, context=2)
    assert not top.cached and top[0]["value"] < 1e9 and "activation_row" in top[0]


@pytest.fixture(scope="module")
def by_dtype(gpt2_dir, tmp_path_factory):
    """The same tokens stored as bfloat16, float16 and float32."""
    ws = str(tmp_path_factory.mktemp("dtypes"))
    return {dtype: ms.extract(gpt2_dir, texts(0, 30), workspace=ws, **{**ARGS, "dtype": dtype})
            for dtype in ("bfloat16", "float16", "float32")}


@pytest.mark.parametrize("dtypes", [("bfloat16", "float16"), ("float32", "bfloat16"),
                                    ("float16", "bfloat16", "float32")])
@pytest.mark.parametrize("out", ["float32", "bfloat16"])
def test_stores_of_mixed_storage_dtypes_load_exact_rows(by_dtype, dtypes, out):
    """bfloat16 with float16 or float32 stores: every row exact, cast once to the loader's dtype."""
    stores = [by_dtype[d] for d in dtypes]
    got: dict[str, list] = {}
    for batch in ms.loader(stores, HPS, batch_size=64, with_index=True, dtype=out):
        for key, value in batch.items():
            assert key not in HPS or value.dtype == getattr(torch, out)
            got.setdefault(key, []).append(value)
    got = {key: torch.cat(parts) for key, parts in got.items()}
    for s, ext in enumerate(stores):
        mine = got["store"] == s
        assert int(mine.sum()) == ext.n_tokens
        for hp in HPS:
            stored = ext.activations(hp)[:].astype(np.float32)[got["row"][mine].numpy()]
            want = torch.from_numpy(stored).to(getattr(torch, out))
            assert torch.equal(got[hp][mine], want), (dtypes, out, s, hp)


def _extract_in_child(model: str, root: str) -> None:
    ext = ms.extract(model, texts(0, 4), workspace=root, **ARGS)
    assert ext.record.status == "COMPLETED"


def test_a_forked_child_extracts_in_a_workspace_its_parent_used(gpt2_dir, tmp_path):
    """A process forked after this one used a workspace (a pool, a DataLoader worker) inherited its runner without
    the runner's thread: its own ms.extract there waited forever. It runs its job on a runner of its own."""
    import multiprocessing

    root = str(tmp_path / "ws")
    ms.extract(gpt2_dir, texts(0, 4), workspace=root, **ARGS)  # the parent's runner exists now
    child = multiprocessing.get_context("fork").Process(target=_extract_in_child, args=(gpt2_dir, root))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert (ms.Workspace(root).extractions()["status"] == "COMPLETED").sum() == 2
