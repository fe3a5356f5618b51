"""The Studio's side files (``studio.json``: the form as last launched; ``models.json``: remembered model folders).

Reads are bounded: a regular file (a link is followed only to one; a folder, a FIFO or a device is refused
before it is opened), at most :data:`MAX_SIDE_FILE_BYTES`, UTF-8 JSON. What was read is parsed through a typed
model, leniently: a value of the wrong type is left out (the form keeps its default) and named in a problem line.
A file with any problem is *set aside* (renamed to ``<name>.bad-<timestamp>``: never deleted, never overwritten)
so that the next save writes a good one, and the Studio says so in a note. Writes go to a temporary file in the
same folder renamed over the name: a link there is replaced, never followed.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import AfterValidator, BaseModel, StringConstraints

from ..specs import short
from .common import esc, for_ui, note_box

MAX_SIDE_FILE_BYTES = 1 << 20  # a side file holds a few settings or folder names: a larger one is not ours
MAX_PROBLEMS_SHOWN = 6
MAX_ROUNDS = 8  # lenient validation: each round leaves out what the previous one found bad

MAX_TEXT = 4096  # a model name, a folder, a dataset path: the longest path a system takes
M = TypeVar("M", bound=BaseModel)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("it holds a NUL character, which no name or path can")
    return value


SettingText = Annotated[str, StringConstraints(max_length=MAX_TEXT), AfterValidator(_no_nul)]
"""A name or a path in a side file: text of at most :data:`MAX_TEXT` characters, without NUL."""


class SideFileError(Exception):
    """A side file that cannot be used as a whole; ``str()`` says why (a sentence part: 'it is a folder')."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_text(path: str | os.PathLike, max_bytes: int = MAX_SIDE_FILE_BYTES) -> str | None:
    """The text of a side file; None when there is none. Raises :class:`SideFileError` for anything but a regular
    UTF-8 file of at most ``max_bytes`` (checked before it is opened, and again on what was opened)."""
    path = os.fspath(path)
    try:
        info = os.stat(path)  # follows a link: what it points at must be a regular file
    except FileNotFoundError:
        return None  # absent (or a link to nothing): the defaults, and the next save writes the file
    except OSError as exc:
        raise SideFileError(f"it cannot be read ({exc.strerror or type(exc).__name__})") from None
    link = f"a link to {os.readlink(path)!r}, which is " if os.path.islink(path) else ""
    if not stat.S_ISREG(info.st_mode):
        raise SideFileError(f"it is {link}{_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise SideFileError(f"it is {info.st_size:,} bytes, more than a side file holds (at most {max_bytes:,})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise SideFileError(f"it cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        opened = os.fstat(fd)  # replaced between the check and the open: checked again
        if not stat.S_ISREG(opened.st_mode):
            raise SideFileError(f"it is {_kind(opened.st_mode)}, not a regular file")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 16, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise SideFileError(f"it is more than {max_bytes:,} bytes, more than a side file holds")
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SideFileError(f"it is not UTF-8 text (byte {raw[exc.start]:#04x} at position {exc.start:,})") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_SIDE_FILE_BYTES) -> Any:
    """The JSON value of a side file (None when there is none); :class:`SideFileError` says what is wrong."""
    text = read_text(path, max_bytes)
    if text is None:
        return None
    try:
        return json.loads(text)
    except RecursionError:
        raise SideFileError("it nests too deeply to be settings") from None
    except ValueError as exc:  # JSONDecodeError
        cut = " (cut short?)" if isinstance(exc, json.JSONDecodeError) and exc.pos >= len(text.rstrip()) else ""
        where = f"at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        what = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise SideFileError(f"it is not valid JSON ({what} {where}{cut})".replace(" )", ")")) from None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {list: "a list", str: "text", int: "a number", float: "a number", type(None): "null",
            dict: "an object"}.get(type(value), type(value).__name__)


def _resolve(data: Any, loc: tuple) -> tuple:
    """The real keys/indices of an error's location (a union's tag such as 'list[int]' ends it): the value to
    leave out. A location naming a missing key resolves to the object that lacks it."""
    path, node = [], data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            break
        path.append(part)
    return tuple(path)


def _without(data: Any, paths: list[tuple]) -> Any:
    """A copy of ``data`` without the values at ``paths`` (none of them empty)."""
    here = {p[0] for p in paths if len(p) == 1}
    deeper: dict[Any, list[tuple]] = {}
    for p in paths:
        if len(p) > 1 and p[0] not in here:
            deeper.setdefault(p[0], []).append(p[1:])
    if isinstance(data, dict):
        return {k: _without(v, deeper[k]) if k in deeper else v for k, v in data.items() if k not in here}
    return [_without(v, deeper[i]) if i in deeper else v for i, v in enumerate(data) if i not in here]


def _where(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def validate_lenient(model: type[M], data: Any, what: str = "the file") -> tuple[M, list[str]]:
    """``model`` from ``data``, leaving out each value that fails (its field keeps its default); returns the model
    and one line per value left out. Not an object at all: the defaults, and a line that says what it is."""
    if not isinstance(data, dict):
        return model(), [f"{what} holds {_json_kind(data)}, not an object of settings"]
    problems: list[str] = []
    for _ in range(MAX_ROUNDS):
        try:
            return model.model_validate(data), problems
        except pydantic.ValidationError as exc:
            errors = exc.errors()
        found: dict[tuple, list[str]] = {}
        for error in errors:
            path = _resolve(data, tuple(error["loc"]))
            if error["type"] == "extra_forbidden":
                found.setdefault(path, []).append("not a setting the Studio knows")
            else:
                found.setdefault(path, []).append(error["msg"])
        if () in found:
            break  # the object as a whole: nothing to leave out
        for path, messages in found.items():
            value = _at(data, path)
            reasons = " or ".join(dict.fromkeys(messages))
            problems.append(f"{_where(path)!r} = {short(value, 60)} ({_json_kind(value)}): {reasons}")
        data = _without(data, list(found))
    return model(), problems + [f"{what} could not be read as settings: the defaults are used"]


def _at(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a bad side file (a file, a link, a folder, a FIFO ...) to ``<name>.bad-<timestamp>`` next to it, never
    over an existing one; returns the new path. Nothing is deleted."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        target = path.with_name(f"{path.name}.bad-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not os.path.lexists(target):
            os.rename(path, target)  # the entry itself: a link is renamed, not what it points at
            return target
    raise SideFileError(f"{path.name} could not be set aside: 999 files named {path.name}.bad-{stamp}* exist")


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary file in the same folder renamed over it (a link at
    ``path`` is replaced, never followed; a reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, indent=1))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SideFile:
    """One side file of a workspace: ``load(model)`` reads it (problems kept in :attr:`problems`, the file set aside
    by :meth:`set_aside_if_bad`), ``save(value)`` writes it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.problems: list[str] = []
        self.set_aside_as: Path | None = None
        self.write_error: str | None = None

    def load(self, model: type[M], list_field: str | None = None) -> M:
        """The file parsed through ``model`` (defaults where it is absent or bad); problems go to :attr:`problems`.
        ``list_field``: the file holds a JSON list, which is ``model``'s field of that name."""
        try:
            data = read_json(self.path)
        except SideFileError as exc:
            self.problems.append(str(exc))
            return model()
        if data is None:
            return model()
        if list_field is not None:
            if not isinstance(data, list):
                self.problems.append(f"the file holds {_json_kind(data)}, not a list")
                return model()
            value, problems = validate_lenient(model, {list_field: data})
            self.problems += [p.replace(f"'{list_field}[", "'item [", 1) for p in problems]  # the file is the list
            return value
        value, problems = validate_lenient(model, data)
        self.problems += problems
        return value

    def set_aside_if_bad(self) -> Path | None:
        """Rename the file out of the way when it had problems (once); returns where it went."""
        if self.problems and self.set_aside_as is None and os.path.lexists(self.path):
            try:
                self.set_aside_as = set_aside(self.path)
            except (OSError, SideFileError) as exc:
                self.write_error = f"it could not be set aside ({getattr(exc, 'strerror', None) or exc})"
        return self.set_aside_as

    def save(self, value: Any) -> bool:
        """Write ``value``; False (and :attr:`write_error` says why) when the folder cannot be written."""
        try:
            write_json(self.path, value)
        except OSError as exc:
            self.write_error = f"it could not be written ({exc.strerror or type(exc).__name__})"
            return False
        self.write_error = None
        return True

    def note(self, used: str) -> str:
        """The problems as an HTML note (empty when there are none): the file, what was wrong, where it went.
        ``used``: what the Studio did instead (e.g. 'the form keeps its defaults for these')."""
        if not self.problems and self.write_error is None:
            return ""
        lines = [for_ui(p) for p in self.problems[:MAX_PROBLEMS_SHOWN]]  # escaped; «marks» as the Studio names them
        if len(self.problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"… and {len(self.problems) - MAX_PROBLEMS_SHOWN:,} more")
        head = f"⚠ <b>{esc(self.path.name)}</b> in this workspace ({esc(self.path)})"
        if self.problems:
            head += f" could not be used as it is; {esc(used)}."
        if self.set_aside_as is not None:
            head += (f" It was set aside as <code>{esc(self.set_aside_as.name)}</code> (nothing was deleted); a new "
                     f"{esc(self.path.name)} is written at the next save.")
        if self.write_error is not None:
            head += (f" Also, {esc(self.write_error)}" if self.problems else f": {esc(self.write_error)}; {esc(used)}"
                     ) + ": check the folder's permissions."
        items = "".join(f"<li>{line}</li>" for line in lines)
        return note_box(f"{head}<ul style='margin:2px 0'>{items}</ul>" if items else head, colour="#fd7e14",
                        background="#fff3e0")


__all__ = ["MAX_SIDE_FILE_BYTES", "SettingText", "SideFile", "SideFileError", "read_json", "read_text", "set_aside",
           "validate_lenient", "write_json"]
