"""CSV, TSV and Parquet files that pandas or pyarrow cannot read as the user meant: rows with more fields than the
header (an unquoted comma in a text), an unclosed quote, a file that is not Parquet. Each is refused at submit, by
file and line, with the fix: never a text cut at its first comma, never a raw pandas/pyarrow traceback."""
from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest
from transformers import AutoTokenizer

import mistudio as ms
from mistudio.cli import main

ARGS = dict(layers=[0], hooks=["residual"])


def _no_store(workspace: str) -> bool:
    root = os.path.join(workspace, "extractions")
    return not os.path.isdir(root) or os.listdir(root) == []


def _cli_refuses(workspace: str, model: str, path, capsys, *extra: str) -> str:
    """The CLI's one-line refusal (exit 2, no traceback) of extracting ``path``."""
    capsys.readouterr()
    code = main(["--workspace", workspace, "extract", "--model", model, "--dataset", str(path), "--layers", "0",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


# name: (file text, the line refused, the excerpt shown, fields, header fields)
MORE_FIELDS = {
    "every row, one text column": ("text\nHello, world and all\nThe cat, sat on the mat\n", 2,
                                   "Hello, world and all", 2, 1),
    "rows of different widths": ("text\nHello\nOne, two, three\nfoo\n", 3, "One, two, three", 3, 1),
    "two commas in every row": ("text\na, b, c\nd, e, f\n", 2, "a, b, c", 3, 1),
    "an id column shifted": ("id,text\n1,Hello, world\n2,The cat, sat\n", 2, "1,Hello, world", 3, 2),
    "only a late row": ("id,text\n1,Hello\n2,fine\n3,One, two\n", 4, "3,One, two", 3, 2),
    "after blank lines and a quoted text": ('text\n\n"a, quoted\ntext"\n\nHello, world\n', 6, "Hello, world", 2, 1),
}


@pytest.mark.parametrize("name", list(MORE_FIELDS))
def test_a_csv_row_with_more_fields_than_its_header_is_refused_by_line(name, gpt2_dir, workspace, tmp_path, capsys):
    """pandas makes the leading fields of such rows an index (the text loses what came before its first comma),
    or with ``index_col=False`` drops the trailing ones, or fails naming another line: which fields make the text
    is ambiguous, so the file is refused at its first such line, with the fix, before any store exists."""
    content, line, excerpt, fields, header = MORE_FIELDS[name]
    path = tmp_path / "texts.csv"
    path.write_text(content)
    with pytest.raises(ms.InputError) as caught:
        ms.Workspace(workspace).submit(gpt2_dir, str(path), **ARGS)
    said = str(caught.value)
    assert f"'{path}' line {line} has {fields} fields, more than the {header} of its header ({excerpt!r})" in said
    assert "quote a text that holds a comma" in said and ".txt" in said and ".jsonl" in said
    assert f"line {line} has {fields} fields" in _cli_refuses(workspace, gpt2_dir, path, capsys)
    assert _no_store(workspace)


def test_a_tsv_row_with_more_fields_is_refused_naming_tabs(gpt2_dir, workspace, tmp_path):
    path = tmp_path / "texts.tsv"
    path.write_text("text\nHello\tworld\n")
    with pytest.raises(ms.InputError, match=r"line 2 has 2 fields, more than the 1 of its header .*a tab"):
        ms.Workspace(workspace).submit(gpt2_dir, str(path), **ARGS)


def test_quoted_texts_with_commas_are_read_whole(gpt2_dir, workspace, tmp_path):
    """The fix the refusal names works: each text exactly as in the file."""
    texts = ["Hello, world and all", 'The cat, "sat", on the mat', "one, two,\nthree"]
    path = tmp_path / "texts.csv"
    pd.DataFrame({"text": texts}).to_csv(path, index=False)
    ext = ms.extract(gpt2_dir, str(path), workspace=workspace, progress=False, **ARGS)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    assert [tokenizer.decode(ext.sample(i)["input_ids"]) for i in range(3)] == texts


def _parquet_bytes(tmp_path) -> bytes:
    good = tmp_path / "good.parquet"
    pd.DataFrame({"text": ["a b c"] * 200}).to_parquet(good)
    return good.read_bytes()


BAD_FILES = {  # name: (file name, content (or a function of tmp_path), what the message says)
    "a CSV named .parquet": ("misnamed.parquet", b"text\nhello\n", "is not a Parquet file"),
    "an empty .parquet": ("empty.parquet", b"", "is not a Parquet file"),
    "a cut .parquet": ("cut.parquet", lambda tmp: _parquet_bytes(tmp)[:300], "is not a Parquet file"),
    "a damaged .parquet": ("damaged.parquet", lambda tmp: (lambda b: b[:4] + b"\0" * 200 + b[204:])(
        _parquet_bytes(tmp)), "is not a Parquet file"),
    "an unclosed quote": ("quote.csv", b'text\n"unterminated quote\nfoo\n',
                          "line 2 opens a quote that is never closed"),
    "an unclosed quote after a quoted line break": ("late.csv", b'text\n"a\nb"\n\nok\n"open\nfoo\n',
                                                    "line 6 opens a quote that is never closed"),
    "an empty .csv": ("empty.csv", b"", "is empty"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_file_pandas_cannot_read_is_refused_by_name(name, gpt2_dir, workspace, tmp_path, capsys):
    file_name, content, words = BAD_FILES[name]
    path = tmp_path / file_name
    path.write_bytes(content(tmp_path) if callable(content) else content)
    with pytest.raises(ms.InputError) as caught:
        ms.Workspace(workspace).submit(gpt2_dir, str(path), **ARGS)
    said = str(caught.value)
    assert f"dataset file '{path}'" in said and words in said, said
    if path.suffix == ".parquet":
        assert "rename it" in said and "to_parquet" in said
    assert words in _cli_refuses(workspace, gpt2_dir, path, capsys)
    assert _no_store(workspace)


def test_a_parquet_link_to_a_csv_names_the_link_and_its_target(gpt2_dir, workspace, tmp_path):
    target = tmp_path / "texts.csv"
    target.write_text("text\nhello\n")
    link = tmp_path / "texts.parquet"
    link.symlink_to(target)
    with pytest.raises(ms.InputError, match=re.escape(f"'{link}' (a link to '{target}') is not a Parquet file")):
        ms.Workspace(workspace).submit(gpt2_dir, str(link), **ARGS)


def test_a_missing_chat_template_names_a_file_on_the_command_line(gpt2_dir, workspace, tmp_path, capsys):
    """The CLI's --chat-template takes a file: its advice names a file, Python's a Jinja string."""
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ms.InputError) as caught:
        ms.Workspace(workspace).submit(gpt2_dir, str(path), chat_template="auto", **ARGS)
    assert 'has no chat template: pass chat_template="<jinja string>" or use a chat model' in str(caught.value)
    err = _cli_refuses(workspace, gpt2_dir, path, capsys, "--chat-template", "auto")
    assert "has no chat template: pass --chat-template <path of a Jinja template file> or use a chat model" in err
    assert "jinja string" not in err
    assert _no_store(workspace)
