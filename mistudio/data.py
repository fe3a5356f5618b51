"""Read dataset rows, tokenize them, validate token ids, and plan length-bucketed batches."""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import itertools
import json
import os
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .chat import FIX, PASS_TEMPLATE, Budget, ChatTemplateError, check_reads_messages, check_template, render_chat
from .errors import InputError, counted
from .formats import DATA_SUFFIXES, file_format, named as _named
from .request import Request
from .specs import HubDataset, pandas_kind

Row = tuple[int, object]  # (dataset row index, text or list of token ids)


def sample_dataset() -> str:
    """The bundled sample: ~2,000 paragraphs of real English prose (CPython's reference and docstrings)."""
    return "sample"


def sample_texts() -> list[str]:
    """The bundled sample's texts, in row order."""
    with resources.files("mistudio.resources").joinpath("sample_text.jsonl.gz").open("rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]


def _decode_error(path: Path, encoding: str) -> InputError:
    """Which line of ``path`` is not ``encoding`` text, and the fix."""
    decoder, line = codecs.getincrementaldecoder(encoding)(), 1
    with open_regular(path) as f:
        head = f.read(4096)
        f.seek(0)
        for raw in f:
            try:
                line += decoder.decode(raw).count("\n")
            except UnicodeDecodeError:
                break
    where = f"dataset file {_named(path)} line {line} is not {encoding} text"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return InputError(f"{where}: it looks like UTF-16 text; «pass encoding='utf-16'»", param="encoding")
    if b"\0" in head:
        return InputError(f"{where}: the file looks binary, not text: point dataset= at a "
                          f"{', '.join(DATA_SUFFIXES)} file")
    return InputError(f"{where}: if the file is in another encoding, «pass encoding='latin-1'» "
                      "(or its own, e.g. «encoding='cp1252'»)")


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (a named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular(path: str | os.PathLike, mode: int) -> InputError:
    """The refusal of a dataset path that is neither a regular file nor a folder."""
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    return InputError(f"dataset path {_named(Path(path))} is {kind}, not a regular file: reading it could block or "
                      f"never end. Copy the data into a {', '.join(DATA_SUFFIXES)} file and «pass dataset=<that "
                      "file>»", param="dataset")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file. It is opened without blocking and checked before a
    byte is read: a FIFO, a device or a socket (even one put there since the request was checked) is refused at
    once instead of blocking the job or never ending."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"dataset file {_named(Path(path))} does not exist (any more): «pass dataset=<an existing "
                         "file>»", param="dataset") from None
    except OSError as exc:  # a socket (ENXIO), a folder, no permission
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = 0
        if mode and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise not_regular(path, mode) from None
        raise InputError(f"dataset file {_named(Path(path))} cannot be opened ({exc.strerror or exc})",
                         param="dataset") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_regular(path, mode)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def dataset_bytes(source: object) -> int | None:
    """The dataset's bytes on disk: a file's size, the files of a saved ``datasets`` folder, the bundled sample's
    (compressed) file; None for in-memory data and Hub datasets. Nothing is read."""
    if isinstance(source, str) and source == "sample":
        return int(resources.files("mistudio.resources").joinpath("sample_text.jsonl.gz").stat().st_size)
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        info = os.stat(source)
    except OSError:
        return None
    if stat.S_ISREG(info.st_mode):
        return int(info.st_size)
    if not stat.S_ISDIR(info.st_mode):
        return None
    total = 0
    for folder, _, files in os.walk(source):
        for name in files:
            try:
                entry = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            total += entry.st_size if stat.S_ISREG(entry.st_mode) else 0
    return total


def _lines(path: Path, encoding: str) -> Iterator[str]:
    """The file's lines without their newline; a decoding failure names the line and the fix."""
    try:
        with io.TextIOWrapper(open_regular(path), encoding=encoding) as f:
            for line in f:
                yield line.rstrip("\n")
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None


CHAT_COLUMNS = ("messages", "conversations", "instruction")


def _fix_for(keys) -> str:
    """The fix for a missing text column: a chat_template when the keys are those of chat data."""
    chat = [c for c in CHAT_COLUMNS if c in keys]
    return f"it holds chat data ({chat[0]!r}): «pass chat_template='auto'»" if chat else \
        "«pass text_column=<one of them>»"


def _json_records(path: Path, encoding: str) -> Iterator[object]:
    """The records of a JSON Lines file (a blank line: None), or of a file holding one JSON array of records (what
    ``json.dump(rows)`` and ``df.to_json(orient='records')`` write). A UTF-8 byte-order mark is skipped. A first
    line holding a list (not token ids) is the whole file's array only when no record follows it."""
    lines = _lines(path, encoding)
    held, blanks = None, 0  # a first line's list, and the blank lines after it
    for n, line in enumerate(lines):
        line = line.lstrip("\ufeff") if n == 0 else line
        if not line.strip():
            if held is not None:
                blanks += 1
            else:
                yield None
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == 0 and line.lstrip().startswith("["):  # a JSON array spread over lines
                yield from _json_array(path, encoding, line, lines)
                return
            raise InputError(f"{path} line {n + 1} is not valid JSON ({exc.msg}): fix or remove that line (mistudio "
                             "reads JSON Lines, one record per line, or one JSON array of records)") from exc
        if n == 0 and isinstance(rec, list) and not _is_token_ids(rec):
            held = rec
            continue
        if held is not None:  # more records follow: the first line was a record of its own
            yield held
            yield from [None] * blanks
            held = None
        yield rec
    if held is not None:  # the whole array on one line
        yield from held


def _json_array(path: Path, encoding: str, first: str, rest: Iterator[str]) -> Iterator[object]:
    text = first + "\n" + "\n".join(rest)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} starts with '[' but is not one JSON array ({exc.msg} at line {exc.lineno}): fix "
                         "it, or write JSON Lines (one record per line)") from exc
    if not isinstance(records, list):
        raise InputError(f"{path} is not JSON Lines nor a JSON array of records: write one record per line")
    yield from records


def _read_jsonl(path: Path, column: str | None, encoding: str) -> Iterator[object]:
    """Each record's ``column`` value (a list of token ids stands for itself), or (``column`` None: chat data) the
    whole record."""
    first = True
    for rec in _json_records(path, encoding):
        if rec is None:
            yield None
            continue
        if column is None or not isinstance(rec, dict):
            yield rec  # a string, token ids, or what the report counts as not text
            continue
        if first and column not in rec:
            raise InputError(f"text column {column!r} is not in {path}: its first record has keys {sorted(rec)}; "
                             + _fix_for(rec))
        first = False
        yield rec[column] if column in rec else rec  # a record without the column: the report says why


def _records(path: Path, sep: str, encoding: str) -> Iterator[tuple[int, str, int | None]]:
    """The non-blank records of a CSV/TSV file, read with the ``csv`` module: (its first line number, that line,
    its fields); fields None for a field past the module's size limit (an unclosed quote, most likely), the last."""
    held: list[str] = []  # the lines of the record being read

    def lines(f) -> Iterator[str]:
        for line in f:
            held.append(line)
            yield line

    with io.TextIOWrapper(open_regular(path), encoding=encoding, errors="replace", newline="") as f:
        reader, start = csv.reader(lines(f), delimiter=sep), 1
        try:
            for record in reader:
                if record:
                    yield start, held[0], len(record)
                start, held[:] = reader.line_num + 1, []
        except csv.Error:
            yield start, held[0] if held else "", None


def _first_row_is_wider(path: Path, sep: str, encoding: str) -> bool:
    """Has the first row more fields than the header? (pandas would then make its leading fields an index.)"""
    head = list(itertools.islice(_records(path, sep, encoding), 2))
    return len(head) == 2 and None not in (head[0][2], head[1][2]) and head[1][2] > head[0][2]


def _first_bad_record(path: Path, sep: str, encoding: str) -> tuple[int, str, int | None, int]:
    """The first record with more fields than the header, or (fields None) the last record, whose quote runs to
    the end of the file: (its first line, that line, its fields, the header's fields); line 0 when there is none.
    Read after pandas refused the file: pandas names no line, or a later one."""
    header, last = None, (0, "", None, 0)
    for start, text, fields in _records(path, sep, encoding):
        if header is None:
            header = fields or 0
        elif fields is not None and fields > header:
            return start, text, fields, header
        else:
            last = (start, text, None, header)
    return last


def _table_error(path: Path, fmt: str, encoding: str, said: str) -> InputError:
    """Why pandas could not read ``path`` as the user meant (``said``: what pandas said), by line, and the fix."""
    sep, mark = ("\t", "a tab") if fmt == "tsv" else (",", "a comma")
    line, text, fields, header = _first_bad_record(path, sep, encoding)
    text = text.rstrip("\r\n")
    excerpt = repr(text if len(text) <= 60 else text[:57] + "...")
    where = f"dataset file {_named(path)}"
    one_per_line = "or, for one text per line, save it as .txt (or as .jsonl, one JSON record per line)"
    if line and fields is not None:
        return InputError(f"{where} line {line} has {fields} fields, more than the {header} of its header ({excerpt}):"
                          f" which of them make the text is ambiguous, so nothing is read. In {fmt.upper()}, quote a "
                          f"text that holds {mark} (\"...\", a quote inside doubled \"\"), {one_per_line}",
                          param="dataset")
    if line and "EOF inside string" in said:
        return InputError(f"{where} line {line} opens a quote that is never closed ({excerpt}): close it (a quote "
                          f"inside a quoted text is doubled \"\"), {one_per_line}", param="dataset")
    return InputError(f"{where} cannot be read as {fmt.upper()} (pandas: {said}): fix the file, {one_per_line}",
                      param="dataset")


def _read_table(path: Path, column: str | None, fmt: str, encoding: str) -> Iterator[object]:
    """A CSV, TSV or Parquet file's ``column`` (None: whole records). A CSV row with more fields than its header is
    refused (pandas would make its leading fields an index, or drop the trailing ones), as is a file pandas or
    pyarrow cannot parse: by file and line, with the fix."""
    import pandas as pd

    sep = "\t" if fmt == "tsv" else ","
    if fmt in ("csv", "tsv") and _first_row_is_wider(path, sep, encoding):
        raise _table_error(path, fmt, encoding, "more fields than the header")
    with open_regular(path) as handle:
        if fmt in ("csv", "tsv"):
            try:  # texts are texts: "NA", "null", "None", "nan", "N/A" stay strings (pandas' NA parsing is off)
                frame = pd.read_csv(handle, sep=sep, encoding=encoding,
                                    keep_default_na=False, na_filter=False,
                                    dtype=None if column is None else {column: str})
            except UnicodeDecodeError:
                raise _decode_error(path, encoding) from None
            except pd.errors.EmptyDataError:
                raise InputError(f"dataset file {_named(path)} is empty: not even a header line (the column "
                                 "names) is in it: «pass dataset=<the file that holds the texts>»",
                                 param="dataset") from None
            except pd.errors.ParserError as exc:
                raise _table_error(path, fmt, encoding, str(exc).removeprefix("Error tokenizing data. C error: ")
                                   .strip()) from None
            if not frame.index.equals(pd.RangeIndex(len(frame))):  # rows wider than the header made an index
                raise _table_error(path, fmt, encoding, "more fields than the header")
        else:
            import pyarrow as pa

            try:
                frame = pd.read_parquet(handle)
            except (pa.ArrowException, OSError) as exc:  # not Parquet, empty, cut short or damaged
                said = str(exc).splitlines()[0].removeprefix("Could not open Parquet input source '<Buffer>': ")
                raise InputError(f"dataset file {_named(path)} is not a Parquet file, or is damaged (pyarrow: "
                                 f"{said}): a file is read by its suffix, so if it holds CSV, JSON Lines or text, "
                                 "rename it to .csv, .jsonl or .txt; else write it again (df.to_parquet(path))",
                                 param="dataset") from None
    if column is None:
        yield from frame.to_dict("records")
        return
    if column not in frame.columns:
        raise InputError(f"text column {column!r} is not in {path}: its columns are {list(frame.columns)}; "
                         + _fix_for(frame.columns))
    yield from frame[column].tolist()


def _read_datasets(ds, column: str | None, where: str) -> Iterator[object]:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(ds.keys())
        raise InputError(f"{where} holds several splits {splits}: point at one split, e.g. its {splits[0]!r} split")
    if column is None:
        yield from ds
        return
    if column not in (ds.column_names or []):
        raise InputError(f"text column {column!r} is not in {where}: its columns are {ds.column_names}; "
                         + _fix_for(ds.column_names or []))
    for record in ds.select_columns([column]):
        yield record[column]


def _hub_error(spec: HubDataset, exc: Exception) -> InputError:
    return InputError(
        f"could not load Hub dataset {spec.name!r} (split {spec.split!r}): {type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}. The Hub may be unreachable from here: save the "
        "dataset with save_to_disk on a machine with network and pass that folder, or pass a local file",
        param="dataset")


def _read_hub(spec: HubDataset, column: str | None) -> Iterator[object]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except Exception as exc:  # the datasets library raises many types for "not reachable"
        raise _hub_error(spec, exc) from exc
    yield from _read_datasets(ds, column, f"Hub dataset {spec.name!r}")


def check_source(request: Request) -> None:
    """Is the data there and readable, with its text column? Reads the first record only (a Hub dataset: its
    description), so that a bad dataset is refused before any store exists."""
    src = request.dataset
    if isinstance(src, HubDataset):
        import datasets

        try:
            builder = datasets.load_dataset_builder(src.name, src.config)
        except Exception as exc:  # the datasets library raises many types for "not reachable"
            raise _hub_error(src, exc) from exc
        columns = list(builder.info.features or {})
        if columns and not request.chat_template and src.column not in columns:
            raise InputError(f"text column {src.column!r} is not in Hub dataset {src.name!r}: its columns are "
                             f"{columns}; " + _fix_for(columns), param="dataset")
        splits = list(builder.info.splits or {})
        if splits and src.split not in splits:
            raise InputError(f"Hub dataset {src.name!r} has no split {src.split!r}: its splits are {splits}",
                             param="dataset")
        return
    for _ in raw_values(request):
        return  # the first record read: files open, decode, and hold the column


def raw_values(spec: Request) -> Iterator[object]:
    """Every row's raw value (text, token ids, or junk), in dataset order; with a chat template, whole records."""
    src = spec.dataset
    kind = pandas_kind(src)
    column = None if spec.chat_template else spec.text_column
    if isinstance(src, HubDataset):
        yield from _read_hub(src, None if spec.chat_template else src.column)
    elif kind == "dataframe":
        yield from (src.to_dict("records") if column is None else src[column].tolist())
    elif kind == "series":
        yield from src.tolist()
    elif isinstance(src, list):  # texts, token-id lists, or records (their text column, as JSON Lines' are)
        yield from (v.get(column, v) if column is not None and isinstance(v, dict) else v for v in src)
    elif src == "sample":
        yield from sample_texts()
    else:
        path = Path(src)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise InputError(f"dataset path {src!r} does not exist (any more): «pass dataset=<an existing file or "
                             "folder>»", param="dataset") from None
        if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        if stat.S_ISDIR(mode):
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError as exc:
                raise InputError(
                    f"dataset folder {src!r} is not a `datasets` folder saved with save_to_disk: "
                    "point at such a folder, or at a .txt/.jsonl/.csv/.parquet file"
                ) from exc
            yield from _read_datasets(ds, column, f"dataset folder {src!r}")
            return
        fmt = file_format(path)
        if fmt == "txt":
            yield from _lines(path, spec.encoding)
        elif fmt == "jsonl":
            yield from _read_jsonl(path, column, spec.encoding)
        else:
            yield from _read_table(path, column, fmt, spec.encoding)


def special_ids(tokenizer) -> np.ndarray:
    """The ids that are markup, not text ([CLS]/[SEP], BOS/EOS, padding, mask, added special tokens): the tokenizer's
    special tokens less its unknown token, which stands for a word of the text it could not spell (unless that id
    also serves as markup, as GPT-2's <|endoftext|> does). ``exclude_special`` drops these, and views hide them."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    markup = {getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "pad", "cls", "sep", "mask")}
    markup |= set(getattr(tokenizer, "additional_special_tokens_ids", None) or [])
    if unk is not None and unk not in markup:
        ids.discard(unk)
    return np.array(sorted(ids), dtype=np.int64)


def _is_token_ids(value: object) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and np.issubdtype(value.dtype, np.integer)
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)


ROLE_CODES = {"system": 0, "user": 1, "assistant": 2, "other": 3}  # tokens/role; "other": template, tools
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def conversation(value: object) -> list[dict] | None:
    """A row as chat messages [{role, content}]: ``messages`` lists, ShareGPT ``conversations`` (from/value),
    Alpaca ``instruction``/``input``/``output`` records, or a bare list of messages; None if it is none of them."""
    if isinstance(value, dict):
        for key in ("messages", "conversations", "conversation"):
            if value.get(key) is not None:
                value = value[key]
                break
        else:
            if isinstance(value.get("instruction"), str) and isinstance(value.get("output"), str):
                extra = value.get("input")
                prompt = value["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
                return [{"role": "user", "content": prompt}, {"role": "assistant", "content": value["output"]}]
            return None
    if isinstance(value, np.ndarray):
        value = list(value)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(m, dict) for m in value):
        return None
    messages = []
    for m in value:
        role = m.get("role") or _SHAREGPT_ROLES.get(str(m.get("from")), m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def chat_template_of(tokenizer, chat_template: str) -> str:
    """The Jinja template to render with: the tokenizer's own for ``"auto"``, else ``chat_template`` itself; a
    template that is not valid Jinja is refused here (:class:`~mistudio.chat.ChatTemplateError`)."""
    if chat_template != "auto":
        check_template(chat_template, template_label(tokenizer, chat_template))
        check_reads_messages(chat_template, template_label(tokenizer, chat_template))
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise InputError(f"chat_template='auto' but the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has "
                         f"no chat template: {PASS_TEMPLATE} or use a chat model",
                         param="chat_template")
    own = own if isinstance(own, str) else own.get("default", next(iter(own.values())))
    check_template(own, template_label(tokenizer, "auto"))
    return own


def template_label(tokenizer, chat_template: str) -> str:
    """How messages name a chat template: the tokenizer's own, or the one passed as ``chat_template``."""
    if chat_template == "auto":
        return f"the chat template of the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r}"
    return "the chat template given as «chat_template»"


def _chat_ids(tokenizer, text: str) -> list[int]:
    """The ids of a rendered conversation, as ``apply_chat_template(..., tokenize=True)`` encodes it."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]


def chat_tokens(tokenizer, messages: list[dict], template: str, label: str = "the chat template",
                where: str = "a conversation") -> tuple[np.ndarray, np.ndarray]:
    """(ids, role codes) of a rendered conversation: ids are ``apply_chat_template(messages, tokenize=True)``'s,
    rendered within the conversation's size and time budget (:mod:`mistudio.chat`); the template is rendered over
    the first k messages and the new tokens go to message k's role (tokens that no prefix explains, e.g. a closing
    template part, are "other"). A template that fails, or goes past its budget, raises ChatTemplateError naming
    ``label`` and ``where``."""
    variables = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    limits = Budget.for_messages(messages, sum(len(str(v)) for v in variables.values()))
    ids = _chat_ids(tokenizer, render_chat(template, messages, variables, label, limits, where))
    roles = np.full(len(ids), ROLE_CODES["other"], dtype=np.int8)
    done = 0
    for k in range(1, len(messages) + 1):
        try:
            prefix = ids if k == len(messages) else _chat_ids(
                tokenizer, render_chat(template, messages[:k], variables, label, limits, where))
        except ChatTemplateError as exc:  # a template may refuse a prefix (e.g. one that ends with a user turn)
            if exc.kind != "failed":
                raise  # past the budget: the conversation's, prefixes included
            continue
        same = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        if same > done:
            roles[done:same] = ROLE_CODES.get(messages[k - 1]["role"], ROLE_CODES["other"])
            done = same
    return np.asarray(ids, dtype=np.int64), roles


def window_spans(length: int, window: int | None, stride: int | None) -> list[tuple[int, int, int]]:
    """How a sample of ``length`` tokens is forwarded: ``(start, stop, own_from)`` per window.

    Windows start every ``stride`` tokens and hold ``window`` tokens (the last one ends at the document's end).
    Each token is owned by the first window that holds it, the one that gives it the most left context: a
    window owns ``[own_from, stop)``, where ``own_from`` is the previous window's stop (0 for the first).
    Without a window, or for a sample that fits, one span covers the whole sample.
    """
    if window is None or length <= window:
        return [(0, length, 0)]
    spans, start, own_from = [], 0, 0
    while True:
        stop = min(start + window, length)
        spans.append((start, stop, own_from))
        if stop == length:
            return spans
        start, own_from = start + stride, stop


def window_positions(length: int, window: int | None, stride: int | None) -> np.ndarray:
    """Each token's position inside the window that owns it (its position id in the forward)."""
    pos = np.empty(length, dtype=np.int32)
    for start, stop, own_from in window_spans(length, window, stride):
        pos[own_from:stop] = np.arange(own_from - start, stop - start)
    return pos


SKIP_REASONS = {  # why a row gave no sample, in the words the report shows
    "empty": "empty or blank",
    "missing": "without the text column (a record with other fields)",
    "not_text": "not text (a number, a list or a record where text was expected)",
    "chat": "a conversation in a plain-text run («pass chat_template='auto'» to read them)",
    "not_chat": "not a conversation (no messages, ShareGPT conversations or Alpaca instruction/output)",
    "oov": "token ids outside the model's vocabulary («oov_policy='skip'»)",
}


def report_line(report: dict) -> str:
    """The data report in one line (marked for the front ends): samples from rows, skipped rows and why, cut
    samples, windows, tokens and activation rows. The estimate, the completion line, Jobs and Browse show it."""
    parts = [f"{counted(report.get('n_samples', 0), 'sample')} from {counted(report.get('n_rows_read', 0), 'row')}"]
    skipped = report.get("skipped") or {}
    if not skipped and (report.get("n_skipped_invalid") or report.get("n_skipped_oov")):  # stores from before
        skipped = {"empty": report.get("n_skipped_invalid", 0), "oov": report.get("n_skipped_oov", 0)}
    skipped = {r: n for r, n in skipped.items() if n}
    if skipped:
        parts.append(f"{counted(sum(skipped.values()), 'row')} skipped: "
                     + "; ".join(f"{n:,} {SKIP_REASONS.get(r, r)}" for r, n in skipped.items()))
    if report.get("n_clamped_tokens"):
        parts.append(f"{counted(report['n_clamped_tokens'], 'token id')} outside the vocabulary clamped to the last id "
                     "(«oov_policy='clamp'»)")
    if report.get("n_truncated"):
        parts.append(f"{report['n_truncated']:,} cut at «max_length» ("
                     f"{counted(report.get('n_truncated_tokens', 0), 'token')} dropped; «window» keeps them whole)")
    windows = report.get("n_windows")
    if windows and windows != report.get("n_samples"):
        parts.append(f"{windows:,} windows")
    tokens, rows = report.get("n_tokens"), report.get("n_rows")
    if tokens is not None:
        parts.append(counted(tokens, "token") + (f", {counted(rows, 'activation row')}" if rows not in (None, tokens)
                                                 else ""))
    return " · ".join(parts)


@dataclass
class TokenizedDataset:
    """Token ids of every kept sample, with the dataset row it came from and what was dropped, and why."""

    ids: list[np.ndarray]
    rows: np.ndarray
    roles: list[np.ndarray] | None = None  # chat data: a ROLE_CODES code per token
    n_rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason (SKIP_REASONS) -> rows
    n_clamped_tokens: int = 0
    n_truncated: int = 0          # kept samples that were longer than max_length
    n_truncated_tokens: int = 0   # tokens those samples lost

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(a) for a in self.ids), dtype=np.int64, count=len(self.ids))

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def report(self) -> dict:
        return {
            "n_rows_read": self.n_rows_read,
            "n_samples": len(self.ids),
            "n_tokens": int(self.lengths.sum()),
            "skipped": dict(self.skipped),
            "n_skipped_invalid": sum(n for r, n in self.skipped.items() if r != "oov"),
            "n_skipped_oov": self.skipped.get("oov", 0),
            "n_clamped_tokens": self.n_clamped_tokens,
            "n_truncated": self.n_truncated,
            "n_truncated_tokens": self.n_truncated_tokens,
        }


def _why_not_text(value: object) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return "empty"
    if conversation(value) is not None:
        return "chat"
    return "missing" if isinstance(value, dict) else "not_text"


def tokenize(spec: Request, tokenizer, vocab_size: int, batch_rows: int = 1024) -> TokenizedDataset:
    """Tokenize with the tokenizer's own call (special tokens as it adds them), truncate, check ids.

    The tokenizer truncates (keeping its special tokens); rows it cut to ``max_length`` are tokenized
    again in full to count what was dropped. With a ``window`` nothing is cut (long documents are forwarded
    in windows). With ``chat_template`` rows are conversations, rendered by the template, with roles.
    Rows that give no sample are counted by reason (``skipped``).
    """
    out = TokenizedDataset(ids=[], rows=np.zeros(0, dtype=np.int64), roles=[] if spec.chat_template else None)
    rows: list[int] = []
    pending: list[tuple[int, str]] = []
    limit_len = None if spec.window is not None else spec.max_length
    template = chat_template_of(tokenizer, spec.chat_template) if spec.chat_template else None
    label = template_label(tokenizer, spec.chat_template) if spec.chat_template else ""

    def keep(row: int, ids: np.ndarray, dropped: int = 0, roles: np.ndarray | None = None,
             given_ids: bool = False) -> None:
        if limit_len is not None and len(ids) > limit_len:
            ids, dropped = ids[:limit_len], len(ids) - limit_len
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            first = int(ids[bad][0])
            if spec.oov_policy == "error":
                cause = ("its ids were made by another tokenizer: tokenize with the model's own (or give the texts)"
                         if given_ids else "the tokenizer has tokens the model's embedding lacks (tokens added "
                         "without resize_token_embeddings): resize the model's embeddings and save it")
                raise InputError(
                    f"dataset row {row} has token id {first}, outside the model's vocabulary (0..{vocab_size - 1}): "
                    f"{cause}, or «pass oov_policy='skip'» to leave such rows out ('clamp' replaces such ids by the "
                    "last one: the activations of another text)", param="oov_policy")
            if spec.oov_policy == "skip":
                out.skip("oov")
                return
            out.n_clamped_tokens += int(bad.sum())
            ids = np.clip(ids, 0, vocab_size - 1)
        if len(ids) == 0:
            out.skip("empty")
            return
        out.n_truncated += dropped > 0
        out.n_truncated_tokens += dropped
        out.ids.append(ids.astype(np.int32))
        if out.roles is not None:
            out.roles.append(roles[: len(ids)])
        rows.append(row)

    def flush() -> None:
        if not pending:
            return
        texts = [t for _, t in pending]
        enc = tokenizer(texts, truncation=limit_len is not None, max_length=limit_len,
                        add_special_tokens=spec.add_special_tokens, verbose=False)["input_ids"]
        dropped = [0] * len(enc)
        # maybe truncated: measure in full
        cut = [i for i, ids in enumerate(enc) if limit_len is not None and len(ids) >= limit_len]
        if cut:
            whole = tokenizer([texts[i] for i in cut], add_special_tokens=spec.add_special_tokens, verbose=False)
            for i, ids in zip(cut, whole["input_ids"]):
                dropped[i] = len(ids) - len(enc[i])
        for (row, _), ids, n in zip(pending, enc, dropped):
            keep(row, np.asarray(ids, dtype=np.int64), n)
        pending.clear()

    limit = spec.max_samples
    first: list = []  # the first conversation and its ids: a template that renders all alike is found at the end
    differ = {"conversations": False, "renders": False}
    for row, value in enumerate(raw_values(spec)):
        if limit is not None and len(rows) + len(pending) >= limit:
            flush()  # some pending rows may still be dropped; read on only if they were
            if len(rows) >= limit:
                break
        out.n_rows_read += 1
        if template is not None:
            messages = conversation(value)
            if messages:
                ids, roles = chat_tokens(tokenizer, messages, template, label, f"dataset row {row}")
                if not first:
                    first[:] = [messages, ids]
                differ["conversations"] |= messages != first[0]
                differ["renders"] |= not np.array_equal(ids, first[1])
                keep(row, ids, roles=roles)
            else:
                out.skip("empty" if value is None else "not_chat")
        elif isinstance(value, str) and value.strip():
            pending.append((row, value))
            if len(pending) >= batch_rows:
                flush()
        elif _is_token_ids(value):
            flush()
            keep(row, np.asarray(value, dtype=np.int64), given_ids=True)
        else:
            out.skip(_why_not_text(value))
    flush()
    out.rows = np.asarray(rows, dtype=np.int64)
    if template is not None and differ["conversations"] and not differ["renders"]:
        raise InputError(
            f"{label} renders every conversation of the dataset as the same text ({len(out.ids):,} samples of "
            f"{len(first[1]):,} tokens each): it reads only what they share (a first system message, say), so "
            f"every sample would be that text; {FIX}", param="chat_template")
    if not out.ids and template is not None:
        raise InputError(
            f"the dataset has no conversations: {out.n_rows_read} rows read, none with 'messages' "
            "([{role, content}]), ShareGPT 'conversations' (from/value) or Alpaca 'instruction'/'input'/'output': "
            "give such rows, or «pass chat_template=None» for plain text", param="chat_template")
    if not out.ids:
        why = "; ".join(f"{n} {SKIP_REASONS[r]}" for r, n in out.skipped.items()) or "none"
        raise InputError(f"the dataset has no usable rows: {out.n_rows_read} read, skipped: {why}. Give a dataset "
                         f"with text in column {spec.text_column!r}", param="dataset")
    return out


def plan_order(lengths: np.ndarray) -> np.ndarray:
    """Stored order: longest first (OOM shows up in the first batch), stable, independent of batch size.

    Any batch size cut from this order pads little, and a resume with another batch size keeps the order.
    """
    return np.argsort(-np.asarray(lengths), kind="stable")


def batch_ranges(n_samples: int, batch_size: int, start: int = 0, lengths: np.ndarray | None = None,
                 max_batch_tokens: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [begin, end) sample ranges of the stored order, from ``start``.

    With ``max_batch_tokens`` (and the stored ``lengths``, longest first) a batch takes as many samples as
    fit the budget in padded tokens (samples x its first, longest, sample): a greedy cut that depends only on
    the stored order and the budget, so a resume from a batch boundary continues on the same boundaries.
    A sample longer than the budget gets a batch of its own (the only batch that exceeds it).
    """
    if max_batch_tokens is None:
        return [(b, min(b + batch_size, n_samples)) for b in range(start, n_samples, batch_size)]
    if lengths is None:
        raise ValueError("max_batch_tokens needs the stored sample lengths")
    ranges, b = [], start
    while b < n_samples:
        e = min(n_samples, b + max(1, max_batch_tokens // max(1, int(lengths[b]))))
        ranges.append((b, e))
        b = e
    return ranges


def plan_batches(offsets: np.ndarray, request: Request, begin: int, end: int,
                 batch_size: int | None = None) -> list[tuple[int, int]]:
    """The ``[first, stop)`` batches of stored samples ``[begin, end)``: a fixed count, or by padded-token budget."""
    size = batch_size or request.batch_size
    if size == "auto":
        raise InputError("«batch_size='auto'» is chosen by trial forwards once the model is loaded: pass a number")
    lengths = np.diff(offsets[:end + 1]) if request.max_batch_tokens is not None else None
    return batch_ranges(end, size, begin, lengths, request.max_batch_tokens)
