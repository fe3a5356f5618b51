"""A real JupyterLab in a real (headless) Chromium: run ms.Studio(), Launch, watch progress, Browse, plot.

Needs Debian's chromium and the playwright package (.ci/run installs both). Outside CI the test is
skipped when they are missing; in CI (CI=true) a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _requirements():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not os.path.exists(CHROMIUM):
        return "Debian's chromium is not installed (apt-get install -y chromium)"
    return None


missing = _requirements()
if missing and os.environ.get("CI"):
    raise RuntimeError(f"real-browser test cannot run in CI: {missing}")
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path, minilm_dir):
    root = tmp_path / "lab"
    root.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(
        "import mistudio as ms\n"
        f"studio = ms.Studio(model={minilm_dir!r})\n"
        "studio.dataset_picker.max_samples.value = 400\n"
        "studio.extraction_panel.layers.value = (1, 3, 5)\n"
        "studio.extraction_panel.batch_size.value = 16\n"
        "studio")]
    nbformat.write(notebook, root / "studio.ipynb")
    port, token = free_port(), "mistudio-test-token"
    env = {**os.environ, "MISTUDIO_WORKSPACE": str(tmp_path / "ws"), "HF_HUB_OFFLINE": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lws")}
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                json.load(r)
            break
        except OSError:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()
            assert time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(0.5)
    yield f"{url}/lab/tree/studio.ipynb?token={token}", tmp_path
    server.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def test_studio_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    url, tmp_path = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus").first).to_be_visible()
        page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first.click()
        time.sleep(1.0)  # let the kernel connect before running
        page.keyboard.press("Shift+Enter")

        studio = page.locator(".widget-tab").first
        studio.wait_for()
        launch = page.locator("button.jupyter-button", has_text="Launch")
        expect(launch).to_be_enabled()
        # record every width the bar shows, from the page itself, while the job runs
        page.evaluate("""() => { window.__widths = []; window.__poll = setInterval(() => {
            const b = document.querySelector('.widget-hprogress .progress-bar');
            if (b) window.__widths.push(parseFloat(b.style.width) || 0); }, 20); }""")
        launch.click()
        page.wait_for_function("() => { const b = document.querySelector('.widget-hprogress .progress-bar');"
                               " return b && b.style.width === '100%'; }")
        widths = page.evaluate("() => { clearInterval(window.__poll); return window.__widths; }")
        moving = sorted({w for w in widths if 0 < w < 100})
        assert len(moving) >= 2, f"the bar jumped straight to the end: {sorted(set(widths))}"
        expect(page.locator(".widget-html", has_text="COMPLETED").first).to_be_visible()
        update_docs = bool(os.environ.get("MISTUDIO_UPDATE_SCREENSHOT"))
        page.screenshot(path=str((DOCS if update_docs else tmp_path) / "studio-extract.png"))

        page.locator(".lm-TabBar-tab", has_text="Browse").first.click()
        page.locator("button.jupyter-button", has_text="Plot").click()
        page.wait_for_function("() => [...document.querySelectorAll('.widget-image')]"
                               ".filter(i => i.naturalWidth > 0).length >= 4")
        expect(page.locator(".widget-html", has_text="Plotted").first).to_be_visible()
        page.screenshot(path=str((DOCS if update_docs else tmp_path) / "studio-browse.png"))
        browser.close()
