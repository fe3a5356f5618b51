"""Strict, forgiving inputs: what users type is read as they meant it, or refused with its name and the fix."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

import mistudio as ms
from mistudio import cli
from conftest import TEXTS, fail_at

FORMS = r"give an int, a list of ints, a string such as '0,3' or '2-5' \(inclusive\), or 'all'"


def _extract(model, dataset=TEXTS, workspace=None, **kw):
    kw.setdefault("layers", [0])
    kw.setdefault("max_samples", 4)
    return ms.extract(model, dataset, workspace=workspace, progress=False, **kw)


def _refused(model, workspace, pattern, dataset=TEXTS, **kw):
    """ws.submit refuses before anything is written: no new store."""
    ws = ms.Workspace(workspace)
    kw.setdefault("layers", [0])
    before = len(ws.extractions())
    with pytest.raises(ms.InputError, match=pattern):
        ws.submit(model, dataset, **kw)
    assert len(ws.extractions()) == before


# 1. booleans are never numbers -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, pattern", [
    ("batch_size", r"batch_size=True is a boolean, not a number: pass a number, e.g. batch_size=8"),
    ("layers", r"layers=True has True, a boolean, not a layer index: " + FORMS),
    ("max_length", r"max_length=True is a boolean, not a number"),
    ("max_samples", r"max_samples=True is a boolean, not a number"),
    ("timeout_s", r"timeout_s=True is a boolean, not a number: pass a number, e.g. timeout_s=600"),
    ("chunk_mb", r"chunk_mb=True is a boolean, not a number"),
])
def test_booleans_are_not_numbers(name, pattern, gpt2_dir, workspace):
    _refused(gpt2_dir, workspace, pattern, **{name: True})


def test_numpy_numbers_are_numbers(gpt2_dir, workspace):
    ext = _extract(gpt2_dir, workspace=workspace, batch_size=np.int64(4), max_samples=np.int32(3),
                   max_length=np.int64(16), layers=np.int64(1))
    assert ext.n_samples == 3 and ext.hook_points == ["layers.1.residual"]
    assert ext.metadata["params"]["batch_size"] == 4


# 2. layers in every form ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, expected", [
    (2, [2]), (np.int64(2), [2]), (np.arange(3), [0, 1, 2]), ((2, 0, 2), [0, 2]), (range(1, 3), [1, 2]),
    ("0,2", [0, 2]), (" 2 , 0, ", [0, 2]), ("1-2", [1, 2]), ("0,1-2", [0, 1, 2]), ("all", [0, 1, 2]),
    ("ALL", [0, 1, 2]),
])
def test_layer_forms(layers, expected, gpt2_dir, workspace):
    job = ms.Workspace(workspace).submit(gpt2_dir, TEXTS, layers=layers, max_samples=2)
    assert job.wait(120).status == "COMPLETED", job.error
    assert job.extraction().hook_points == [f"layers.{i}.residual" for i in expected]
    assert job.meta["params"]["layers"] == expected


def test_layers_string_is_a_number_not_its_digits(gpt2_dir, workspace):
    with pytest.raises(ms.InputError, match=r"layer index 10 is out of range: this model has 3 layers"):
        _extract(gpt2_dir, workspace=workspace, layers="10")


@pytest.mark.parametrize("layers, why", [
    ("a,b", r"layers='a,b' has 'a', which is neither a layer index nor a range like '2-5'"),
    ("5-2", r"layers='5-2' has the range '5-2', which runs backwards \(write '2-5'\)"),
    ("-1", r"layers='-1' has '-1'"),
    ([1.5], r"layers=\[1.5\] has 1.5, which is not a whole number"),
    (-1, r"layers=-1: layer index -1 is out of range: blocks count from 0"),
    (np.array([0.5]), r"layers=array\(\[0.5\]\) has 0.5"),
    ("", r"layers is empty"),
    ([None], r"layers=\[None\] has None"),  # layers=None itself means "not given": the preset's, else [0]
])
def test_layers_junk_is_refused(layers, why, gpt2_dir, workspace):
    _refused(gpt2_dir, workspace, why + r".*" + FORMS, layers=layers)


def test_cli_layers_use_the_same_parser(gpt2_dir, workspace, capsys):
    args = ["--workspace", workspace, "extract", "--model", gpt2_dir, "--max-samples", "3"]
    assert cli.main([*args, "--layers", "1-2"]) == 0
    assert "layers.1.residual, layers.2.residual" in capsys.readouterr().out
    assert cli.main([*args, "--layers", "all"]) == 0
    assert "layers.0.residual, layers.1.residual, layers.2.residual" in capsys.readouterr().out
    assert cli.main([*args, "--layers", "a,b"]) == 2
    assert "--layers a,b has 'a'" in capsys.readouterr().err  # worded as the command line's flag


# 3. DataFrame, Series and Path datasets -----------------------------------------------------------------------
def _kept_rows(texts):
    return [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]


def test_dataframe_series_and_path(gpt2_dir, workspace, tmp_path):
    frame = pd.DataFrame({"body": TEXTS, "n": range(len(TEXTS))})
    ext = _extract(gpt2_dir, frame, workspace=workspace, text_column="body", max_samples=None)
    assert sorted(ext.rows().tolist()) == _kept_rows(TEXTS)
    assert ext.metadata["dataset"]["source"] == {"kind": "dataframe", "n_rows": len(TEXTS), "columns": ["body", "n"]}

    series = pd.Series(["alpha beta", None, "gamma delta"], name="t")
    ext = _extract(gpt2_dir, series, workspace=workspace)
    assert sorted(ext.rows().tolist()) == [0, 2]
    assert ext.metadata["dataset"]["source"] == {"kind": "series", "n_rows": 3}

    path = tmp_path / "d.txt"
    path.write_text("one line\ntwo lines\n")
    ext = _extract(gpt2_dir, path, workspace=workspace)
    assert ext.n_samples == 2 and ext.metadata["dataset"]["source"] == {"kind": "path", "path": str(path)}


def test_dataframe_missing_column_and_empty(gpt2_dir, workspace):
    frame = pd.DataFrame({"body": ["x"], "n": [1]})
    _refused(gpt2_dir, workspace, r"text column 'text' is not in the DataFrame: its columns are \['body', 'n'\]; "
                                  r"pass text_column=<one of them>", dataset=frame)
    _refused(gpt2_dir, workspace, r"dataset is an empty dataframe", dataset=pd.DataFrame({"text": []}))
    _refused(gpt2_dir, workspace, r"dataset=42 \(int\) is not a dataset mistudio can read", dataset=42)


def test_dataframe_job_cannot_be_retried_from_disk(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    job = ws.submit(gpt2_dir, pd.DataFrame({"text": TEXTS}), max_samples=2, before_batch=fail_at(0)).wait(60)
    assert job.status == "FAILED"
    with pytest.raises(ms.InputError, match=r"in-memory pandas DataFrame, which is not saved on disk"):
        ms.Workspace(workspace).retry(job.id)  # a fresh handle: rebuilt from the metadata
    assert ms.Workspace(workspace).retry(job.id, dataset=pd.DataFrame({"text": TEXTS}),
                                         before_batch=None).wait(60).status == "COMPLETED"


# 4. the file decides its format -----------------------------------------------------------------------------
def test_format_from_link_name_then_target_then_content(gpt2_dir, workspace, tmp_path):
    blob = tmp_path / "blob"
    blob.write_text("first text\nsecond text\nthird text\n")
    (tmp_path / "data.txt").symlink_to(blob)  # the link's name says text: read as text, not parquet
    ext = _extract(gpt2_dir, str(tmp_path / "data.txt"), workspace=workspace)
    assert ext.metadata["dataset"]["report"]["n_rows_read"] == 3
    assert ext.metadata["dataset"]["source"]["path"] == str(tmp_path / "data.txt")

    real = tmp_path / "real.jsonl"
    real.write_text("\n".join(json.dumps({"text": t}) for t in ["a b", "c d"]) + "\n")
    (tmp_path / "nosuffix").symlink_to(real)  # no suffix on the link: the target's decides
    assert _extract(gpt2_dir, str(tmp_path / "nosuffix"), workspace=workspace).n_samples == 2

    lines = tmp_path / "lines"
    lines.write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    assert _extract(gpt2_dir, lines, workspace=workspace).n_samples == 2  # sniffed: JSON lines

    frame = tmp_path / "frame"
    pd.DataFrame({"text": ["p q", "r s", "t"]}).to_parquet(frame)
    assert _extract(gpt2_dir, frame, workspace=workspace).n_samples == 3  # sniffed: PAR1


def test_undecidable_file_names_the_real_target(gpt2_dir, workspace, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "mystery").symlink_to(blob)
    _refused(gpt2_dir, workspace, rf"dataset file '.*mystery' \(a link to '{blob}'\) has no suffix and looks binary",
             dataset=str(tmp_path / "mystery"))
    doc = tmp_path / "notes.docx"
    doc.write_bytes(b"PK\x03\x04")
    (tmp_path / "notes").symlink_to(doc)
    _refused(gpt2_dir, workspace, rf"'.*notes' \(a link to '{doc}'\) has an unsupported type '.docx'",
             dataset=str(tmp_path / "notes"))


# 5. encoding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_encoding(kind, gpt2_dir, workspace, tmp_path):
    texts = ["plain words", "more plain words", "café au lait, déjà vu"]
    path = tmp_path / f"d.{kind}"
    if kind == "txt":
        body, line = "\n".join(texts) + "\n", 3
    elif kind == "jsonl":
        body, line = "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n", 3
    else:
        body, line = "text\n" + "\n".join(f'"{t}"' for t in texts) + "\n", 4
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ms.InputError, match=rf"dataset file '.*d.{kind}' line {line} is not utf-8 text: if the "
                                            r"file is in another encoding, pass encoding='latin-1'"):
        _extract(gpt2_dir, path, workspace=workspace)
    ext = _extract(gpt2_dir, path, workspace=workspace, encoding="latin-1")
    assert ext.n_samples == 3 and ext.metadata["params"]["encoding"] == "latin-1"
    assert ext.metadata["dataset"]["encoding"] == "latin-1"
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    assert tok.decode(ext.sample(2)["input_ids"]) == texts[2]


def test_binary_file_and_unknown_encoding(gpt2_dir, workspace, tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"fine first line\n" + b"\x00\x01\x89PNG\xff" * 100)
    with pytest.raises(ms.InputError, match=r"d.txt' line 2 is not utf-8 text: the file looks binary, not text"):
        _extract(gpt2_dir, path, workspace=workspace)
    _refused(gpt2_dir, workspace, r"encoding='klingon' is not a text encoding Python knows: use e.g. 'utf-8'",
             dataset=path, encoding="klingon")


# 6. max_length is refused above the model's positions ---------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_max_length_above_positions_refused(family, tiny_models, workspace):
    _refused(tiny_models[family], workspace, r"max_length=129 is more than the 128 positions of model '.*': "
                                             r"pass max_length=128 or less", max_length=129)


def test_max_length_at_positions_works(gpt2_dir, workspace):
    ext = _extract(gpt2_dir, [" ".join(TEXTS) * 8], workspace=workspace, max_length=128)
    assert ext.n_tokens == 128


# 7. truncation is counted -----------------------------------------------------------------------------------
def test_truncation_counted(gpt2_dir, workspace):
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS if t.strip()]
    ext = _extract(gpt2_dir, TEXTS + [list(range(20))], workspace=workspace, max_length=8, max_samples=None)
    report = ext.metadata["dataset"]["report"]
    cut = [n - 8 for n in lengths + [20] if n > 8]
    assert cut and report["n_truncated"] == len(cut) and report["n_truncated_tokens"] == sum(cut)
    assert int(np.diff(ext.sample_offsets).max()) == 8


# 8. errors name the argument the user passed ------------------------------------------------------------------
@pytest.mark.parametrize("bad, pattern", [
    (dict(model_dtype="int8"), r"^model_dtype='int8': Input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
    (dict(dtype="int8"), r"^dtype='int8': Input should be 'float16', 'bfloat16' or 'float32'"),
    (dict(device="tpu"), r"^device='tpu' is not one of"),
    (dict(hooks=["resid"]), r"^hooks=\['resid'\]: unknown hook kind 'resid'"),
    (dict(hooks="residual,nope"), r"^hooks=\['residual', 'nope'\]: unknown hook kind 'nope'"),
    (dict(batch_size="eight"), r"^batch_size='eight' is not a whole number"),
    (dict(max_length="long"), r"^max_length='long' is not a whole number"),
    (dict(text_column=3), r"^text_column=3 is not text"),
    (dict(oov_policy="drop"), r"^oov_policy='drop': Input should be 'clamp', 'skip' or 'error'"),
    (dict(layers=[4], chunk_mb=0), r"^chunk_mb=0.0 is out of range"),
    (dict(model=" "), r"^model is empty"),
])
def test_errors_name_the_users_argument(bad, pattern, gpt2_dir, workspace):
    bad = {"model": gpt2_dir, **bad}
    _refused(bad.pop("model"), workspace, pattern, **bad)
