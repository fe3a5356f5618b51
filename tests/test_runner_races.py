"""Hostile checks of the runner whose job thread ends when its queue is empty: submits from several threads,
submits racing the thread's exit, a submit from a job's own listener, cancel/retry/resume right after a job ends,
training jobs in the same queue, two Workspace objects on one folder, and the interpreter's exit with jobs queued.
No job lost or run twice, one at a time, in submit order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import mistudio as ms

TINY = dict(layers=[0], hooks=["residual"], max_samples=2, max_length=8, batch_size=2, dtype="float32",
            device="cpu")


class Log:
    """Every event of every job, with the thread that sent it."""

    def __init__(self):
        self.events: list[tuple[float, str, str, str]] = []  # (time, job, event/status, thread)
        self.lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self.lock:
            what = event["event"] + (":" + event["status"] if event["event"] == "state" else "")
            self.events.append((time.monotonic(), event["job_id"], what, threading.current_thread().name))

    def runs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        with self.lock:
            for _, job, what, _ in self.events:
                out.setdefault(job, []).append(what)
        return out

    def starts(self) -> list[str]:
        with self.lock:
            return [job for _, job, what, _ in self.events if what == "state:LOADING"]

    def check_one_at_a_time(self) -> None:
        active = None
        with self.lock:
            for _, job, what, _ in self.events:
                if what == "state:LOADING":
                    assert active is None, f"{job} started while {active} ran"
                    active = job
                elif what in ("state:COMPLETED", "state:FAILED", "state:CANCELLED"):
                    if active == job:
                        active = None


def _job_threads(workspace: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"mistudio-jobs:{Path(workspace).resolve()}"]


def test_submits_from_several_threads_at_once(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    log = Log()
    ws.subscribe(log)  # every job of the folder, from before its submit (a job's own subscribe can come too late)
    per_thread: dict[int, list] = {}
    barrier = threading.Barrier(4)
    errors = []

    def submit(k: int) -> None:
        try:
            barrier.wait(10)
            per_thread[k] = []
            for _ in range(3):
                per_thread[k].append(ws.submit(gpt2_dir, "sample", **TINY))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    jobs = [j for k in sorted(per_thread) for j in per_thread[k]]
    assert len({j.id for j in jobs}) == 12
    for job in jobs:
        assert job.wait(180).status == "COMPLETED", (job.id, job.status, job.error)
    runs = log.runs()
    for job in jobs:
        assert runs[job.id].count("state:LOADING") == 1, (job.id, runs[job.id])
        assert runs[job.id].count("state:COMPLETED") == 1, (job.id, runs[job.id])
    log.check_one_at_a_time()
    order = log.starts()
    for k, mine in per_thread.items():  # each thread's jobs ran in its submit order
        positions = [order.index(j.id) for j in mine]
        assert positions == sorted(positions), (k, positions)
    assert len(_job_threads(workspace)) == 1  # one thread served them all


def test_a_submit_racing_the_threads_exit_is_never_stranded(gpt2_dir, workspace):
    """job.wait() returns as soon as the runner lets go of the job, before its loop looks at the queue: a submit
    at that moment races the thread's exit, over and over."""
    ws = ms.Workspace(workspace)
    for i in range(12):
        job = ws.submit(gpt2_dir, "sample", **TINY)
        assert job.wait(60).status == "COMPLETED", (i, job.status, job.error)
        if i % 3 == 2:
            time.sleep(0.05 * (i % 2))
    assert len(_job_threads(workspace)) == 1


def test_a_listener_that_submits_from_the_job_thread(gpt2_dir, workspace):
    """A completion listener runs on the job's thread and submits the next job: the chain of 5 must run."""
    ws = ms.Workspace(workspace)
    done: list = []
    finished = threading.Event()

    def chain(event: dict) -> None:
        if event["event"] == "completed":
            done.append(event["job_id"])
            if len(done) < 5:
                ws.submit(gpt2_dir, "sample", **TINY).subscribe(chain)
            else:
                finished.set()

    ws.submit(gpt2_dir, "sample", **TINY).subscribe(chain)
    assert finished.wait(120), done
    assert len(set(done)) == 5


def test_cancel_retry_resume_right_after_an_end(gpt2_dir, workspace):
    from conftest import gate

    ws = ms.Workspace(workspace)
    hook, reached, release = gate(1)
    job = ws.submit(gpt2_dir, "sample", before_batch=hook, **{**TINY, "max_samples": 8})
    assert reached.wait(60)
    job.cancel()
    release.set()
    assert job.wait(60).status == "CANCELLED"
    resumed = ws.resume(job.id)  # at once: the thread may be ending
    assert resumed.wait(60).status == "COMPLETED", resumed.error
    retried = ws.retry(job.id) if hasattr(ws, "retry") else resumed.retry()
    assert retried.wait(60).status == "COMPLETED", retried.error
    queued = ws.submit(gpt2_dir, "sample", **TINY)
    queued.cancel()  # cancelled while queued or just started
    assert queued.wait(60).status in ("CANCELLED", "COMPLETED")
    after = ws.submit(gpt2_dir, "sample", **TINY)
    assert after.wait(60).status == "COMPLETED"


def test_two_workspace_objects_share_one_queue(gpt2_dir, workspace):
    a, b = ms.Workspace(workspace), ms.Workspace(workspace)
    log = Log()
    a.subscribe(log)  # the folder's listeners: b's jobs too, each from before its submit
    jobs = [(a if i % 2 else b).submit(gpt2_dir, "sample", **TINY) for i in range(6)]
    for job in jobs:
        assert job.wait(120).status == "COMPLETED", job.error
    log.check_one_at_a_time()
    assert log.starts() == [j.id for j in jobs]  # each started once, in submit order


def test_training_and_extraction_jobs_share_the_queue(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    ext = ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual"], max_samples=40, batch_size=32,
                     dtype="float32", workspace=workspace, progress=False, device="cpu")
    settings = {"architecture": "topk", "d_sae": 32, "k": 4, "batch_size": 64, "n_tokens": 64 * 10, "lr": 3e-3,
                "progress_every_steps": 5, "checkpoint_every_steps": 0}
    jobs = []
    for i in range(3):
        jobs.append(ws.train_sae(ext, "layers.1.residual", **settings))
        jobs.append(ws.submit(gpt2_dir, "sample", **TINY))
    for job in jobs:
        assert job.wait(180).status == "COMPLETED", (job.id, job.status, getattr(job, "error", None))
    last = ws.train_sae(ext, "layers.1.residual", **settings)
    assert last.wait(120).status == "COMPLETED"


def test_interpreter_exit_waits_for_queued_jobs(gpt2_dir, tmp_path):
    """A script submits 4 jobs and ends: the at-exit hook waits for each (one thread started, then ended)."""
    ws_dir = tmp_path / "ws"
    script = textwrap.dedent(f"""
        import mistudio as ms
        ws = ms.Workspace({str(ws_dir)!r})
        ids = []
        for i in range(4):
            ids.append(ws.submit({gpt2_dir!r}, "sample", **{TINY!r}).id)
        print(",".join(ids), flush=True)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env,
                         cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-3000:]
    ids = out.stdout.strip().splitlines()[-1].split(",")
    ws = ms.Workspace(str(ws_dir))
    for job_id in ids:
        assert ws.job(job_id).status == "COMPLETED", (job_id, ws.job(job_id).status)


def test_interpreter_exit_with_a_job_submitted_during_the_wait(gpt2_dir, tmp_path):
    """A completion listener submits a follow-up while the at-exit hook waits: the hook's list was taken before;
    the follow-up must not be left half-written (it completes, or it never started: QUEUED/INTERRUPTED)."""
    ws_dir = tmp_path / "ws"
    script = textwrap.dedent(f"""
        import sys
        import mistudio as ms
        ws = ms.Workspace({str(ws_dir)!r})
        follow = []
        def again(event):
            if event["event"] == "completed" and not follow:
                follow.append(ws.submit({gpt2_dir!r}, "sample", **{{**{TINY!r}, "max_samples": 16}}).id)
                print("FOLLOW", follow[0], flush=True)
        ws.submit({gpt2_dir!r}, "sample", **{TINY!r}).subscribe(again)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env,
                         cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-3000:]
    follow = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("FOLLOW")]
    assert follow, out.stdout + out.stderr[-2000:]
    status = ms.Workspace(str(ws_dir)).job(follow[0]).status
    assert status == "COMPLETED", (status, out.stderr[-2000:])


@pytest.mark.parametrize("how", ["submit", "retry"])
def test_a_recover_while_a_job_is_being_set_up_leaves_it_alone(gpt2_dir, workspace, monkeypatch, how):
    """Another Workspace object on the folder recovers (a Studio's Jobs tab refreshing does, on a timer) right after a
    submit or a retry created the job's store and before the job holds its lease and is queued. The store names this
    process and no runner of it holds the job yet; it is not a leftover of a crash. (CI once saw Retry refused with
    StoreBusy "(recover)" naming the test's own pid, and the new job marked INTERRUPTED.)"""
    from mistudio.workspace import Workspace

    ws = ms.Workspace(workspace)
    first = ws.submit(model=gpt2_dir, dataset="sample", **TINY).wait(60)
    assert first.status == "COMPLETED"
    create, marked = Workspace._create, []

    def create_then_recover(self, location, meta):
        store = create(self, location, meta)
        marked.extend(ms.Workspace(workspace, recover=False).recover())  # the other object, at the worst moment
        return store

    monkeypatch.setattr(Workspace, "_create", create_then_recover)
    job = ws.submit(model=gpt2_dir, dataset="sample", **TINY) if how == "submit" else first.retry(batch_size=1)
    assert marked == [], "a job being set up in this process was marked as interrupted"
    assert job.wait(60).status == "COMPLETED"
    assert ms.Workspace(workspace, recover=False).recover() == []
