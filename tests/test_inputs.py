"""Every bad input a user can cause fails fast with a message naming the value and the fix; readers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import mistudio as ms


def _extract(model, dataset="sample", workspace=None, **kw):
    kw.setdefault("layers", [0])
    return ms.extract(model, dataset, workspace=workspace, progress=False, max_samples=kw.pop("max_samples", 8), **kw)


@pytest.mark.parametrize("bad, pattern", [
    (dict(batch_size=0), r"batch_size=0 is not allowed: use a power of two from 1 to 512"),
    (dict(batch_size=3), r"batch_size=3 is not allowed"),
    (dict(batch_size=1024), r"batch_size=1024 is not allowed"),
    (dict(max_length=0), r"max_length=0 must be a positive"),
    (dict(max_length=-5), r"max_length=-5 must be a positive"),
    (dict(hooks=["resid"]), r"unknown hook kind 'resid': choose from \('residual', 'mlp', 'attention'\)"),
    (dict(layers=[3]), r"layer index 3 is out of range: this model has 3 layers, use 0 to 2"),
    (dict(layers=[-1]), r"layer index -1 is out of range"),
    (dict(layers=[]), r"layers is empty"),
    (dict(dtype="float64"), r"dtype='float64'"),
    (dict(device="tpu"), r"device='tpu' is not one of"),
    (dict(timeout_s=0), r"timeout_s=0 must be a positive"),
])
def test_bad_parameters(bad, pattern, gpt2_dir, workspace):
    with pytest.raises(ms.InputError, match=pattern):
        _extract(gpt2_dir, workspace=workspace, **bad)


def test_bad_parameters_create_no_store(gpt2_dir, workspace):
    with pytest.raises(ms.InputError):
        _extract(gpt2_dir, workspace=workspace, batch_size=3)
    assert ms.Workspace(workspace).extractions().empty


def test_missing_model_path(workspace, tmp_path):
    with pytest.raises(ms.InputError, match=r"model folder './no/such/model' \(relative to the current folder .*\) does not exist"):
        _extract("./no/such/model", workspace=workspace)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ms.InputError, match=r"has no config.json"):
        _extract(str(empty), workspace=workspace)


def test_hub_id_offline_says_so(workspace):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ms.InputError, match=r"Hugging Face Hub.*HF_HUB_OFFLINE is set.*local folder"):
        _extract("openai-community/gpt2-not-cached", workspace=workspace)


def test_hub_dataset_offline_says_so(gpt2_dir, workspace):
    with pytest.raises(ms.InputError, match=r"could not load Hub dataset 'nobody/nothing'.*save_to_disk"):
        _extract(gpt2_dir, ms.HubDataset(name="nobody/nothing"), workspace=workspace)


def test_empty_datasets(gpt2_dir, workspace, tmp_path):
    with pytest.raises(ms.InputError, match="dataset is an empty list"):
        _extract(gpt2_dir, [], workspace=workspace)
    with pytest.raises(ms.InputError, match=r"no usable rows: 3 read, skipped: 3 empty"):
        _extract(gpt2_dir, ["", "  ", None], workspace=workspace)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    with pytest.raises(ms.InputError, match="no usable rows"):
        _extract(gpt2_dir, str(blank), workspace=workspace)


def test_unsupported_and_missing_files(gpt2_dir, workspace, tmp_path):
    doc = tmp_path / "notes.docx"
    doc.write_bytes(b"PK")
    with pytest.raises(ms.InputError, match=r"unsupported type '.docx': supported are .txt, .jsonl"):
        _extract(gpt2_dir, str(doc), workspace=workspace)
    with pytest.raises(ms.InputError, match=r"dataset path '.*missing.jsonl' does not exist"):
        _extract(gpt2_dir, str(tmp_path / "missing.jsonl"), workspace=workspace)


def test_missing_text_column(gpt2_dir, workspace, tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": ["a b c", "d e"]}).to_csv(path, index=False)
    with pytest.raises(ms.InputError, match=r"text column 'text' is not in .*d.csv: its columns are \['body'\]"):
        _extract(gpt2_dir, str(path), workspace=workspace)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ms.InputError, match=r"text column 'content' is not in .*keys \['body'\]"):
        _extract(gpt2_dir, str(jsonl), workspace=workspace, text_column="content")


def test_workspace_not_writable(gpt2_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ms.InputError, match=r"workspace '.*file/ws' is not writable.*workspace=<a folder"):
        _extract(gpt2_dir, workspace=str(blocker / "ws"))


def test_unknown_architecture_lists_modules(tmp_path):
    import torch
    from mistudio.models import find_blocks

    model = torch.nn.Module()
    model.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
    with pytest.raises(ms.InputError, match=r"cannot map hook points for model type 'toy'.*stack \(2 x Linear"):
        find_blocks(model, "toy", 2)


def test_pad_token_added_without_touching_model(gpt2_dir):
    from mistudio.models import load_model

    loaded = load_model(ms.ModelSpec(name_or_path=gpt2_dir))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"
    assert loaded.vocab_size == loaded.model.get_input_embeddings().num_embeddings == len(loaded.tokenizer)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet", "datasets", "list"])
def test_readers(kind, gpt2_dir, workspace, tmp_path):
    rows = ["first text here", "", "second one", "third and last"]
    if kind == "txt":
        src = tmp_path / "d.txt"
        src.write_text("\n".join(rows) + "\n")
    elif kind == "jsonl":
        src = tmp_path / "d.jsonl"
        src.write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(rows)) + "\n")
    elif kind in ("csv", "parquet"):
        src = tmp_path / f"d.{kind}"
        frame = pd.DataFrame({"text": rows, "n": range(4)})
        frame.to_csv(src, index=False) if kind == "csv" else frame.to_parquet(src)
    elif kind == "datasets":
        import datasets

        src = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(src))
    else:
        src = rows
    ext = _extract(gpt2_dir, src if kind == "list" else str(src), workspace=workspace)
    assert sorted(ext.rows().tolist()) == [0, 2, 3]
    assert ext.metadata["dataset"]["report"]["n_skipped_invalid"] == 1


def test_sample_dataset_is_real_text():
    texts = ms.sample_texts()
    assert len(texts) >= 1000
    assert all(t.strip() for t in texts)
    assert sum(" the " in t for t in texts) > 500


def test_cli_extract_and_errors(gpt2_dir, tmp_path):
    env = {**os.environ, "MISTUDIO_WORKSPACE": str(tmp_path / "ws")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mistudio.cli", *a], capture_output=True, text=True,
                                    env=env, timeout=300)
    ok = run("extract", "--model", gpt2_dir, "--layers", "0,2", "--hooks", "residual,mlp", "--max-samples", "20")
    assert ok.returncode == 0, ok.stderr
    assert "COMPLETED" in ok.stdout and "layers.2.mlp" in ok.stdout
    bad = run("extract", "--model", gpt2_dir, "--layers", "0", "--batch-size", "3")
    # the command line names its flags, not Python's keywords
    assert bad.returncode == 2 and "--batch-size 3 is not allowed" in bad.stderr and "batch_size=" not in bad.stderr
    jobs = run("jobs")
    assert jobs.returncode == 0 and "COMPLETED" in jobs.stdout


def test_cli_demo_offline(tmp_path):
    env = {**os.environ, "MISTUDIO_WORKSPACE": str(tmp_path / "ws"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["mistudio", "demo", "--max-samples", "64"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "COMPLETED" in out.stdout and "layers.5.residual" in out.stdout and "tokens/s" in out.stdout
    assert str(tmp_path / "ws") in out.stdout
    assert "cut at --max-length" in out.stdout and "--window keeps them whole" in out.stdout, out.stdout
    again = subprocess.run(["mistudio", "demo", "--max-samples", "64", "--window", "128"], capture_output=True,
                           text=True, env=env, timeout=300)  # the flags its summary advises exist
    assert again.returncode == 0 and "cut at" not in again.stdout and "windows" in again.stdout, again.stdout
