"""The Train tab driven without a browser: real widgets, a real store, real training jobs on the runner thread."""
from __future__ import annotations

import threading
import time

import pytest

import mistudio as ms
from mistudio.request import Request
from mistudio.training import list_trainings, submit_training
from mistudio.widgets.train_panel import TrainPanel, curves_figure, ui_error

pytest.importorskip("matplotlib")
HP = "layers.1.residual"
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(gpt2_dir, tmp_path_factory):
    """A workspace holding one COMPLETED extraction (runs made by the tests come and go in their own workspaces)."""
    return tmp_path_factory.mktemp("train-tab")


@pytest.fixture(scope="module")
def ext(gpt2_dir, root):
    return ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual", "mlp"], max_samples=80, batch_size=32,
                      dtype="float32", workspace=str(root), progress=False)


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def fill(panel: TrainPanel, steps: int, k: int = 4) -> None:
    """A tiny run: 64 latents, top-k, batches of 128 tokens, ``steps`` steps."""
    panel.hook_point.value = HP
    panel.architecture.value = "topk"
    panel.size_by.value, panel.size.value = "d_sae", 64
    panel.sparsity["k"].value = k
    panel.lr.value, panel.batch_size.value = 3e-3, 128
    panel.length_by.value, panel.length.value = "n_tokens", float(128 * steps)


def test_launch_watch_live_plot_evaluation_and_extract_with_the_sae(ext, root, gpt2_dir):
    handed = []
    panel = TrainPanel(ms.Workspace(root), on_extract_with_sae=handed.append, progress_every_steps=2)
    assert panel.extraction.value == ext.id and set(panel.hook_point.options) == {HP, "layers.1.mlp"}
    assert panel.extract_button.disabled and panel.retry_button.disabled and panel.cancel_button.disabled
    fill(panel, 150)
    panel.plot_every_s = 0.05
    pictures, busy = [], []
    panel.plot.observe(lambda c: pictures.append(c["new"]), "value")
    panel.busy.observe(lambda c: busy.append(c["new"]), "value")
    progress = []
    panel.progress.observe(lambda c: progress.append(c["new"]), "value")
    panel.launch_button.click()
    job = panel.job
    assert job is not None and "Checking the settings" in busy[0] and panel.busy.value == ""
    assert job.wait(120).status == "COMPLETED", job.error
    wait_for(lambda: "COMPLETED" in panel.status.value and panel.evaluation.value)
    # the plot: PNGs, redrawn as the run went (throttled), the last one from the whole history
    wait_for(lambda: panel._plot_timer is None and len(pictures) >= 2)
    assert len(pictures) >= 2 and all(bytes(p).startswith(PNG) for p in pictures) and len(set(pictures)) >= 2
    assert panel.plot.layout.display == "" and [h["step"] for h in panel.history] == \
        [h["step"] for h in job.history()]
    assert progress == sorted(progress) and panel.progress.value == panel.progress.max == 150
    assert "explained variance" in panel.metrics.value and "L0" in panel.metrics.value
    from mistudio.widgets.train_panel import _compact

    window = _compact(job.history()[-1]["dead_window"])  # which dead fraction this is: the evaluation has another
    assert f"dead (no firing in the last {window} training tokens)" in panel.metrics.value, panel.metrics.value
    assert "next-token loss" in panel.evaluation.value and "loss recovered" in panel.evaluation.value
    said = f"over {job.evaluation['ce_tokens']:,} tokens of {job.evaluation['ce_samples']:,} samples"
    assert said in panel.evaluation.value  # the losses' own tokens, not the stored tokens the header counts
    # the random model: zeroing its hook point makes its guesses uniform, lowering the loss, and the tab says why
    # there is no "loss recovered" (a number there would mean nothing)
    assert (job.evaluation["ce_loss_score"] is None) == ("does not raise the loss here" in panel.evaluation.value)
    assert panel.cancel_button.disabled and not panel.retry_button.disabled and panel.resume_button.disabled
    # the runs table lists it
    wait_for(lambda: panel.runs and panel.runs[0]["status"] == "COMPLETED")
    assert panel.runs[0]["id"] == job.id and "topk 64 k=4" in panel.table.children[11 + 4].value
    # Extract with this SAE: the callback gets the SAE, the model, the dataset and the layer
    assert not panel.extract_button.disabled
    panel.extract_button.click()
    assert handed == [job.extract_arguments(partial=True)]
    arguments = handed[0]
    assert arguments["saes"] == {HP: str(job.sae_path)} and arguments["model"] == gpt2_dir
    assert arguments["dataset"] == "sample" and arguments["layers"] == [1] and arguments["hooks"] == ["residual"]
    assert Request.build(**arguments).saes == {HP: str(job.sae_path)}
    assert "Extract tab now extracts with SAE" in panel.message.value
    other = submit_training(ms.Workspace(root), ext, HP, evaluate=False, **{**panel.settings(), "n_tokens": 256})
    assert other.wait(60).status == "COMPLETED"
    panel.watch(other)  # another run shown: what the tab said of the first goes
    assert "now extracts with SAE" not in panel.message.value


def test_cancel_resume_and_retry_from_the_tab(ext, root, tmp_path):
    ws = ms.Workspace(root)
    panel = TrainPanel(ws, evaluate=False, progress_every_steps=1)
    fill(panel, 120)
    started = threading.Event()

    def first_progress(event):
        if event.get("kind") == "training" and event["event"] == "progress":
            started.set()

    ws.subscribe(first_progress)
    panel.launch()
    job = panel.job
    assert started.wait(60) and not panel.cancel_button.disabled
    panel.cancel_button.click()
    assert "CANCELLING" in panel.status.value
    assert job.wait(60).status == "CANCELLED"
    wait_for(lambda: not panel.resume_button.disabled)
    assert "Resume continues from its checkpoint" in panel.status.value
    assert "tokens/s" in panel.metrics.value and "ETA" not in panel.metrics.value  # a stopped run has no ETA
    ws.unsubscribe(first_progress)
    # resume: the same run, from its checkpoint, to the end
    panel.length.value = 128 * 120.0  # the form as the run had it (resume never changes the settings)
    panel.resume_button.click()
    assert panel.job.id == job.id
    assert panel.job.wait(120).status == "COMPLETED"
    wait_for(lambda: "COMPLETED" in panel.status.value)
    assert panel.job.record.resumes[0]["previous_status"] == "CANCELLED"
    # retry with the form edited: a new run linked to it, with the change only
    panel.sparsity["k"].value = 8
    panel.length.value = 128 * 5.0
    panel.retry_button.click()
    retried = panel.job
    assert retried.id != job.id and retried.wait(60).status == "COMPLETED"
    record = retried.record
    assert record.retry_of == job.id and record.retry_overrides == {"k": 8, "n_tokens": 640}


def test_bad_settings_show_in_the_tab_in_its_words_and_create_nothing(ext, root):
    ws = ms.Workspace(root)
    panel = TrainPanel(ws)
    fill(panel, 5)
    before = len(list_trainings(ws))
    panel.sparsity["k"].value = 0
    assert panel.launch() is None
    assert "Bad input" in panel.message.value and "&#x27;k (per token)&#x27; 0 must be a positive whole " \
        "number" in panel.message.value
    panel.sparsity["k"].value = 4
    panel.batch_size.value = 10 ** 6
    panel.launch_button.click()
    assert "set &#x27;Batch (tokens)&#x27; to 4096" in panel.message.value
    panel.batch_size.value = 128
    panel.length.value = 100.5
    panel.launch_button.click()
    assert "&#x27;Tokens&#x27; 100.5 must be a whole number" in panel.message.value
    assert len(list_trainings(ws)) == before and panel.job is None
    assert ui_error(ms.InputError("«d_sae=3» <b>")) == "&#x27;Latents (d_sae)&#x27; 3 &lt;b&gt;"  # escaped


def test_show_a_run_from_the_table_fills_the_form_and_draws_its_history(ext, root):
    ws = ms.Workspace(root)
    done = submit_training(ws, ext, "layers.1.mlp", evaluate=False, architecture="standard", l1_coefficient=2.5,
                           d_sae=48, batch_size=128, n_tokens=128 * 20, lr=2e-3, progress_every_steps=5)
    assert done.wait(60).status == "COMPLETED"
    panel = TrainPanel(ws)
    row = next(i for i, r in enumerate(panel.runs) if r["id"] == done.id)
    n_columns = 11
    show = panel.table.children[n_columns * (row + 1) + n_columns - 1]
    show.click()
    assert panel.job.id == done.id
    assert (panel.architecture.value, panel.size_by.value, panel.size.value) == ("standard", "d_sae", 48)
    assert panel.sparsity["l1_coefficient"].value == 2.5 and panel.sparsity["k"].layout.display == "none"
    assert panel.hook_point.value == "layers.1.mlp" and panel.length_by.value == "n_tokens"
    assert bytes(panel.plot.value).startswith(PNG) and [h["step"] for h in panel.history] == [5, 10, 15, 20]
    assert "Not evaluated" in panel.evaluation.value
    panel.length_by.value = "epochs"  # the length follows the unit: 2,560 tokens of this store, in epochs
    tokens = int(panel._extraction_rows[panel.extraction.value]["tokens_total"])
    assert panel.length.value == round(128 * 20 / tokens, 3) and panel.length.description == "Epochs"
    panel.length.value = 1.0
    panel.length_by.value = "n_tokens"  # 1 epoch is the store's tokens, not 1 token
    assert panel.length.value == tokens
    assert panel.extract_button.layout.display == "none"  # no Studio callback: no button
    assert panel.extract_with_sae() is None


def test_reports_that_come_while_the_plot_draws_are_drawn_next(ext, root, monkeypatch):
    """A report that lands during a drawing (the next one is not scheduled while one draws) is drawn right after
    it: the curves' titles never lag the metrics line (they used to, by one report, until the next one came)."""
    import mistudio.widgets.train_panel as tab

    panel = TrainPanel(ms.Workspace(root))
    panel.plot_every_s = 0.01
    drawn = []

    def drawing(history):
        drawn.append([h["step"] for h in history])
        if len(drawn) == 1:  # a report arrives as the first drawing is under way, as _on_event adds it
            with panel._lock:
                panel.history.append({"step": 4, "loss": 0.5})
            panel._schedule_plot()  # what the event asks for: nothing, since a drawing holds the timer
        return curves_figure(history)

    monkeypatch.setattr(tab, "curves_figure", drawing)
    panel.history = [{"step": 2, "loss": 1.0}]
    panel._schedule_plot(now=True)
    wait_for(lambda: panel._plot_timer is None and len(drawn) >= 2, timeout=20)
    assert drawn == [[2], [2, 4]]


def test_curves_figure_draws_four_panels_with_the_last_values():
    history = [{"step": s, "loss": 10.0 / s, "l0": 4.0, "explained_variance": s / 100, "dead_fraction": 0.1}
               for s in range(1, 50)] + [{"step": 50, "loss": float("nan"), "l0": 4.0}]
    fig = curves_figure(history)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss: 0.204", "L0 (latents per token): 4", "explained variance: 0.49",
                      "dead latents (fraction): 0.1"]
    assert fig.axes[0].get_yscale() == "log"


def test_a_dead_fraction_of_zero_is_drawn_above_the_axis_on_the_runs_whole_step_range():
    """Dead latents are counted from the dead window on (None before): the panel still spans every step, as the
    others do, and a fraction of 0 is a line above the bottom axis, not hidden in it."""
    history = [{"step": s, "loss": 1.0 / s, "l0": 4.0, "explained_variance": s / 40,
                "dead_fraction": None if s < 15 else 0.0, "dead_window": 1500} for s in range(1, 31)]
    fig = curves_figure(history)
    assert len({ax.get_xlim() for ax in fig.axes}) == 1 and fig.axes[3].get_xlim()[0] <= 1
    for ax in fig.axes[2:]:  # explained variance and dead fraction: 0 to 1, with a margin
        low, high = ax.get_ylim()
        assert low < 0 and high > 1 and min(-low, high - 1) >= 0.02 * (high - low)


def test_before_its_dead_window_a_run_says_when_dead_latents_are_counted():
    """No latent can be dead before the run has trained on its dead window: the plot and the line say from when,
    not 0."""
    from mistudio.widgets.train_panel import _dead

    history = [{"step": s, "loss": 1.0, "l0": 4.0, "explained_variance": 0.5, "dead_fraction": None,
                "dead_window": 6400} for s in range(1, 5)]
    assert curves_figure(history).axes[3].get_title() == "dead latents: from 6.4k tokens"  # short: it is not cut
    longer = [{**h, "dead_window": 960_000} for h in history]
    assert curves_figure(longer).axes[3].get_title() == "dead latents: from 960k tokens"
    assert _dead(history[-1]) == "– (counted from 6,400 tokens)"
    assert _dead({**history[-1], "dead_fraction": 0.25}) == "0.25"


def test_a_failed_run_shows_its_error_and_offers_what_can_succeed(ext, root):
    panel = TrainPanel(ms.Workspace(root), evaluate=False, timeout_s=1e-6)
    fill(panel, 5)
    job = panel.launch()
    assert job.wait(60).status == "FAILED"
    wait_for(lambda: "FAILED" in panel.status.value)
    assert "Timed out" in panel.message.value and "time limit" in panel.message.value
    assert "fewer tokens (&#x27;Tokens&#x27;)" in panel.message.value  # the setting named as the form names it
    assert not panel.resume_button.disabled and not panel.retry_button.disabled and panel.cancel_button.disabled
    assert panel.extract_button.disabled
    panel.options["timeout_s"] = None  # the standing options apply to a retry too
    panel.retry_button.click()
    retried = panel.job
    assert retried.id != job.id and retried.wait(60).status == "COMPLETED"
    assert retried.record.retry_reason == "TIMEOUT" and retried.record.retry_overrides == {"timeout_s": None}


def visible_tick_labels(ax) -> list[str]:
    """The y tick labels drawn inside the axis's range (major and minor), as the PNG shows them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(ax.figure).draw()
    low, high = ax.get_ylim()
    ticks = ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
    return [t.label1.get_text() for t in ticks if t.label1.get_visible() and t.label1.get_text()
            and low <= t.get_loc() <= high]


@pytest.mark.parametrize("losses", [[520.0, 574.0], [900.0 - 10 * i for i in range(40)], [0.9, 0.35, 0.2],
                                    [300.0 / (i + 1) ** 2 for i in range(60)]],
                         ids=["short-run", "within-a-decade", "within-a-decade-below-1", "spanning-decades"])
def test_the_loss_axis_has_numbers_whatever_its_range(losses):
    """A loss within one decade (the usual case once training settles) gets y labels too, not only one that spans
    powers of ten; the axis stays logarithmic."""
    history = [{"step": 10 * (i + 1), "loss": loss, "l0": 32, "explained_variance": 0.06, "dead_fraction": 0.0}
               for i, loss in enumerate(losses)]
    ax = curves_figure(history).axes[0]
    labels = visible_tick_labels(ax)
    assert ax.get_yscale() == "log" and len(labels) >= 2, labels


def test_a_short_run_with_the_tabs_defaults_draws_a_point_for_every_step(ext, root):
    """No progress_every_steps from the tab: a run of 11 steps reports each one (not steps 10 and 11 only)."""
    panel = TrainPanel(ms.Workspace(root), evaluate=False)
    fill(panel, 11)
    job = panel.launch()
    assert job.wait(60).status == "COMPLETED", job.error
    wait_for(lambda: "COMPLETED" in panel.status.value and panel._plot_timer is None)
    assert [h["step"] for h in panel.history] == list(range(1, 12))
    assert panel.progress.value == panel.progress.max == 11


def test_the_runs_grid_folds_into_two_lines_per_run_when_the_panel_is_narrow(ext, root):
    """At ~1,000 px with the file browser open the eleven columns do not fit: below the width they need, each run
    takes two lines (status, run, extraction, hook point, SAE / step, EV, L0, dead, age, Show), by a container
    query on the panel's own width, as the Jobs grid does; cells wrap instead of being cut."""
    import re

    from mistudio.widgets.train_panel import RUN_HEADERS, TRAIN_STYLE

    ws = ms.Workspace(root)
    done = submit_training(ws, ext, HP, evaluate=False, d_sae=64, k=4, batch_size=128, n_tokens=128 * 3)
    assert done.wait(60).status == "COMPLETED"
    panel = TrainPanel(ws)
    assert "mistudio-train-panel" in panel._dom_classes and "mistudio-panel" in panel._dom_classes
    styles = [c.value for c in panel.children if isinstance(c.value if hasattr(c, "value") else None, str)
              and c.value.startswith("<style>")]
    assert any(TRAIN_STYLE in s for s in styles)
    assert not panel.table.layout.grid_template_columns  # the tracks are the stylesheet's (two layouts by width)
    wide = re.search(r"\.mistudio-train-runs \{[^}]*grid-template-columns:([^;]+);", TRAIN_STYLE).group(1)
    needs = sum(int(n) for n in re.findall(r"(\d+)px", wide)) + 8 * (len(RUN_HEADERS) - 1)
    narrow = re.search(r"@container \(max-width: (\d+)px\)", TRAIN_STYLE)
    assert narrow and needs <= int(narrow.group(1)) + 1, (needs, narrow.group(1))
    folded = TRAIN_STYLE[narrow.start():]
    tracks = re.search(r"grid-template-columns:([^;]+);", folded).group(1)
    assert tracks.count("minmax(") == 6 and "grid-column: span 2" in folded  # 4 + SAE over two / 6 cells
    folded_needs = sum(int(n) for n in re.findall(r"(\d+)px", tracks)) + 8 * 5
    assert folded_needs <= 480, folded_needs  # fits a notebook next to an open file browser on a small screen
    n = len(RUN_HEADERS)
    cells = list(panel.table.children)
    for line in (cells[:n], cells[n:2 * n]):  # the header folds as its rows do
        assert ["mistudio-first" in c._dom_classes for c in line] == [True] * 5 + [False] * 6
        assert ["mistudio-wide" in c._dom_classes for c in line] == [False] * 4 + [True] + [False] * 6
    row = cells[n:2 * n]
    for cell in row[:-1]:  # text wraps (clamped to three lines, the whole text in the tooltip), never nowrap
        text = re.sub(r'<span class="mistudio-badge"[^>]*>', "", cell.value)
        assert "nowrap" not in text and "ellipsis" not in text
    assert "<wbr>" in row[3].value  # the hook point may break at its dots


def test_the_extraction_choices_say_what_tells_them_apart(gpt2_dir, tmp_path):
    """Two extractions of the same model and size: each entry is the Browse tab's (when it was made, model, dataset,
    hook points), so the two read differently, and the dropdown is sized as Browse's, to fit a narrow window."""
    ws = ms.Workspace(tmp_path / "ws")
    first = ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual"], max_samples=8, dtype="float32",
                       workspace=str(ws.root), progress=False)
    second = ms.extract(gpt2_dir, "sample", layers=[0, 1], hooks=["residual", "mlp"], max_samples=8,
                        dtype="float32", workspace=str(ws.root), progress=False)
    panel = TrainPanel(ws)
    labels = dict((value, label) for label, value in panel.extraction.options)
    rows = {r["id"]: r for r in ws.extractions().to_dict("records")}
    from mistudio.widgets.common import extraction_label

    for ext, points in ((first, "layer 1 × residual"), (second, "layers 0,1 × residual, mlp")):
        label = labels[ext.id]
        assert label == extraction_label(rows[ext.id]) and label.endswith(" · " + points), label
    assert labels[first.id] != labels[second.id]
    assert panel.extraction.layout.max_width and panel.extraction.layout.width == "auto"

def test_a_run_over_the_same_rows_many_times_is_warned(ext, root):
    """A run of 60 epochs over a small store fits its rows: the run says so (Python, and the tab when it shows it),
    and a run of a few epochs says nothing."""
    ws = ms.Workspace(root)
    many = submit_training(ws, ext, HP, evaluate=False, architecture="topk", k=4, d_sae=32, batch_size=512,
                           epochs=60, lr=3e-3)
    [warning] = many.warnings()
    assert f"passes over the {many.record.rows:,} rows" in warning and "60 times" in warning, warning
    assert "(n_tokens, epochs)" in warning and "«" not in warning  # worded for Python
    panel = TrainPanel(ws)
    panel.watch(many)
    assert "60 times" in panel.message.value and "(&#x27;Tokens&#x27;, &#x27;Epochs&#x27;)" in panel.message.value
    many.cancel()
    few = submit_training(ws, ext, HP, evaluate=False, architecture="topk", k=4, d_sae=32, batch_size=512, epochs=2)
    assert few.warnings() == []
    panel.watch(few)
    assert "times" not in panel.message.value
    few.cancel()
    many.wait(60), few.wait(60)
