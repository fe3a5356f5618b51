"""Small pieces shared by the panels: plain-words error classes, badges, formatting, guarded callbacks."""
from __future__ import annotations

import functools
import html
import logging
import re
import time
from typing import Any, Callable

from ..errors import render
from ..models import packaged_minilm_path
from ..request import param_names

log = logging.getLogger("mistudio")

PLAIN_ERRORS = {
    "OOM": "Out of memory",
    "VALIDATION": "Bad input",
    "TIMEOUT": "Timed out",
    "INTERRUPTED": "Interrupted: the kernel or process running it died",
    "UNKNOWN": "Unexpected error",
}
STATUS_COLOURS = {
    "QUEUED": "#6c757d", "LOADING": "#0d6efd", "EXTRACTING": "#0d6efd", "SAVING": "#0d6efd",
    "COMPLETED": "#198754", "FAILED": "#dc3545", "CANCELLED": "#fd7e14", "UNREADABLE": "#343a40",
}


def badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#6c757d")
    return (f'<span class="mistudio-badge" style="background:{colour};color:white;border-radius:4px;'
            f'padding:1px 6px;font-size:11px;white-space:nowrap">{html.escape(status)}</span>')


def error_box(text: str) -> str:
    return (f'<div class="mistudio-error" style="border-left:4px solid #dc3545;background:#fdecea;padding:6px 10px">'
            f"{text}</div>")


def note_box(text: str, colour: str = "#0d6efd", background: str = "#e7f1ff") -> str:
    return (f'<div class="mistudio-note" style="border-left:4px solid {colour};background:{background};'
            f'padding:6px 10px">{text}</div>')


def guard(show: Callable[[str], None], fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a widget callback: any exception is shown (as an error box) through ``show``, never only logged."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the point: the user sees it in the panel
            log.debug("mistudio panel callback failed", exc_info=True)
            show(error_box(f"<b>{html.escape(type(exc).__name__)}</b>: {html.escape(str(exc))}"))
            return None

    return wrapped


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def ago(timestamp: float | None, now: float | None = None) -> str:
    """'just now', '3 min ago', '2 h ago', '4 days ago'."""
    if not timestamp:
        return "–"
    seconds = max(0.0, (now or time.time()) - timestamp)
    if seconds < 45:
        return "just now"
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= size:
            n = int(round(seconds / size)) if unit != "day" else int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''} ago"
    return "just now"


def summarise_hook_points(points: list[str] | str) -> str:
    """'layers.1.residual, layers.1.mlp, layers.3.residual, layers.3.mlp' -> 'layers 1,3 × residual, mlp'."""
    if isinstance(points, str):
        points = [p.strip() for p in points.split(",") if p.strip()]
    by_kind: dict[str, list[int]] = {}
    other = []
    for point in points:
        match = re.fullmatch(r"layers\.(\d+)\.(\w+)", point)
        if match:
            by_kind.setdefault(match.group(2), []).append(int(match.group(1)))
        else:
            other.append(point)
    groups: dict[tuple[int, ...], list[str]] = {}
    for kind, layers in by_kind.items():
        groups.setdefault(tuple(sorted(set(layers))), []).append(kind)
    parts = [f"layer{'s' if len(ls) > 1 else ''} {','.join(map(str, ls))} × {', '.join(kinds)}"
             for ls, kinds in groups.items()]
    return "; ".join(parts + other) or "–"


def short_id(extraction_id: str) -> str:
    """'ext_20261129_031502_1a2b3c' -> '031502_1a2b3c' (the full id is in the tooltip)."""
    match = re.fullmatch(r"ext_\d{8}_(\d{6}_\w+)", extraction_id)
    return match.group(1) if match else extraction_id


def progress_text(status: str, progress: dict) -> str:
    done, total = progress.get("samples_done", 0), progress.get("samples_total") or 0
    rate = progress.get("tokens_per_s") or 0
    percent = f" ({100 * done / total:.0f}%)" if total else ""
    return (f"{badge(status)} {done:,} / {total:,} samples{percent} · {rate:,.0f} tokens/s · "
            f"ETA {duration(progress.get('eta_s'))}")


_UI_ADVICE = [  # phrases written for Python users, said the way a panel user acts
    (r"see ext\.rows\(\)", "the Browse tab shows the stored rows"),
    (r"ms\.sample_dataset\(\)", "the bundled sample"),
    (r"ms\.HubDataset\(name, split, column\)", "a Hub dataset (Dataset tab, source Hub)"),
    (r"\(ws\.cancel\([^)]*\)\)", "(Cancel in the Jobs tab)"),
    (r"ws\.extractions\(\)", "the Jobs tab"),
]


def studio_names() -> dict[str, tuple[str, str]]:
    """How the Studio names each parameter in messages: its field label."""
    return param_names(force=("force", "Delete permanently"), name=("name", "Name"), workspace=("workspace",
                       "Workspace"), preset=("preset", "Preset"), overwrite=("overwrite", "Overwrite"))


def for_ui(message: "str | BaseException") -> str:
    """HTML of an error (an exception, or a message that may mark its parameters): parameters named as the
    Studio's fields ("set 'Window' to 512"), Python-call advice turned into what to do in the panels, and the
    bundled model's install path shown by its name."""
    text = getattr(message, "template", None) or str(message)
    text = render(text, "studio", studio_names())
    for pattern, replacement in _UI_ADVICE:
        text = re.sub(pattern, replacement, text)
    bundled = _bundled_path()
    if bundled:
        text = text.replace(repr(bundled), "all-MiniLM-L6-v2 (bundled)").replace(bundled, "all-MiniLM-L6-v2 (bundled)")
    return html.escape(text)


def _bundled_path() -> str | None:
    path = packaged_minilm_path()
    return str(path) if path else None
