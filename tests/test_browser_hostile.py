"""A real JupyterLab in a real (headless) Chromium, opened on a hostile workspace (#16, points 7 and 8): its
studio.json and models.json are malformed, a failed store's stored error type and message hold
``<img src=x onerror="window.__pwned=1">`` and an interrupted store's model name holds it too. The Studio renders,
says what was wrong with the two files, and ``window.__pwned`` stays undefined after every tab is visited, the
failure shown in the Extract tab, each Jobs row's details opened and the banner's Resume tried.

Needs what tests/test_browser.py needs (Debian's chromium and playwright); skipped the same way without them.
"""
from __future__ import annotations

import json
import socket
import time

import nbformat
import pytest

import mistudio as ms
from conftest import fail_at
from test_browser import CHROMIUM, FLAGS, missing, running_lab

PAYLOAD = '<img src=x onerror="window.__pwned=1">'
TABS = ("Model", "Dataset", "Extract", "Jobs", "Browse", "Features", "Train")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing is not None, reason=missing or "")]


@pytest.fixture
def hostile_lab(tmp_path, gpt2_dir):
    """JupyterLab serving a notebook whose Studio opens the hostile workspace; yields (url, workspace, ids)."""
    ws_root = tmp_path / "ws"
    ws = ms.Workspace(str(ws_root))
    failed = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=4, before_batch=fail_at(0, PAYLOAD))
    failed.wait(120)
    assert failed.status == "FAILED"
    failed.store.update(error={**failed.error, "error_type": PAYLOAD, "error_message": f"it broke: {PAYLOAD}"})
    ghost = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=4)
    ghost.wait(120)
    ghost.store.update(status="EXTRACTING", model={"name_or_path": f"/nowhere/{PAYLOAD}"},
                       heartbeat={"pid": 999999, "host": socket.gethostname(), "time": 0, "proc_start": "0"})
    (ws_root / "studio.json").write_text(json.dumps({"model": 42, "dataset": PAYLOAD,
                                                     "extract": {"checksum": PAYLOAD}}))
    (ws_root / "models.json").write_text(f'["{PAYLOAD.replace(chr(34), chr(92) + chr(34))}", 42, "/tm')  # cut short

    root = tmp_path / "lab"
    root.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell("import mistudio as ms\nstudio = ms.Studio()\nstudio")]
    nbformat.write(notebook, root / "hostile.ipynb")
    with running_lab(root, ws_root, tmp_path) as (url, token):
        yield f"{url}/lab/tree/hostile.ipynb?token={token}", ws_root, {"failed": failed.id, "ghost": ghost.id}


def run_in_kernel(page, code: str) -> str:
    """Run ``code`` in the notebook's kernel (an execute request from the page); returns what it printed."""
    return page.evaluate("""async code => {
        const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        let printed = '';
        const future = kernel.requestExecute({code});
        future.onIOPub = msg => { if (['stream', 'error'].includes(msg.header.msg_type))
            printed += msg.content.text || msg.content.evalue; };
        await future.done;
        return printed;
    }""", code)


def test_hostile_workspace_in_a_real_browser(hostile_lab):
    from playwright.sync_api import expect, sync_playwright

    url, ws_root, ids = hostile_lab
    expect.set_options(timeout=60_000)  # a cold kernel imports torch and transformers first
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first.click()
        time.sleep(1.0)  # let the kernel connect before running
        page.keyboard.press("Shift+Enter")
        page.locator(".widget-tab").first.wait_for()

        def pwned():
            time.sleep(0.5)  # an <img src=x> fails to load (and would run its onerror) right after it is added
            return page.evaluate("() => [window.__pwned, document.querySelectorAll('.mistudio-studio [onerror], "
                                 ".mistudio-studio img[src=\"x\"]').length]")

        # the note names both files and what was wrong; the files were set aside
        note = page.locator(".mistudio-files-note")
        expect(note).to_be_visible()
        expect(note).to_contain_text("studio.json")
        expect(note).to_contain_text("models.json")
        expect(note).to_contain_text("not valid JSON")
        expect(note).to_contain_text("'model' = 42")
        assert sorted(p.name.split(".bad-")[0] for p in ws_root.glob("*.bad-*")) == ["models.json", "studio.json"]
        # the banner names the interrupted job's model, as text
        banner = page.locator(".mistudio-banner")
        expect(banner).to_contain_text(PAYLOAD)
        assert pwned() == [None, 0]

        for name in TABS:
            page.locator(".widget-tab .lm-TabBar-tab", has_text=name).first.click()
            if name == "Extract":  # the failed job's failure box, its stored error type and message
                run_in_kernel(page, f"studio.extraction_panel.watch(studio.workspace.job({ids['failed']!r}))")
                expect(page.locator(".mistudio-error", has_text="it broke").first).to_contain_text(PAYLOAD)
            if name == "Jobs":  # every row's details, one after the other
                details = page.locator(".widget-tab button[title^='Details']:visible")
                expect(details.first).to_be_visible()
                for i in range(details.count()):
                    details.nth(i).click()
                    assert pwned() == [None, 0], f"Jobs row {i}'s details"
                expect(page.locator(".mistudio-error", has_text="it broke").first).to_contain_text(PAYLOAD)
            assert pwned() == [None, 0], f"the {name} tab"

        # the banner's Resume fails (no such model folder) and says so, the name as text
        banner.locator("button", has_text="Resume it").click()
        expect(banner).to_contain_text("Resume")
        assert pwned() == [None, 0], "the banner after Resume"
        # the next save writes a good studio.json
        assert run_in_kernel(page, "print(studio.save_settings())").strip() == "True"
        json.loads((ws_root / "studio.json").read_text())
        assert not errors, errors
        browser.close()
