"""Datasets are regular files (or saved folders) of a size the estimate shows; texts that look like "missing" stay
texts; a preset file is a small regular file (issue 16, parts 4 and 6). Real FIFOs, devices and sockets, never
read: every refusal comes at once (each call runs on a thread that must end within seconds)."""
from __future__ import annotations

import json
import os
import resource
import socket
import time

import numpy as np
import pandas as pd
import pytest
from conftest import at_once
from transformers import AutoTokenizer

import mistudio as ms
from mistudio import data
from mistudio.cli import main
from mistudio.request import Request

NA_TEXTS = ["NA", "null", "None", "nan", "N/A", "", "NaN", "n/a", "#N/A", "NULL", "-nan", "<NA>"]
ARGS = dict(layers=[0], hooks=["residual"])


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "data.txt"  # a name that says text: only its type gives it away
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path):
    path = tmp_path / "data.jsonl"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    yield path
    server.close()


def test_fifo_device_and_socket_are_refused_at_once(gpt2_dir, workspace, fifo, unix_socket, tmp_path):
    link = tmp_path / "link.txt"
    link.symlink_to(fifo)
    for path in (fifo, "/dev/zero", unix_socket, link):
        for call in (lambda p: ms.estimate(gpt2_dir, str(p), **ARGS),
                     lambda p: ms.Workspace(workspace).submit(gpt2_dir, str(p), **ARGS)):
            started = time.monotonic()
            error = at_once(call, path)
            assert isinstance(error, ms.InputError), error
            assert "is not a regular file" in str(error) and "dataset" in str(error)
            assert time.monotonic() - started < 10
    assert ms.Workspace(workspace).extractions().shape[0] == 0  # no store was made


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_a_file_replaced_by_a_fifo_after_the_check_is_refused_not_read(gpt2_dir, tmp_path, kind, unix_socket):
    """The request was checked against a regular file; by the time the data is read it is a pipe (or a device, a
    socket): the reader refuses it, by its type, without blocking."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    (tmp_path / "work").mkdir()
    for suffix in (".txt", ".jsonl", ".csv", ".parquet"):
        path = tmp_path / "work" / f"data{suffix}"
        pd.DataFrame({"text": ["a b c", "d e"]}).to_csv(path, index=False) if suffix == ".csv" else \
            pd.DataFrame({"text": ["a b c", "d e"]}).to_parquet(path) if suffix == ".parquet" else \
            path.write_text('{"text": "a b c"}\n' if suffix == ".jsonl" else "a b c\n")
        request = Request.build(model=gpt2_dir, dataset=str(path), **ARGS)
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "device":
            path.symlink_to("/dev/zero")
        else:
            path.symlink_to(unix_socket)
        for call in (data.check_source, lambda r: data.tokenize(r, tokenizer, 400)):
            error = at_once(call, request)
            expected = {"fifo": "a FIFO (a named pipe)", "device": "a character device", "socket": "a socket"}[kind]
            assert isinstance(error, ms.InputError) and f"is {expected}, not a regular file" in str(error), error
            assert "pass dataset=" in str(error)
        error = at_once(data.open_regular, path)  # the reader's own check, past the listing's (a later swap)
        assert isinstance(error, ms.InputError) and "not a regular file" in str(error), error
        path.unlink()


def test_the_estimate_shows_the_datasets_size(gpt2_dir, workspace, tmp_path, capsys):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ms.sample_texts()[:30]))
    est = ms.estimate(gpt2_dir, str(path), **ARGS)
    assert est["dataset_bytes"] == os.path.getsize(path) and est["rows_read"] == 30
    size = ms.errors.human_bytes(os.path.getsize(path))
    assert est["summary"].startswith(f"dataset {size}, 30 rows read · ≈ ")

    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ms.sample_texts()[:10]}).save_to_disk(str(folder))
    on_disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert ms.estimate(gpt2_dir, str(folder), **ARGS)["dataset_bytes"] == on_disk

    in_memory = ms.estimate(gpt2_dir, ["one text", "two texts"], **ARGS)
    assert in_memory["dataset_bytes"] is None and in_memory["summary"].startswith("dataset, 2 rows read · ")
    assert ms.estimate(gpt2_dir, "sample", max_samples=5, **ARGS)["dataset_bytes"] > 100_000

    code = main(["--workspace", workspace, "estimate", "--model", gpt2_dir, "--dataset", str(path), "--layers", "0"])
    assert code == 0 and f"dataset {size}, 30 rows read" in capsys.readouterr().out


def _write(fmt: str, path, texts: list[str]) -> None:
    frame = pd.DataFrame({"id": range(len(texts)), "text": texts})
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_texts_that_look_missing_stay_texts(gpt2_dir, tmp_path, fmt):
    path = tmp_path / f"na.{fmt}"
    _write(fmt, path, NA_TEXTS)
    if fmt in ("csv", "tsv"):  # what pandas' defaults would have made of them: 10 of 12 lost
        assert pd.read_csv(path, sep="\t" if fmt == "tsv" else ",")["text"].isna().sum() >= 10
    est = ms.estimate(gpt2_dir, str(path), **ARGS)
    assert est["rows_read"] == 12 and est["samples"] == 11 and est["skipped"] == {"empty": 1}
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    got = data.tokenize(Request.build(model=gpt2_dir, dataset=str(path), **ARGS), tokenizer, len(tokenizer))
    kept = [t for t in NA_TEXTS if t]
    assert got.rows.tolist() == [i for i, t in enumerate(NA_TEXTS) if t]
    for ids, text in zip(got.ids, kept):
        assert tokenizer.decode(ids) == text
        np.testing.assert_array_equal(ids, tokenizer(text)["input_ids"])


def test_import_preset_refuses_devices_fifos_and_huge_files_without_reading(workspace, tmp_path, fifo):
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(10 * 2**30)  # 10 GB, sparse: nothing to read but its size
    ws = ms.Workspace(workspace)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path, words in (("/dev/zero", "is not a regular file"), (fifo, "is not a regular file"),
                        (huge, "10,737,418,240 bytes, far more than a preset")):
        started = time.monotonic()
        error = at_once(ws.import_preset, str(path))
        assert isinstance(error, ms.InputError) and words in str(error), error
        assert time.monotonic() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KB: nothing was read
    assert ws.presets() == {}


TEXTS3 = ["first text", "second one", "third"]


@pytest.mark.parametrize("form", ["array-one-line", "array-indented", "jsonl-with-bom", "jsonl-of-ids"])
def test_json_files_as_people_write_them(gpt2_dir, tmp_path, form):
    """A JSON array of records (json.dump, df.to_json(orient='records')), indented or not, JSON Lines saved with a
    byte-order mark (Windows editors), and JSON Lines of token-id lists: each reads as its rows."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    records = [{"text": t} for t in TEXTS3]
    path = tmp_path / "rows.json"
    if form == "array-one-line":
        path.write_text(json.dumps(records))
    elif form == "array-indented":
        path.write_text(json.dumps(records, indent=2))
    elif form == "jsonl-with-bom":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8-sig")
    else:
        path.write_text("".join(json.dumps(tokenizer(t)["input_ids"]) + "\n" for t in TEXTS3))
    got = data.tokenize(Request.build(model=gpt2_dir, dataset=str(path), **ARGS), tokenizer, len(tokenizer))
    assert [tokenizer.decode(ids) for ids in got.ids] == TEXTS3 and got.skipped == {}


def test_a_broken_json_array_names_the_file_and_the_fix(gpt2_dir, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n')
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    with pytest.raises(ms.InputError, match=r"rows.json starts with '\[' but is not one JSON array .*JSON Lines"):
        data.tokenize(Request.build(model=gpt2_dir, dataset=str(path), **ARGS), tokenizer, len(tokenizer))


def test_a_first_line_holding_a_list_is_one_row_when_more_follow(gpt2_dir, tmp_path):
    """JSON Lines whose first record is a list (not token ids) are still read line by line: every row is counted,
    none is lost (a one-line file is the whole array)."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    path = tmp_path / "rows.jsonl"
    path.write_text('["header"]\n' + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS3))
    got = data.tokenize(Request.build(model=gpt2_dir, dataset=str(path), **ARGS), tokenizer, len(tokenizer))
    assert [tokenizer.decode(ids) for ids in got.ids] == TEXTS3
    assert got.n_rows_read == 4 and got.skipped == {"not_text": 1}
    path.write_text("".join(json.dumps([t, t]) + "\n" for t in TEXTS3))  # lists of sentences: said, not lost
    with pytest.raises(ms.InputError, match="no usable rows: 3 read, skipped: 3 not text"):
        data.tokenize(Request.build(model=gpt2_dir, dataset=str(path), **ARGS), tokenizer, len(tokenizer))
    path.write_text("[]\n" + "".join(json.dumps(tokenizer(t)["input_ids"]) + "\n" for t in TEXTS3))
    got = data.tokenize(Request.build(model=gpt2_dir, dataset=str(path), **ARGS), tokenizer, len(tokenizer))
    assert [tokenizer.decode(ids) for ids in got.ids] == TEXTS3 and got.n_rows_read == 4


def test_text_whose_tokenizer_outgrew_the_model_says_so(gpt2_dir, tmp_path):
    """A tokenizer given tokens the model's embedding lacks (no resize_token_embeddings): text with them stops the
    job naming that cause, not 'another tokenizer'."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(gpt2_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = len(tokenizer)
    tokenizer.add_tokens(["<newtok>"])
    tokenizer.save_pretrained(model)
    with pytest.raises(ms.InputError, match=rf"row 0 has token id {vocab}, .*tokens the model's embedding lacks"):
        data.tokenize(Request.build(model=str(model), dataset=["a <newtok> b"], **ARGS), tokenizer, vocab)


def test_a_list_of_records_reads_its_text_column_as_json_lines_do(gpt2_dir, tmp_path):
    """[{"text": ...}, ...] in Python is the rows of a JSON Lines file: its text column read (it was refused as
    'without the text column'); a record without it is skipped and counted, as from a file."""
    texts = ["The first record.", "A second, longer record of text.", "Third."]
    records = [{"text": t, "id": i} for i, t in enumerate(texts)] + [{"body": "no text here"}]
    plain = ms.extract(gpt2_dir, texts, workspace=str(tmp_path / "a"), progress=False, **ARGS)
    ext = ms.extract(gpt2_dir, records, workspace=str(tmp_path / "b"), progress=False, **ARGS)
    np.testing.assert_array_equal(ext.store.input_ids(), plain.store.input_ids())
    assert ext.record.dataset.report.skipped == {"missing": 1}
    body = ms.extract(gpt2_dir, [{"body": t} for t in texts], text_column="body", workspace=str(tmp_path / "c"),
                      progress=False, **ARGS)
    np.testing.assert_array_equal(body.store.input_ids(), plain.store.input_ids())
