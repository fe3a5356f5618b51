"""A real JupyterLab in a real (headless) Chromium: run ms.Studio(), Launch, watch progress, Browse, plot; the
kernel stays free while a Hub id is typed and looked up; a job submitted from another cell updates its row; and
nothing is cut off in any tab at 1,400 px (the file browser open, ~360 px) and at 1,000 px (file browser open).

Needs Debian's chromium and the playwright package (.ci/run installs both). Outside CI the test is
skipped when they are missing; in CI (CI=true) a missing browser is a failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import datasets
import nbformat
import pytest

import mistudio as ms

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TABS = ("Model", "Dataset", "Extract", "Jobs", "Browse", "Features", "Train")

# Every visible element of the Studio whose content is wider than its box (text cut off, or a row that spills),
# as [tag, class, text, scrollWidth, clientWidth]; the slider's own handle and text fields (whose text scrolls
# inside them by design) aside; a dropdown whose chosen entry is wider than it is measured with the page's font.
# The output area holding the Studio counts too (no horizontal scrolling). The argument: another root to check
# (the Features panel shown on its own).
OVERFLOWING = """root_selector => {
  const root = document.querySelector(root_selector || '.mistudio-studio');
  const found = [];
  const area = root.closest('.jp-OutputArea-output');
  const ruler = document.createElement('canvas').getContext('2d');
  for (const e of [area, ...root.querySelectorAll('*')]) {
    if (e.offsetParent && e.tagName === 'SELECT' && e.selectedOptions.length) {  // the chosen entry's text fits
      ruler.font = getComputedStyle(e).font;
      const need = ruler.measureText(e.selectedOptions[0].text).width + 28;  // + padding and the arrow
      if (need > e.clientWidth + 1) found.push(['SELECT', '', e.selectedOptions[0].text.slice(0, 40), need,
                                                e.clientWidth]);
    }
    if (!e.offsetParent || ['SELECT', 'INPUT', 'TEXTAREA', 'IMG', 'svg'].includes(e.tagName)) continue;
    if (e.closest('.noUi-target') || e.closest('.mistudio-feature-view details:not([open])')) continue;
    if (e.scrollWidth > e.clientWidth + 1) {
      found.push([e.tagName, String(e.className).slice(0, 50), (e.innerText || '').slice(0, 40), e.scrollWidth,
                  e.clientWidth]);
    }
  }
  return found;
}"""
# A feature page's columns: anything of the left column (histogram, logit table ...) whose right edge passes the
# column's own, and the right column starting left of the left column's end on the same line, as [what, px].
COLUMNS_SPILL = """() => {
  const page = document.querySelector('.mistudio-feature-page .msfp');
  const left = page.querySelector('.msfp-left'), l = left.getBoundingClientRect();
  const r = page.querySelector('.msfp-right').getBoundingClientRect();
  const found = [];
  for (const e of left.querySelectorAll('*')) {
    const b = e.getBoundingClientRect();
    if (b.width && b.right > l.right + 1) found.push([e.tagName + '.' + String(e.className.baseVal ?? e.className)
                                                      .slice(0, 30), Math.round(b.right - l.right)]);
  }
  if (r.top < l.bottom && r.left < l.right - 1) found.push(['.msfp-right over .msfp-left', Math.round(l.right - r.left)]);
  return found;
}"""
# Buttons of a part of the Studio that cannot be seen or clicked: outside the output area or the window, or under
# another element at their centre.
HIDDEN_BUTTONS = """selector => {
  const area = document.querySelector('.mistudio-studio').closest('.jp-OutputArea-output').getBoundingClientRect();
  const out = [];
  for (const b of document.querySelectorAll(selector + ' button')) {
    if (!b.offsetParent) { out.push([b.title, 'not displayed']); continue; }
    b.scrollIntoView({block: 'center', inline: 'nearest'});
    const r = b.getBoundingClientRect();
    const at = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
    const outside = r.left < area.left - 1 || r.right > area.right + 1 || r.right > window.innerWidth;
    if (outside) out.push([b.title, 'outside']);
    else if (!(at === b || b.contains(at))) out.push([b.title || b.innerText, 'covered']);
  }
  return out;
}"""


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


@contextlib.contextmanager
def running_lab(root: Path, workspace: Path, tmp_path: Path):
    """A real JupyterLab serving ``root``, its kernels on ``workspace`` and this checkout's mistudio, with its
    settings under ``tmp_path`` (no news, no update checks); yields (url, token) and stops it after."""
    port, token = free_port(), "mistudio-test-token"
    # the kernel imports this checkout's mistudio (not another one the environment may have installed)
    env = {**os.environ, "MISTUDIO_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
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
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.expose_app_in_browser=True"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
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
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    # a widget message from the browser that the kernel dropped is a click the Studio never heard (it happened when a
    # panel's thread updated a widget: see tests/test_kernel_threads.py); comm_close drops are ipykernel's own
    dropped = dropped_messages(tmp_path, "comm_msg")
    assert not dropped, f"the kernel dropped messages from the browser: {dropped}"


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
    notebook.cells = [nbformat.v4.new_code_cell("import mistudio as ms\nms.Studio()"),
                      nbformat.v4.new_code_cell("print('another cell ran')")]
    # the form as a user left it last time in this workspace (the Studio remembers it in studio.json)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "studio.json").write_text(json.dumps({
        "model": minilm_dir, "dataset": {"source": "sample", "max_samples": 200, "max_length": 128},
        "extract": {"layers": [1, 3, 5], "hooks": ["residual"], "batch_size": 16}}))
    nbformat.write(notebook, root / "studio.ipynb")
    with running_lab(root, tmp_path / "ws", tmp_path) as (url, token):
        yield f"{url}/lab/tree/studio.ipynb?token={token}", tmp_path, (url, token)


def restart_kernel(url: str, token: str) -> None:
    """Restart the notebook's kernel through the server (what Kernel > Restart does): its process dies."""
    with urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=10) as r:
        kernel = json.load(r)[0]["kernel"]["id"]
    request = urllib.request.Request(f"{url}/api/kernels/{kernel}/restart?token={token}", method="POST", data=b"")
    urllib.request.urlopen(request, timeout=60).read()


def run_in_kernel(page, code: str, timeout_ms: int | None = None) -> dict:
    """Run ``code`` in the notebook's kernel as a cell would (an execute request), from the page; returns how long
    the kernel took to answer (ms) and what it printed. With ``timeout_ms``, a kernel that has not answered by then
    is not waited for: ``printed`` then says so."""
    return page.evaluate("""async ([code, timeout]) => {
        const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const started = performance.now();
        let printed = '';
        const future = kernel.requestExecute({code});
        future.onIOPub = msg => { if (msg.header.msg_type === 'stream') printed += msg.content.text; };
        const late = timeout === null ? null : new Promise(done => setTimeout(() => done('late'), timeout));
        if (await (late === null ? future.done : Promise.race([future.done, late])) === 'late')
            printed = `(the kernel did not answer in ${timeout / 1000} s)`;
        return {ms: performance.now() - started, printed};
    }""", [code, timeout_ms])


def dropped_messages(tmp_path: Path, kind: str = "") -> list[str]:
    """The lines of JupyterLab's log (``lab.log``) where the kernel dropped a message from the browser (``kind``:
    e.g. ``comm_msg``; all kinds by default)."""
    return [line for line in (tmp_path / "lab.log").read_text().splitlines()
            if f"Cannot handle {kind}".rstrip() in line]


def open_notebook(playwright, url: str):
    """A headless Chromium on ``url`` (a notebook in JupyterLab), once its cells and kernel status show."""
    from playwright.sync_api import expect

    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(url)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    expect(page.locator(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus").first).to_be_visible()
    return browser, page


def test_studio_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    url, tmp_path, (server, token) = lab
    shots = DOCS if os.environ.get("MISTUDIO_UPDATE_SCREENSHOT") else tmp_path
    expect.set_options(timeout=30_000)  # a cold kernel imports torch and transformers on the first click
    with sync_playwright() as p:
        browser, page = open_notebook(p, url)
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the 1,400 px screenshots: the whole width

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

        def wait_for_percent(least):
            """The new job's own status line (not the last job's bar) says it is this far."""
            page.wait_for_function("least => [...document.querySelectorAll('.widget-html')].some(h => {"
                                   " const m = h.innerText.match(/samples computed \\((\\d+)%\\)/);"
                                   " return h.offsetParent && m && +m[1] >= least; })", arg=least)

        def fits(where):
            """Nothing cut off or spilling in the Studio as it is shown now."""
            time.sleep(0.4)
            found = page.evaluate(OVERFLOWING)
            assert not found, f"{where}: content wider than its box: {found}"

        def file_browser_width(width):
            """Open the file browser and drag its edge until it is ``width`` px wide."""
            page.evaluate("() => window.jupyterapp.commands.execute('filebrowser:activate')")
            expect(page.locator(".jp-FileBrowser").first).to_be_visible()
            handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle:visible").first.bounding_box()
            page.mouse.move(handle["x"] + 1, handle["y"] + 300)
            page.mouse.down()
            page.mouse.move(page.locator(".jp-SideBar.jp-mod-left").first.bounding_box()["width"] + width,
                            handle["y"] + 300, steps=5)
            page.mouse.up()
            shown = page.locator(".jp-FileBrowser").first.bounding_box()["width"]
            assert abs(shown - width) <= 20, f"the file browser is {shown} px wide, not {width}"

        def reachable(selector, where):
            found = page.evaluate(HIDDEN_BUTTONS, selector)
            assert not found, f"{where}: buttons that cannot be seen or clicked: {found}"

        run_cell()
        page.locator(".widget-tab").first.wait_for()
        # it opens on the Model tab; the bundled model is named, not a path
        model_input = page.locator(".widget-tab input[placeholder='Hugging Face id or local folder']").first
        expect(model_input).to_have_value("all-MiniLM-L6-v2 (bundled)")

        # typing a Hub id: no lookup per keystroke, a cell runs meanwhile; Load / inspect is busy, off the kernel
        model_input.fill("")
        model_input.type("gp", delay=120)
        running = page.evaluate_handle("""() => { const kernel =
            window.jupyterapp.shell.currentWidget.sessionContext.session.kernel; const started = performance.now();
            return kernel.requestExecute({code: "print('another cell ran')"}).done.then(() => performance.now()
            - started); }""")
        model_input.type("t2", delay=120)
        model_input.press("Tab")
        assert page.evaluate("p => p", running) < 3000, "the kernel was busy while a Hub id was typed"
        inspect = button("Load / inspect")
        page.evaluate("""() => { window.__states = []; const b = [...document.querySelectorAll('.widget-tab button')]
            .find(b => b.innerText.includes('Load / inspect')); new MutationObserver(() =>
            window.__states.push(b.disabled)).observe(b, {attributes: true, attributeFilter: ['disabled']}); }""")
        inspect.click()
        assert run_in_kernel(page, "print('another cell ran')")["ms"] < 3000, "Load / inspect blocked the kernel"
        expect(page.locator(".mistudio-error", has_text="local Hugging Face cache").first).to_be_visible()
        expect(inspect).to_be_enabled()
        assert page.evaluate("() => window.__states")[:1] == [True], "no busy state while the Hub lookup ran"
        model_input.fill("all-MiniLM-L6-v2 (bundled)")
        model_input.press("Tab")
        expect(page.locator(".mistudio-error", has_text="local Hugging Face cache")).to_have_count(0)  # cleared
        inspect.click()
        expect(page.locator(".mistudio-model-info")).to_be_visible()
        shot("model")

        tab("Dataset")
        button("Preview").click()
        expect(page.locator(".mistudio-preview")).to_be_visible()
        expect(page.locator(".widget-html", has_text="of 2,077 rows").first).to_be_visible()
        shot("dataset")

        # a bad model: Launch says so (no store); fixed in the Model tab, the failure goes and Launch runs it
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
        expect(page.locator(".mistudio-error", has_text="does not exist")).to_have_count(0)  # about another form
        button("Estimate").click()  # the plan before launching: disk, peak memory
        expect(page.locator(".mistudio-note", has_text="on disk").first).to_be_visible()
        page.evaluate("""() => { window.__widths = []; window.__poll = setInterval(() => {
            const b = [...document.querySelectorAll('.widget-hprogress .progress-bar')].find(b => b.offsetParent);
            if (b) window.__widths.push(parseFloat(b.style.width) || 0); }, 20); }""")
        button("Launch").click()
        page.wait_for_function("() => [...document.querySelectorAll('.widget-hprogress .progress-bar')]"
                               ".some(b => b.offsetParent && b.style.width === '100%')")
        widths = page.evaluate("() => { clearInterval(window.__poll); return window.__widths; }")
        moving = sorted({w for w in widths if 0 < w < 100})
        assert len(moving) >= 2, f"the bar jumped straight to the end: {sorted(set(widths))}"
        expect(page.locator(".widget-html", has_text="COMPLETED").first).to_be_visible()
        shot("extract")

        # a second run, cancelled with data: Browse lists it; Cleanup removes it; Browse then says so, no error
        button("Launch").click()
        wait_for_percent(40)  # a chunk or more is computed
        button("Cancel").click()
        expect(page.locator(".widget-html", has_text="samples kept").first).to_be_visible()
        tab("Jobs")
        grid = page.locator(".mistudio-jobs")
        expect(grid.locator(".mistudio-badge", has_text="CANCELLED")).to_be_visible()
        expect(grid.locator(".mistudio-cell", has_text="layers 1,3,5 × residual")).to_have_count(2)
        grid.locator("button[title^='Details']").first.click()  # the newest row's details, under the grid
        expect(page.locator(".mistudio-note", has_text="tokens saved").first).to_be_visible()
        fits("Jobs, 1,400 px")
        reachable(".mistudio-jobs", "Jobs, 1,400 px")
        shot("jobs")
        tab("Browse")
        expect(page.locator(".widget-tab select:visible").first).to_contain_text("CANCELLED")
        tab("Jobs")
        button("Cleanup").click()
        button("Delete these").click()
        expect(page.locator(".widget-html", has_text="Deleted 1 stores").first).to_be_visible()
        expect(grid.locator(".mistudio-badge")).to_have_count(1)  # redrawn: the CANCELLED row's Retry is gone
        grid.locator("button[title^='Retry']").first.click()  # a COMPLETED row: a full rerun asks first
        question = page.locator(".widget-html", has_text="again as a new extraction?").first
        expect(question).to_be_visible()
        button("Don't run").click()
        expect(question).to_be_hidden()
        expect(page.locator(".widget-html", has_text="Nothing was started").first).to_be_visible()
        expect(grid.locator(".mistudio-badge")).to_have_count(1)  # the COMPLETED store alone: no rerun queued
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
        # the feature view's histogram, then the row's heatmap and norms (Browse draws the histogram once)
        page.wait_for_function("() => [...document.querySelectorAll('.widget-image')]"
                               ".filter(i => i.naturalWidth > 0).length >= 3")
        expect(page.locator(".widget-html", has_text="Plotted").first).to_be_visible()
        shot("browse")

        tab("Jobs")
        # a job submitted from another cell (another Workspace object): its row appears and ends without Refresh
        # (only the folder's events change the grid, so a deadline for a loaded machine still fails without them;
        # 2 s on an idle one)
        submitted = run_in_kernel(page, "_ws = ms.Workspace()\n_job = _ws.submit(model=str(ms.packaged_minilm_path()), "
                                        "dataset='sample', layers=[2], max_samples=24, batch_size=8)\nprint(_job.id)")
        other = submitted["printed"].strip()
        row_id = grid.locator(f".mistudio-cell[title='{other}']")
        expect(row_id).to_be_visible(timeout=30_000)
        assert run_in_kernel(page, "_job.wait(); print(_job.status)")["printed"].strip() == "COMPLETED"
        expect(grid.locator(".mistudio-cell", has_text="layer 2 × residual")).to_be_visible()
        page.wait_for_function("id => { const cells = [...document.querySelectorAll('.mistudio-jobs > *')];"
                               " const at = cells.findIndex(c => c.querySelector(`.mistudio-cell[title='${id}']`));"
                               " return at > 0 && cells[at - 1].innerText.includes('COMPLETED')"
                               " && cells[at + 4].innerText.includes('24 / 24'); }", arg=other, timeout=30_000)

        # nothing cut off in any tab: at 1,400 px with the file browser open (~360 px, JupyterLab's default)...
        page.evaluate("() => window.jupyterapp.commands.execute('filebrowser:activate')")
        expect(page.locator(".jp-FileBrowser").first).to_be_visible()
        file_browser_width(360)
        for name in TABS:
            tab(name)
            if name == "Features":  # its table, painted (a cold kernel imports torch first: a loaded machine)
                expect(page.locator(".mistudio-ftable select option").first).to_be_attached(timeout=240_000)
            fits(f"{name}, 1,400 px, file browser open")
            if name == "Jobs":
                reachable(".mistudio-jobs", "Jobs, 1,400 px, file browser open")
        # ... and at 1,000 px with the file browser open (the grid folds each job into two lines)
        page.set_viewport_size({"width": 1000, "height": 1000})
        file_browser_width(250)  # JupyterLab's default
        for name in TABS:
            tab(name)
            if name == "Model":
                button("Load / inspect").click()
                expect(page.locator(".mistudio-model-info")).to_be_visible()
            fits(f"{name}, 1,000 px, file browser open")
            if name == "Extract":  # the folded sections too, each open in turn
                headers = page.locator(".widget-tab .jupyter-widget-Collapse-header:visible, "
                                       ".widget-tab .lm-Collapse-header:visible")
                for i in range(headers.count()):
                    headers.nth(i).click()
                    fits(f"Extract, 1,000 px, folded section {i + 1} open")
                headers.last.click()  # folded again for the screenshot
            if name == "Jobs":
                reachable(".mistudio-jobs", "Jobs, 1,000 px, file browser open")
                grid.locator("button[title^='Details']").first.click()  # clickable where it is
                expect(page.locator(".mistudio-note", has_text="tokens saved").first).to_be_visible()
            shot(f"{name.lower()}-1000")

        # a kernel restart during a job: re-running the cell shows the interrupted job with Resume; its banner fits
        page.set_viewport_size({"width": 1400, "height": 1000})
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
        expect(banner).to_contain_text("samples were saved")
        expect(banner.locator("button", has_text="Resume it")).to_be_visible()
        for width in (1400, 1000):
            page.set_viewport_size({"width": width, "height": 1000})
            fits(f"the restart banner, {width} px, file browser open")
            reachable(".mistudio-banner", f"the restart banner, {width} px")
        browser.close()


# -- the real browser -----------------------------------------------------------------------------------------
# The Features tab's check lives here, beside the Studio's: the suite runs a file per worker, and two JupyterLabs
# driven at once on two cores starved the second one's page (it never opened).


@pytest.fixture
def worktree_on_path(monkeypatch):
    """The kernel imports this checkout's mistudio (the fixture's server and kernel inherit the environment)."""
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


@pytest.fixture
def features_lab(worktree_on_path, lab, gpt2_dir):
    """The suite's JupyterLab with a notebook that shows the Features tab on an extraction of a tiny GPT-2."""
    url, tmp_path, server = lab
    from test_latents import make_sae

    ws = tmp_path / "features-ws"
    make_sae(tmp_path / "sae", "topk", layer=1)
    ms.extract(model=gpt2_dir, dataset=ms.sample_texts()[:80], layers=[1], max_length=48, workspace=str(ws),
               saes={"layers.1.residual": str(tmp_path / "sae")})
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    trace = tmp_path / "features-panel.log"  # the panel's debug trace in the kernel: shown if the test fails
    notebook.cells = [nbformat.v4.new_code_cell(
        "import logging\nimport mistudio as ms\nfrom mistudio.widgets.features_panel import FeaturesPanel\n"
        f"handler = logging.FileHandler({str(trace)!r})\n"
        "handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))\n"
        "logging.getLogger('mistudio').addHandler(handler)\nlogging.getLogger('mistudio').setLevel(logging.DEBUG)\n"
        f"panel = FeaturesPanel(ms.Workspace({str(ws)!r}))\npanel")]
    nbformat.write(notebook, tmp_path / "lab" / "features.ipynb")
    return url.replace("studio.ipynb", "features.ipynb"), tmp_path


# What the Features panel shows and holds when a page did not open: its lines in the page, its state and every
# thread's stack in the kernel (asked on the kernel's shell, at most 30 s), and its debug trace (a file).
PANEL_STATE = """import sys, traceback
print('status:', panel.status.value, '| busy:', panel.busy.value, '| working:', panel.working, '| queued:',
      panel._queued and panel._queued[0], '| table index:', panel.table_list.index, '| page:',
      panel.page and panel.page['feature'])
for ident, frame in sys._current_frames().items():
    print(f'--- thread {ident}'); traceback.print_stack(frame, limit=6, file=sys.stdout)"""


def panel_state(page, tmp_path: Path) -> str:
    shown = page.evaluate("""() => ({
        chosen: [...document.querySelectorAll('.mistudio-ftable select')].map(s => s.selectedIndex),
        lines: [...document.querySelectorAll('.mistudio-busy, .mistudio-error, .widget-html')]
            .filter(e => e.offsetParent).map(e => e.innerText.slice(0, 300)).filter(t => t.trim()).slice(0, 12)})""")
    try:
        kernel = run_in_kernel(page, PANEL_STATE, timeout_ms=30_000)["printed"]
    except Exception as exc:  # noqa: BLE001 - a report of a failure: say why this part is missing
        kernel = f"(could not ask the kernel: {exc})"
    trace = tmp_path / "features-panel.log"
    seen = trace.read_text()[-6000:] if trace.exists() else "(no trace written)"
    dropped = dropped_messages(tmp_path)
    return (f"in the page: {shown}\nin the kernel:\n{kernel[:8000]}\n"
            f"the panel's trace (its value changes, threads, tasks):\n{seen}\n"
            f"messages from the browser the kernel dropped: {dropped or 'none'}")


@pytest.mark.slow
@pytest.mark.skipif(missing is not None, reason=missing or "")
def test_features_tab_in_jupyterlab(features_lab):
    from playwright.sync_api import expect, sync_playwright

    url, tmp_path = features_lab
    shots = DOCS if os.environ.get("MISTUDIO_UPDATE_SCREENSHOT") else tmp_path
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser, page = open_notebook(p, url)
        page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first.click()
        time.sleep(1.0)
        page.keyboard.press("Shift+Enter")

        def button(text):
            return page.locator("button.jupyter-button:visible", has_text=text).first

        def shot(name, top):
            page.locator(top).first.evaluate("e => e.scrollIntoView({block: 'start'})")
            time.sleep(0.5)
            page.screenshot(path=str(shots / f"studio-features{name}.png"))

        def fits(where):
            """Nothing cut off or spilling in the Features panel as it is shown now (the Studio test's check)."""
            time.sleep(0.4)
            found = page.evaluate(OVERFLOWING, ".mistudio-features")
            assert not found, f"{where}: content wider than its box: {found}"

        def page_fits(where):
            """The feature page's columns apart, nothing of the left one under the right one, nothing cut off."""
            fits(where)
            found = page.evaluate(COLUMNS_SPILL)
            assert not found, f"{where}: the feature page's left column spills: {found}"

        table = page.locator(".mistudio-ftable select")
        # the first page of the table, painted (a cold kernel imports torch and transformers first: allow for a
        # loaded machine)
        expect(table.locator("option")).to_have_count(25, timeout=240_000)
        # the tab opens on the SAE's latents (what the extraction with an SAE was for); then the raw hook point
        expect(page.locator(".widget-html", has_text="128 features over").first).to_be_visible()
        hook_points = page.locator(".widget-dropdown select:visible", has=page.locator("option", has_text=".latents"))
        hook_points.first.select_option(label="layers.1.residual")
        expect(page.locator(".widget-html", has_text="32 features over").first).to_be_visible()
        first = table.locator("option").nth(1)
        feature = int(first.inner_text().split()[0])
        table.select_option(index=1)  # a click on a row opens its page
        view = page.locator(".mistudio-feature-page .msfp")
        # the first page computes the model's logit effects (loads its weights): allow for a loaded machine
        try:
            expect(view.locator(".msfp-header h4")).to_contain_text(f"neuron {feature}", timeout=180_000)
        except AssertionError as exc:  # what the kernel saw: the click, the tasks (it failed twice under load)
            raise AssertionError(f"the page of feature {feature} did not open\n{panel_state(page, tmp_path)}") from exc
        logits = view.locator(".msfp-logits table tr")
        expect(logits).to_have_count(11)  # header + 10 rows of promoted and suppressed tokens
        assert "promoted" in view.locator(".msfp-logits").inner_text()
        bars = view.locator(".msfp-hist-svg rect")
        assert bars.count() >= 3
        box = view.locator(".msfp-hist-svg").bounding_box()
        assert box and box["width"] > 300 and box["height"] > 100  # the histogram renders, at its size
        heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
        assert max(heights) > 50 and len(set(heights)) > 2
        expect(view.locator(".msfp-peak").first).to_be_visible()
        left, right = view.locator(".msfp-left").bounding_box(), view.locator(".msfp-right").bounding_box()
        assert right["x"] >= left["x"] + left["width"], (left, right)  # two columns side by side in a notebook
        expect(page.locator(".widget-dropdown select:visible").last).not_to_have_value("")  # an example chosen
        shot("", ".widget-tab .lm-TabBar")
        shot("-page", ".mistudio-feature-page")
        # a feature page open: nothing cut off, the columns apart, at 1,400 px with the file browser open and
        # closed, and at 1,000 px (the columns stack)
        page_fits("a feature page, 1,400 px, file browser open")
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        page_fits("a feature page, 1,400 px, file browser closed")
        page.set_viewport_size({"width": 1000, "height": 1000})
        page_fits("a feature page, 1,000 px, file browser closed")
        page.set_viewport_size({"width": 1400, "height": 1000})

        # from text to features: type a prompt, choose a token, click one of its features
        page.locator(".widget-tab .lm-TabBar-tab", has_text="From text").first.click()
        prompt = page.locator(".widget-tab textarea:visible").first
        prompt.fill("The quick brown fox jumps over the lazy dog.")
        button("Run").click()
        tokens = page.locator(".mistudio-ptokens select")
        expect(tokens.locator("option").nth(3)).to_be_attached()
        tokens.select_option(index=3)
        chosen = page.locator(".mistudio-pfeature:visible").nth(0)
        expect(chosen).to_be_visible()
        target = int(chosen.inner_text().split("·")[0])
        chosen.click()
        expect(view.locator(".msfp-header h4")).to_contain_text(f"neuron {target}")
        expect(page.locator(".mistudio-prompt", has_text=f"shaded by feature {target}")).to_be_visible()
        shot("-prompt", ".widget-tab .lm-TabBar")

        # the SAE's latents, exported as a dataset from the Export section: confirm, then what was written
        page.locator(".widget-dropdown select:visible", has=page.locator("option", has_text="layers.1.residual"
                                                                                           ".latents")).first \
            .select_option(label="layers.1.residual.latents")
        expect(page.locator(".widget-html", has_text="128 features over").first).to_be_visible()
        # a latent's page: its histogram starts at the data and says the zero bin in words; the columns apart
        page.locator(".widget-tab .lm-TabBar-tab", has_text="Table").first.click()
        table.select_option(index=0)
        expect(view.locator(".msfp-header h4")).to_contain_text("latent", timeout=120_000)
        fired, total = (int(n.replace(",", "")) for n in re.search(
            r"fires on ([\d,]+) of ([\d,]+) tokens", view.locator(".msfp-stats").inner_text()).groups())
        first_bar = view.locator(".msfp-hist-svg rect").first
        if fired < total:  # the zero bin first, in words
            expect(view.locator(".msfp-hist")).to_contain_text(f"0 (not firing): {total - fired:,} tokens")
            assert first_bar.locator("title").inner_text() == f"0 (not firing): {total - fired:,}"
        else:  # fires everywhere: the axis starts at its first value
            assert float(first_bar.get_attribute("height")) > 0
        assert len(view.locator(".msfp-hist-svg text").all_inner_texts()) >= 4  # y ticks and a few bin edges
        page_fits("a latent's page, 1,400 px, file browser closed")
        shot("-latent-page", ".mistudio-feature-page")
        # long pieces in the logit table (GPT-2 has 48 dashes, 16 spaces as one token): they wrap in their column
        run_in_kernel(page, "panel.page['logits']['promoted'][0]['token'] = '-' * 48\n"
                            "panel.page['logits']['suppressed'][0]['token'] = 'Ġ' * 16 + 'attribute'\n"
                            "panel._render_page()")
        expect(view.locator(".msfp-logits")).to_contain_text("-" * 48)
        page_fits("a latent's page with long logit tokens, 1,400 px, file browser closed")
        page.locator(".widget-tab .lm-TabBar-tab", has_text="Export").first.click()
        expect(button("Export SAELens cache")).to_be_visible()
        fits("the Export sub-tab, 1,400 px, file browser closed")  # 'Export SAELens ca…' was cut
        shot("-export", ".widget-tab .lm-TabBar")
        folder = tmp_path / "latents-dataset"
        page.locator(".widget-hbox:visible", has=button("Export datasets")).locator("input").fill(str(folder))
        button("Export datasets").click()
        expect(page.locator(".widget-html:visible", has_text="d_sae 128").first).to_be_visible()
        page.locator("button.jupyter-button:visible").filter(has_text=re.compile(r"^\s*Export\s*$")).click()  # confirm
        written = page.locator(".widget-html:visible",
                               has_text=re.compile(r"Wrote 80 samples, [\d,]+ non-zero latents")).first
        expect(written).to_be_visible(timeout=120_000)
        assert str(folder) in written.inner_text(), written.inner_text()
        assert datasets.load_from_disk(str(folder)).num_rows == 80
        assert page.locator(".mistudio-error:visible").count() == 0
        browser.close()
