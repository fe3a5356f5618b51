"""Hostile checks of the Features tab's task runner (``_run``/``_work``: the thread stops counting as working under
its lock) and the model picker's Inspect: clicks racing a task's end from other threads, queued opens (the last
wins), errors in work and in done, ``wait()`` semantics. A real panel on a real store, real threads."""
from __future__ import annotations

import random
import threading
import time

import pytest

import mistudio as ms
from conftest import while_muted_elsewhere
from mistudio.widgets.features_panel import FeaturesPanel
from mistudio.widgets.model_picker import ModelPicker


@pytest.fixture(scope="module")
def workspace_dir(tmp_path_factory, gpt2_dir):
    root = tmp_path_factory.mktemp("race_features_ws")
    ms.extract(model=gpt2_dir, dataset=ms.sample_texts()[:20], layers=[1], hooks=["residual"], max_length=24,
               workspace=str(root), progress=False, device="cpu")
    return str(root)


@pytest.fixture
def panel(workspace_dir):
    panel = FeaturesPanel(ms.Workspace(workspace_dir), page_size=10)
    assert panel.wait(120)
    return panel


def _idle(panel) -> None:
    assert panel.wait(30)
    assert not panel.working and panel._queued is None and panel.busy.value == ""
    assert not panel.open_button.disabled


def test_clicks_racing_the_end_of_tasks_never_get_lost(panel):
    """Task A runs ~0-2 ms; from another thread a click (queued or not) lands at a random moment around A's end.
    A click accepted must run exactly once; of queued clicks the last always runs; nothing runs after wait()."""
    rng = random.Random(1)
    ran: list[str] = []
    lock = threading.Lock()

    def task(name: str, sleep: float):
        def work():
            if sleep:
                time.sleep(sleep)
            return name

        def done(result):
            with lock:
                ran.append(result)
        return work, done

    for i in range(300):
        ran.clear()
        a_work, a_done = task(f"A{i}", rng.choice([0, 0.0005, 0.002]))
        assert panel._run("A", a_work, a_done)
        queued_names, accepted = [], []
        delay = rng.choice([0, 0.0002, 0.001, 0.003])

        def clicker():
            time.sleep(delay)
            for j in range(rng.choice([1, 2, 3])):
                name = f"B{i}.{j}"
                queue = rng.random() < 0.7
                w, d = task(name, 0)
                if panel._run("B", w, d, queue=queue):
                    accepted.append((name, queue))
        t = threading.Thread(target=clicker)
        t.start()
        t.join(10)
        _idle(panel)
        with lock:
            seen = list(ran)
        assert seen.count(f"A{i}") == 1, (i, seen)
        assert len(seen) == len(set(seen)), (i, seen)
        for name, queue in accepted:
            if not queue:
                assert name in seen, (i, name, seen, accepted)
        queued_names = [n for n, q in accepted if q]
        if queued_names:
            assert queued_names[-1] in seen, (i, queued_names, seen)
        time.sleep(0.003)
        with lock:
            assert ran == seen, "a task ran after wait() said none was left"


def test_errors_in_work_and_done_still_run_the_queued_click(panel):
    calls: list[str] = []
    gate = threading.Event()

    def bad_work():
        gate.wait(10)
        raise ValueError("work broke <here>")

    assert panel._run("bad work", bad_work, lambda _: calls.append("never"))
    assert panel._run("queued", lambda: "q", lambda r: calls.append(r), queue=True)
    gate.set()
    _idle(panel)
    assert calls == ["q"]
    assert "work broke" in panel.status.value and "<here>" not in panel.status.value  # escaped

    gate.clear()

    def bad_done(_):
        raise RuntimeError("done broke")

    assert panel._run("bad done", lambda: gate.wait(10), bad_done)
    assert panel._run("queued 1", lambda: "1", lambda r: calls.append(r), queue=True)
    assert panel._run("queued 2", lambda: "2", lambda r: calls.append(r), queue=True)  # replaces 1: last wins
    assert not panel._run("refused", lambda: "x", lambda r: calls.append(r))  # not queued while busy: refused
    gate.set()
    _idle(panel)
    assert calls == ["q", "2"]


def test_wait_follows_a_chain_of_queued_tasks(panel):
    order: list[int] = []

    def work(i):
        def w():
            time.sleep(0.01)
            if i < 5:  # each task queues the next from its own done (the page's follow-up)
                panel._run(f"t{i + 1}", work(i + 1), lambda _: order.append(i + 1), queue=True)
            return i
        return w
    assert panel._run("t0", work(0), lambda _: order.append(0))
    assert panel.wait(30)
    assert order == [0, 1, 2, 3, 4, 5] and not panel.working


def test_model_picker_inspect_clicks_racing_the_lookups_end(gpt2_dir):
    picker = ModelPicker()
    picker.set_model(gpt2_dir)
    for i in range(100):
        first = picker.inspect_async()
        assert first is not None
        deadline = time.monotonic() + 30
        second = None
        while second is None and time.monotonic() < deadline:  # clicks as the first ends: one must be taken
            second = picker.inspect_async()
            if second is None and not first.is_alive():
                second = picker.inspect_async()
                assert second is not None, (i, picker._thread, picker.busy)
        assert second is not None
        second.join(30)
        assert not picker.busy and not picker.inspect_button.disabled
        assert picker.details is not None and picker.details["n_layers"] == 3


def test_wait_true_means_the_finished_tasks_tab_is_reset(panel):
    """``_work``'s finally sets ``_thread = None`` first, then clears the busy line, enables the buttons and the
    navigation, all under the lock; ``wait()`` and ``working`` read ``_thread`` without the lock. So wait() can
    say True (nothing runs) while the tab still shows the busy line and disabled buttons. Widened here by an
    observer of the busy line (widgets call observers synchronously in the setter)."""
    slow = threading.Event()

    def slow_clear(change):
        if change["new"] == "" and slow.is_set():
            time.sleep(0.3)
    panel.busy.observe(slow_clear, "value")
    slow.set()
    assert panel._run("short", lambda: None, lambda _: None)
    deadline = time.monotonic() + 10
    while panel.working and time.monotonic() < deadline:
        time.sleep(0.001)
    assert panel.wait(10)
    assert panel.busy.value == "" and not panel.open_button.disabled, \
        "wait() returned True before the finished task's tab was reset"


def test_picker_not_busy_means_the_button_is_enabled(gpt2_dir):
    picker = ModelPicker()
    picker.set_model(gpt2_dir)

    def slow_enable(change):
        if change["new"] is False:
            time.sleep(0.3)
    picker.inspect_button.observe(slow_enable, "disabled")
    thread = picker.inspect_async()
    deadline = time.monotonic() + 30
    while picker.busy and time.monotonic() < deadline:
        time.sleep(0.001)
    button = picker.inspect_button
    assert not button.disabled and button.icon == "search" and "mistudio-busy" not in button._dom_classes, \
        "busy is False while the Inspect button still spins"
    thread.join(10)


def test_a_choice_while_another_thread_rebuilds_the_browse_list_is_taken(gpt2_dir, tmp_path):
    """A job's end rebuilds the Browse tab's list on the job's thread, its value changes muted; JupyterLab hands
    the kernel widget messages on a subshell thread meanwhile. The user's choice then is a choice (the mute was
    one flag for every thread)."""
    from mistudio.widgets.browser import ActivationBrowser

    ws = ms.Workspace(str(tmp_path))
    first = ms.extract(gpt2_dir, ["one two three", "four five"], layers=[0], workspace=str(tmp_path), progress=False)
    second = ms.extract(gpt2_dir, ["six seven", "eight"], layers=[1], workspace=str(tmp_path), progress=False)
    browser = ActivationBrowser(ws)
    other = first.id if browser.extraction.value == second.id else second.id
    while_muted_elsewhere(browser, lambda: setattr(browser.extraction, "value", other))  # the choice, here
    assert browser.ext is not None and browser.ext.id == other
