"""Chat data: conversations rendered with a chat template, with the role of every token (tokens/role)."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from transformers import AutoTokenizer

import mistudio as ms
from mistudio.data import ROLE_CODES

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is Zarr?"},
     {"role": "assistant", "content": "A chunked array format."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Say more about residual streams."},
     {"role": "assistant", "content": "They carry information from layer to layer."}],
]
ARGS = dict(layers=[0], dtype="float32", progress=False)


@pytest.fixture(scope="module")
def chat_dir(gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 with a simple chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(gpt2_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return str(folder)


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _expected(tok, messages) -> tuple[list[int], list[int]]:
    ids, roles = [], []
    for m in messages:
        piece = tok(f"<|{m['role']}|>{m['content']}<|endoftext|>", add_special_tokens=False)["input_ids"]
        ids += piece
        roles += [ROLE_CODES[m["role"]]] * len(piece)
    return ids, roles


def _check(ext, tok, chats):
    assert ext.metadata["storage"]["role_codes"] == ROLE_CODES
    for row, messages in enumerate(chats):
        s = ext.sample(row)
        ids, roles = _expected(tok, messages)
        assert list(s["input_ids"]) == _ids(tok.apply_chat_template(messages, tokenize=True)) == ids
        assert list(s["role"]) == roles
        assert s["activations"]["layers.0.residual"].shape[0] == len(ids)
    assert ext.verify().ok


def test_messages_rendered_with_roles(chat_dir, workspace):
    tok = AutoTokenizer.from_pretrained(chat_dir)
    ext = ms.extract(chat_dir, [{"messages": m} for m in CHATS], chat_template="auto", workspace=workspace, **ARGS)
    _check(ext, tok, CHATS)
    assert ext.store.tokens("special")[:].sum() == sum(len(m) for m in CHATS)  # one <|endoftext|> per message
    # assistant tokens are selectable
    s = ext.sample(1)
    assistant = s["activations"]["layers.0.residual"][s["role"] == ROLE_CODES["assistant"]]
    assert len(assistant) > 0


def test_formats_sharegpt_alpaca_parquet_and_datasets_folder(chat_dir, tmp_path, workspace):
    tok = AutoTokenizer.from_pretrained(chat_dir)
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text("".join(json.dumps({"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                                for m in c]}) + "\n" for c in CHATS))
    _check(ms.extract(chat_dir, str(sharegpt), chat_template="auto", workspace=workspace, **ARGS), tok, CHATS)

    alpaca = tmp_path / "alpaca.parquet"
    pd.DataFrame({"instruction": ["Add.", "Name a colour."], "input": ["2 and 3", ""],
                  "output": ["5", "Blue"]}).to_parquet(alpaca)
    as_chats = [[{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
                [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]]
    _check(ms.extract(chat_dir, str(alpaca), chat_template="auto", workspace=workspace, **ARGS), tok, as_chats)

    nested = tmp_path / "messages.parquet"
    pd.DataFrame({"messages": CHATS}).to_parquet(nested)
    _check(ms.extract(chat_dir, str(nested), chat_template="auto", workspace=workspace, **ARGS), tok, CHATS)

    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"messages": m} for m in CHATS]).save_to_disk(str(folder))
    _check(ms.extract(chat_dir, str(folder), chat_template="auto", workspace=workspace, **ARGS), tok, CHATS)


def test_template_string_and_missing_template(gpt2_dir, workspace):
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    assert not tok.chat_template
    with pytest.raises(ms.InputError, match=r"no chat template: pass chat_template=\"<jinja string>\" or use a chat"):
        ms.extract(gpt2_dir, CHATS, chat_template="auto", workspace=workspace, **ARGS)
    ext = ms.extract(gpt2_dir, CHATS, chat_template=TEMPLATE, workspace=workspace, **ARGS)
    tok.chat_template = TEMPLATE
    _check(ext, tok, CHATS)
    assert ext.metadata["params"]["chat_template"] == TEMPLATE


def test_a_template_that_never_reads_the_messages_is_refused(gpt2_dir, tmp_path, workspace):
    """A data file passed as the template (or a template that ignores ``messages``) rendered every conversation as
    the same text and ended COMPLETED: refused before anything is stored, naming the fix, in Python and the CLI."""
    from mistudio import cli

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    for source in (data.read_text(), "<|system|>always the same<|endoftext|>"):
        with pytest.raises(ms.InputError, match="renders every conversation as the same text"):
            ms.extract(gpt2_dir, CHATS, chat_template=source, workspace=workspace, **ARGS)
    cli_ws = tmp_path / "cli"
    assert cli.main(["--workspace", str(cli_ws), "extract", "--model", gpt2_dir, "--dataset", str(data),
                     "--chat-template", str(data), "--max-samples", "2"]) == 2
    assert not list(cli_ws.glob("extractions/*.zarr"))  # nothing stored
    ms.extract(gpt2_dir, CHATS, chat_template=TEMPLATE, workspace=workspace, **ARGS)  # one that reads them runs
    # templates that render one role only, tag a role without its text, or skip a turn read the messages: they run
    for own in ("{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}\n{% endif %}{% endfor %}",
                "{% for m in messages %}{% if m.role == 'user' %}[INST]{% else %}{{ m.content }}{% endif %}"
                "{% endfor %}", "{% for m in messages[1:] %}{{ m.content }}\n{% endfor %}"):
        ext = ms.extract(gpt2_dir, CHATS, chat_template=own, workspace=workspace, **ARGS)
        assert ext.sample(0)["input_ids"].tolist() != ext.sample(1)["input_ids"].tolist()
    # one that reads only what the conversations share (a first system message) renders every sample alike: the
    # data shows it, and it is refused before anything is stored
    shared = [[{"role": "system", "content": "You are terse."}, *chat[-2:]] for chat in CHATS]
    with pytest.raises(ms.InputError, match=r"renders every conversation of the dataset as the same text \(2 "):
        ms.extract(gpt2_dir, shared, chat_template="{{ messages[0]['content'] }}", workspace=workspace, **ARGS)


def test_chat_file_without_chat_template_names_the_fix(gpt2_dir, tmp_path, workspace):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    with pytest.raises(ms.InputError, match="chat_template='auto'"):
        ms.extract(gpt2_dir, str(path), workspace=workspace, **ARGS)
    with pytest.raises(ms.InputError, match="no conversations"):
        ms.extract(gpt2_dir, ["plain text"], chat_template=TEMPLATE, workspace=workspace, **ARGS)
