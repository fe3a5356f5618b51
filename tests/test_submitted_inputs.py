"""A queued job runs on what was submitted, or fails saying what changed: a notebook that rewrites its dataset file
(or re-saves its model folder) and submits again, in a loop, must not get every store filled from the last version.
Jobs run one at a time, so the later ones wait in the queue while the earlier one computes."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

import mistudio as ms
from mistudio.errors import InputError

from conftest import held_until
from test_model_identity import resave

OPTIONS = dict(layers=[1], hooks=["residual"], dtype="float32", max_length=16, batch_size=4)
TOPICS = ["apples", "bananas", "cherries"]


def write_rows(path, topic: str) -> None:
    path.write_text("".join(json.dumps({"text": f"{topic} number {i} is tasty"}) + "\n" for i in range(6)))


@pytest.fixture
def busy(gpt2_dir, workspace):
    """A workspace whose worker is held by a first job until ``release`` is set: the next submits wait in the queue."""
    ws, release = ms.Workspace(workspace), threading.Event()
    first = ws.submit(gpt2_dir, ["held"], before_batch=held_until(release), **OPTIONS)
    yield ws, release
    release.set()
    first.wait(60)


def first_text(job) -> str:
    ext = job.extraction()
    return ext.tokenizer.decode(ext.sample(0, tokens=False)["input_ids"])


def test_a_dataset_file_rewritten_after_submit_fails_its_job_and_leaves_no_store(gpt2_dir, busy, tmp_path):
    ws, release = busy
    data = tmp_path / "sweep.jsonl"
    jobs = {}
    for topic in TOPICS:  # the sweep: write the file, submit, next topic
        write_rows(data, topic)
        jobs[topic] = ws.submit(gpt2_dir, str(data), **OPTIONS)
    release.set()
    for topic in TOPICS:
        jobs[topic].wait(120)
    for topic in TOPICS[:-1]:
        job = jobs[topic]
        assert job.status == "FAILED" and job.error["error_type"] == "VALIDATION", (topic, job.status)
        message = job.error["error_message"]
        assert "changed after this job was submitted" in message and "sweep.jsonl" in message, message
        assert "file of its own" in message
        assert job.id not in set(ws.extractions()["id"])  # refused before any row was written: no store
    last = jobs[TOPICS[-1]]
    assert last.status == "COMPLETED", last.error
    assert first_text(last).startswith("cherries number 0")
    source = last.extraction().metadata["dataset"]["source"]
    assert source["kind"] == "path" and source["path"] == str(data)


def test_an_in_memory_dataset_changed_after_submit_changes_no_job(gpt2_dir, busy):
    ws, release = busy
    texts = ["apples number 0 is tasty", "apples number 1 is tasty"]
    job = ws.submit(gpt2_dir, texts, **OPTIONS)
    texts[0] = "bananas number 0 is tasty"  # the notebook reuses its list
    texts.append("cherries")
    release.set()
    assert job.wait(120).status == "COMPLETED", job.error
    assert job.extraction().n_samples == 2
    assert first_text(job).startswith("apples number 0")


def test_a_model_folder_resaved_after_submit_fails_its_job(gpt2_dir, busy, tmp_path):
    ws, release = busy
    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    job = ws.submit(str(folder), ["a text"], **OPTIONS)
    resave(folder, seed=1)  # a training loop saved its next step into the same folder
    after = ws.submit(str(folder), ["a text"], **OPTIONS)
    release.set()
    assert job.wait(120).status == "FAILED"
    message = job.error["error_message"]
    assert "the model changed after this job was submitted" in message and "model.safetensors" in message, message
    assert "folder of its own" in message
    assert after.wait(120).status == "COMPLETED", after.error  # submitted after the save: runs on it
    want = ms.open_extraction(after.id, workspace=ws.root).activations("layers.1.residual")[:]
    assert np.isfinite(want).all()


def test_the_check_names_the_file_and_the_time(tmp_path, gpt2_dir):
    from mistudio.inputs import SubmittedInputs
    from mistudio.request import Request

    data = tmp_path / "rows.txt"
    data.write_text("one\ntwo\n")
    submitted = SubmittedInputs.of(Request.build(model=gpt2_dir, dataset=str(data), layers=[0]))
    submitted.check_dataset()  # unchanged: nothing to say
    data.write_text("one\ntwo\nthree\n")
    with pytest.raises(InputError, match=r"the dataset changed after this job was submitted \(at \d\d:\d\d:\d\d\): "
                                         r"rows.txt in .* was written"):
        submitted.check_dataset()


def test_a_link_repointed_after_submit_fails_its_job(gpt2_dir, busy, tmp_path):
    """model='latest', a link a training loop repoints to its newest checkpoint: the job must not run on the one
    saved after submit under the name it was submitted with."""
    ws, release = busy
    first, second = tmp_path / "ckpt-1", tmp_path / "ckpt-2"
    shutil.copytree(gpt2_dir, first)
    shutil.copytree(gpt2_dir, second)
    resave(second, seed=2)
    latest = tmp_path / "latest"
    latest.symlink_to(first)
    job = ws.submit(str(latest), ["a text"], **OPTIONS)
    latest.unlink()
    latest.symlink_to(second)
    release.set()
    assert job.wait(120).status == "FAILED"
    assert "the model changed after this job was submitted" in job.error["error_message"]


def rewrite(path, text: str) -> None:
    """Write ``text`` as a new file in ``path``'s place (a new inode and modification time), as most tools save."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_a_dataset_rewritten_with_the_same_bytes_still_runs(gpt2_dir, busy, tmp_path):
    """A loop that regenerates the same file before each submit (one job per layer, say) changes no data: every
    queued job runs. A same-size rewrite with other bytes is still caught."""
    ws, release = busy
    data, other = tmp_path / "rows.jsonl", tmp_path / "other.jsonl"
    jobs = []
    for layer in (0, 1):
        write_rows(data, "apples")
        jobs.append(ws.submit(gpt2_dir, str(data), **{**OPTIONS, "layers": [layer]}))
    rewrite(data, data.read_text())
    write_rows(other, "apples")
    changed = ws.submit(gpt2_dir, str(other), **OPTIONS)
    rewrite(other, other.read_text().replace("apples", "grapes"))  # the same size, other rows
    release.set()
    for job in jobs:
        assert job.wait(120).status == "COMPLETED", job.error
        assert first_text(job).startswith("apples number 0")
    assert changed.wait(120).status == "FAILED"
    assert "changed after this job was submitted" in changed.error["error_message"]


def test_files_past_the_digest_budget_are_held_by_identity(tmp_path, gpt2_dir, monkeypatch):
    """Submit reads at most DIGEST_BUDGET bytes of an input (a large file would make submit slow): past that, a
    rewrite with the same bytes is reported as a change, loudly, never missed."""
    from mistudio import inputs
    from mistudio.request import Request

    data = tmp_path / "rows.txt"
    data.write_text("one\ntwo\n")
    request = Request.build(model=gpt2_dir, dataset=str(data), layers=[0])
    held = inputs.SubmittedInputs.of(request)
    monkeypatch.setattr(inputs, "DIGEST_BUDGET", 4)
    by_identity = inputs.SubmittedInputs.of(request)
    rewrite(data, "one\ntwo\n")
    read_from = held.identities("dataset")  # the job reads the file now
    held.check_dataset(read_from)
    with pytest.raises(InputError, match="rows.txt"):
        by_identity.check_dataset(read_from)


def test_a_file_changed_while_the_job_read_it_fails_even_if_its_bytes_come_back(gpt2_dir, workspace, tmp_path,
                                                                                 monkeypatch):
    """A, B, A: the notebook writes B after submit (the job reads B), then A again before the job's check. The bytes
    at the check are the submitted ones, but the rows read were not: the job must fail, not store B as A."""
    from mistudio import inputs

    data = tmp_path / "rows.jsonl"
    write_rows(data, "apples")
    submitted_bytes = data.read_text()
    check = inputs.SubmittedInputs.check_dataset

    def back_to_a_then_check(self, read_from=None):
        rewrite(data, submitted_bytes)
        return check(self, read_from)

    monkeypatch.setattr(inputs.SubmittedInputs, "check_dataset", back_to_a_then_check)
    ws = ms.Workspace(workspace)
    release = threading.Event()
    first = ws.submit(gpt2_dir, ["held"], before_batch=held_until(release), **OPTIONS)
    job = ws.submit(gpt2_dir, str(data), **OPTIONS)
    write_rows(data, "grapes")  # B, same size: the job will read it
    release.set()
    first.wait(60)
    assert job.wait(120).status == "FAILED", first_text(job)
    assert "changed after this job was submitted" in job.error["error_message"]
