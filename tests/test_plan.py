"""One plan for the run and the estimate: for every combination of options, what the estimate says is what the
store holds; and a request that fails a check leaves no store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import mistudio as ms
from mistudio.plan import check
from mistudio.request import Request

from conftest import DU_TOLERANCE, disk_usage, file_bytes

CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
TEMPLATE_ROWS = [{"messages": [{"role": "user", "content": f"Question {i}: what is in layer {i}?"},
                               {"role": "assistant", "content": "The residual stream, mostly. " * (1 + i % 4)}]}
                 for i in range(12)]


def _mixed_file(folder) -> str:
    """Text rows, and rows that give no sample for five different reasons."""
    texts = ms.sample_texts()[:30]
    rows = [{"text": t} for t in texts] + [{"text": ""}, {"text": "   "}, {"text": 5}, {"other": "no text here"},
                                          *TEMPLATE_ROWS[:4]]
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _chat_file(folder) -> str:
    path = folder / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TEMPLATE_ROWS + [{"text": "not a chat"}]))
    return str(path)


CELLS = {
    "plain": dict(max_samples=24, max_length=32),
    "windows": dict(max_samples=16, window=24, stride=10),
    "windows+special+shards": dict(max_samples=16, window=24, stride=12, exclude_special=True, chunk_mb=0.01,
                                   shard_mb=0.05),
    "skipped rows": dict(dataset="mixed", max_length=48),
    "chat": dict(dataset="chats", chat_template=CHAT, max_length=64),
    "token budget, no shards": dict(max_samples=30, max_length=40, max_batch_tokens=200, shard_mb=0),
    "exclude special, shards": dict(max_samples=20, max_length=40, exclude_special=True, chunk_mb=0.01,
                                    shard_mb=0.04),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert-like", "decoder"])
def test_the_estimate_is_the_run_for_every_option(model, minilm_dir, gpt2_dir, tmp_path):
    folder = minilm_dir if model == "bert-like" else gpt2_dir
    data = {"mixed": _mixed_file(tmp_path), "chats": _chat_file(tmp_path)}
    for name, cell in CELLS.items():
        options = {**cell, "dataset": data.get(cell.get("dataset"), cell.get("dataset", "sample"))}
        workspace = str(tmp_path / f"ws-{len(os.listdir(tmp_path))}")
        est = ms.estimate(folder, layers=[0, 1], hooks=["residual", "mlp"], workspace=workspace, **options)
        ext = ms.extract(folder, layers=[0, 1], hooks=["residual", "mlp"], workspace=workspace, progress=False,
                         **options)
        record = ext.record
        report = record.dataset.report
        where = f"{model} / {name}"
        assert est["samples"] == ext.n_samples == report.n_samples, where
        assert est["tokens"] == record.storage.n_input_tokens == report.n_tokens, where
        assert est["rows"] == ext.n_tokens == ext.activations("layers.1.mlp").shape[0], where
        assert est["windows"] == report.n_windows and est["skipped"] == report.skipped, where
        assert est["truncated"] == report.n_truncated and est["truncated_tokens"] == report.n_truncated_tokens
        disk = file_bytes(ext.location)
        assert abs(disk - est["file_bytes"]) <= 0.01 * disk, (where, disk, est["file_bytes"])
        used = disk_usage(ext.location)
        assert abs(used - est["bytes_on_disk"]) <= DU_TOLERANCE * used, (where, used, est["bytes_on_disk"])
        if "window" in cell:
            assert est["windows"] > est["samples"], where  # long documents: several windows each
        if name == "skipped rows":
            assert est["skipped"] == {"empty": 2, "not_text": 1, "missing": 1, "chat": 4}, est["skipped"]
            assert "4 a conversation in a plain-text run" in est["report_line"]
        if name == "chat":
            assert est["skipped"] == {"not_chat": 1}


# -- a request that fails a check leaves no store -------------------------------------------------------------
def _no_store(workspace: str) -> bool:
    root = os.path.join(workspace, "extractions")
    return not os.path.isdir(root) or os.listdir(root) == []


@pytest.mark.parametrize("bad, message", [
    (dict(layers=[5]), "layer index 5 is out of range: this model has 3 layers"),
    (dict(layers="0-3000000000"), "layer index 3000000000, which is out of range"),
    (dict(max_length=4096), "max_length=4096 is more than the 128 positions"),
    (dict(window=4096), "window=4096 is more than the 128 positions"),
    (dict(chat_template="auto"), "has no chat template"),
    (dict(dataset=ms.HubDataset("imdb", "train", "text")), "could not load Hub dataset 'imdb'"),
    (dict(text_column="body"), "text column 'body' is not in"),
])
def test_each_refused_request_leaves_no_store(bad, message, gpt2_dir, workspace, tmp_path):
    args = {"dataset": str(_chat_file(tmp_path)) if "text_column" in bad else "sample", "layers": [0], **bad}
    with pytest.raises(ms.InputError, match=message):
        ms.Workspace(workspace).submit(gpt2_dir, **args)
    with pytest.raises(ms.InputError, match=message):
        ms.estimate(gpt2_dir, workspace=workspace, **args)
    assert _no_store(workspace)


def test_the_cli_refuses_a_missing_chat_template_without_a_store(gpt2_dir, workspace, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mistudio.cli", "extract", "--workspace", workspace, "--model",
                           gpt2_dir, "--dataset", _chat_file(tmp_path), "--chat-template", "auto"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "has no chat template" in proc.stderr and "--chat-template" in proc.stderr
    assert _no_store(workspace)


def test_a_request_refused_while_tokenizing_leaves_no_store(gpt2_dir, workspace):
    """What only the whole dataset shows (here: no usable row) ends the job FAILED/VALIDATION, and its new,
    empty store is removed: the job says why, the workspace holds nothing."""
    job = ms.Workspace(workspace).submit(gpt2_dir, [[1, 2, 3], [1, 10**6]], oov_policy="error", layers=[0])
    assert job.wait(60).status == "FAILED" and job.error["error_type"] == "VALIDATION"
    assert "outside the model's vocabulary" in job.error["error_message"]
    assert _no_store(workspace) and ms.Workspace(workspace).job(job.id).status == "FAILED"


def test_a_refusal_while_tokenizing_leaves_no_new_workspace_behind(gpt2_dir, tmp_path, workspace):
    """``ms.extract`` into a workspace that did not exist: refused while tokenizing, it leaves no empty folders
    (an existing workspace stays, empty or not)."""
    fresh, empty = tmp_path / "fresh" / "ws", tmp_path / "empty"
    os.makedirs(os.path.join(workspace, "extractions"))
    empty.mkdir()
    for root in (fresh, workspace, empty):
        with pytest.raises(ms.InputError, match="outside the model's vocabulary"):
            ms.extract(gpt2_dir, [[1, 2, 3], [1, 10**6]], oov_policy="error", layers=[0], workspace=str(root),
                       progress=False)
    assert not (tmp_path / "fresh").exists()  # what the refused run made is gone, its parent folders too
    assert os.listdir(workspace) == ["extractions"] and _no_store(workspace)
    assert empty.is_dir() and os.listdir(empty) == []  # an existing folder stays as it was


def test_resume_refuses_up_front_what_cannot_resume(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=4, timeout_s=1e-6).wait(60)
    assert job.status == "FAILED"
    store = ws.store(job.id, writable=True)  # as a bad request recorded in a store by an earlier version
    store.update(error={**job.error, "error_type": "VALIDATION", "error_message": "bad input",
                        "resume_available": False})
    started = time.perf_counter()
    with pytest.raises(ms.InputError, match="cannot resume: it failed \\[VALIDATION\\] bad input.*retry it"):
        ws.resume(job.id)
    assert time.perf_counter() - started < 2  # refused before any model is loaded


def test_check_resolves_all_layers_and_keeps_the_request(gpt2_dir):
    request = check(Request.build(model=gpt2_dir, layers="all"))
    assert request.layers == [0, 1, 2] and request.hook_points[-1] == "layers.2.residual"
    assert Request.build(model=gpt2_dir, layers=[1]).replace(max_length=64).max_length == 64
