"""Small pieces shared by the panels: plain-words error classes, badges, formatting, guarded callbacks, the
Studio's stylesheet (nothing cut off from ~450 px up), busy buttons and a smoothed rate for ETAs."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import ipywidgets as W

from ..analysis.feature_view import escape as esc  # the one escaping helper (the feature views and pages use it too)
from ..data import report_line
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
    "STORE_LOST": "Its store was deleted or replaced",
    "STORE_DAMAGED": "Its store is damaged",
    "DISK_FULL": "The disk is full",
}
STATUS_COLOURS = {
    "QUEUED": "#6c757d", "LOADING": "#0d6efd", "EXTRACTING": "#0d6efd", "TRAINING": "#0d6efd", "SAVING": "#0d6efd",
    "COMPLETED": "#198754", "FAILED": "#dc3545", "CANCELLED": "#fd7e14", "UNREADABLE": "#343a40",
}


def badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#6c757d")
    return (f'<span class="mistudio-badge" style="background:{colour};color:white;border-radius:4px;'
            f'padding:1px 6px;font-size:11px;white-space:nowrap">{esc(status)}</span>')


def error_box(text: str) -> str:
    return (f'<div class="mistudio-error" style="border-left:4px solid #dc3545;background:#fdecea;padding:6px 10px">'
            f"{text}</div>")


def note_box(text: str, colour: str = "#0d6efd", background: str = "#e7f1ff") -> str:
    return (f'<div class="mistudio-note" style="border-left:4px solid {colour};background:{background};'
            f'padding:6px 10px">{text}</div>')


def store_notes(ext: Any) -> str:
    """HTML of what a store says about its data, in the Studio's words: the dataset report (rows read, skipped
    and why, samples cut, windows) and what to know before trusting the values (``ext.warnings()``)."""
    report = ext.record.dataset.report
    line = f"<br><small>{for_ui(report_line(report.model_dump()))}</small>" if report is not None else ""
    warnings = ext.warnings()
    if warnings:
        line += note_box("<br>".join(f"⚠ {for_ui(w)}" for w in warnings), colour="#fd7e14", background="#fff3e0")
    return line


def _kernel_parent() -> contextvars.ContextVar | None:
    """The running ipykernel's "request being answered" (its shell parent), or None outside a kernel."""
    kernel_module = sys.modules.get("ipykernel.kernelbase")
    if kernel_module is None or not kernel_module.Kernel.initialized():
        return None
    parent = getattr(kernel_module.Kernel.instance(), "_shell_parent", None)
    return parent if isinstance(parent, contextvars.ContextVar) else None


def answers_no_request(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a callback that runs on a background thread (a job's events, a timer, a panel's task): the widget
    updates it makes answer no request of the kernel.

    Without it, ipykernel (7.4) takes a thread's updates as answers to whichever request the kernel handled last,
    and sends the browser's next messages for each widget updated to that request's subshell. JupyterLab deletes
    short-lived subshells (the widget manager's), so a click on such a widget was dropped ("Unknown subshell_id"
    in the server log) and the panel never heard it."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        parent = _kernel_parent()
        if parent is None:
            return fn(*args, **kwargs)

        def unparented() -> Any:
            parent.set({})
            return fn(*args, **kwargs)

        return contextvars.copy_context().run(unparented)

    return wrapped


class PerThreadFlag:
    """A boolean attribute held per thread (False until set): a panel's "this thread is rebuilding a list, its
    value changes are not a user's choice". Per thread, because a background task rebuilds lists on its own
    thread while the kernel takes clicks on another (JupyterLab sends widget messages to a subshell thread): a
    click then is a click."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}_per_thread"

    def _local(self, obj: Any) -> threading.local:
        local = obj.__dict__.get(self.slot)
        if local is None:
            local = obj.__dict__.setdefault(self.slot, threading.local())
        return local

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(self._local(obj), "on", False)

    def __set__(self, obj: Any, on: bool) -> None:
        self._local(obj).on = on

def guard(show: Callable[[str], None], fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a widget callback: any exception is shown (as an error box) through ``show``, never only logged."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the point: the user sees it in the panel
            log.debug("mistudio panel callback failed", exc_info=True)
            show(error_box(f"<b>{esc(type(exc).__name__)}</b>: {esc(str(exc))}"))
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


def progress_text(status: str, progress: dict, saved: int | None = None, eta_s: float | None = None,
                  rate: float | None = None) -> str:
    """'EXTRACTING 480 / 2,077 samples computed (23%) · 256 saved · 1,234 tokens/s · ETA 1 min 10 s': what was
    computed and what is on disk (``saved``, the commit mark), said apart; ``eta_s``/``rate`` smoothed ones."""
    done, total = progress.get("samples_done", 0), progress.get("samples_total") or 0
    rate = progress.get("tokens_per_s") or 0 if rate is None else rate
    eta_s = progress.get("eta_s") if eta_s is None else eta_s
    percent = f" ({100 * done / total:.0f}%)" if total else ""
    kept = f" · {saved:,} saved" if saved is not None else ""
    return (f"{badge(status)} {done:,} / {total:,} samples computed{percent}{kept} · {rate:,.0f} tokens/s · "
            f"ETA {duration(eta_s)}")


class RateMeter:
    """A smoothed rate from cumulative counts: the rate between the first two updates, then an exponential moving
    average of the rate between updates with a time constant of ``window_s`` (one slow or fast batch moves it a
    little, a real change within a window), so an ETA from it does not jump with each batch. A count that goes
    down (a resume) starts it again."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self.rate: float | None = None
        self._last: tuple[float, float] | None = None
        self._measured = False  # a rate between two updates was taken (the seed is only shown until then)

    def update(self, count: float, at: float | None = None, first_rate: float | None = None) -> float | None:
        """Take the cumulative ``count`` at time ``at`` (default: now); ``first_rate``: a rate to show (e.g. the
        engine's rate over its first batch) until two updates measure one, then dropped, not blended in: a first
        batch's rate can be many times the job's (5-12x on a short one, its writes and statistics not yet
        waited on). Returns the smoothed rate."""
        at = time.monotonic() if at is None else at
        if self._last is not None and count < self._last[1]:
            self.rate, self._last, self._measured = None, None, False
        if self._last is None:
            self._last = (at, count)
            if first_rate:
                self.rate = float(first_rate)
            return self.rate
        dt, dc = at - self._last[0], count - self._last[1]
        if dt <= 0:
            return self.rate
        now_rate = dc / dt
        weight = 1.0 - math.exp(-dt / self.window_s)
        self.rate = self.rate + weight * (now_rate - self.rate) if self._measured else now_rate
        self._measured = True
        self._last = (at, count)
        return self.rate

    def eta(self, left: float) -> float | None:
        """Seconds for ``left`` more at the smoothed rate (None while unknown)."""
        return left / self.rate if self.rate and self.rate > 0 else None


def breakable(text: str) -> str:
    """Escaped text that may wrap at path and name separators ('my_data/set.jsonl' breaks after '/', '_' and
    before '.'), never in the middle of a word unless a single part is wider than its cell."""
    escaped = esc(str(text))
    return re.sub(r"([/_\\-])", r"\1<wbr>", escaped).replace(".", "<wbr>.")


@contextlib.contextmanager
def busy(button: W.Button, text: str, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """A slow action: the button shows ``text`` with a spinning icon and is disabled until it ends (``say``: a
    line to show meanwhile). Widget changes reach the browser at once, also while the kernel computes."""
    before = button.description, button.icon, button.disabled
    button.description, button.icon, button.disabled = text, "spinner", True
    button.add_class("mistudio-busy")
    if say is not None:
        say(f'<span class="mistudio-working">⏳ {esc(text)}</span>')
    try:
        yield
    finally:
        button.description, button.icon, button.disabled = before
        button.remove_class("mistudio-busy")


# The Studio's stylesheet. Every panel holds it (each tab also works alone); rules are scoped to its classes.
# Nothing is cut off: rows of controls wrap instead of squeezing their labels, buttons keep their text, and the
# Jobs grid turns each job into two lines when its panel is narrower than the nine columns need (a container
# query on the panel's own width: a file browser or a split view narrows it as much as a small window does).
STYLE = """
.mistudio-panel { min-width: 0; }
.mistudio-panel .widget-hbox, .mistudio-panel .jupyter-widget-hbox { flex-wrap: wrap; row-gap: 4px; }
.mistudio-panel .jupyter-button { flex: 0 0 auto; max-width: 100%; }
.mistudio-panel .widget-dropdown > select, .mistudio-panel .jupyter-widget-dropdown > select { padding-right: 24px;
  text-overflow: ellipsis; }
.mistudio-panel .widget-html-content, .mistudio-panel .jupyter-widget-html-content { min-width: 0;
  line-height: 1.45; }
.mistudio-panel .mistudio-line { white-space: normal; overflow-wrap: anywhere; line-height: 1.4; }
.mistudio-panel .mistudio-note, .mistudio-panel .mistudio-error { line-height: 1.45; }
.mistudio-busy i.fa { animation: mistudio-spin 1.2s linear infinite; }
@keyframes mistudio-spin { from { transform: rotate(0deg); } to { transform: rotate(360deg); } }
.mistudio-banner { flex-wrap: wrap; gap: 4px 8px; }
.mistudio-banner > .widget-html, .mistudio-banner > .jupyter-widget-html { flex: 1 1 320px; min-width: 0; }
.mistudio-banner .jupyter-button { flex: 0 0 auto; width: auto; }
.mistudio-jobs-panel { container-type: inline-size; }
.mistudio-jobs-panel .mistudio-jobs { display: grid; gap: 3px 8px; align-items: center; overflow: visible;
  grid-template-columns: 112px 104px minmax(80px, 1fr) minmax(72px, 0.7fr) minmax(110px, 1.5fr) 136px 64px 72px 160px; }
.mistudio-jobs-panel .mistudio-jobs > * { min-width: 0; }
.mistudio-jobs .mistudio-cell { white-space: normal; overflow-wrap: anywhere; line-height: 1.3; }
.mistudio-jobs .mistudio-clamp { display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical;
  overflow: hidden; }
.mistudio-jobs .mistudio-actions { flex-wrap: wrap; gap: 2px; overflow: visible; }
.mistudio-jobs .mistudio-actions .jupyter-button { margin: 0; }
@container (max-width: 979px) {
  .mistudio-jobs-panel .mistudio-jobs { grid-template-columns: minmax(92px, 0.9fr) minmax(100px, 0.8fr)
    minmax(64px, 1fr) minmax(64px, 1fr) minmax(96px, 1.2fr); row-gap: 2px; }
  .mistudio-jobs-panel .mistudio-jobs .mistudio-actions { grid-column: span 2; }
  .mistudio-jobs-panel .mistudio-jobs .mistudio-first { border-top: 1px solid var(--jp-border-color2, #ddd);
    padding-top: 3px; }
}
"""


def stylesheet() -> W.HTML:
    """The Studio's CSS as a widget (invisible; a panel that holds it is styled wherever it is shown)."""
    widget = W.HTML(f"<style>{STYLE}</style>", layout=W.Layout(display="none"))
    widget.add_class("mistudio-style")
    return widget


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
    return esc(text)


def _bundled_path() -> str | None:
    path = packaged_minilm_path()
    return str(path) if path else None


def sae_label(folder: str) -> str:
    """An SAE's folder as the tabs name it: its last part, with the run's id for a trained one (every run saves to
    ``saes/<run>/sae``, so ``sae`` alone named none)."""
    path = Path(folder)
    return f"{path.parent.name}/{path.name}" if path.name == "sae" and path.parent.name else path.name or folder


def extraction_label(row: dict) -> str:
    """An extraction as a dropdown entry (Browse, Features, Train), short enough for a narrow window: date and time ·
    model · dataset · hook points, and the status unless COMPLETED ('11-30 10:47:03 · all-MiniLM-L6-v2 · sample ·
    layers 1,3,5 × residual'; '+ latents of sae_…953b7e/sae' when it holds an SAE's, so that stores made with two
    SAEs read apart). The line under the dropdown names the chosen one in full."""
    created = row.get("created")
    when = f"{created:%m-%d %H:%M:%S}" if created is not None and created == created else short_id(row["id"])
    model = str(row["model"]).removesuffix(" (bundled)")
    status = "" if row["status"] == "COMPLETED" else f" · {row['status']}"
    saes = [sae_label(f) for f in str(row.get("saes") or "").split(", ") if f]
    latents = (f" + latents of {', '.join(saes)}" if saes else " + SAE latents") if row.get("latents") else ""
    return f"{when} · {model} · {row['dataset']} · {summarise_hook_points(row['hook_points'])}{latents}{status}"
