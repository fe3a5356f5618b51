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
    assert any(s["status"] != "done" for s in shards)
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
    (dict(saes={"layers.2.residual": "SAE"}), "saes is not supported with cluster"),
])
def test_what_a_cluster_cannot_run_is_refused_before_a_store(gpt2_dir, workspace, tmp_path, client, options,
                                                             message):
    from test_saes import write_sparsify

    if "saes" in options:
        write_sparsify(tmp_path / "SAE")
        options = {"saes": {"layers.2.residual": str(tmp_path / "SAE")}}
    ws = ms.Workspace(workspace)
    with pytest.raises(ms.InputError, match=message):
        ws.submit(gpt2_dir, "sample", cluster=client, **{**ARGS, **options})
    assert not os.path.isdir(os.path.join(workspace, "extractions")) or not os.listdir(
        os.path.join(workspace, "extractions"))
