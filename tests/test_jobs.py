"""Background jobs with real threads, real stores and a real child process killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio import runner as jobs_module
from conftest import gate, fail_at

HOOKS = ["residual", "mlp", "attention"]
BASE = dict(layers=[0, 2], hooks=HOOKS, max_samples=120, dtype="float32", chunk_mb=0.01)


def arrays(ext) -> dict:
    return {hp: ext.activations(hp)[:] for hp in ext.hook_points}


@pytest.fixture(scope="module")
def clean(gpt2_dir, tmp_path_factory):
    """Reference run: batch 8, no faults."""
    ws = str(tmp_path_factory.mktemp("clean"))
    ext = ms.extract(gpt2_dir, "sample", workspace=ws, progress=False, batch_size=8, **BASE)
    return ext, arrays(ext)


def assert_same(ext, reference: dict, exact: bool = True):
    for hp, ref in reference.items():
        got = ext.activations(hp)[:]
        if exact:
            np.testing.assert_array_equal(got, ref, err_msg=hp)
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()), err_msg=hp)


class Recorder:
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if e["event"] == kind]


def test_progress_events_and_states(gpt2_dir, workspace, clean):
    ws = ms.Workspace(workspace)
    rec = Recorder()
    ws.subscribe(rec)  # the folder's events, from before the submit: a job's own subscribe after it can be late
    job = ws.submit(gpt2_dir, "sample", batch_size=8, **BASE)
    job.wait(120)
    assert job.status == "COMPLETED"
    assert {e["job_id"] for e in rec.events} == {job.id}
    states = [e["status"] for e in rec.of("state")]
    assert states == ["QUEUED", "LOADING", "EXTRACTING", "SAVING", "COMPLETED"]
    progress = rec.of("progress")
    assert progress[-1]["samples_done"] == progress[-1]["samples_total"] == 120
    assert all(p["tokens_per_s"] > 0 for p in progress)
    assert all(0 <= p["samples_committed"] <= p["samples_done"] for p in progress)  # saved apart from computed
    assert [p["samples_committed"] for p in progress] == sorted(p["samples_committed"] for p in progress)
    assert progress[-1]["eta_s"] == pytest.approx(0, abs=1e-6)
    (done,) = rec.of("completed")
    assert done["n_samples"] == 120
    assert_same(job.extraction(), clean[1])


def test_the_heartbeat_records_the_samples_computed(gpt2_dir, workspace):
    hook, reached, release = gate(at_batch=6)
    job = ms.Workspace(workspace).submit(gpt2_dir, "sample", batch_size=8, before_batch=hook, **BASE)
    try:
        assert reached.wait(60)
        deadline = time.monotonic() + 3 * jobs_module.HEARTBEAT_S + 5
        while job.record.progress.samples_computed != 48 and time.monotonic() < deadline:
            time.sleep(0.1)
        progress = job.record.progress  # what a banner reads after the process dies here
        assert progress.samples_computed == 48 and progress.samples_committed <= 48
    finally:
        release.set()
    assert job.wait(60).status == "COMPLETED"
    progress = job.record.progress  # at the end, computed is what was saved (not the last heartbeat's count)
    assert progress.samples_computed == progress.samples_committed == progress.samples_total


def test_cancel_while_extracting_keeps_committed(gpt2_dir, workspace, clean):
    hook, reached, release = gate(at_batch=6)
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=hook, **BASE)
    assert reached.wait(60)
    job.cancel()
    release.set()
    job.wait(60)
    assert job.status == "CANCELLED"
    meta = job.meta
    done = meta["progress"]["samples_committed"]
    assert done == 48  # cancelled during batch 7 (index 6): abandoned at its next block, six batches kept
    ext = job.extraction()
    stop = meta["progress"]["tokens_committed"]
    for hp, ref in clean[1].items():
        np.testing.assert_array_equal(ext.activations(hp)[:stop], ref[:stop])
    with pytest.raises(ms.InputError, match="has not been extracted yet"):
        ext.sample(int(ext.sample_index[done]))
    # resume continues from the mark; the finished store equals an uninterrupted run
    resumed = job.resume()
    assert resumed.wait(60).status == "COMPLETED"
    assert_same(resumed.extraction(), clean[1])
    assert resumed.meta["resumes"][0]["from_sample"] == 48


def test_cancel_while_queued_and_order(gpt2_dir, workspace):
    hook, reached, release = gate(at_batch=1)
    ws = ms.Workspace(workspace)
    rec = Recorder()
    ws.subscribe(rec)
    first = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=hook, **BASE)
    second = ws.submit(gpt2_dir, "sample", batch_size=8, **BASE)
    third = ws.submit(gpt2_dir, "sample", batch_size=8, **BASE)
    assert reached.wait(60)
    assert second.status == "QUEUED" and third.status == "QUEUED"
    second.cancel()
    release.set()
    for job in (first, second, third):
        job.wait(120)
    assert (first.status, second.status, third.status) == ("COMPLETED", "CANCELLED", "COMPLETED")
    assert not second.store.is_allocated  # it never started
    order = [(e["job_id"], e["status"]) for e in rec.of("state")]
    assert order.index((first.id, "COMPLETED")) < order.index((third.id, "LOADING"))
    assert (second.id, "LOADING") not in order
    # a second workspace object on the same folder sees the same history, newest first
    table = ms.Workspace(workspace).extractions()  # a pandas DataFrame
    assert list(table["id"]) == [third.id, second.id, first.id]
    assert list(table["status"]) == ["COMPLETED", "CANCELLED", "COMPLETED"]
    assert "CANCELLED" in table.to_string() and "<table" in table._repr_html_()


def test_cancel_while_loading(gpt2_dir, workspace, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_load = jobs_module.load_model

    def slow_load(spec):
        entered.set()
        release.wait(30)
        return real_load(spec)

    monkeypatch.setattr(jobs_module, "load_model", slow_load)
    ws = ms.Workspace(workspace)
    ws.runner.models.clear()
    job = ws.submit(gpt2_dir, "sample", batch_size=8, **BASE)
    assert entered.wait(60)
    assert job.status == "LOADING"
    job.cancel()
    release.set()
    assert job.wait(60).status == "CANCELLED"
    assert not job.store.is_allocated


OOM_MESSAGES = [
    lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 11.7 GiB total)"),
    lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes."),
    lambda: RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, max allowed: 18.13 GB)."),
]


@pytest.mark.parametrize("make_error", OOM_MESSAGES)
def test_oom_is_classified_with_half_batch(make_error, gpt2_dir, workspace):
    def boom(index, batch_size):
        if index == 2:
            raise make_error()

    rec = Recorder()
    ws = ms.Workspace(workspace)
    ws.subscribe(rec)  # from before the submit
    job = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=boom, **BASE)
    job.wait(60)
    assert job.status == "FAILED"
    err = job.error
    assert err["error_type"] == "OOM" and err["suggested_retry_params"] == {"batch_size": 4}
    assert "Out of memory at batch_size=8" in err["error_message"] and "batch_size=4" in err["error_message"]
    (failed,) = rec.of("failed")
    for key in ("error_type", "error_message", "suggested_retry_params", "retry_available", "cancel_available"):
        assert key in failed
    assert failed["retry_available"] is True and failed["cancel_available"] is False
    assert job.meta["progress"]["samples_committed"] == 16  # the two batches before the fault are kept


def test_auto_retry_on_oom_halves_until_it_fits(gpt2_dir, workspace, clean):
    def boom(index, batch_size):
        if batch_size >= 4 and index == 1:  # 8 and 4 fail on their second batch, 2 fits
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    rec = Recorder()
    ws = ms.Workspace(workspace)
    ws.subscribe(rec)  # from before the submit
    job = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=boom, auto_retry_on_oom=True, **BASE)
    job.wait(120)
    assert job.status == "COMPLETED", job.error
    assert [e["batch_size"] for e in rec.of("retry")] == [4, 2]
    meta = job.meta
    assert [a["batch_size"] for a in meta["attempts"]] == [8, 4] and meta["auto_retried"] is True
    assert meta["params"]["batch_size"] == 2
    assert_same(job.extraction(), clean[1], exact=False)


def test_auto_retry_gives_up_after_three(gpt2_dir, workspace):
    def always(index, batch_size):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=always, auto_retry_on_oom=True, **BASE)
    job.wait(60)
    assert job.status == "FAILED" and job.error["error_type"] == "OOM"
    assert [a["batch_size"] for a in job.meta["attempts"]] == [8, 4, 2]
    assert "Batch size is already 1" in job.error["error_message"]


def test_retry_lineage_and_overrides(gpt2_dir, workspace, clean):
    def boom(index, batch_size):
        if batch_size == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    ws = ms.Workspace(workspace)
    failed = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=boom, **BASE).wait(60)
    assert failed.status == "FAILED"
    retry = failed.retry(**failed.error["suggested_retry_params"])
    assert retry.wait(60).status == "COMPLETED"
    meta = retry.meta
    assert meta["retry_of"] == failed.id and meta["retry_count"] == 1 and meta["retry_reason"] == "OOM"
    assert meta["params"]["batch_size"] == 4 and meta["auto_retried"] is False
    assert_same(retry.extraction(), clean[1], exact=False)
    # by id, from a fresh workspace object (as after a kernel restart), with another override
    again = ms.Workspace(workspace).retry(failed.id, max_samples=10, batch_size=2)
    assert again.wait(60).status == "COMPLETED" and again.extraction().n_samples == 10


def test_timeout(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, "sample", batch_size=8, timeout_s=0.3,
                    before_batch=lambda i, b: time.sleep(0.1), **BASE)
    job.wait(60)
    assert job.status == "FAILED" and job.error["error_type"] == "TIMEOUT"
    assert job.error["suggested_retry_params"] == {"max_samples": 60}
    assert "time limit of 0.3 s" in job.error["error_message"]


def test_a_timeout_before_anything_is_stored_offers_a_longer_limit_not_a_resume(gpt2_dir, workspace):
    """Out of time while loading: the words said "Resume it", the resume refused quoting them, and reads called the
    store damaged while verify said OK."""
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, "sample", timeout_s=1e-6, **BASE).wait(60)
    error = job.error
    assert job.status == "FAILED" and error["error_type"] == "TIMEOUT" and not error["resume_available"]
    assert "stopped before it stored anything" in error["error_message"] and "Resume it" not in error["error_message"]
    assert "timeout_s=None" in error["error_message"] and error["suggested_retry_params"] == {"timeout_s": 2e-6}
    from mistudio.cli import error_text
    cli = error_text(error, "cli")  # --timeout none works whether or not a preset set the limit; "no --timeout" not
    assert "--timeout 2e-06, or --timeout none for none" in cli and "no --timeout" not in cli, cli
    with pytest.raises(ms.InputError, match="There is nothing stored to resume from: retry it"):
        ws.resume(job.id)
    ext = ms.open_extraction(job.id, workspace=workspace)
    with pytest.raises(ms.InputError, match=r"holds no activations/layers.0.residual: its job stopped \(FAILED "
                                            r"\[TIMEOUT\]\) before it stored anything.*; retry it"):
        ext.activations("layers.0.residual")
    assert ext.verify().ok
    assert job.retry(timeout_s=None).wait(60).status == "COMPLETED"


def test_broken_listener_does_not_break_job(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, "sample", batch_size=8, **BASE)
    job.subscribe(lambda e: 1 / 0)
    assert job.wait(60).status == "COMPLETED"


def test_busy_store_refused_and_cleanup(gpt2_dir, workspace):
    hook, reached, release = gate(at_batch=2)
    ws = ms.Workspace(workspace)
    empty = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=fail_at(0), **BASE).wait(60)
    assert empty.status == "FAILED" and empty.error["error_type"] == "UNKNOWN"
    done = ws.submit(gpt2_dir, "sample", batch_size=8, **BASE).wait(60)
    running = ws.submit(gpt2_dir, "sample", batch_size=8, before_batch=hook, **BASE)
    assert reached.wait(60)
    with pytest.raises(ms.StoreBusy, match=rf"extraction {running.id} is EXTRACTING in this kernel"):
        ws.resume(running.id)
    with pytest.raises(ms.StoreBusy):
        ws.delete(running.id)
    report = ws.cleanup(dry_run=True).to_dict("records")
    assert [r["id"] for r in report] == [empty.id] and report[0]["reason"].startswith("empty")
    assert report[0]["bytes"] > 0
    release.set()
    running.wait(60)
    report = ws.cleanup(dry_run=False).to_dict("records")
    assert [r["id"] for r in report] == [empty.id] and report[0]["deleted"]
    assert set(ws.extractions()["id"]) == {done.id, running.id}
    with pytest.raises(ms.InputError, match="already COMPLETED"):
        ws.resume(done.id)


CHILD = textwrap.dedent("""
    import sys, time
    import mistudio as ms
    ws = ms.Workspace(sys.argv[1])
    job = ws.submit(sys.argv[2], "sample", batch_size=8, before_batch=lambda i, b: time.sleep(0.15),
                    layers=[0, 2], hooks=["residual", "mlp", "attention"], max_samples=120, dtype="float32",
                    chunk_mb=0.01)
    print(job.id, flush=True)
    job.wait()
""")


def test_sigkill_mid_job_is_interrupted_then_resumed(gpt2_dir, workspace, clean):
    child = subprocess.Popen([sys.executable, "-c", CHILD, workspace, gpt2_dir], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        job_id = child.stdout.readline().strip()
        ws = ms.Workspace(workspace)
        store = ws.store(job_id)
        deadline = time.monotonic() + 120
        while store.refresh().get("progress", {}).get("samples_committed", 0) < 24:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        # the child is alive: opening the workspace must not mark it interrupted
        assert ms.Workspace(workspace).job(job_id).status == "EXTRACTING"
        with pytest.raises(ms.StoreBusy, match="in another process"):
            ws.resume(job_id)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    reopened = ms.Workspace(workspace)
    job = reopened.job(job_id)
    assert job.status == "FAILED"
    assert job.error["error_type"] == "INTERRUPTED" and "kernel was restarted or crashed" in job.error["error_message"]
    committed = job.meta["progress"]["samples_committed"]
    assert 24 <= committed < 120
    resumed = reopened.resume(job_id)
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    assert_same(resumed.extraction(), clean[1], exact=False)
