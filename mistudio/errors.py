"""Error types, the wording of parameters in messages, and the classification of failures into plain-words
classes.

A message names the parameter it is about with a mark: ``«window=600»`` (the value as the user gave it),
``«pass window=512»`` (the fix), ``«window»`` (the parameter alone) or ``«pass window»`` (give it). ``str(error)``
reads as Python (``window=600``, ``pass window=512``, ``window``, ``pass window=``); :func:`render` reads as the
command line (``--window 600``, ``--window``) or the Studio (``'Window' 600``, ``set 'Window' to 512``), from the
names each front end passes. ``«py:TrainConfig.»`` is text for the Python wording only (the class a field belongs
to): the command line and the Studio name a flag or a field alone. Likewise ``«cli:...»`` is for the command line
only and ``«py+studio:...»`` for the others; such text may hold one mark (a fix that differs by front end:
``«py+studio:«pass chat_template="<jinja string>"»»«cli:«pass chat_template=<path of a file>»»``).
"""
from __future__ import annotations

import errno
import re
import shlex

ERROR_TYPES = ("OOM", "VALIDATION", "TIMEOUT", "INTERRUPTED", "DISK_FULL", "STORE_LOST", "STORE_DAMAGED", "UNKNOWN")

_OOM_MARKERS = (
    "out of memory",  # CUDA, HIP, generic
    "mps backend out of memory",
    "defaultcpuallocator: can't allocate memory",
    "can't allocate memory",
    "not enough memory",
    "failed to allocate memory",
)


_MARK = re.compile(r"«(pass )?([A-Za-z_][A-Za-z0-9_]*)(?:=(.*?))?»")
_STYLES = "py|cli|studio"
_ONLY = re.compile(rf"«((?:{_STYLES})(?:\+(?:{_STYLES}))*):((?:[^«»]|«[^«»]*»)*)»")  # text for some front ends


def _cli_value(value: str) -> str:
    """A Python literal as typed on a command line: 'auto' -> auto, [0, 3] -> 0,3, 2.0 -> 2."""
    value = value.strip()
    if re.fullmatch(r"-?\d+\.0", value):  # a flag's float that holds a whole number, as it was typed
        return value[:-2]
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1] or "''"  # an empty text as typed: --hooks ''
    if value.startswith("[") and value.endswith("]"):
        return ",".join(v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()) or "''"
    return value


def _json_value(value: str) -> str:
    """A Python literal as JSON writes it: 'lots' -> "lots", None -> null, [0, 'a'] -> [0, "a"]."""
    value = value.strip()
    words = {"None": "null", "True": "true", "False": "false"}
    return words.get(value) or re.sub(r"'([^'\"]*)'", r'"\1"', value)


def render(text: str, style: str = "python", names: dict[str, tuple[str, str]] | None = None) -> str:
    """A message with its parameter marks worded for a front end: ``"python"``, ``"cli"`` or ``"studio"`` (or
    ``"file"``: the keys of a preset file, in JSON).

    ``names`` maps a parameter to its (command-line flag without dashes, Studio label); by default the flag is
    the name with dashes and the label the name in words."""
    def word(m: re.Match) -> str:
        verb, name, value = bool(m.group(1)), m.group(2), m.group(3)
        if style == "file":  # a preset file's keys, as its JSON writes them
            return ("set " if verb else "") + f'"{name}"' + ("" if value is None else f": {_json_value(value)}")
        if style == "python":
            if value is None:
                return f"pass {name}=" if verb else name
            return ("pass " if verb else "") + f"{name}={value}"
        flag, label = (names or {}).get(name) or (name.replace("_", "-"), name.replace("_", " ").capitalize())
        if style == "cli":
            if value in ("True", "False"):
                shown = f"--{flag}" if value == "True" else f"--no-{flag.removeprefix('no-')}"
            elif value in (None, ""):
                shown = f"--{flag}"
            elif value == "None":
                shown = f"no --{flag}"
            else:
                shown = f"--{flag} {_cli_value(value)}"
            return ("pass " if verb and value != "None" else "leave out " if verb else "") + shown.removeprefix(
                "no " if verb else "")
        if value in ("True", "False"):
            return (("tick" if value == "True" else "untick") + f" '{label}'") if verb else \
                f"'{label}' {'ticked' if value == 'True' else 'not ticked'}"
        if value in (None, ""):
            return f"'{label}'"
        shown = "empty" if value == "None" else _cli_value(value)
        return f"set '{label}' to {shown}" if verb else f"'{label}' {shown}"

    short = "py" if style in ("python", "file") else style
    text = _ONLY.sub(lambda m: m.group(2) if short in m.group(1).split("+") else "", text)
    return _MARK.sub(word, text)


EXTRACT_AGAIN = "run `mistudio extract` again with the same flags (a new extraction)"


def retry_words(python: str, cli: str = EXTRACT_AGAIN) -> str:
    """A fix that retries an extraction: ``python`` for Python and the Studio (which have a retry), ``cli`` for the
    command line (which has none: it extracts again), marked for :func:`render`."""
    return f"«py+studio:{python}»«cli:{cli}»"


RETRY_EXTRACTION = retry_words("retry the extraction")
RE_EXTRACT = retry_words("re-extract (retry)", "re-extract (run `mistudio extract` again)")


class MistudioError(Exception):
    """Base class of every error mistudio raises on purpose. A message with marks (see :func:`render`) reads as
    Python in ``str()``; ``template`` keeps the marks for the other front ends."""

    def __init__(self, *args):
        if args and isinstance(args[0], str) and "«" in args[0]:
            self.template = args[0]
            args = (render(args[0]), *args[1:])
        super().__init__(*args)


class InputError(MistudioError, ValueError):
    """A value the user gave is wrong. The message names the value and the fix.

    ``param`` is the parameter it is about (when one is); the message marks parameters (see :func:`render`):
    ``str()`` words them for Python, ``render(style, names)`` for the command line or the Studio."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.template = message
        self.param = param if param is not None else (_MARK.search(message) or [None, None, None])[2]

    def __str__(self) -> str:
        return render(self.template, "python")

    def render(self, style: str, names: dict[str, tuple[str, str]] | None = None) -> str:
        return render(self.template, style, names)


class JobCancelled(MistudioError):
    """Raised inside a job when its cancel token is set; the job ends CANCELLED."""


class JobInterrupted(MistudioError):
    """Raised inside a job whose process is exiting (a Jupyter kernel shut down or restarted): the job stops at
    its next block and ends FAILED/INTERRUPTED, resumable, like a job whose process died, but with what it
    computed committed."""


class JobTimeout(MistudioError):
    """Raised inside a job that ran past its ``timeout_s``."""


class StoreBusy(MistudioError):
    """A live job already owns the store this operation wants to write."""


class StoreLost(MistudioError):
    """The store a job was writing was deleted or replaced under it: the job stops without writing more."""


class DiskFull(MistudioError, OSError):
    """No space left (or quota exceeded) where the workspace lives. Carries bytes free and needed."""

    def __init__(self, message: str, free: int | None = None, needed: int | None = None):
        super().__init__(errno.ENOSPC, message)
        self.message, self.free, self.needed = message, free, needed

    def __str__(self) -> str:
        return self.message


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``'1 row'``, ``'2 rows'``, ``'1,024 samples'``: a count with its noun in the right number."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc`` (it may be wrapped by the writer or by zarr), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(where: str, free: int | None, needed: int | None, what: str) -> str:
    have = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    need = f", about {human_bytes(needed)} more needed" if needed else ""
    return (f"The disk holding {where} is full ({have}{need}). {what} Free some space (or move the workspace) and "
            "resume the job: it continues from what was saved.")


class StoreCorrupted(MistudioError):
    """Part of a store is damaged or missing: names the store, the array, the chunk and the file, and the fix
    (``fix``: by default, verify the store and re-extract it)."""

    def __init__(self, location: str, what: str | None = None, array: str | None = None, chunk: tuple | None = None,
                 file: str | None = None, fix: str | None = None):
        if what is None:  # rebuilt from its message alone: unpickled, or re-raised out of a DataLoader worker
            self.location = self.array = self.chunk = self.file = None
            self.what = location
            super().__init__(location)
            return
        self.location, self.array, self.chunk, self.file, self.what = location, array, chunk, file, what
        where = "".join([f" array {array}" if array else "", f" chunk {chunk}" if chunk is not None else "",
                         f" (file {file})" if file else ""])
        fix = fix or f"Run `mistudio verify <id>` (ext.verify() in Python) for a full report; {RE_EXTRACT} to repair it"
        super().__init__(_named(f"store {location} is damaged:{where}: {what}. {fix}", location))


def _named(message: str, location: str) -> str:
    """``message`` with its ``mistudio verify <id>`` naming the store at ``location`` (``<root>/extractions/<id>.zarr``)
    and its workspace."""
    found = re.match(r"^(?:file://)?(.+)/extractions/([^/]+)\.zarr/?$", location)
    if not found:
        return message
    root, store_id = found.groups()
    return message.replace("`mistudio verify <id>", f"`mistudio verify {store_id} --workspace {shlex.quote(root)}") \
        .replace("ws.rerecord(id)", f"ws.rerecord({store_id!r})")


class ExtractionFailed(MistudioError):
    """``ms.extract`` ran a job that ended FAILED; carries the job's error record."""

    def __init__(self, extraction_id: str, error: dict):
        self.extraction_id = extraction_id
        self.error = error
        hint = ""
        if error.get("suggested_retry_params"):
            hint = retry_words(f" Suggested retry: {error['suggested_retry_params']}.", "")
        words = error.get("error_template") or error["error_message"]
        self.template = f"[{error['error_type']}] {words}{hint} (extraction {extraction_id})"
        super().__init__(render(self.template))


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU out-of-memory errors, by type or by the allocator's message."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in _OOM_MARKERS)
    return False


def classify(exc: BaseException, params: dict, disk: tuple[str, int | None, int | None] | None = None,
             resumable: bool = True) -> dict:
    """Turn an exception raised by a job into its error record (type, words, suggested retry).

    ``disk`` is (where, bytes free, bytes still needed), used to word a full disk; ``resumable``: whether the
    store holds something a resume continues from (its tokens), so that the words offer only what can succeed.
    """
    batch_size = params.get("batch_size", 8)
    batch_size = int(batch_size) if isinstance(batch_size, (int, float)) else 8  # "auto" before its choice
    if disk_full_cause(exc) is not None:
        where, free, needed = disk or ("the workspace", None, None)
        return {"error_type": "DISK_FULL", "suggested_retry_params": {}, "resume_available": True,
                "error_message": disk_full_message(where, free, needed, "Everything committed before it is kept."),
                "bytes_free": free, "bytes_needed": needed}
    if isinstance(exc, JobInterrupted):
        return {"error_type": "INTERRUPTED", "error_message": str(exc), "suggested_retry_params": {},
                "resume_available": True}
    if isinstance(exc, (StoreLost, StoreCorrupted)):  # damaged: a resume would stop at the committed rows again
        record = {"error_type": "STORE_LOST" if isinstance(exc, StoreLost) else "STORE_DAMAGED",
                  "error_message": str(exc), "suggested_retry_params": {}, "resume_available": False}
        if getattr(exc, "template", None):  # its fix worded by each front end
            record["error_template"] = exc.template
        return record
    budget = params.get("max_batch_tokens")
    if is_oom(exc):
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if budget:
            template = (f"Out of memory at «max_batch_tokens={budget}»: {first_line}. Retry with «max_batch_tokens="
                        f"{max(1, budget // 2)}», or «micro_batch_size=1».")
            suggested = {"max_batch_tokens": max(1, budget // 2)}
        elif batch_size > 1:
            template = (f"Out of memory at «batch_size={batch_size}»: {first_line}. Retry with «batch_size="
                        f"{max(1, batch_size // 2)}».")
            suggested = {"batch_size": max(1, batch_size // 2)}
        else:
            template = (f"Out of memory at «batch_size=1»: {first_line}. Batch size is already 1: use a shorter "
                        "«max_length», fewer layers, or a bigger device.")
            suggested = {}
        return {"error_type": "OOM", "error_message": render(template), "error_template": template,
                "suggested_retry_params": suggested}
    if isinstance(exc, (InputError, StoreBusy)):
        record = {"error_type": "VALIDATION", "error_message": str(exc), "suggested_retry_params": {},
                  "resume_available": False}
        if isinstance(exc, InputError) and exc.template != str(exc):  # front ends word its parameters their way
            record.update(error_template=exc.template, param=exc.param)
        return record
    if isinstance(exc, JobTimeout):
        if not resumable:  # out of time while loading the model or reading the data: a longer limit is the fix
            limit, again = params.get("timeout_s"), retry_words("retry it", "run `mistudio extract` again")
            template = (f"{exc} It stopped before it stored anything (while loading the model or reading the data): "
                        f"{again} with a longer limit («timeout_s={2 * limit:g}», or "
                        "«py+studio:«timeout_s=None»»«cli:--timeout none» for none)."
                        if limit else f"{exc} It stopped before it stored anything: {again} with a longer limit.")
            return {"error_type": "TIMEOUT", "error_message": render(template), "error_template": template,
                    "suggested_retry_params": {"timeout_s": 2 * limit} if limit else {}}
        max_samples = params.get("max_samples")
        suggested = {"max_samples": max(1, int(max_samples) // 2)} if max_samples else {}
        template = (f"{exc} Resume it to continue from what was saved (each run gets the limit again), or "
                    + retry_words("retry with fewer samples.", "run `mistudio extract` again with fewer samples "
                                  "(a new extraction)."))
        return {"error_type": "TIMEOUT", "error_message": render(template), "error_template": template,
                "suggested_retry_params": suggested}
    return {
        "error_type": "UNKNOWN",
        "error_message": f"{type(exc).__name__}: {exc}",
        "suggested_retry_params": {},
    }
