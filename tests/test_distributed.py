"""Sharded extraction on a real dask LocalCluster (2 worker processes) into one store."""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest

import mistudio as ms

distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder

ARGS = dict(layers=[0, 2], hooks=["residual", "mlp", "attention"], max_samples=160, dtype="float32", chunk_mb=0.01,
            batch_size=8)


def slow(index, batch_size):
    time.sleep(0.12)


def fail_once(marker):
    def hook(index, batch_size):
        if index == 2:
            try:
                os.remove(marker)
            except FileNotFoundError:
                return
            raise RuntimeError("injected shard failure")
    return hook


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           worker_dashboard_address=None)
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def single(gpt2_dir, tmp_path_factory):
    ext = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path_factory.mktemp("single")), progress=False, **ARGS)
    return {hp: ext.activations(hp)[:] for hp in ext.hook_points}


def assert_equal_to(ext, reference):
    for hp, ref in reference.items():
        np.testing.assert_allclose(ext.activations(hp)[:], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()),
                                   err_msg=hp)


def test_plan_and_edges_are_single_writer():
    from mistudio.distributed import plan_shards

    offsets = np.concatenate([[0], np.cumsum(np.arange(50, 0, -1))])
    shards = plan_shards(offsets, 4)
    assert [s["first"] for s in shards][0] == 0 and shards[-1]["stop"] == 50
    assert all(a["stop"] == b["first"] for a, b in zip(shards, shards[1:]))
    chunk = 64
    owners: dict[int, set] = {}
    for s in shards:
        start, stop = s["tokens"]
        lo, hi = -(-start // chunk) * chunk, stop // chunk * chunk
        for c in range(lo // chunk, hi // chunk):
            owners.setdefault(c, set()).add(s["index"])
    assert all(len(v) == 1 for v in owners.values())  # a whole chunk belongs to exactly one shard


def test_cluster_run_equals_single_process(gpt2_dir, workspace, client, single):
    ext = ms.extract(gpt2_dir, "sample", workspace=workspace, progress=False, cluster=client, **ARGS)
    meta = ext.metadata
    assert meta["status"] == "COMPLETED" and len(meta["shards"]) == 4
    assert all(s["status"] == "done" and s["runs"] == 1 for s in meta["shards"])
    assert_equal_to(ext, single)
    stats = meta["statistics"]["layers.2.mlp"]
    values = ext.activations("layers.2.mlp")[:]
    assert stats["count"] == values.size and stats["mean"] == pytest.approx(values.mean(), rel=1e-4, abs=1e-7)


def start_slow_job(ws, model_dir, client, progress_events: int):
    """Submit a slowed-down sharded job and return it once it reported ``progress_events`` batches."""
    events = []
    job = ws.submit(model_dir, "sample", cluster=client, before_batch=slow, **ARGS)
    job.subscribe(events.append)
    deadline = time.monotonic() + 120
    while sum(e["event"] == "progress" for e in events) < progress_events:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_cancel_stops_all_workers_then_resume_here(gpt2_dir, workspace, client, single):
    ws = ms.Workspace(workspace)
    job = start_slow_job(ws, gpt2_dir, client, progress_events=1)
    asked = time.monotonic()
    job.cancel().wait(60)
    assert job.status == "CANCELLED" and time.monotonic() - asked < 10
    shards = job.meta["shards"]
    assert any(s["status"] == "cancelled" for s in shards)  # stopped by the cancel: not failed, no error
    assert {s["status"] for s in shards} <= {"done", "cancelled", "pending"} and not any("error" in s for s in shards)
    logs = client.get_worker_logs()  # a cancel is an answer, not a worker's failure with a traceback
    assert not any("JobCancelled" in str(entry) for entries in logs.values() for entry in entries)
    resumed = ws.resume(job.id)  # no cluster: the unfinished shards run in this process
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    assert_equal_to(resumed.extraction(), single)


def test_killed_worker_shard_is_rerun(gpt2_dir, workspace, client, single):
    ws = ms.Workspace(workspace)
    job = start_slow_job(ws, gpt2_dir, client, progress_events=3)
    pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    assert job.wait(180).status == "COMPLETED", job.error
    assert_equal_to(job.extraction(), single)


def test_failed_shard_is_retried_alone(gpt2_dir, workspace, client, single, tmp_path):
    marker = tmp_path / "fail-once"
    marker.write_text("")
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, "sample", cluster=client, before_batch=fail_once(str(marker)), **ARGS)
    assert job.wait(120).status == "FAILED"
    assert "injected shard failure" in job.error["error_message"]
    shards = job.meta["shards"]
    failed = [s["index"] for s in shards if s["status"] == "failed"]
    assert len(failed) == 1 and sum(s["status"] == "done" for s in shards) == 3
    resumed = ws.resume(job.id, cluster=client)
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    runs = {s["index"]: s["runs"] for s in resumed.meta["shards"]}
    assert runs == {i: (2 if i in failed else 1) for i in range(4)}
    assert_equal_to(resumed.extraction(), single)


@pytest.mark.parametrize("options, message", [
    (dict(exclude_special=True), "exclude_special=True is not supported with cluster"),
    (dict(batch_size="auto"), "cannot size a dask run"),
])
def test_what_a_cluster_cannot_run_is_refused_before_a_store(gpt2_dir, workspace, tmp_path, client, options,
                                                             message):
    ws = ms.Workspace(workspace)
    with pytest.raises(ms.InputError, match=message):
        ws.submit(gpt2_dir, "sample", cluster=client, **{**ARGS, **options})
    assert not os.path.isdir(os.path.join(workspace, "extractions")) or not os.listdir(
        os.path.join(workspace, "extractions"))


# -- SAE latents on the cluster ------------------------------------------------------------------------------
HP = "layers.2.residual"
SAE_ARGS = dict(layers=[2], hooks=["residual"], dtype="float32", max_length=40, max_samples=80, batch_size=4,
                chunk_mb=0.01, shard_mb=0.05, feature_statistics="on")
LATENT_ARRAYS = ("indices", "values", "feature_offsets", "feature_rows", "feature_values")


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    from test_latents import make_sae

    folder = tmp_path_factory.mktemp("saes")
    make_sae(folder / "topk", "topk")
    make_sae(folder / "standard", "standard")
    return {name: str(folder / name) for name in ("topk", "standard")}


@pytest.fixture(scope="module")
def local_sae_runs(gpt2_dir, sae_dirs, tmp_path_factory):
    """The same requests run locally (no cluster): the reference."""
    return {name: ms.extract(gpt2_dir, "sample", saes={HP: folder}, workspace=str(tmp_path_factory.mktemp(name)),
                             progress=False, **SAE_ARGS) for name, folder in sae_dirs.items()}


def assert_same_latents(ext, ref) -> None:
    """Bit-equal latents, by-feature index, feature reads, latent and feature statistics."""
    from test_latents import assert_same_statistics

    from mistudio.storage import featfeed
    from mistudio.storage.reads import CheckedArray

    assert ext.latent_info(HP).model_dump(exclude={"sae"}) == ref.latent_info(HP).model_dump(exclude={"sae"})
    for name in LATENT_ARRAYS:  # checked reads (mistudio's codec: fast, and every chunk's crc32c)
        got, want = (CheckedArray(e.store.array(f"latents/{HP}/{name}"), e.location, e.store.array(
            f"latents/{HP}/{name}").shape[0])[:] for e in (ext, ref))
        np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_array_equal(ext.latents(HP).toarray(), ref.latents(HP).toarray())
    for latent in range(0, ext.latent_info(HP).d_sae, 11):
        for got, want in zip(ext.feature(HP, latent), ref.feature(HP, latent)):
            np.testing.assert_array_equal(got, want, err_msg=f"latent {latent}")
    assert ext.record.latent_statistics == ref.record.latent_statistics
    for key in (f"{HP}.latents", HP):
        rows, _ = featfeed.load(ext.store, key, ext.n_tokens)  # saved by the run, to the last row
        assert rows == ext.n_tokens
        assert_same_statistics(ext.feature_statistics(key), ref.feature_statistics(key))
    assert ext.verify().ok, str(ext.verify())


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_latents_on_a_cluster_equal_a_local_run(architecture, gpt2_dir, workspace, client, sae_dirs,
                                                local_sae_runs):
    from mistudio.distributed import straddling_blocks

    ref = local_sae_runs[architecture]
    ext = ms.extract(gpt2_dir, "sample", saes={HP: sae_dirs[architecture]}, workspace=workspace, progress=False,
                     cluster=client, **SAE_ARGS)
    meta = ext.metadata
    assert meta["status"] == "COMPLETED" and len(meta["shards"]) == 4
    info = ext.latent_info(HP)
    if architecture == "standard":  # probed on a worker: the same first batch as the local probe
        assert "first batch" in info.width_reason
    n_blocks = -(-ext.n_tokens // info.block_rows)
    straddling = straddling_blocks(info, meta["shards"], ext.n_tokens)
    assert 0 < len(straddling) < n_blocks  # blocks indexed by workers and by the coordinator
    assert_same_latents(ext, ref)
    np.testing.assert_array_equal(ext.activations(HP)[:], ref.activations(HP)[:])



def test_latents_past_float16_on_a_cluster_are_counted_as_a_local_run(gpt2_dir, workspace, client, tmp_path):
    """The shards' latent statistics carry the ±inf count: merged, it is the local run's, and warned the same."""
    from test_latents import make_loud_sae

    make_loud_sae(tmp_path / "sae")
    args = dict(saes={HP: str(tmp_path / "sae")}, progress=False, **{**SAE_ARGS, "dtype": "float16",
                                                                      "feature_statistics": "off"})
    ref = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "local"), **args)
    ext = ms.extract(gpt2_dir, "sample", workspace=workspace, cluster=client, **args)
    assert len(ext.metadata["shards"]) == 4
    assert ext.record.latent_statistics == ref.record.latent_statistics
    assert ext.record.latent_statistics[HP].n_out_of_range > 0 and ext.warnings() == ref.warnings()

@pytest.mark.slow
@pytest.mark.parametrize("on_cluster", [False, True])
def test_a_cancelled_cluster_run_with_saes_resumes_equal_to_a_clean_run(on_cluster, gpt2_dir, workspace, client,
                                                                        sae_dirs, local_sae_runs, tmp_path):
    from test_latents import make_sae

    folder = tmp_path / "sae"
    make_sae(folder, "standard")  # the same weights as sae_dirs["standard"] (same seed)
    ws = ms.Workspace(workspace)
    events = []
    job = ws.submit(gpt2_dir, "sample", saes={HP: str(folder)}, cluster=client, before_batch=slow, **SAE_ARGS)
    job.subscribe(events.append)
    deadline = time.monotonic() + 120
    while sum(e["event"] == "progress" for e in events) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.cancel().wait(60)
    assert job.status == "CANCELLED"
    assert any(s["status"] != "done" for s in job.meta["shards"])
    assert job.extraction().verify().ok  # what was stored is whole up to what it claims
    make_sae(folder, "standard", seed=1)  # retrained in place: refused, as a local resume refuses it
    with pytest.raises(ms.InputError, match="is not the one this store was made with"):
        ws.resume(job.id, cluster=client if on_cluster else None)
    make_sae(folder, "standard")
    resumed = ws.resume(job.id, cluster=client if on_cluster else None)
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    assert all(s["status"] == "done" for s in resumed.meta["shards"])
    assert_same_latents(resumed.extraction(), local_sae_runs["standard"])


def test_a_worker_refuses_an_sae_that_is_not_the_recorded_one(tmp_path):
    from test_latents import make_sae

    from mistudio.distributed import replica_saes
    from mistudio.request import Request
    from mistudio.saes import load_sae
    from mistudio.storage.metadata import LatentInfo

    make_sae(tmp_path / "sae", "topk")
    held = load_sae(tmp_path / "sae")
    request = Request.build(model="gpt2", dataset="sample", layers=[2], saes={HP: str(tmp_path / "sae")})

    class Loaded:
        input_device = "cpu"

    recorded = {HP: LatentInfo(sae=str(tmp_path / "sae"), fingerprint=held.fingerprint, architecture="topk",
                               d_sae=held.d_sae, k=held.k, width=8, width_reason="k", block_rows=128,
                               hook_name=held.hook_name)}
    assert replica_saes(request, Loaded(), recorded)[HP].fingerprint == held.fingerprint
    make_sae(tmp_path / "sae", "topk", seed=1)
    assert replica_saes(request, Loaded(), recorded)[HP].fingerprint == held.fingerprint  # the replica's, kept
    recorded[HP] = recorded[HP].model_copy(update={"fingerprint": "0" * 64})  # another store, made with another
    with pytest.raises(ms.InputError, match="is not the one this store was made with"):
        replica_saes(request, Loaded(), recorded)


def test_a_finished_shard_is_on_the_disk_before_the_mark_moves_over_it(gpt2_dir, workspace, client, monkeypatch):
    """Workers write a shard's rows through Zarr, which does not flush them: the coordinator flushes every unit file
    of a finished shard's rows (and their folders) before the commit mark moves over them, as the local writer does,
    so that a power cut loses no committed row."""
    from mistudio import distributed

    synced, marks = [], []
    real_sync, real_update = distributed.sync_data, distributed.ExtractionStore.update

    def recording_sync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_sync(fd)

    def recording_update(self, **sections):
        mark = (sections.get("progress") or {}).get("tokens_committed")
        if mark:
            marks.append((mark, len(synced)))
        return real_update(self, **sections)

    monkeypatch.setattr(distributed, "sync_data", recording_sync)
    monkeypatch.setattr(distributed.ExtractionStore, "update", recording_update)
    ext = ms.extract(gpt2_dir, "sample", workspace=workspace, progress=False, cluster=client, **ARGS)
    hp = "layers.2.mlp"
    g = distributed.Geometry.of(ext.activations(hp).zarr)
    files = {str(g.unit_file(u)) for u in range(g.n_units)}
    assert files <= set(synced)
    for mark, n_synced in marks:  # every unit holding a committed row was flushed before that mark was written
        below = {str(g.unit_file(u)) for u in range(-(-mark // g.unit_rows))}
        assert below <= set(synced[:n_synced]), mark


def test_a_resume_reruns_a_finished_shard_above_the_mark_whose_chunks_are_not_its_own(gpt2_dir, workspace, client,
                                                                                      single):
    """Shards finished above the commit mark in an earlier run are checked against their chunk records when the
    run resumes: one whose files are not the ones recorded (two swapped) is run again, not trusted, and the store
    ends equal to a one-process run and verified."""
    from pathlib import Path

    from mistudio.storage.store import ExtractionStore

    ext = ms.extract(gpt2_dir, "sample", workspace=workspace, progress=False, cluster=client, **ARGS)
    store = ExtractionStore.open(ext.location, writable=True)
    store.update(status="CANCELLED", progress={"samples_committed": 0, "tokens_committed": 0})  # as a stop leaves
    hp = "layers.2.mlp"
    arr = ext.activations(hp)
    lo, hi = ext.metadata["shards"][2]["tokens"]
    unit_rows = (arr.zarr.shards or arr.zarr.chunks)[0]
    units = list(range(-(-lo // unit_rows), hi // unit_rows))  # storage units wholly inside shard 2's rows
    assert len(units) >= 2
    folder = Path(ext.location) / "activations" / hp / "c"
    a, b = folder / str(units[0]) / "0", folder / str(units[1]) / "0"
    tmp = a.with_name("swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    ws = ms.Workspace(workspace)
    resumed = ws.resume(ext.id).wait(180)
    assert resumed.status == "COMPLETED", resumed.error
    runs = [s["runs"] for s in ws.open(ext.id).metadata["shards"]]
    assert runs == [1, 1, 2, 1], runs  # shard 2 run again, the others trusted
    done = ws.open(ext.id)
    assert done.verify().ok
    assert_equal_to(done, single)
