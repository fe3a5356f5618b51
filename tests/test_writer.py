"""The store writer on real stores: sharded arrays (format 2), concurrent shard writes, resume inside a
shard, version-1 stores, verify on shards, and tokenization while the weights load."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mistudio as ms
from mistudio import plan as plan_module
from mistudio import runner as runner_module
from mistudio.storage import codec
from mistudio.errors import StoreCorrupted
from mistudio.storage.verify import verify
from mistudio.storage.metadata import ExtractionMeta, new_nonce
from mistudio.storage.stats import HookStats
from mistudio.storage.store import ExtractionStore
from mistudio.storage.writer import ChunkWriter

from conftest import TEXTS, allocated_store

BASE = dict(layers=[0, 2], hooks=["residual", "mlp", "attention"], batch_size=2, dtype="float32", chunk_mb=0.01)
SHARDED = dict(BASE, shard_mb=0.032)  # 64-row chunks of d=32 float32, 4 per shard: 256-row shards
DATA = TEXTS * 8
HP = "layers.2.residual"


def values(ext) -> dict:
    return {hp: ext.activations(hp)[:] for hp in ext.hook_points}


@pytest.fixture(scope="module")
def reference(gpt2_dir, tmp_path_factory):
    """An unsharded (version 1 layout) completed store's values."""
    ws = str(tmp_path_factory.mktemp("writer") / "ws")
    ext = ms.extract(gpt2_dir, DATA, workspace=ws, progress=False, **BASE, shard_mb=0)
    assert ext.metadata["format_version"] == 1 and ext.activations(HP).shards is None
    return values(ext), ext.metadata["statistics"]


def test_sharded_store_equals_unsharded(gpt2_dir, workspace, reference):
    ref, ref_stats = reference
    ext = ms.extract(gpt2_dir, DATA, workspace=workspace, progress=False, **SHARDED)
    a = ext.activations(HP)
    assert ext.metadata["format_version"] == 2 and a.shards == (256, 32) and a.chunks == (64, 32)
    storage = ext.metadata["storage"]
    assert (storage["checksum"], storage["shard_rows"]) == (True, 256) and ext.n_tokens > 3 * 256
    got = values(ext)
    for hp in ref:
        np.testing.assert_array_equal(got[hp], ref[hp])
    assert ext.metadata["statistics"] == ref_stats
    report = ext.verify()
    n_token_arrays = len(list(ext.store.group["tokens"].array_keys()))  # one chunk each here
    units = len(ext.hook_points) * -(-ext.n_tokens // 256)
    assert report.ok and report.chunks_checked == units + n_token_arrays, str(report)
    files = sorted(p.name for p in (Path(ext.location) / "activations" / HP / "c").iterdir())
    assert files == [str(i) for i in range(-(-ext.n_tokens // 256))]  # one file per shard, no leftovers
    assert ext.to_xarray()[HP].shape == ref[HP].shape


def test_resume_after_cancel_mid_shard_equals_clean_run(gpt2_dir, workspace, reference):
    ref, ref_stats = reference
    holder = []

    def cancel_at(index: int, batch: int) -> None:
        if index == 14:  # after 1,402 tokens: inside the sixth 256-row shard
            holder[0].cancel()

    holder.append(ms.Workspace(workspace).submit(gpt2_dir, DATA, before_batch=cancel_at, **SHARDED))
    job = holder[0]
    assert job.wait(120).status == "CANCELLED"
    mark = job.meta["progress"]["tokens_committed"]
    assert 256 < mark < job.meta["progress"]["tokens_total"] and mark % 256, "the mark should cut a shard"
    assert verify(job.extraction().location).ok
    resumed = job.resume()
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    ext = resumed.extraction()
    got = values(ext)
    for hp in ref:
        np.testing.assert_array_equal(got[hp], ref[hp])
    for hp, stats in ref_stats.items():  # sums in another order: equal to rounding
        assert ext.metadata["statistics"][hp]["count"] == stats["count"]
        assert ext.metadata["statistics"][hp]["mean"] == pytest.approx(stats["mean"], rel=1e-6, abs=1e-9)
    assert ext.verify().ok


def _store(location: str, n_samples: int, length: int, hooks: int, width: int, **layout) -> ExtractionStore:
    return allocated_store(location, [np.full(length, 3, np.int32)] * n_samples,
                           {f"layers.{i}.residual": width for i in range(hooks)}, "float32", **layout)


def test_concurrent_shard_writes_never_lose_rows(tmp_path, monkeypatch):
    """Six hook points written in parallel, batches of random sizes, flushes in the middle (a partial chunk
    written, then written whole in a copy of its shard): every row lands, and no unit ever has two writes at once."""
    store = _store(str(tmp_path / "s.zarr"), 300, 13, hooks=6, width=16, chunk_mb=0.004, shard_mb=0.02)
    arr = store.activations("layers.0.residual")
    assert arr.shards == (320, 16) and arr.chunks == (64, 16)
    active, overlaps, most = set(), [], [0]
    lock = threading.Lock()
    real_append = codec.UnitWriter.append

    def watched(self, chunk, pieces, **kw):
        key = (self.arr.path, chunk // self.g.per_shard)
        with lock:
            overlaps.append(key) if key in active else active.add(key)
            most[0] = max(most[0], len(active))
        time.sleep(0.01)
        try:
            real_append(self, chunk, pieces, **kw)
        finally:
            with lock:
                active.discard(key)

    monkeypatch.setattr(codec.UnitWriter, "append", watched)
    rng = np.random.default_rng(1)
    full = {hp: rng.standard_normal((300 * 13, 16)).astype(np.float32) for hp in store.meta["hook_points"]}
    writer = ChunkWriter(store, 0)
    done = 0
    while done < 300:
        n = min(300 - done, int(rng.integers(1, 40)))
        writer.put(n, {f"activations/{hp}": v[done * 13:(done + n) * 13] for hp, v in full.items()},
                   {hp: HookStats.empty() for hp in full})
        done += n
        if rng.random() < 0.1:
            writer.flush()
            assert store.record.progress.samples_committed == done
    writer.close()
    assert not overlaps and most[0] > 1
    assert store.record.progress.tokens_committed == 300 * 13
    for hp, v in full.items():
        np.testing.assert_array_equal(store.activations(hp)[:], v)
    store.update(status="COMPLETED")
    assert verify(store.location).ok


@pytest.mark.parametrize("shard_mb,start,stop", [
    (0.02, 0, 320), (0.02, 0, 150), (0.02, 320, 640), (0.02, 640, 650), (0.02, 640, 700),  # 320-row shards
    (0, 0, 64), (0, 0, 30), (0, 640, 660), (0, 640, 700)])  # 64-row chunks
def test_fast_unit_files_equal_zarrs_own(tmp_path, shard_mb, start, stop):
    """A unit the writer encodes itself (whole, partial, the array's short last one; sharded or not) is
    byte for byte the file Zarr writes for the same rows."""
    n_rows, unit = 700, (320 if shard_mb else 64)
    ours = _store(str(tmp_path / "ours.zarr"), n_rows // 10, 10, hooks=1, width=16, chunk_mb=0.004, shard_mb=shard_mb)
    theirs = _store(str(tmp_path / "theirs.zarr"), n_rows // 10, 10, hooks=1, width=16, chunk_mb=0.004,
                    shard_mb=shard_mb)
    assert ours.activations("layers.0.residual").shards == ((320, 16) if shard_mb else None)
    data = np.random.default_rng(0).standard_normal((stop - start, 16)).astype(np.float32)
    cut = (stop - start) // 3
    arr = ours.activations("layers.0.residual")
    writer = codec.UnitWriter(arr, codec.Geometry.of(arr))
    pieces, step = [data[:cut], data[cut:]], 64
    for a in range(start, stop, step):  # chunk by chunk, each from views of the pieces (no copy)
        b = min(a + step, stop)
        writer.append(a // step, [p[max(a, s) - s:min(b, s + len(p)) - s] for p, s in zip(pieces, (start, start + cut))
                                  if max(a, s) < min(b, s + len(p))])
    writer.close()
    theirs.activations("layers.0.residual")[start:stop] = data
    rel = f"activations/layers.0.residual/c/{start // unit}/0"
    assert (tmp_path / "ours.zarr" / rel).read_bytes() == (tmp_path / "theirs.zarr" / rel).read_bytes()
    np.testing.assert_array_equal(ours.activations("layers.0.residual")[start:stop], data)


def test_version_1_store_opens_reads_verifies_resumes(gpt2_dir, workspace, reference):
    """A store as the previous code wrote it (format 1: no shards, no shard_mb parameter) keeps working."""
    ref, _ = reference

    def fail_at(index: int, batch: int) -> None:
        if index == 30:
            raise RuntimeError("stop here")

    job = ms.Workspace(workspace).submit(gpt2_dir, DATA, before_batch=fail_at, **BASE, shard_mb=0)
    assert job.wait(120).status == "FAILED"
    store = ms.Workspace(workspace).store(job.id, writable=True)
    record = store.record.to_json()
    params = {k: v for k, v in record["params"].items() if k != "shard_mb"}
    store.group.attrs.update({"mistudio": {**record, "format_version": 1, "params": params}})
    ext = ms.open_extraction(job.id, workspace=workspace)
    mark = ext.metadata["progress"]["tokens_committed"]
    assert ext.metadata["format_version"] == 1 and 0 < mark and ext.activations(HP).shards is None
    np.testing.assert_array_equal(ext.activations(HP)[:mark], ref[HP][:mark])
    assert ext.verify().ok
    resumed = ms.Workspace(workspace).resume(job.id)
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    ext = ms.open_extraction(job.id, workspace=workspace)
    assert ext.metadata["format_version"] == 1 and ext.activations(HP).shards is None
    got = values(ext)
    for hp in ref:
        np.testing.assert_array_equal(got[hp], ref[hp])
    assert ext.verify().ok


def test_verify_names_damaged_inner_chunk_and_missing_shard(gpt2_dir, workspace):
    ext = ms.extract(gpt2_dir, DATA, workspace=workspace, progress=False, **SHARDED)
    shard = Path(ext.location) / "activations" / HP / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[2 * 64 * 32 * 4 + 100] ^= 0x10  # inside inner chunk 2 of shard 1: global chunk 6, rows 384-448
    shard.write_bytes(bytes(data))
    report = ext.verify()
    assert [(p.array, p.chunk) for p in report.problems] == [(f"activations/{HP}", (1, 0))], str(report)
    assert "inner chunk(s) (6, 0)" in report.problems[0].what and report.problems[0].file.endswith(f"{HP}/c/1/0")
    a = ext.activations(HP)
    with pytest.raises(StoreCorrupted, match=r"chunk \(1, 0\).*inner chunk\(s\) \(6, 0\)"):
        a[400:410]
    a[300:384], a[448:512]  # the other inner chunks of that shard still read
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the index is gone
    assert "the shard cannot be decoded: its index" in ext.verify().problems[0].what
    shard.unlink()
    report = ext.verify()
    assert [p.what.split(" (")[0] for p in report.problems] == ["the shard is missing"]
    with pytest.raises(StoreCorrupted, match="shard is missing"):
        a[300:310]


def test_tokenization_runs_while_weights_load_and_fails_as_validation(gpt2_dir, workspace, monkeypatch):
    seen = {}
    real_tokenize, real_load = plan_module.tokenize, runner_module.ModelCache.get

    def tokenize(*args, **kwargs):
        seen["tokenize_thread"] = threading.current_thread().name
        seen["tokenize_started"] = time.perf_counter()
        return real_tokenize(*args, **kwargs)

    def slow_get(self, spec):
        time.sleep(0.5)
        seen["load_done"] = time.perf_counter()
        return real_load(self, spec)

    monkeypatch.setattr(plan_module, "tokenize", tokenize)
    monkeypatch.setattr(runner_module.ModelCache, "get", slow_get)
    ext = ms.extract(gpt2_dir, TEXTS, workspace=workspace, progress=False, **BASE)
    assert ext.status == "COMPLETED" and seen["tokenize_thread"] == "mistudio-tokenize"
    assert seen["tokenize_started"] < seen["load_done"]  # tokenized while the weights loaded
    # an out-of-vocabulary id with oov_policy="error": the tokenization's InputError fails the job as VALIDATION
    job = ms.Workspace(workspace).submit(gpt2_dir, [[1, 2, 3], [1, 10**6]], oov_policy="error", **BASE)
    assert job.wait(60).status == "FAILED"
    assert job.error["error_type"] == "VALIDATION" and "outside the model's vocabulary" in job.error["error_message"]


def test_cancel_while_tokenizing_and_loading(gpt2_dir, workspace, monkeypatch):
    release = threading.Event()
    real_tokenize = plan_module.tokenize

    def stuck(*args, **kwargs):
        release.wait(30)
        return real_tokenize(*args, **kwargs)

    monkeypatch.setattr(plan_module, "tokenize", stuck)
    job = ms.Workspace(workspace).submit(gpt2_dir, TEXTS, **BASE)
    while job.status != "LOADING":
        time.sleep(0.01)
    time.sleep(0.3)
    asked = time.perf_counter()
    job.cancel()
    assert job.wait(30).status == "CANCELLED" and time.perf_counter() - asked < 5
    release.set()
    assert not ms.Workspace(workspace).store(job.id).is_allocated
