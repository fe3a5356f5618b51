"""A hostile user and a hostile machine: traversal ids, tampered stores, racing processes and threads,
stores deleted under running jobs, a full disk, Ctrl-C. Real processes, threads and stores on disk."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mistudio as ms
from mistudio.cli import main as cli

from conftest import TEXTS

SMALL = dict(layers=[0, 1], hooks=["residual", "mlp"], dtype="float32", chunk_mb=0.01)


def slow(delay: float = 0.1):
    return lambda index, batch_size: time.sleep(delay)


def tree(path: Path) -> dict:
    """Every file under ``path`` with its bytes: proof that nothing there changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def set_meta(store_dir: Path, **changes) -> None:
    doc = json.loads((store_dir / "zarr.json").read_text())
    doc["attributes"]["mistudio"].update(changes)
    (store_dir / "zarr.json").write_text(json.dumps(doc))


@pytest.fixture
def two_workspaces(gpt2_dir, tmp_path):
    """A workspace and, beside it, another one holding a finished and a failed store."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    done = ms.extract(gpt2_dir, TEXTS, workspace=str(other), progress=False, **SMALL)
    failed = ms.Workspace(str(other)).submit(gpt2_dir, TEXTS, before_batch=lambda i, b: 1 / 0, **SMALL).wait(60)
    assert failed.status == "FAILED"
    ms.Workspace(str(mine))
    return mine, other, done.id, failed.id


# -- 1. confinement -------------------------------------------------------------------------------------
BAD_IDS = ["../../other/extractions/{id}", "../other/extractions/{id}.zarr", "/tmp/x", "a/b", "..", ".hidden",
           "ext\\..\\x", "", "ext_1 2"]


def test_traversal_ids_refused_at_every_entry_point(two_workspaces, capsys):
    mine, other, done_id, failed_id = two_workspaces
    before = tree(other)
    ws = ms.Workspace(str(mine))
    for pattern in BAD_IDS:
        for target in (done_id, failed_id):
            bad = pattern.format(id=target)
            for call in (ws.delete, ws.open, ws.job, ws.resume, ws.retry, ws.cancel, ws.store,
                         lambda i: ws.delete(i, force=True), lambda i: ms.open_extraction(i, workspace=str(mine))):
                with pytest.raises(ms.InputError, match="not an extraction id|does not exist|not a mistudio"):
                    call(bad)
            for command in (["resume", bad], ["delete", bad, "--force"]):
                assert cli(["--workspace", str(mine), *command]) == 2
                assert "not an extraction id" in capsys.readouterr().err
    for bad in (None, 3, ["x"]):
        with pytest.raises(ms.InputError, match="not an extraction id"):
            ws.job(bad)
    assert tree(other) == before
    assert ms.Workspace(str(other)).extractions()["status"].tolist().count("COMPLETED") == 1


def test_jobs_panel_shows_a_bad_id_in_the_panel(gpt2_dir, workspace):
    from mistudio.widgets import JobsPanel

    panel = JobsPanel(ms.Workspace(workspace))
    panel._act("Resume", panel.workspace.resume, "../../etc")
    assert "not an extraction id" in panel.message.value


# -- 2. safe deletion -----------------------------------------------------------------------------------
def test_tampered_renamed_and_linked_stores_never_misdirect_cleanup(two_workspaces, gpt2_dir, tmp_path):
    mine, other, done_id, failed_id = two_workspaces
    ws = ms.Workspace(str(mine))
    own = ws.submit(gpt2_dir, TEXTS, before_batch=lambda i, b: 1 / 0, **SMALL).wait(60)
    extractions = mine / "extractions"
    # a copy of another workspace's failed store whose metadata id points back at the original
    copied = extractions / "copied.zarr"
    shutil.copytree(other / "extractions" / f"{failed_id}.zarr", copied)
    set_meta(copied, id=f"../../other/extractions/{failed_id}")
    # a store renamed by hand
    renamed = extractions / "renamed_by_hand.zarr"
    os.rename(extractions / f"{own.id}.zarr", renamed)
    # a link to a store outside the workspace
    (extractions / "linked.zarr").symlink_to(other / "extractions" / f"{done_id}.zarr")
    an_hour_ago = time.time() - 3600  # past the grace period of stores that may still be being created
    os.utime(extractions / "linked.zarr", (an_hour_ago, an_hour_ago), follow_symlinks=False)
    before = tree(other)

    listed = ws.extractions().set_index("id")
    assert listed.loc["copied", "status"] == "FAILED" and "copied or renamed" in listed.loc["copied", "problem"]
    assert listed.loc["linked", "status"] == "UNREADABLE" and listed.loc["linked", "damaged"]
    report = ws.cleanup(dry_run=False, force=True).set_index("id")
    assert report.loc["copied", "deleted"] and report.loc["renamed_by_hand", "deleted"]
    assert not report.loc["linked", "deleted"] and "outside" in report.loc["linked", "note"]
    assert not copied.exists() and not renamed.exists()
    assert (extractions / "linked.zarr").is_symlink()
    assert tree(other) == before  # nothing outside was touched, the original failed store included
    with pytest.raises(ms.InputError, match="outside the workspace"):
        ws.open("linked")


def test_completed_needs_force_and_damaged_needs_force(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    done = ms.extract(gpt2_dir, TEXTS, workspace=workspace, progress=False, **SMALL)
    with pytest.raises(ms.InputError, match="COMPLETED: deleting it loses its activations.*force=True"):
        ws.delete(done.id)
    assert cli(["--workspace", workspace, "delete", done.id]) == 2
    junk = Path(workspace) / "extractions" / "junk.zarr"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    old = time.time() - 3600
    os.utime(junk, (old, old))
    report = ws.cleanup(dry_run=False)
    assert report.set_index("id").loc["junk", "damaged"] and junk.exists()  # damaged: kept without force
    report = ws.cleanup(dry_run=False, force=True)
    assert report.set_index("id").loc["junk", "deleted"] and not junk.exists()
    assert ws.delete(done.id, force=True) > 0 and ws.extractions().empty


CLEANER = textwrap.dedent("""
    import os, sys, time
    import mistudio as ms
    root, stop = sys.argv[1], sys.argv[2]
    rounds = 0
    while not os.path.exists(stop):
        ms.Workspace(root).cleanup(dry_run=False, force=True)
        rounds += 1
    print(rounds, flush=True)
""")


def test_submits_race_a_cleanup_loop_in_another_process(gpt2_dir, workspace, tmp_path):
    ws = ms.Workspace(workspace)
    ms.extract(gpt2_dir, TEXTS[:2], workspace=workspace, progress=False, layers=[0])  # the folder exists
    stop = tmp_path / "stop"
    cleaner = subprocess.Popen([sys.executable, "-c", CLEANER, workspace, str(stop)], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        jobs = [ws.submit(gpt2_dir, TEXTS, layers=[0], max_samples=3) for _ in range(100)]
        for job in jobs:
            assert job.wait(120).status == "COMPLETED", job.error
    finally:
        stop.touch()
        rounds = int(cleaner.communicate(timeout=120)[0].strip() or 0)
    assert rounds > 0
    listed = ws.extractions()
    assert set(j.id for j in jobs) <= set(listed["id"]) and set(listed["status"]) == {"COMPLETED"}
    for job in jobs[::10]:
        assert job.extraction().activations("layers.0.residual")[:].any()
    assert not [p for p in os.listdir(Path(workspace) / "extractions") if p.startswith(".")]


def test_sixty_concurrent_submits_from_threads(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    jobs, errors = [], []
    lock = threading.Lock()

    def submit():
        try:
            job = ws.submit(gpt2_dir, TEXTS[:3], layers=[0])
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(exc)
            return
        with lock:
            jobs.append(job)

    threads = [threading.Thread(target=submit) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len({j.id for j in jobs}) == 60
    assert all(j.wait(120).status == "COMPLETED" for j in jobs)


# -- 4. a lost store is a failure -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_store_deleted_or_replaced_mid_run_fails_the_job(gpt2_dir, workspace, tmp_path, how):
    ws = ms.Workspace(workspace)
    started = threading.Event()
    job = ws.submit(gpt2_dir, "sample", max_samples=200, before_batch=lambda i, b: (started.set(), time.sleep(0.05)),
                    **SMALL)
    assert started.wait(60)
    location = Path(job.store.location)
    shutil.rmtree(location)
    if how == "replaced":
        other = ms.extract(gpt2_dir, TEXTS, workspace=str(tmp_path / "elsewhere"), progress=False, **SMALL)
        shutil.copytree(other.location, location)
        replacement = tree(location)
    job.wait(60)
    assert job.status == "FAILED" and job.error["error_type"] == "STORE_LOST"
    assert ("deleted" if how == "deleted" else "replaced") in job.error["error_message"]
    if how == "deleted":
        assert not location.exists()  # never recreated by the job's later writes
    else:
        assert tree(location) == replacement  # the other store is untouched



@pytest.mark.parametrize("shard_mb", [0, 0.04])
def test_a_store_deleted_right_after_the_writers_check_is_not_made_again(gpt2_dir, workspace, monkeypatch,
                                                                         shard_mb):
    """The writer checks the store before each batch. A delete just after that check used to be undone by the
    batch's chunk writes, which made the array's folder again with its parents: a folder of arrays without a
    zarr.json at the old path. Now nothing above a chunk's own folder is made: the job fails as STORE_LOST."""
    from mistudio.storage.store import ExtractionStore

    check, checks = ExtractionStore.check_same, []

    def check_then_delete(self):
        check(self)
        if threading.current_thread().name == "mistudio-writer":
            checks.append(self.location)
            if len(checks) == 3:
                shutil.rmtree(self.location)

    monkeypatch.setattr(ExtractionStore, "check_same", check_then_delete)
    job = ms.Workspace(workspace).submit(gpt2_dir, "sample", max_samples=200, shard_mb=shard_mb, **SMALL)
    job.wait(60)
    assert len(checks) >= 3 and not Path(checks[0]).exists()
    assert job.status == "FAILED" and job.error["error_type"] == "STORE_LOST", job.error
    assert "deleted or moved" in job.error["error_message"]


def test_a_write_through_zarr_to_a_deleted_store_makes_no_folder(gpt2_dir, tmp_path):
    """Statistics snapshots, caches and notes write through Zarr, whose local store makes its folder (and the
    parents) on open and on every write: a store deleted meanwhile is not made again."""
    from mistudio.storage.store import open_group

    ext = ms.extract(gpt2_dir, TEXTS, workspace=str(tmp_path / "ws"), progress=False, **SMALL)
    group = open_group(ext.location, mode="a")
    shutil.rmtree(ext.location)
    with pytest.raises(FileNotFoundError, match="deleted or moved"):
        group.attrs.update({"late": 1})
    with pytest.raises(FileNotFoundError, match="deleted or moved"):
        open_group(ext.location, mode="a", path="analysis/notes")
    assert not Path(ext.location).exists()


# -- 5. disk full -----------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or 'not root'}): "
                    "the disk-full test needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on the file system of ``path``."""
    ballast = path / "ballast"
    free = shutil.disk_usage(path).free
    with open(ballast, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return ballast


def test_disk_full_is_its_own_error_and_resume_equals_a_clean_run(gpt2_dir, small_disk, tmp_path):
    args = dict(layers=[0, 1, 2], hooks=["residual", "mlp", "attention"], dtype="float32", chunk_mb=0.05,
                max_samples=150, batch_size=2)
    clean = ms.extract(gpt2_dir, "sample", workspace=str(tmp_path / "clean"), progress=False, **args)
    assert clean.store.record.progress.tokens_total * 32 * 4 * 9 > 12_000_000  # more than will be free
    root = small_disk / "ws"
    ws = ms.Workspace(str(root))
    ballast = fill(small_disk, leave=3_000_000)
    job = ws.submit(gpt2_dir, "sample", **args).wait(120)
    assert job.status == "FAILED", job.status
    error = job.error
    assert error["error_type"] == "DISK_FULL" and error["resume_available"]
    assert "is full" in error["error_message"] and "free" in error["error_message"]
    assert "resume" in error["error_message"] and error["bytes_needed"] > 0
    assert job.meta["progress"]["samples_committed"] > 0  # what fitted was committed and kept
    ballast.unlink()
    resumed = ws.resume(job.id).wait(120)
    assert resumed.status == "COMPLETED", resumed.error
    for hp in clean.hook_points:
        np.testing.assert_array_equal(resumed.extraction().activations(hp)[:], clean.activations(hp)[:], err_msg=hp)


def test_disk_full_at_submit_leaves_no_store(gpt2_dir, small_disk):
    root = small_disk / "ws"
    ws = ms.Workspace(str(root))
    (root / "extractions").mkdir(parents=True)
    fill(small_disk, leave=0)
    with pytest.raises(ms.DiskFull, match="is full.*No store was created"):
        ws.submit(gpt2_dir, TEXTS, layers=[0])
    assert os.listdir(root / "extractions") == []


def _ctrl_c_as_in_a_terminal() -> None:
    """A child started from a background shell inherits SIGINT ignored; a terminal's Ctrl-C reaches it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# -- 6. Ctrl-C in the CLI -------------------------------------------------------------------------------
def test_cli_ctrl_c_keeps_what_was_saved_and_says_how_to_resume(gpt2_dir, workspace):
    env = {**os.environ, "MISTUDIO_WORKSPACE": workspace, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "mistudio.cli", "extract", "--model", gpt2_dir, "--layers", "0,1,2",
                              "--hooks", "residual,mlp,attention", "--batch-size", "1", "--dtype", "float32"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while True:  # wait until something is committed
        assert time.monotonic() < deadline and child.poll() is None
        listed = ms.Workspace(workspace, recover=False).extractions()
        if len(listed) and listed["samples_committed"].iloc[0] > 0:
            break
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    job_id = listed["id"].iloc[0]
    assert len(lines) == 1 and f"mistudio resume {job_id}" in lines[0] and "samples are saved" in lines[0]
    job = ms.Workspace(workspace).job(job_id)
    assert job.status == "CANCELLED" and job.meta["progress"]["samples_committed"] > 0


# -- a script that ends while its job runs -------------------------------------------------------------------
SCRIPT_ENDS = textwrap.dedent("""
    import sys, threading, time
    import mistudio as ms
    ws = ms.Workspace(sys.argv[1])
    at_batch_3 = threading.Event()
    def slowly(i, n):
        if i == 3:
            print("batch 3", flush=True)
            at_batch_3.set()
        time.sleep(float(sys.argv[3]))
    job = ws.submit(sys.argv[2], "sample", layers=[0], max_samples=40, batch_size=2, before_batch=slowly)
    print(job.id, flush=True)
    if len(sys.argv) > 4:  # end the script while the job extracts
        at_batch_3.wait(120)
""")


def test_a_script_that_ends_while_its_job_runs_waits_for_it(gpt2_dir, workspace):
    out = subprocess.run([sys.executable, "-c", SCRIPT_ENDS, workspace, gpt2_dir, "0.01"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    job_id = out.stdout.strip().splitlines()[0]
    assert f"waiting for 1 job(s) to finish before exiting ({job_id})" in out.stderr
    assert "Traceback" not in out.stderr and "cannot schedule new futures" not in out.stderr
    ext = ms.open_extraction(job_id, workspace=workspace)
    assert ext.status == "COMPLETED" and ext.n_samples == 40


def test_ctrl_c_while_a_script_waits_cancels_and_says_how_to_resume(gpt2_dir, workspace):
    child = subprocess.Popen([sys.executable, "-c", SCRIPT_ENDS, workspace, gpt2_dir, "0.3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=_ctrl_c_as_in_a_terminal)
    job_id = child.stdout.readline().strip()
    assert child.stdout.readline().strip() == "batch 3"  # its job runs (20 batches)
    said = ""
    while "waiting for 1 job(s)" not in said:  # the script has ended: its exit waits for the job (not a sleep)
        line = child.stderr.readline()
        assert line, f"the script ended without waiting for its job: {said[-2000:]}"
        said += line
    time.sleep(0.2)  # from its message into its wait (the message is printed just before the wait's try:)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    err = said + err
    assert child.returncode == 0
    assert f"job {job_id} is CANCELLED; what was saved is kept: resume it with" in err, err[-2000:]
    ext = ms.open_extraction(job_id, workspace=workspace)
    assert ext.status == "CANCELLED" and 0 < ext.committed_tokens() < ext.n_tokens
    assert ms.Workspace(workspace).resume(job_id).wait(120).status == "COMPLETED"


def test_a_kernel_that_shuts_down_stops_its_job_interrupted_and_resumable(gpt2_dir, workspace):
    """A Jupyter kernel shut down or restarted: nobody to wait for; the job stops at its next block with what it
    computed committed and ends FAILED/INTERRUPTED (the Studio's restart banner offers Resume)."""
    kernel = "import sys, types; sys.modules['ipykernel'] = types.ModuleType('ipykernel')  # as in a kernel\n"
    out = subprocess.run([sys.executable, "-c", kernel + SCRIPT_ENDS, workspace, gpt2_dir, "0.2", "mid-run"],
                         capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "waiting for" not in out.stderr, out.stderr[-2000:]
    job_id = out.stdout.strip().splitlines()[0]
    job = ms.Workspace(workspace).job(job_id)
    error = job.error
    assert job.status == "FAILED" and error["error_type"] == "INTERRUPTED" and error["resume_available"], error
    assert "its Jupyter kernel was shut down or restarted" in error["error_message"]
    ext = job.extraction()
    assert 0 < ext.committed_tokens() < ext.n_tokens and ext.verify().ok  # batches 0-2 at least, not all 20
    assert ms.Workspace(workspace).resume(job_id).wait(120).status == "COMPLETED"
