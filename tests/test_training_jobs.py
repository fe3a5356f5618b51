"""SAE training as background jobs: real stores from ms.extract over a tiny GPT-2, the workspace's real runner
thread, and a real child process killed with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio.analysis.sae_training import CHECKPOINT_DIR, CHECKPOINT_FILE, TrainConfig
from mistudio.request import Request
from mistudio.saes import load_sae
from mistudio.training import (EVALUATION_FILE, HISTORY_FILE, RUN_FILE, SAME_DATA, TrainingJob, list_trainings,
                               read_history, read_record, submit_training, training_job)

HP = "layers.1.residual"
TIMING = ("tokens_per_s", "eta_s", "elapsed_s")
STATES = ["QUEUED", "LOADING", "TRAINING", "SAVING", "COMPLETED"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ext(gpt2_dir, tmp_path_factory):
    return ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual", "mlp"], max_samples=80, batch_size=32,
                      dtype="float32", workspace=str(tmp_path_factory.mktemp("extractions")), progress=False)


def small(steps: int, **kw) -> dict:
    """A tiny run's settings: top-k with k=4 unless another architecture is given (then its own setting only)."""
    topk = {"k": 4} if kw.get("architecture", "topk") == "topk" else {}
    return {"architecture": "topk", "d_sae": 64, **topk, "batch_size": 128, "n_tokens": 128 * steps, "lr": 3e-3,
            "progress_every_steps": 5, "checkpoint_every_steps": 0, **kw}


class Recorder:
    def __init__(self):
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, kind: str, job_id: str | None = None) -> list[dict]:
        return [e for e in self.events if e["event"] == kind and (job_id is None or e["job_id"] == job_id)]


def strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_a_run_trains_to_completed_with_events_metrics_and_evaluation(ext, tmp_path, gpt2_dir):
    ws = ms.Workspace(tmp_path / "ws")
    heard, own = Recorder(), Recorder()
    ws.subscribe(heard)
    job = ws.train_sae(ext, HP, **small(60))  # the Workspace's door to submit_training
    job.subscribe(own)
    assert job.wait(120).status == "COMPLETED", job.error
    assert [e["status"] for e in own.of("state")][-4:] == STATES[1:]
    assert [e["status"] for e in heard.of("state", job.id)] == STATES  # the workspace's listeners hear all
    assert all(e["kind"] == "training" for e in heard.events)
    progress = own.of("progress")
    steps = [e["step"] for e in progress]
    assert progress and steps == sorted(steps) and steps[-1] == 60
    assert {"loss", "l0", "explained_variance", "dead_fraction", "tokens_per_s", "eta_s", "lr"} <= set(progress[-1])
    done = own.of("completed")[0]
    evaluation = done["evaluation"]
    assert done["steps"] == 60 and done["tokens"] == 60 * 128 and done["sae_path"] == str(job.sae_path)
    # a decoder model: the next-token loss with the SAE spliced in, against clean and zero-ablation
    assert {"explained_variance", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero_ablation",
            "ce_loss_score"} <= set(evaluation)
    assert evaluation["explained_variance"] > 0.3 and 0 < evaluation["l0"] <= 4
    # the folder: run.json (typed), history, checkpoint, the SAE and its evaluation
    folder = tmp_path / "ws" / "saes" / job.id
    record = read_record(folder)
    assert record.status == "COMPLETED" and record.extraction.id == ext.id and record.hook_point == HP
    assert record.config["d_sae"] == 64 and record.d_in == 32 and record.progress.step == 60
    assert record.metrics["step"] == 60 and record.evaluation == evaluation and record.error is None
    assert record.timings.train_seconds > 0 and record.timings.finished >= record.timings.started
    assert json.loads((folder / EVALUATION_FILE).read_text()) == evaluation
    assert (folder / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    history = read_history(folder)
    assert [h["step"] for h in history] == list(range(5, 61, 5)) and history[-1] == record.metrics
    assert job.history() == history and job.progress["step"] == 60
    # the SAE: mistudio loads it; it reconstructs as the evaluation says
    sae = load_sae(job.sae_path)
    assert (sae.hook_point, sae.d_in, sae.d_sae, sae.k) == (HP, 32, 64, 4)
    assert job.sae().fingerprint == sae.fingerprint
    # listed
    row = next(r for r in list_trainings(ws) if r["id"] == job.id)
    assert row["status"] == "COMPLETED" and row["step"] == 60 and row["eval_explained_variance"] == pytest.approx(
        evaluation["explained_variance"]) and row["sparsity"] == "k=4" and row["extraction"] == ext.id
    frame = ws.trainings()
    assert frame.loc[frame["id"] == job.id, "status"].item() == "COMPLETED"
    assert str(frame["created"].dtype).startswith("datetime64")
    # a handle from disk (another Workspace object on the folder) reads the same
    other = training_job(ms.Workspace(tmp_path / "ws"), job.id)
    assert other.status == "COMPLETED" and other.evaluation == evaluation
    assert ms.Workspace(tmp_path / "ws").training(job.id).evaluation == evaluation


def test_the_saved_sae_loads_in_sae_lens_and_encodes_the_same(ext, tmp_path):
    sl = pytest.importorskip("sae_lens")
    ws = ms.Workspace(tmp_path / "ws")
    job = submit_training(ws, ext, HP, evaluate=False, **small(20, architecture="jumprelu", l0_coefficient=1.0))
    assert job.wait(120).status == "COMPLETED", job.error
    assert job.evaluation is None and not (job.folder / EVALUATION_FILE).exists()
    theirs = sl.SAE.load_from_disk(str(job.sae_path))
    assert theirs.cfg.architecture() == "jumprelu" and theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.from_numpy(ext.activations(HP)[:256])
    torch.testing.assert_close(theirs.encode(x), job.sae().encode(x), rtol=1e-5, atol=1e-6)


def test_cancel_mid_run_then_resume_equals_an_uninterrupted_run_bit_for_bit(ext, tmp_path):
    ws = ms.Workspace(tmp_path / "ws")
    settings = small(80, checkpoint_every_steps=7, lr_warm_up_steps=5, lr_decay_steps=20, dead_window_tokens=2048)
    whole = submit_training(ws, ext, HP, evaluate=False, **settings)
    assert whole.wait(120).status == "COMPLETED", whole.error

    def cancel_at_first_progress(event: dict) -> None:  # on the job's thread: it stops before its next step
        if event["event"] == "progress" and event["job_id"] != whole.id:
            ws.runner.live_job(event["job_id"]).cancel()

    ws.subscribe(cancel_at_first_progress)  # before submitting: the first report (always sent) is heard
    halves = submit_training(ws, ext, HP, evaluate="reconstruction", **settings)
    assert halves.wait(120).status == "CANCELLED", halves.error
    ws.unsubscribe(cancel_at_first_progress)
    state = torch.load(halves.folder / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=False)
    stopped = state["step"]
    assert stopped == 5 and not state["finished"] and not halves.sae_path.exists()
    assert halves.record.progress.step <= stopped and halves.error is None
    assert ws.runner.live_job(halves.id) is None
    resumed = halves.resume()
    assert resumed.id == halves.id and resumed.folder == halves.folder
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    record = resumed.record
    assert record.resumes[0]["previous_status"] == "CANCELLED" and record.resumes[0]["last_step"] <= stopped
    assert (whole.sae_path / "sae_weights.safetensors").read_bytes() == \
        (resumed.sae_path / "sae_weights.safetensors").read_bytes()
    assert strip(whole.history()) == strip(resumed.history())
    assert "ce_clean" not in record.evaluation and record.evaluation["explained_variance"] > 0
    with pytest.raises(ms.InputError, match="already COMPLETED"):
        resumed.resume()


def test_a_queued_run_cancelled_never_trains_and_can_resume(ext, tmp_path):
    ws = ms.Workspace(tmp_path / "ws")
    first = submit_training(ws, ext, HP, evaluate=False, **small(60))
    queued = submit_training(ws, ext, HP, evaluate=False, **small(10))
    queued.cancel()
    assert queued.wait(120).status == "CANCELLED"
    assert not (queued.folder / CHECKPOINT_DIR).exists() and first.wait(120).status == "COMPLETED"
    with pytest.raises(ms.InputError, match="is CANCELLED: extract with its SAE once it is COMPLETED"):
        queued.extract_arguments()
    again = ms.Workspace(tmp_path / "ws")
    resumed = training_job(again, queued.id).resume()
    assert resumed.wait(120).status == "COMPLETED" and resumed.record.progress.step == 10


def test_retry_with_overrides_makes_a_linked_run(ext, tmp_path):
    ws = ms.Workspace(tmp_path / "ws")
    old = submit_training(ws, ext, HP, evaluate=False, **small(10, d_sae=None, expansion_factor=2))
    assert old.wait(120).status == "COMPLETED"
    new = old.retry(d_sae=48, k=8, hook_point="layers.1.mlp")  # d_sae replaces the old expansion factor
    assert new.id != old.id and new.folder != old.folder
    assert new.wait(120).status == "COMPLETED", new.error
    record = new.record
    assert (record.retry_of, record.retry_count, record.retry_reason) == (old.id, 1, "completed")
    assert record.retry_overrides == {"d_sae": 48, "expansion_factor": None, "k": 8, "hook_point": "layers.1.mlp"}
    assert record.config["expansion_factor"] is None and record.d_sae == 48 and record.hook_point == "layers.1.mlp"
    assert new.sae().hook_point == "layers.1.mlp" and new.sae().k == 8
    assert old.record.config["expansion_factor"] == 2  # the old run is left as it was
    assert {r["id"]: r["retry_of"] for r in list_trainings(ws)} == {new.id: old.id, old.id: ""}


def test_a_listing_while_a_run_is_being_set_up_leaves_it_alone(ext, tmp_path, monkeypatch):
    """The Train tab lists runs (which marks runs whose process died) right after a submit wrote the new run's
    QUEUED record and before it is queued: the run names this process and is not a crashed one's."""
    import mistudio.training as training

    ws, write, marked = ms.Workspace(tmp_path / "ws"), training.write_record, []

    def write_then_list(folder, record, **options):
        write(folder, record, **options)
        if record.status == "QUEUED" and not marked:
            other = ms.Workspace(tmp_path / "ws", recover=False)
            marked.append([r["id"] for r in list_trainings(other) if r["status"] == "FAILED"])

    monkeypatch.setattr(training, "write_record", write_then_list)
    job = submit_training(ws, ext, HP, evaluate=False, **small(5))
    assert marked == [[]], "a run being set up in this process was marked as interrupted"
    assert job.wait(120).status == "COMPLETED", job.error


def test_a_timeout_fails_resumable_and_a_retry_without_it_completes(ext, tmp_path):
    ws = ms.Workspace(tmp_path / "ws")
    job = submit_training(ws, ext, HP, evaluate=False, timeout_s=1e-6, **small(10))
    assert job.wait(120).status == "FAILED"
    error = job.error
    assert error["error_type"] == "TIMEOUT" and error["resume_available"]
    assert "time limit" in error["error_message"] and "pass n_tokens=" in error["error_message"]
    resumed = job.resume()  # with the same limit again: it times out again
    assert resumed.wait(120).status == "FAILED" and resumed.error["error_type"] == "TIMEOUT"
    assert len(resumed.record.resumes) == 1
    retried = job.retry(timeout_s=None)
    assert retried.wait(120).status == "COMPLETED" and retried.record.retry_reason == "TIMEOUT"


@pytest.mark.parametrize("kwargs, param, words", [
    ({"k": 0}, "k", "k=0 must be a positive whole number"),
    ({"architecture": "gated"}, "architecture", "is not one of"),
    ({"lr_rate": 0.1}, "lr_rate", "did you mean lr?"),
    ({"k": 100}, "k", "k=100 is larger than d_sae=64"),
    ({"batch_size": 10 ** 6}, "batch_size", "is more than the"),
    ({"d_sae": 10 ** 12}, "d_sae", r"d_sae=1,000,000,000,000 that needs about .* GiB to train"),
    ({"d_sae": 10 ** 12, "batch_size": 10 ** 6}, "batch_size",  # every problem at once, none hiding another
     r"2 settings are wrong: \(1\) .*batch_size=1000000 is more .*; \(2\) .*d_sae=1,000,000,000,000 that"),
    ({"d_sae": 32, "k": 100, "batch_size": 10 ** 6}, "k", r"2 settings are wrong: \(1\) .*k=100 .*\(2\) .*batch"),
    ({"n_tokens": 100, "epochs": 1.0}, "epochs", "not both"),
    ({"timeout_s": -1}, "timeout_s", "positive number of seconds"),
    ({"evaluate": "yes"}, "evaluate", "is not True, False or 'reconstruction'"),
    ({"config": "topk"}, "config", "config='topk' must be a TrainConfig or a dict of its settings"),
])
def test_invalid_settings_create_nothing(ext, tmp_path, kwargs, param, words):
    ws = ms.Workspace(tmp_path / "ws")
    with pytest.raises(ms.InputError, match=words) as caught:
        submit_training(ws, ext, HP, **{**small(5), **kwargs})
    assert caught.value.param == param
    assert not (tmp_path / "ws" / "saes").exists() and list_trainings(ws) == []


def test_bad_extraction_or_hook_point_create_nothing(ext, tmp_path):
    ws = ms.Workspace(tmp_path / "ws")
    with pytest.raises(ms.InputError, match="hook point 'layers.2.residual' is not in extraction") as caught:
        submit_training(ws, ext, "layers.2.residual", **small(5))
    assert caught.value.param == "hook_point"
    with pytest.raises(ms.InputError, match="no extraction 'ext_nope'"):
        submit_training(ws, "ext_nope", HP, **small(5))
    with pytest.raises(ms.InputError, match="is not an extraction") as caught:
        submit_training(ws, 42, HP, **small(5))
    assert caught.value.param == "extraction"
    assert not (tmp_path / "ws" / "saes").exists()


def test_extract_arguments_build_a_request_with_the_sae(ext, tmp_path, gpt2_dir):
    ws = ms.Workspace(tmp_path / "ws")
    job = submit_training(ws, ext, "layers.1.mlp", evaluate=False, **small(5))
    job.wait(120)
    arguments = job.extract_arguments()
    same_data = {name: ext.record.params.model_dump()[name] for name in SAME_DATA}
    assert same_data["max_samples"] == 80 and same_data["text_column"] == "text"
    assert same_data["dtype"] == "float32"  # the store's, not the float16 a new request would take
    assert arguments == {"saes": {"layers.1.mlp": str(job.sae_path)}, "model": gpt2_dir, "layers": [1],
                         "hooks": ["mlp"], "dataset": "sample", **same_data}
    request = Request.build(**arguments)
    assert request.saes == {"layers.1.mlp": str(job.sae_path)} and request.hook_points == ["layers.1.mlp"]


def test_a_deleted_run_folder_stops_the_job_without_recreating_it(ext, tmp_path):
    import shutil

    ws = ms.Workspace(tmp_path / "ws")
    started = threading.Event()
    job = submit_training(ws, ext, HP, evaluate=False, **small(4000, progress_every_steps=1))

    def on_progress(event: dict) -> None:
        if event["event"] == "progress":
            started.set()

    job.subscribe(on_progress)
    assert started.wait(60)
    shutil.rmtree(job.folder)
    assert job.wait(60).status == "FAILED"
    assert job.ended_in_memory and job.error["error_type"] == "STORE_LOST"
    assert training_job(ws, job.id) is job  # the runner keeps the end it could not write


def training_on_a_copy(ext, tmp_path) -> tuple:
    """A long run on a copy of ``ext`` (which a test may take away), once it is training: (copy, workspace, job)."""
    import shutil

    copy = ms.open_extraction(shutil.copytree(ext.location, tmp_path / "copy.zarr"))
    ws = ms.Workspace(tmp_path / "ws")
    started = threading.Event()
    job = submit_training(ws, copy, HP, evaluate=False, **small(4000, progress_every_steps=1))
    job.subscribe(lambda event: started.set() if event["event"] == "progress" else None)
    assert started.wait(60)
    return copy, ws, job


def test_an_extraction_deleted_while_the_run_reads_it_fails_plainly_not_resumable(ext, tmp_path):
    import shutil

    copy, _ws, job = training_on_a_copy(ext, tmp_path)
    shutil.rmtree(copy.location)
    assert job.wait(60).status == "FAILED"
    error = job.error
    assert error["error_type"] == "VALIDATION" and not error["resume_available"], error
    assert "is gone" in error["error_message"] and "deleted while this run read it" in error["error_message"]


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    import mistudio as ms
    from mistudio.training import submit_training
    ws = ms.Workspace(sys.argv[1])
    ext = ms.open_extraction(sys.argv[2])
    job = submit_training(ws, ext, "layers.1.residual", evaluate=False, architecture="topk", d_sae=64, k=4,
                          batch_size=128, n_tokens=128 * 120, lr=3e-3, progress_every_steps=2,
                          checkpoint_every_steps=5)
    # a slow listener on the job's thread: about 7 steps a second, time enough to kill it mid-run
    job.subscribe(lambda e: time.sleep(0.3) if e["event"] == "progress" else None)
    print(job.id, flush=True)
    job.wait()
""")


@pytest.mark.slow  # a child process imports torch: ~7 s on an idle machine, more on a busy one
def test_sigkill_mid_run_is_listed_interrupted_and_resumes_exactly(ext, tmp_path):
    root = tmp_path / "ws"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), ext.location], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).parents[1])
    try:
        run_id = child.stdout.readline().strip()
        folder = root / "saes" / run_id
        deadline = time.monotonic() + 120
        while not ((folder / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file() and read_record(folder).progress.step >= 20):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        ws = ms.Workspace(root)
        assert list_trainings(ws)[0]["status"] == "TRAINING"  # alive: listing must not mark it
        with pytest.raises(ms.StoreBusy, match="in another process"):
            training_job(ws, run_id).resume()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ws = ms.Workspace(root)  # a new kernel asks for the run by its id first: it is marked, not TRAINING forever
    assert (training_job(ws, run_id).status, training_job(ws, run_id).error["error_type"]) == ("FAILED", "INTERRUPTED")
    row = list_trainings(ws)[0]
    assert (row["id"], row["status"], row["error"]) == (run_id, "FAILED", "INTERRUPTED")
    assert "kernel was restarted or crashed" in row["message"]
    job = training_job(ws, run_id)
    assert job.error["resume_available"] and job.record.error.model_extra["interrupted_in"] == "TRAINING"
    killed_at = torch.load(folder / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=False)["step"]
    assert 5 <= killed_at < 120
    resumed = job.resume()
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    # the same run uninterrupted, here
    whole = submit_training(ws, ext, HP, evaluate=False, **small(120, progress_every_steps=2))
    assert whole.wait(120).status == "COMPLETED", whole.error
    assert (whole.sae_path / "sae_weights.safetensors").read_bytes() == \
        (resumed.sae_path / "sae_weights.safetensors").read_bytes()
    assert strip(whole.history()) == strip(resumed.history())
    assert isinstance(resumed, TrainingJob) and read_record(folder).resumes[0]["previous_error"] == "INTERRUPTED"
    assert (folder / RUN_FILE).is_file() and (folder / HISTORY_FILE).is_file()


def test_an_extraction_deleted_before_the_run_starts_fails_it_plainly(gpt2_dir, ext, tmp_path):
    import shutil

    ws = ms.Workspace(tmp_path / "ws")
    doomed = ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual"], max_samples=20, batch_size=32,
                        dtype="float32", workspace=str(tmp_path / "ws"), progress=False)
    release, held = threading.Event(), []

    def hold_the_first_run(event: dict) -> None:  # on the runner's thread: nothing else starts meanwhile
        if event.get("kind") == "training" and event.get("status") == "LOADING" and not held:
            held.append(event["job_id"])
            release.wait(30)

    ws.subscribe(hold_the_first_run)
    first = submit_training(ws, ext, HP, evaluate=False, **small(5))
    queued = submit_training(ws, doomed, HP, evaluate=False, **small(2, batch_size=64))
    with pytest.raises(ms.StoreBusy, match=f"read by SAE training run {queued.id}"):  # queued: it will read it
        ws.delete(doomed.id, force=True)
    shutil.rmtree(doomed.location)  # removed behind mistudio's back: the run must still fail plainly
    release.set()
    assert queued.wait(60).status == "FAILED" and first.wait(60).status == "COMPLETED" and held == [first.id]
    error = queued.error
    assert error["error_type"] == "VALIDATION" and not error["resume_available"]
    assert f"extraction {doomed.id} is gone" in error["error_message"]
    with pytest.raises(ms.InputError, match="cannot resume: it failed \\[VALIDATION\\]"):
        queued.resume()
    with pytest.raises(ms.InputError, match=f"extraction {doomed.id} of training run {queued.id} is gone") as caught:
        queued.retry()
    assert caught.value.param == "extraction"
    retried = queued.retry(extraction=ext)  # the same settings on another extraction
    assert retried.wait(60).status == "COMPLETED" and retried.record.retry_overrides == {"extraction": ext.id}


def test_a_short_run_reports_progress_about_every_twentieth_of_it_by_default(ext, tmp_path):
    """The Train tab's defaults on a small extraction make a run of a few steps: it reports every step (the bar
    and the curve move from the first one), not every 10 (a bar at 0 for most of the run, a curve of two points)."""
    ws = ms.Workspace(tmp_path / "ws")
    settings = {k: v for k, v in small(11).items() if k != "progress_every_steps"}  # the default, as the tab
    job = ws.train_sae(ext, HP, evaluate=False, **settings)
    assert job.wait(120).status == "COMPLETED", job.error
    assert [h["step"] for h in job.history()] == list(range(1, 12))
    assert job.record.config["progress_every_steps"] is None  # said as "the default", so a resume reads it again
    job = ws.train_sae(ext, HP, evaluate=False, **{**settings, "n_tokens": 128 * 60})
    assert job.wait(120).status == "COMPLETED", job.error
    assert [h["step"] for h in job.history()] == list(range(3, 61, 3))  # 20 reports


@pytest.mark.parametrize("total_steps, every", [(1, 1), (11, 1), (20, 1), (21, 2), (60, 3), (100, 5), (200, 10),
                                                (50_000, 10), (1_000_000, 200)])
def test_the_default_progress_interval_is_a_twentieth_of_a_short_run_and_every_10_steps_of_a_long_one(
        total_steps, every):
    """Short runs: about 20 reports. Long runs: every 10 steps as before (a report costs a device sync and a
    history line), and at most about 5,000 reports (the history file and the checkpoint's copy stay small)."""
    assert TrainConfig().progress_interval(total_steps) == every
    assert TrainConfig(progress_every_steps=7).progress_interval(total_steps) == 7  # asked for: as asked


def test_extract_arguments_of_a_run_on_in_memory_data_ask_for_the_data(gpt2_dir, tmp_path):
    """ws.submit(**job.extract_arguments()) must not fall back on the bundled sample when the SAE was trained on a
    list of texts: the arguments say what is missing, and take the data given."""
    ws = ms.Workspace(tmp_path / "ws")
    texts = [f"my own text number {i}, about apples" for i in range(40)]
    mine = ws.submit(gpt2_dir, texts, layers=[1], hooks=["residual"], dtype="float32").wait(120)
    job = submit_training(ws, mine.extraction(), HP, evaluate=False, **small(3, batch_size=64))
    assert job.wait(120).status == "COMPLETED", job.error
    with pytest.raises(ms.InputError, match="in-memory data.*pass dataset=") as caught:
        job.extract_arguments()
    assert caught.value.param == "dataset"
    arguments = job.extract_arguments(dataset=texts)
    with_sae = ws.submit(**arguments).wait(120)
    assert with_sae.status == "COMPLETED" and with_sae.extraction().n_samples == 40
    assert "dataset" not in job.extract_arguments(partial=True)  # the Studio asks in its Dataset tab


def test_resume_while_the_extraction_is_away_is_refused_and_keeps_the_checkpoint(ext, tmp_path):
    import shutil

    copy, ws, job = training_on_a_copy(ext, tmp_path)
    assert job.cancel().wait(60).status == "CANCELLED"
    away = shutil.move(copy.location, tmp_path / "elsewhere.zarr")  # a disk not mounted yet, a folder moved
    with pytest.raises(ms.InputError, match="not at .*stays CANCELLED with its checkpoint") as caught:
        training_job(ws, job.id).resume()
    assert caught.value.param == "extraction"
    assert training_job(ws, job.id).status == "CANCELLED"
    shutil.move(away, copy.location)
    resumed = training_job(ws, job.id).resume()
    assert resumed.cancel().wait(60).status == "CANCELLED"  # it ran again from its checkpoint


def test_deleting_an_extraction_a_training_run_reads_is_refused_naming_the_run(gpt2_dir, tmp_path):
    ws = ms.Workspace(tmp_path / "ws")
    source = ws.submit(gpt2_dir, "sample", layers=[1], hooks=["residual"], max_samples=40, dtype="float32")
    assert source.wait(120).status == "COMPLETED"
    started = threading.Event()
    job = submit_training(ws, source.extraction(), HP, evaluate=False, **small(4000, progress_every_steps=1))
    job.subscribe(lambda event: started.set() if event["event"] == "progress" else None)
    try:
        assert started.wait(60)
        with pytest.raises(ms.StoreBusy, match=f"read by SAE training run {job.id}.*cancel it"):
            ws.delete(source.id, force=True)
        assert source.id in set(ws.extractions()["id"])
    finally:
        job.cancel().wait(60)
    ws.delete(source.id, force=True)  # the run ended: nothing reads it now


@pytest.mark.parametrize("value, words", [(None, "None for"), (3, "3 for"),
                                          (load_sae, "not a folder")])
def test_saes_values_that_are_not_folders_are_refused_by_name(gpt2_dir, value, words):
    with pytest.raises(ms.InputError, match=f"{words}.*sae.save"):
        Request.build(model=gpt2_dir, layers=[1], saes={HP: value})


def test_a_training_run_is_taken_as_its_sae_folder(ext, tmp_path, gpt2_dir):
    ws = ms.Workspace(tmp_path / "ws")
    job = submit_training(ws, ext, HP, evaluate=False, **small(3))
    assert job.wait(120).status == "COMPLETED", job.error
    assert Request.build(model=gpt2_dir, layers=[1], saes={HP: job}).saes == {HP: str(job.sae_path)}


def test_a_model_moved_before_evaluation_says_how_to_measure_the_loss(gpt2_dir, tmp_path):
    """The SAE is trained and saved; the next-token loss needs the model, which moved: the evaluation says so and
    names the call that measures it from the model's new folder, and that call works."""
    import shutil

    from mistudio.analysis.sae_training import evaluate_sae

    folder = Path(shutil.copytree(gpt2_dir, tmp_path / "model"))
    ws = ms.Workspace(tmp_path / "ws")
    source = ws.submit(str(folder), "sample", layers=[1], hooks=["residual"], max_samples=40, dtype="float32")
    assert source.wait(120).status == "COMPLETED"
    moved = shutil.move(folder, tmp_path / "moved")
    job = submit_training(ws, source.extraction(), HP, **small(3))
    assert job.wait(120).status == "COMPLETED", job.error
    message = json.loads((job.folder / EVALUATION_FILE).read_text())["ce_error"]
    assert str(folder) in message and "evaluate_sae(job.sae(), job.extraction(), job.hook_point, model=" in message
    figures = evaluate_sae(job.sae(), job.extraction(), job.hook_point, model=moved)
    assert figures["ce_clean"] > 0 and "ce_spliced" in figures


def test_a_cancel_during_the_evaluation_stops_it_and_resume_evaluates_the_saved_sae(ext, tmp_path):
    """Cancel reaches the evaluation too (it reads the whole store: minutes on a real one): the run ends CANCELLED
    with its SAE saved, and a resume evaluates that SAE without training again."""
    ws = ms.Workspace(tmp_path / "ws")
    job = submit_training(ws, ext, HP, evaluate="reconstruction", **small(6))

    def on_saving(event: dict) -> None:  # on the job's thread, before the evaluation starts
        if event["event"] == "state" and event["status"] == "SAVING":
            job.cancel()

    job.subscribe(on_saving)
    assert job.wait(120).status == "CANCELLED", job.error
    saved = load_sae(job.sae_path).fingerprint
    assert job.evaluation is None and job.record.progress.step == 6
    resumed = job.resume()
    assert resumed.wait(120).status == "COMPLETED", resumed.error
    assert resumed.evaluation["explained_variance"] is not None and load_sae(job.sae_path).fingerprint == saved
    assert [h["step"] for h in resumed.history()] == [h["step"] for h in job.history()]  # no step trained again


def test_the_time_limit_is_the_trainings_not_the_evaluations(ext, tmp_path):
    """A resume gets the same time limit again: were the evaluation held to it, a run whose evaluation alone takes
    longer could never complete."""
    ws = ms.Workspace(tmp_path / "ws")
    job = submit_training(ws, ext, HP, evaluate="reconstruction", timeout_s=8, **small(2))  # trains in well under 8 s

    def past_the_limit(event: dict) -> None:  # on the job's thread, once trained, before the evaluation
        if event["event"] == "state" and event["status"] == "SAVING":
            time.sleep(max(0.0, job._deadline - time.time() + 0.5))

    job.subscribe(past_the_limit)
    assert job.wait(120).status == "COMPLETED", job.error
    assert job.evaluation["explained_variance"] is not None


def test_extract_arguments_with_other_data_keep_how_it_was_read_even_once_the_extraction_is_gone(gpt2_dir, tmp_path):
    """The run records how its extraction read the data: with the store deleted, extract_arguments(dataset=...) still
    windows as it did; another dataset's own column and length are its own, not the first's max_samples."""
    import shutil

    ws = ms.Workspace(tmp_path / "ws")
    texts = [f"sample {i}: " + "the cat sat on the mat and looked at the dog " * 6 for i in range(30)]
    ext = ms.extract(gpt2_dir, texts, layers=[1], window=32, stride=16, add_special_tokens=False, max_samples=20,
                     dtype="float32", workspace=str(ws.root), progress=False)
    job = submit_training(ws, ext, HP, evaluate=False, **small(3))
    assert job.wait(120).status == "COMPLETED", job.error
    shutil.rmtree(ext.location)
    more = texts + [f"another text {i} " * 20 for i in range(40)]
    arguments = job.extract_arguments(dataset=more)
    assert (arguments["window"], arguments["stride"], arguments["add_special_tokens"]) == (32, 16, False)
    assert "max_samples" not in arguments and arguments["dataset"] is more
    again = ms.Workspace(tmp_path / "ws2").submit(**arguments).wait(120)
    assert again.status == "COMPLETED" and again.extraction().n_samples == 70


@pytest.mark.parametrize("exclude_special", [False, True])
def test_the_evaluation_is_over_the_rows_the_run_trained_on(gpt2_dir, tmp_path, exclude_special):
    """A run with exclude_special=False trains on the special tokens' rows too, so it is evaluated on them too;
    the evaluation says which rows it used."""
    texts = [f"<|endoftext|> {t}" for t in ms.sample_texts()[:40]]
    store = ms.extract(gpt2_dir, texts, layers=[1], dtype="float32", workspace=str(tmp_path / "x"), progress=False)
    special = int(np.isin(store.store.group["tokens/input_ids"][:], store.tokenizer.all_special_ids).sum())
    assert special >= 40
    job = ms.Workspace(tmp_path / "ws").train_sae(store, HP, evaluate="reconstruction",
                                                  **small(10, exclude_special=exclude_special))
    assert job.wait(120).status == "COMPLETED", job.error
    assert job.evaluation["n_tokens"] == store.n_tokens - (special if exclude_special else 0)
    assert job.evaluation["exclude_special"] is exclude_special
    from mistudio.widgets.train_panel import TrainPanel
    shown = TrainPanel._evaluation_html(job.evaluation)
    assert f"over {job.evaluation['n_tokens']:,} stored tokens, special tokens " \
           f"{'left out' if exclude_special else 'included'}" in shown



def test_a_sparsity_setting_of_another_architecture_is_refused(ext, tmp_path):
    """--architecture standard --k 8 ran and recorded k=8, which a ReLU SAE never reads: refused by name, with both
    fixes; the architecture's own setting (and the relu alias) runs."""
    from mistudio.training import make_config

    ws = ms.Workspace(tmp_path / "ws")
    with pytest.raises(ms.InputError, match=r"k=8 applies to topk SAEs only, and this run trains a 'standard' one: "
                                            r"leave it out, or pass architecture='topk'"):
        submit_training(ws, ext, HP, architecture="standard", k=8)
    with pytest.raises(ms.InputError, match="l1_coefficient=2.0 applies to standard SAEs only"):
        make_config(None, {"l1_coefficient": 2.0})  # the default architecture is top-k
    assert make_config(None, {"architecture": "relu", "l1_coefficient": 2.0}).l1_coefficient == 2.0
    assert not (tmp_path / "ws" / "saes").exists() or not list((tmp_path / "ws" / "saes").iterdir())


def test_settings_given_by_name_are_refused_by_name(ext, tmp_path):
    """ws.train_sae(..., architecture='top-k'): the message names the keyword as typed and the architecture meant,
    not the class's field (TrainConfig.architecture=...), which a TrainConfig built by hand still names."""
    ws = ms.Workspace(tmp_path / "ws")
    with pytest.raises(ms.InputError) as caught:
        ws.train_sae(ext, HP, architecture="top-k")
    said = str(caught.value)
    assert said.startswith("architecture='top-k' is not one of") and "did you mean architecture='topk'?" in said
    assert "TrainConfig" not in said
    from mistudio.analysis.sae_training import TrainConfig
    with pytest.raises(ms.InputError, match=r"^TrainConfig\.architecture='top-k'"):
        TrainConfig(architecture="top-k")
