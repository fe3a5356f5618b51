"""One writer per store, across real processes: two resumes at the same instant -> exactly one runs and the other
is refused naming the holder; a delete racing a resume -> the store is deleted or completed, never resurrected;
the lease dies with its process, so an interrupted store is recovered at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import mistudio as ms
from mistudio.errors import StoreBusy
from mistudio.storage.lease import WriterLease, holder

from conftest import cancelled_at, gate

OPTIONS = dict(layers=[0, 2], hooks=["residual"], dtype="float32", max_samples=60, max_length=32, batch_size=2)

CHILD = textwrap.dedent("""
    import json, os, sys, time
    import mistudio as ms
    action, workspace, job_id, go = sys.argv[1:5]
    ws = ms.Workspace(workspace)
    open(f"{go}.{os.getpid()}.ready", "w").close()  # imported and opened: ready
    while not os.path.exists(go):  # every child starts its action at the same instant
        time.sleep(0.001)
    try:
        if action == "resume":
            job = ws.resume(job_id, before_batch=lambda i, n: time.sleep(0.02))
            print(json.dumps({"did": "resumed"}), flush=True)
            job.wait()
            print(json.dumps({"did": "ended", "status": str(job.status)}), flush=True)
        else:
            print(json.dumps({"did": "deleted", "bytes": ws.delete(job_id, force=True)}), flush=True)
    except Exception as exc:
        print(json.dumps({"did": "refused", "type": type(exc).__name__, "message": str(exc)}), flush=True)
""")


def stopped_store(model: str, workspace: str) -> str:
    ws = ms.Workspace(workspace)
    job = cancelled_at(ws, model, "sample", at_batch=4, **OPTIONS)
    return job.id


def race(actions: list[str], workspace: str, job_id: str, tmp_path: Path) -> list[list[dict]]:
    go = tmp_path / f"go-{time.monotonic_ns()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, action, workspace, job_id, str(go)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for action in actions]
    deadline = time.monotonic() + 240  # each has imported mistudio and opened the workspace (a sleep was not
    while not all(Path(f"{go}.{child.pid}.ready").exists() for child in children):  # enough under load: one child
        # started its action after the other's job had completed, and was refused as such, not as busy)
        if time.monotonic() > deadline or any(child.poll() is not None for child in children):
            for child in children:
                child.kill()
            pytest.fail("a child did not get ready: " + " | ".join(c.communicate()[1][-1500:] for c in children))
        time.sleep(0.05)
    go.touch()
    out = []
    for child in children:
        stdout, stderr = child.communicate(timeout=240)
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert lines, stderr[-2000:]
        out.append(lines)
    return out


@pytest.fixture(scope="module")
def clean(gpt2_dir, tmp_path_factory):
    ext = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path_factory.mktemp("clean")), progress=False, **OPTIONS)
    return {hp: ext.activations(hp)[:] for hp in ext.hook_points}


@pytest.mark.slow
def test_two_resumes_at_once_one_runs_the_other_is_refused_by_name(gpt2_dir, workspace, tmp_path, clean):
    # one race of two real processes (each start imports torch: about 10 s under CI's load)
    job_id = stopped_store(gpt2_dir, workspace)
    results = race(["resume", "resume"], workspace, job_id, tmp_path)
    ran = [r for r in results if r[0]["did"] == "resumed"]
    refused = [r for r in results if r[0]["did"] == "refused"]
    assert len(ran) == 1 and len(refused) == 1, results
    assert refused[0][0]["type"] == "StoreBusy", refused
    assert "is being written by pid" in refused[0][0]["message"] or "in another process" in \
        refused[0][0]["message"], refused
    assert ran[0][-1] == {"did": "ended", "status": "COMPLETED"}, ran
    ext = ms.open_extraction(job_id, workspace=workspace)
    assert ext.status == "COMPLETED" and ext.verify().ok
    for hp, want in clean.items():
        np.testing.assert_array_equal(ext.activations(hp)[:], want, err_msg=hp)


@pytest.mark.slow
def test_a_delete_racing_a_resume_never_resurrects_the_store(gpt2_dir, workspace, tmp_path, clean):
    outcomes = set()
    for round_ in range(2):
        job_id = stopped_store(gpt2_dir, workspace)
        resume, delete = race(["resume", "delete"], workspace, job_id, tmp_path)
        location = Path(workspace) / "extractions" / f"{job_id}.zarr"
        if delete[0]["did"] == "deleted":  # the delete won: the resume was refused, and nothing came back
            assert resume[0]["did"] == "refused", (resume, delete)
            assert not location.exists(), "a deleted store came back"
            outcomes.add("deleted")
        else:  # the resume won: the delete was refused naming it, and the store completed correctly
            assert delete[0]["did"] == "refused" and delete[0]["type"] == "StoreBusy", (resume, delete)
            assert resume[-1] == {"did": "ended", "status": "COMPLETED"}, resume
            ext = ms.open_extraction(job_id, workspace=workspace)
            for hp, want in clean.items():
                np.testing.assert_array_equal(ext.activations(hp)[:], want, err_msg=hp)
            outcomes.add("completed")
    assert outcomes  # which side wins is the race's; both are correct


def test_a_store_being_written_refuses_a_delete_and_a_second_lease(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    hook, reached, release = gate(at_batch=2)
    job = ws.submit(gpt2_dir, "sample", before_batch=hook, **OPTIONS)
    assert reached.wait(60)
    location = ws.path_of(job.id)
    owner = holder(location)
    assert owner is not None and owner["pid"] == os.getpid() and owner["purpose"] == "extraction"
    with pytest.raises(StoreBusy, match="in this kernel"):
        ws.delete(job.id, force=True)
    with pytest.raises(StoreBusy, match=r"being written by pid \d+ on .* since .* \(extraction\)"):
        WriterLease.acquire(location, job.id, "delete")
    release.set()
    assert job.wait(60).status == "COMPLETED"
    assert holder(location) is None  # let go when the job ended
    lease = WriterLease.acquire(location, job.id, "test")
    lease.release()


@pytest.mark.slow
def test_the_lease_dies_with_its_process_and_the_store_is_recovered(gpt2_dir, workspace, tmp_path):
    job_id = stopped_store(gpt2_dir, workspace)
    hold = textwrap.dedent("""
        import sys, time
        import mistudio as ms
        ws = ms.Workspace(sys.argv[1])
        job = ws.resume(sys.argv[2], before_batch=lambda i, n: time.sleep(0.5))
        print("running", flush=True)
        job.wait()
    """)
    child = subprocess.Popen([sys.executable, "-c", hold, workspace, job_id], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert child.stdout.readline().strip() == "running"
    location = ms.Workspace(workspace, recover=False).path_of(job_id)
    deadline = time.monotonic() + 60
    while holder(location) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(StoreBusy, match=f"being written by pid {child.pid}"):
        ms.Workspace(workspace).delete(job_id, force=True)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert holder(location) is None  # the system freed the lock with the process
    ws = ms.Workspace(workspace)  # opening recovers: the dead job is INTERRUPTED, and resumes here
    assert ws.job(job_id).status == "FAILED" and ws.job(job_id).error["error_type"] == "INTERRUPTED"
    assert ws.resume(job_id).wait(120).status == "COMPLETED"


def test_a_cache_write_never_recreates_a_deleted_store(gpt2_dir, workspace):
    """A panel that computed something of a store then caches it, after the store was deleted: nothing comes back."""
    from mistudio.analysis.stats import cache_write

    ext = ms.extract(gpt2_dir, "sample", workspace=workspace, progress=False, **OPTIONS)
    mark = ext.committed_tokens()
    ms.Workspace(workspace).delete(ext.id, force=True)
    assert cache_write(ext, "analysis/featstats/x", mark, {"a": 1}, {"v": np.zeros(3)}) is False
    assert not Path(ext.location).exists()


@pytest.mark.parametrize("kind", ["folder", "fifo", "link"])
def test_a_lease_file_that_is_not_a_plain_file_is_named_never_followed_or_waited_on(gpt2_dir, workspace, tmp_path,
                                                                                    kind):
    """A folder, a FIFO or a link in place of `.mistudio-lease`: the listing still lists (a store whose process
    died is still marked INTERRUPTED or left as it is, never hangs or raises), and resume, cleanup and delete
    refuse by name with the fix."""
    import threading

    job_id = stopped_store(gpt2_dir, workspace)
    location = ms.Workspace(workspace).path_of(job_id)
    lease = Path(location) / ".mistudio-lease"
    lease.unlink()
    {"folder": lambda: lease.mkdir(), "fifo": lambda: os.mkfifo(lease),
     "link": lambda: lease.symlink_to(tmp_path / "elsewhere")}[kind]()
    listed = []
    lister = threading.Thread(target=lambda: listed.append(ms.Workspace(workspace).extractions()), daemon=True)
    lister.start()
    lister.join(30)
    assert listed and job_id in set(listed[0]["id"]), "the listing hung or raised"
    ws = ms.Workspace(workspace)
    for act in (lambda: ws.resume(job_id), lambda: ws.delete(job_id, force=True)):
        with pytest.raises(StoreBusy, match=r"\.mistudio-lease is .*a store's lease file must be a plain file\. "
                                            r"Remove it"):
            act()
    assert ws.cleanup(dry_run=True) is not None
    assert not (tmp_path / "elsewhere").exists()  # a link is never followed, never created through


def test_a_store_swapped_in_as_the_metadata_is_written_is_not_taken_for_ours(tmp_path, monkeypatch):
    """The writer checks the store before every batch by the group file's stamp, and takes the stamp of the file it
    just wrote as its own. Another store renamed into place in that instant is not: the next check reads it and
    stops the job (StoreLost) before a row goes into the other store."""
    import mistudio.storage.store as store_module
    from conftest import allocated_store
    from mistudio.errors import StoreLost

    ours = allocated_store(str(tmp_path / "ours.zarr"), [[1, 2, 3]] * 4, {"layers.0.residual": 8})
    other = allocated_store(str(tmp_path / "other.zarr"), [[4, 5]] * 4, {"layers.0.residual": 8})
    ours.guarded = True
    ours.check_same()
    real = store_module.write_atomic

    def write_then_swap(path, data, durable=True):
        written = real(path, data, durable)
        os.rename(ours.location, str(tmp_path / "away.zarr"))
        os.rename(other.location, ours.location)
        return written

    monkeypatch.setattr(store_module, "write_atomic", write_then_swap)
    ours.update(progress={"samples_committed": 1})
    monkeypatch.setattr(store_module, "write_atomic", real)
    with pytest.raises(StoreLost, match="replaced by another store"):
        ours.check_same()
