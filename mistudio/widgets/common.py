"""Small pieces shared by the panels: plain-words error classes, badges, formatting."""
from __future__ import annotations

import html

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
            f'padding:1px 6px;font-size:11px">{html.escape(status)}</span>')


def error_box(text: str) -> str:
    return (f'<div class="mistudio-error" style="border-left:4px solid #dc3545;background:#fdecea;padding:6px 10px">'
            f"{text}</div>")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_text(status: str, progress: dict) -> str:
    done, total = progress.get("samples_done", 0), progress.get("samples_total") or 0
    rate = progress.get("tokens_per_s") or 0
    return (f"{badge(status)} {done:,} / {total:,} samples · {rate:,.0f} tokens/s · "
            f"ETA {duration(progress.get('eta_s'))}")
