"""Hostile text everywhere a user or a store can put it (a stored error type and message, a model name, a dataset
path and its rows, a preset name, a feature note, a searched token, a prompt): every tab's rendered HTML shows it as
text, never as markup (#16, point 8)."""
from __future__ import annotations

import html
import json
import socket
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

import ipywidgets as W

import mistudio as ms
from conftest import fail_at
from mistudio.analysis.feature_view import examples_html, feature_view_html
from mistudio.widgets.common import esc

pytest.importorskip("matplotlib")

EVIL = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(2)</script>"
QUOTE = '" onmouseover="alert(3)'
HOSTILE = (EVIL, SCRIPT, QUOTE)
FORBIDDEN_TAGS = {"img", "script", "iframe", "object", "embed"}


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text between tags."""

    def __init__(self):
        super().__init__(convert_charrefs=False)  # text as written: an escaped '<' stays '&lt;'
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []  # the text, entities decoded
        self.raw: list[str] = []  # the text as written

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)
        self.raw.append(data)

    def handle_entityref(self, name):
        self.text.append(html.unescape(f"&{name};"))

    def handle_charref(self, name):
        self.text.append(html.unescape(f"&#{name};"))


def assert_inert(markup: str, where: str) -> Tags:
    """No hostile tag and no event-handler attribute in ``markup``; returns what it parsed to."""
    lowered = markup.lower()
    assert "<img" not in lowered and "<script" not in lowered, (where, markup[:2000])
    tags = Tags()
    tags.feed(markup)
    for tag, attrs in tags.tags:
        assert tag not in FORBIDDEN_TAGS, (where, tag, attrs)
        assert not [a for a in attrs if a.lower().startswith("on")], (where, tag, attrs)
        assert not any("javascript:" in (v or "").lower() for v in attrs.values()), (where, tag, attrs)
    raw = [d for d in tags.raw if "<" in d]  # a '<' outside a tag: text that reached the HTML unescaped
    assert not raw, (where, raw[:3])
    return tags


def rendered(widget: W.Widget, seen: set | None = None) -> list[tuple[str, str]]:
    """(where, html) for every HTML string in the widget tree: HTML widgets' values and any description that a
    widget renders as HTML."""
    seen = set() if seen is None else seen
    if id(widget) in seen:
        return []
    seen.add(id(widget))
    out = []
    if isinstance(widget, (W.HTML, W.HTMLMath)) and widget.value:
        out.append((f"{type(widget).__name__} {sorted(widget._dom_classes)}", widget.value))
    if getattr(widget, "description_allow_html", False) and getattr(widget, "description", ""):
        out.append((f"description of {type(widget).__name__}", widget.description))
    for child in getattr(widget, "children", ()) or ():
        out += rendered(child, seen)
    return out


def scan(studio) -> str:
    """Assert every rendered HTML string of the Studio is inert; returns them all (to check what they show)."""
    parts = rendered(studio)
    for where, markup in parts:
        assert_inert(markup, where)
    return "\n".join(markup for _, markup in parts)


def shown(markup: str, text: str) -> bool:
    """``text`` appears in ``markup`` as text (escaped), not as markup."""
    return esc(text) in markup or html.escape(text, quote=False) in markup


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def hostile_workspace(gpt2_dir, workspace, tmp_path):
    """A workspace whose stores hold hostile text: a completed extraction of rows full of it (its file named with
    it), a failed one whose stored error type and message are markup, and an interrupted one whose model name is."""
    data = tmp_path / f"{EVIL}.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} {EVIL} {SCRIPT} {QUOTE} end"}) + "\n" for i in range(6)))
    ws = ms.Workspace(workspace)
    done = ws.submit(gpt2_dir, str(data), layers=[0], max_samples=6, max_length=48)
    done.wait(120)
    assert done.status == "COMPLETED", done.error
    failed = ws.submit(gpt2_dir, str(data), layers=[0], max_samples=4, before_batch=fail_at(0, EVIL))
    failed.wait(120)
    assert failed.status == "FAILED"
    failed.store.update(error={**failed.error, "error_type": EVIL, "error_message": f"{EVIL} {SCRIPT} {QUOTE}"})
    ghost = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=4)
    ghost.wait(120)
    ghost.store.update(status="EXTRACTING", model={"name_or_path": f"/nowhere/{EVIL}"},
                       heartbeat={"pid": 999999, "host": socket.gethostname(), "time": 0, "proc_start": "0"})
    return {"root": workspace, "data": str(data), "done": done.id, "failed": failed.id, "ghost": ghost.id}


def test_every_tab_shows_hostile_text_as_text(hostile_workspace, gpt2_dir):
    hw = hostile_workspace
    studio = ms.Studio(workspace=hw["root"], model=gpt2_dir)
    # the banner: the interrupted job, its model named with markup; Resume fails and says why
    assert studio.interrupted == hw["ghost"] and shown(studio.banner.value, EVIL)
    studio.resume_interrupted()
    seen = [scan(studio)]

    # Model tab: a folder named with markup, inspected and remembered
    picker = studio.model_picker
    picker.set_model(f"/nowhere/{EVIL}")
    picker.inspect()
    assert shown(picker.info.value, EVIL)
    picker.remember_folder()
    assert shown(picker.info.value, EVIL)
    seen.append(scan(studio))
    picker.set_model(gpt2_dir)

    # Dataset tab: a file named with markup whose rows hold markup; a column named with it
    dataset = studio.dataset_picker
    dataset.source.value = "file"
    dataset.path.value = hw["data"]
    dataset.show_preview()
    assert shown(dataset.preview.value, EVIL) and shown(dataset.preview.value, SCRIPT)
    seen.append(scan(studio))
    dataset.column.value = EVIL
    dataset.show_preview()
    seen.append(scan(studio))
    dataset.column.value = "text"

    # Extract tab: the summary names the file; a preset named with markup; the failed job's failure box
    panel = studio.extraction_panel
    studio.selected_index = 2
    assert shown(panel.summary.value, EVIL)
    panel.preset_name.value = EVIL
    panel.save_preset()
    assert shown(panel.preset_status.value, EVIL)
    panel.watch(ms.Workspace(hw["root"]).job(hw["failed"]))
    assert panel.failure_box.layout.display == "" and shown(panel.alert.value, EVIL) and shown(panel.alert.value, QUOTE)
    seen.append(scan(studio))

    # Jobs tab: the failed row's status cell, its details, the Delete question
    studio.selected_index = 3
    jobs = studio.jobs_panel
    jobs.refresh()
    jobs.cells[hw["failed"]]["buttons"]["Details"].click()
    assert shown(jobs.details.value, EVIL) and shown(jobs.details.value, SCRIPT)
    assert shown(jobs.cells[hw["failed"]]["status"].value, EVIL)
    jobs.ask_delete(hw["failed"])
    jobs.preview_cleanup()
    seen.append(scan(studio))

    # Browse tab: the completed extraction, its rows' tokens plotted and in a feature view
    studio.selected_index = 4
    browser = studio.browser
    browser.extraction.value = hw["done"]
    assert browser.plot() and browser.show_feature()
    seen.append(scan(studio))

    # Features tab: a feature page, a note, a token search and a prompt full of markup
    studio.selected_index = 5
    features = studio.features_panel
    assert features.wait(120)
    features.extraction.value = hw["done"]
    assert features.wait(120)
    assert features.open_feature(0) and features.wait(120)
    features.note.value = f"{EVIL} {SCRIPT} {QUOTE}"
    features.save_note()
    features.token.value = EVIL
    features.find()
    assert features.wait(120)
    features.prompt.value = f"{EVIL} {SCRIPT}"
    features.run_prompt()
    assert features.wait(120)
    seen.append(scan(studio))
    assert shown(features.page_html.value, EVIL) and shown(features.page_html.value, QUOTE)  # the note

    # Train tab
    studio.selected_index = 6
    seen.append(scan(studio))

    everything = "\n".join(seen)
    for text in HOSTILE:
        assert shown(everything, text), text  # the hostile text reached the HTML, as text


def test_feature_view_html_escapes_every_data_string():
    example = {"value": 2.0, "context_tokens": [EVIL, QUOTE, SCRIPT], "context_values": [0.5, 2.0, None],
               "context_start": 0, "row": 3, "position": 1}
    view = {"hook_point": EVIL, "feature": EVIL, "n_tokens": 10, "top": [example],
            "bands": [{"quantiles": [0.0, 1.0], "values": [0.0, 2.0], "examples": [example]}],
            "token_means": [{"token": EVIL, "mean": 1.0, "count": 3}, {"token": QUOTE, "mean": 0.5, "count": 2}]}
    for scheme in ("auto", "raw"):
        out = feature_view_html(view, special_tokens=[SCRIPT], scheme=scheme)
        tags = assert_inert(out, "feature_view_html")
        text = "".join(tags.text)
        assert EVIL in text and QUOTE.strip('"') in text
    assert_inert(examples_html([example], [], "auto", 2.0), "examples_html")
