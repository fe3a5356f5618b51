"""Which kind of data file a path holds (decided by its name, its link target's name, or its content)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def named(path: Path) -> str:
    """The path as the user gave it, and the real file when it is a link."""
    real = os.path.realpath(path)
    return f"{str(path)!r}" + (f" (a link to {real!r})" if real != os.path.abspath(path) else "")


def file_format(path: str | os.PathLike) -> str:
    """How to read a data file: 'txt', 'jsonl', 'csv', 'tsv' or 'parquet'.

    Decided by the suffix of the path as given (a link's own name), else by its target's suffix, else by
    the content: parquet's magic ``PAR1``, JSON lines starting with ``{``, else text (only for a file with
    no suffix at all: an unknown suffix such as .docx is refused).
    """
    given = Path(path)
    real = Path(os.path.realpath(given))
    for p in (given, real):
        if p.suffix.lower() in FORMATS:
            return FORMATS[p.suffix.lower()]
    with real.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "jsonl"
    suffix = given.suffix or real.suffix
    if suffix:
        raise InputError(f"dataset file {named(given)} has an unsupported type {suffix!r}: supported are "
                         f"{', '.join(DATA_SUFFIXES)} files and saved `datasets` folders")
    if b"\0" in head:
        raise InputError(f"dataset file {named(given)} has no suffix and looks binary, not text: point dataset= at "
                         f"a {', '.join(DATA_SUFFIXES)} file, or name it with the suffix of its format")
    return "txt"
