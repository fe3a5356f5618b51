"""A job's start and a concurrent ``recover()`` in the same process (the Jobs tab refreshes on a timer thread after
every job that ends: ``JobsPanel.refresh`` calls ``workspace.recover()``).

``Workspace._start`` puts the new store on disk (QUEUED, this process's heartbeat), then takes its writer lease, then
queues the job. In between, ``recover()`` sees a live status written by this process that its runner does not hold,
takes it for a leftover, takes the lease and marks the store FAILED/INTERRUPTED; the start's own ``take_lease`` then
raises StoreBusy. CI saw it once as a Retry in the Extract tab that started no job
(``test_widgets.py::test_failure_then_retry_with_suggested_batch``). These tests put a recover in that window on
purpose, so the outcome does not depend on the scheduler (``Runner.setting_up`` closes the window; the same recover on
the starting thread, for submit and retry: ``test_runner_races.py``).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable

import pytest

import mistudio as ms
from mistudio.errors import StoreBusy
from mistudio.storage.store import ExtractionStore

from test_widgets import failed_out_of_memory, wait_for

@contextmanager
def recover_in_start_window(act: Callable[[], object], hold: bool = False):
    """Run ``act()`` (a recover) once, in the window where a submit or retry has put its new store on disk but has
    not taken its lease nor queued its job yet.

    ``hold=False``: on the starting thread, to its end. ``hold=True``: on another thread, as the Jobs tab's refresh
    timer runs it; if it takes a store's lease "for recover", it keeps it until this block ends, and the start goes
    on meanwhile (the interleaving a loaded machine produces by chance)."""
    real_create, real_take = ExtractionStore.create, ExtractionStore.take_lease
    held, done = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    def take_lease(self, purpose, job_id=None):
        lease = real_take(self, purpose, job_id)
        if hold and purpose == "recover":
            held.set()
            done.wait(30)
        return lease

    def create(cls, location, meta, storage_options=None):
        store = real_create(location, meta, storage_options)
        if threads:  # once: the first store created in the block
            return store
        if not hold:
            threads.append(threading.current_thread())
            act()
            return store
        thread = threading.Thread(target=act, daemon=True, name="recover-in-window")
        threads.append(thread)
        thread.start()
        deadline = time.monotonic() + 30
        while not held.is_set() and thread.is_alive() and time.monotonic() < deadline:  # took the lease, or passed
            held.wait(0.01)
        return store

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ExtractionStore, "create", classmethod(create))
        patch.setattr(ExtractionStore, "take_lease", take_lease)
        try:
            yield
        finally:
            done.set()
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join(30)
    assert threads, "no store was created in the block: the window was never reached"


def interrupted(workspace: str) -> list[str]:
    """Ids of the stores the workspace lists as FAILED/INTERRUPTED (a kernel restart's, as the banner says)."""
    frame = ms.Workspace(workspace, recover=False).extractions()
    return list(frame[(frame["status"] == "FAILED") & (frame["error"] == "INTERRUPTED")]["id"])


def test_submit_is_not_refused_by_a_recover_on_another_thread(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)
    other = ms.Workspace(workspace)
    with recover_in_start_window(other.recover, hold=True):
        try:
            job = ws.submit(gpt2_dir, "sample", layers=[0], max_samples=8)
        except StoreBusy as exc:
            pytest.fail(f"submit refused by this process's own recover(): {exc}")
    assert job.wait(60).status == "COMPLETED" and interrupted(workspace) == []


def test_retry_in_the_extract_tab_while_the_jobs_tab_refreshes(gpt2_dir, workspace):
    """The CI failure, forced: the first job fails (OOM), its end makes the Jobs tab refresh on a timer thread, and
    that refresh's recover() meets the retry's new store."""
    studio, first = failed_out_of_memory(gpt2_dir, workspace)
    panel = studio.extraction_panel
    assert panel.batch_size.value == 4
    panel.batch_size.value = 2
    with recover_in_start_window(studio.jobs_panel.refresh, hold=True):
        panel.retry_button.click()
    second = panel.job
    assert "Retry failed" not in panel.alert.value, panel.alert.value
    assert second.id != first.id
    second.wait(60)
    wait_for(lambda: panel.progress.bar_style == "success")
    assert second.meta["retry_of"] == first.id and interrupted(workspace) == []
