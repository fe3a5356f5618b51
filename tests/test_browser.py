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
    # test scaffolding, run by every kernel start (restarts too) and not shown in the notebook: every batch
    # a little slower, so the test can watch, cancel and restart a job
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-slow-batches.py").write_text(
        "import functools, time\nimport mistudio as ms\n"
        "ms.Studio = functools.partial(ms.Studio, before_batch=lambda index, batch_size: time.sleep(0.12))\n")
    notebook.cells = [nbformat.v4.new_code_cell("import mistudio as ms\nms.Studio()")]
    # the form as a user left it last time in this workspace (the Studio remembers it in studio.json)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "studio.json").write_text(json.dumps({
        "model": minilm_dir, "dataset": {"source": "sample", "max_samples": 400, "max_length": 128},
        "extract": {"layers": [1, 3, 5], "hooks": ["residual"], "batch_size": 16}}))
    nbformat.write(notebook, root / "studio.ipynb")
    port, token = free_port(), "mistudio-test-token"
    env = {**os.environ, "MISTUDIO_WORKSPACE": str(tmp_path / "ws"), "HF_HUB_OFFLINE": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "IPYTHONDIR": str(tmp_path / "ipython"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"),
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
    yield f"{url}/lab/tree/studio.ipynb?token={token}", tmp_path, (url, token)
    server.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def restart_kernel(url: str, token: str) -> None:
    """Restart the notebook's kernel through the server (what Kernel > Restart does): its process dies."""
    with urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=10) as r:
        kernel = json.load(r)[0]["kernel"]["id"]
    request = urllib.request.Request(f"{url}/api/kernels/{kernel}/restart?token={token}", method="POST", data=b"")
    urllib.request.urlopen(request, timeout=60).read()


def test_studio_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    url, tmp_path, (server, token) = lab
    shots = DOCS if os.environ.get("MISTUDIO_UPDATE_SCREENSHOT") else tmp_path
    expect.set_options(timeout=30_000)  # a cold kernel imports torch and transformers on the first click
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus").first).to_be_visible()

        def run_cell():
            page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first.click()
            time.sleep(1.0)  # let the kernel connect before running
            page.keyboard.press("Shift+Enter")

        def tab(name):
            page.locator(".widget-tab .lm-TabBar-tab", has_text=name).first.click()
            page.locator(".widget-tab .lm-TabBar").first.scroll_into_view_if_needed()

        def shot(name):
            page.locator(".widget-tab .lm-TabBar").first.scroll_into_view_if_needed()
            time.sleep(0.3)
            page.screenshot(path=str(shots / f"studio-{name}.png"))

        def button(text):
            return page.locator(".widget-tab button.jupyter-button:visible", has_text=text).first

        def bar_width():
            return page.evaluate("() => { const b = [...document.querySelectorAll('.widget-hprogress .progress-bar')]"
                                 ".find(b => b.offsetParent); return b ? parseFloat(b.style.width) || 0 : 0; }")

        def wait_for_percent(least):
            """The new job's own status line (not the last job's bar) says it is this far."""
            page.wait_for_function("least => [...document.querySelectorAll('.widget-html')].some(h => {"
                                   " const m = h.innerText.match(/samples \\((\\d+)%\\)/);"
                                   " return h.offsetParent && m && +m[1] >= least; })", arg=least)

        run_cell()
        page.locator(".widget-tab").first.wait_for()
        # it opens on the Model tab; the bundled model is named, not a path
        model_input = page.locator(".widget-tab input[placeholder='Hugging Face id or local folder']").first
        expect(model_input).to_have_value("all-MiniLM-L6-v2 (bundled)")
        button("Load / inspect").click()
        expect(page.locator(".mistudio-model-info")).to_be_visible()
        shot("model")

        tab("Dataset")
        button("Preview").click()
        expect(page.locator(".mistudio-preview")).to_be_visible()
        shot("dataset")

        # a bad model: Launch says so (no store), fix it in the Model tab, Retry runs the fixed one
        tab("Model")
        model_input.fill("/no/such/model")
        model_input.press("Tab")
        tab("Extract")
        expect(page.locator(".widget-html", has_text="Runs such/model").first).to_be_visible()  # the summary line
        button("Launch").click()
        expect(page.locator(".mistudio-error", has_text="does not exist").first).to_be_visible()
        expect(page.locator(".mistudio-error", has_text="No extraction was created").first).to_be_visible()
        tab("Model")
        model_input.fill("all-MiniLM-L6-v2 (bundled)")
        model_input.press("Tab")
        tab("Extract")
        expect(page.locator(".widget-html", has_text="Runs all-MiniLM-L6-v2 (bundled)").first).to_be_visible()
        button("Estimate").click()  # the plan before launching: disk, peak memory
        expect(page.locator(".mistudio-note", has_text="on disk").first).to_be_visible()
        page.evaluate("""() => { window.__widths = []; window.__poll = setInterval(() => {
            const b = [...document.querySelectorAll('.widget-hprogress .progress-bar')].find(b => b.offsetParent);
            if (b) window.__widths.push(parseFloat(b.style.width) || 0); }, 20); }""")
        button("Retry").click()
        page.wait_for_function("() => [...document.querySelectorAll('.widget-hprogress .progress-bar')]"
                               ".some(b => b.offsetParent && b.style.width === '100%')")
        widths = page.evaluate("() => { clearInterval(window.__poll); return window.__widths; }")
        moving = sorted({w for w in widths if 0 < w < 100})
        assert len(moving) >= 2, f"the bar jumped straight to the end: {sorted(set(widths))}"
        expect(page.locator(".widget-html", has_text="COMPLETED").first).to_be_visible()
        shot("extract")

        # a second run, cancelled with data: Browse lists it; Cleanup removes it; Browse then says so, no error
        button("Launch").click()
        wait_for_percent(40)  # a chunk or more is saved
        button("Cancel").click()
        expect(page.locator(".widget-html", has_text="samples kept").first).to_be_visible()
        tab("Jobs")
        grid = page.locator(".mistudio-jobs")
        expect(grid.locator(".mistudio-badge", has_text="CANCELLED")).to_be_visible()
        expect(grid.locator(".mistudio-cell", has_text="layers 1,3,5 × residual")).to_have_count(2)
        fits = page.evaluate("""() => { const g = document.querySelector('.mistudio-jobs');
            const out = g.closest('.jp-OutputArea-output');
            return [g.scrollWidth, g.clientWidth, out.scrollWidth, out.clientWidth]; }""")
        assert fits[0] <= fits[1] and fits[2] <= fits[3], f"the Jobs grid needs horizontal scrolling: {fits}"
        grid.locator("button[title^='Details']").first.click()  # the newest row's details, under the grid
        expect(page.locator(".mistudio-note", has_text="tokens saved").first).to_be_visible()
        shot("jobs")
        tab("Browse")
        expect(page.locator(".widget-tab select:visible").first).to_contain_text("CANCELLED")
        tab("Jobs")
        button("Cleanup").click()
        button("Delete these").click()
        expect(page.locator(".widget-html", has_text="Deleted 1 stores").first).to_be_visible()
        tab("Browse")
        expect(page.locator(".widget-html", has_text="no longer in the workspace").first).to_be_visible()
        expect(page.locator(".widget-tab select:visible").first).not_to_contain_text("CANCELLED")
        assert page.locator(".widget-tab .mistudio-error:visible").count() == 0

        # the feature view: top examples over the whole store, tokens shaded by activation
        page.locator(".widget-tab input[type=number]:visible").nth(1).fill("7")
        page.locator(".widget-tab input[type=number]:visible").nth(1).press("Tab")
        button("Feature view").click()
        view = page.locator(".mistudio-feature-view")
        expect(view.locator(".ms-peak").first).to_be_visible()
        shaded = page.evaluate("() => [...document.querySelectorAll('.mistudio-feature-view .ms-tok')]"
                               ".filter(t => getComputedStyle(t).backgroundColor !== 'rgba(0, 0, 0, 0)').length")
        assert shaded >= 20, f"only {shaded} shaded tokens"
        button("Plot").click()
        page.wait_for_function("() => [...document.querySelectorAll('.widget-image')]"
                               ".filter(i => i.naturalWidth > 0).length >= 5")
        expect(page.locator(".widget-html", has_text="Plotted").first).to_be_visible()
        shot("browse")

        # a kernel restart during a job: re-running the cell shows the interrupted job with Resume
        tab("Extract")
        button("Launch").click()
        wait_for_percent(20)
        restart_kernel(server, token)
        expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                            ".jp-KernelStatus").first).to_be_visible()
        time.sleep(2.0)
        run_cell()
        banner = page.locator(".mistudio-banner")
        expect(banner).to_contain_text("was interrupted")
        expect(banner.locator("button", has_text="Resume it")).to_be_visible()
        browser.close()
