"""Presets: saved extraction arguments, a partial :class:`~mistudio.request.Request` as JSON in
``<workspace>/presets/<name>.json``. Reading, listing, deleting and exporting them is light (no model code);
saving validates them as a submit would (``Workspace.save_preset``).

Every file is parsed through its typed model: a bad one is reported by name (``Presets.problems()``), left out
of the listing, and never stops anything else. Writes go to a temporary file renamed into place, so a link at
the preset's name is replaced, never followed.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from .errors import InputError
from .listing import ID_PATTERN, Folder
from .request import Request
from .specs import HubDataset, ModelSpec, pandas_kind, short

MAX_PRESET_BYTES = 1 << 20  # a preset is a few hundred bytes; a larger file is not one
EXPORT = "«py+studio:ws.export_preset(name, path)»«cli:`mistudio presets export NAME PATH`»"  # how to make a file
NOT_IN_PRESETS = ("before_batch", "cluster", "workspace", "storage_options", "progress", "preset")


class PresetFile(BaseModel):
    """The layout of a preset file: its name, the arguments (Request fields only), when it was saved."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    arguments: dict[str, Any]
    saved: float | None = None

    @pydantic.field_validator("arguments")
    @classmethod
    def _known(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(Request.model_fields))
        if unknown:
            raise ValueError(f"has unknown keys {', '.join(map(repr, unknown))} (the keys are extraction arguments, "
                             "e.g. 'model', 'layers', 'batch_size': «py+studio:help(ms.extract) lists them»"
                             "«cli:`mistudio extract --help` lists them as flags»)")
        return v


def check_preset_name(name: Any) -> str:
    """A preset's name follows the id rule: letters, digits, ``_``, ``-``, ``.``; never a path."""
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name) or ".." in name:
        raise InputError(f"{short(name)} is not a preset name: use letters, digits, '_', '-', '.' (no separators, "
                         "no '..'), e.g. 'gpt2-residual-all'", param="name")
    return name


def preset_arguments(arguments: dict) -> dict:
    """Submit arguments as JSON: paths made absolute, Hub datasets as ``{"hub": {...}}``; in-memory data, live
    objects (a dask client, callables) and unknown names are refused, naming the argument."""
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        if key in NOT_IN_PRESETS:
            raise InputError(f"«{key}» cannot be saved in a preset (it belongs to one run): pass it next to "
                             "«preset»", param=key)
        if key not in Request.model_fields:
            raise InputError(f"{key!r} is not an extraction argument: the arguments are "
                             f"{', '.join(Request.model_fields)}", param=key)
        if key == "model" and isinstance(value, ModelSpec):
            value = value.name_or_path
        if key == "model" and isinstance(value, (str, os.PathLike)) and Path(os.fspath(value)).expanduser().exists():
            value = str(Path(os.fspath(value)).expanduser().resolve())
        if key == "dataset":
            kind = pandas_kind(value) or ("list" if isinstance(value, (list, tuple)) else None)
            if kind:
                raise InputError(f"«dataset» is an in-memory {kind}, which a preset cannot hold: save it to a file "
                                 "(e.g. df.to_parquet('data.parquet')) and pass its path, or pass the data next to "
                                 "«preset» each time", param="dataset")
            if isinstance(value, HubDataset):
                value = {"hub": value.model_dump()}
            elif isinstance(value, (str, os.PathLike)) and os.fspath(value) != "sample":
                value = os.path.abspath(os.path.expanduser(os.fspath(value)))
        if isinstance(value, (tuple, range)) or type(value).__module__ == "numpy":
            value = value.tolist() if hasattr(value, "tolist") else list(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise InputError(f"«{key}={short(value)}» cannot be saved in a preset (not JSON): pass plain numbers, "
                             "strings, lists or dicts", param=key) from None
        out[key] = value
    return out


def read_preset_file(path: str | os.PathLike, fs=None) -> PresetFile:
    """Parse a preset file (a regular file of at most 1 MB holding a preset's JSON); InputError says what is wrong."""
    shown = os.fspath(path)
    try:
        if fs is None:
            if not os.path.isfile(shown):
                raise InputError(f"{shown!r} is not a regular file: export a preset with {EXPORT} and import that "
                                 "file", param="path")
            if os.path.getsize(shown) > MAX_PRESET_BYTES:
                raise InputError(f"{shown!r} is {os.path.getsize(shown):,} bytes, far more than a preset: import "
                                 "a file written by `mistudio presets export`", param="path")
            with open(shown, encoding="utf-8") as f:
                raw = f.read(MAX_PRESET_BYTES + 1)
        else:
            with fs.open(shown, "r") as f:
                raw = f.read(MAX_PRESET_BYTES + 1)
        return PresetFile.model_validate(json.loads(raw, object_pairs_hook=_once))
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSON and pydantic errors are ValueErrors
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if isinstance(exc, json.JSONDecodeError):
            why = f"it is not JSON: {exc.msg.lower()} at line {exc.lineno}, column {exc.colno}"
        elif isinstance(exc, _Twice):
            why = str(exc)
        elif isinstance(exc, UnicodeDecodeError):
            why = "it is not UTF-8 text"
        elif isinstance(exc, pydantic.ValidationError):
            why = "; ".join(_said(e) for e in exc.errors()[:3])
        raise InputError(f"{shown!r} is not a preset file ({why[:400]}): export one with {EXPORT}",
                         param="path") from None


class _Twice(ValueError):
    """A JSON object that writes a key twice."""


def _once(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are each written once (json keeps the last of a key written twice: an SAE lost)."""
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise _Twice(f"it writes {', '.join(map(repr, twice))} twice in one object: keep one of them")
    return dict(pairs)


def _said(error: dict) -> str:
    """One problem of a preset file's layout, naming its key as the JSON writes it."""
    where = ".".join(f'"{part}"' for part in error["loc"])
    if error["type"] == "missing":
        return f"it has no {where}"
    if error["type"] == "model_type":
        return "it is not a JSON object"
    what = {"dict_type": "is not an object of arguments", "string_type": "is not text",
            "float_type": "is not a number"}.get(error["type"], error["msg"].removeprefix("Value error, "))
    return f"{where} {what}" if where else what


def from_json(arguments: dict) -> dict:
    """A preset's arguments as submit takes them (a Hub dataset back to ``HubDataset``)."""
    args = dict(arguments)
    if isinstance(args.get("dataset"), dict) and "hub" in args["dataset"]:
        args["dataset"] = HubDataset(**args["dataset"]["hub"])
    return args


class Presets:
    """The presets of one workspace folder."""

    def __init__(self, folder: Folder):
        self.folder = folder
        self.fs = folder.fs
        self.path = f"{folder._root_path}/presets"

    def _fs(self):
        """The filesystem to read through: None (plain files, checked to be regular) for a local workspace."""
        return self.fs if self.folder.remote else None

    def file(self, name: str) -> str:
        return f"{self.path}/{check_preset_name(name)}.json"

    def names(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        found = []
        for entry in sorted(self.fs.ls(self.path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".json") and ID_PATTERN.fullmatch(name[:-5]) and ".." not in name:
                found.append(name[:-5])
        return found

    def read(self, name: str) -> dict:
        """One preset's arguments, ready for ``ws.submit(**arguments)``."""
        path = self.file(name)
        if not self.fs.exists(path):
            raise InputError(f"no preset {name!r} in workspace {self.folder.root!r}: saved presets are "
                             f"{self.names() or 'none'}", param="preset")
        try:
            return from_json(read_preset_file(path, self._fs()).arguments)
        except InputError as exc:
            raise InputError(f"preset {name!r} is damaged: {exc.template}; delete it (`mistudio presets delete "
                             f"{name}`) or save it again", param="preset") from None

    def all(self) -> dict[str, dict]:
        """Every readable preset: name -> its arguments (as saved, JSON), sorted by name; see :meth:`problems`."""
        return {name: args for name, args, problem in self._scan() if problem is None}

    def problems(self) -> dict[str, str]:
        """Preset files that cannot be read: name -> why (they are left out of :meth:`all`)."""
        return {name: problem for name, _, problem in self._scan() if problem is not None}

    def _scan(self) -> list[tuple[str, dict | None, str | None]]:
        out = []
        for name in self.names():
            try:
                out.append((name, read_preset_file(self.file(name), self._fs()).arguments, None))
            except InputError as exc:
                out.append((name, None, str(exc)))
        return out

    def write(self, name: str, arguments: dict) -> None:
        """Write a preset (JSON already checked): a temporary file renamed over the name, never through a link."""
        path = self.file(name)
        text = json.dumps({"name": name, "arguments": arguments, "saved": time.time()}, indent=2)
        self.fs.makedirs(self.path, exist_ok=True)
        if self.folder.remote:
            with self.fs.open(path, "w") as f:
                f.write(text)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)  # replaces a link at the name itself, never its target
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, name: str) -> None:
        path = self.file(name)
        if not self.fs.exists(path) and not os.path.islink(path):
            raise InputError(f"no preset {name!r} in workspace {self.folder.root!r}: saved presets are "
                             f"{self.names() or 'none'}", param="preset")
        if self.folder.remote:
            self.fs.rm(path)
        else:
            os.unlink(path)  # a link is removed, its target kept

    def export(self, name: str, target: str | os.PathLike) -> str:
        """Write a preset to a JSON file (to share it); returns the file's path."""
        arguments = self.read(name)
        target = os.path.abspath(os.path.expanduser(os.fspath(target)))
        data = {"name": name, "arguments": preset_arguments(arguments), "saved": time.time()}
        try:
            with open(target, "w", encoding="utf-8") as out:
                out.write(json.dumps(data, indent=2))
        except OSError as exc:
            why = "it is a folder" if os.path.isdir(target) else "no such folder" if not os.path.isdir(
                os.path.dirname(target)) else exc.strerror or type(exc).__name__
            raise InputError(f"cannot write the preset to {target!r} ({why.lower()}): give the path of a file in a "
                             "folder you can write, e.g. ./my-preset.json", param="path") from None
        return target


__all__ = ["Presets", "PresetFile", "check_preset_name", "preset_arguments", "read_preset_file", "from_json"]
