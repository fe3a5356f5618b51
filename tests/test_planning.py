"""Planning a run: estimate, batch_size="auto", token budgets, micro-batches, device_map, quantization."""
from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mistudio as ms
from mistudio.data import batch_ranges
from mistudio.errors import InputError

from conftest import DU_TOLERANCE, disk_usage

SMALL = dict(layers=[0, 2], hooks=["residual", "mlp"], max_samples=120, dtype="float32", progress=False)


def _values(ext) -> dict:
    return {hp: ext.activations(hp)[:] for hp in ext.hook_points}


def _same(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for hp in a:
        scale = max(float(np.abs(b[hp]).max()), 1e-6)
        assert float(np.abs(a[hp] - b[hp]).max()) <= rel * scale, hp


@pytest.fixture(scope="module")
def fixed(gpt2_dir, tmp_path_factory):
    """The reference: a plain run at batch 8."""
    return ms.extract(gpt2_dir, "sample", batch_size=8, workspace=str(tmp_path_factory.mktemp("ref")), **SMALL)


# -- 1. estimate --------------------------------------------------------------------------------------------
def _chunk_bytes(location: str) -> int:
    """Bytes of the chunk files (not the metadata, the lease or the chunk records)."""
    skipped = ("zarr.json", ".mistudio-lease", ".mistudio-chunks")
    return sum(f.stat().st_size for f in Path(location).rglob("*") if f.is_file() and f.name not in skipped)


@pytest.mark.parametrize("layout", [{}, {"chunk_mb": 0.01, "shard_mb": 0.04}], ids=["chunks", "shards"])
def test_estimate_matches_the_finished_store_and_loads_no_weights(gpt2_dir, workspace, monkeypatch, layout):
    import mistudio.models
    import mistudio.plan  # before the patch: imported under it, plan would keep no_weights for later tests

    def no_weights(*_a, **_k):
        raise AssertionError("estimate without probe loaded the weights")

    with monkeypatch.context() as m:
        m.setattr(mistudio.models, "load_model", no_weights)
        m.setattr(mistudio.plan, "load_model", no_weights)
        est = ms.estimate(gpt2_dir, "sample", workspace=workspace, **layout,
                          **{k: v for k, v in SMALL.items() if k != "progress"})
    for key in ("samples", "tokens", "bytes_on_disk", "free_disk_bytes", "peak_device_bytes", "warnings", "summary"):
        assert key in est, key
    assert est["seconds"] is None and est["warnings"] == [] and "on disk" in est["summary"]
    ext = ms.extract(gpt2_dir, "sample", workspace=workspace, **layout, **SMALL)
    assert ext.metadata["format_version"] == (2 if layout else 1)
    location = ext.store.location
    assert est["samples"] == len(ext.rows()) and est["tokens"] == ext.store.record.progress.tokens_total
    assert est["data_bytes"] == _chunk_bytes(location)  # exact for the chunks
    total = ms.Workspace(workspace).extractions().iloc[0]["bytes"]
    assert abs(total - est["file_bytes"]) <= 0.01 * total  # metadata is the rest
    used = disk_usage(location)  # what the disk loses: whole blocks a file, and the folders (chunks in c/<i>/)
    assert abs(used - est["bytes_on_disk"]) <= DU_TOLERANCE * used, (used, est["bytes_on_disk"])
    assert est["peak_device_bytes"] > est["n_parameters"] * 4


def test_estimate_probe_and_warnings(gpt2_dir, workspace, monkeypatch):
    estimate_module = importlib.import_module("mistudio.plan")  # ms.estimate is the function

    monkeypatch.setattr(estimate_module, "_free_disk", lambda _ws: 1000)
    est = ms.estimate(gpt2_dir, "sample", [0], max_samples=40, max_batch_tokens=50, workspace=workspace, probe=True)
    assert est["seconds"] > 0 and est["summary"].endswith("2 warnings")
    assert any("free" in w and "workspace=" in w for w in est["warnings"])
    assert any("max_batch_tokens=50" in w and "batch of its own" in w for w in est["warnings"])
    with pytest.raises(InputError, match="batch_size=3"):
        ms.estimate(gpt2_dir, "sample", [0], batch_size=3, workspace=workspace)


def test_a_token_budget_below_every_row_is_warned_with_its_fix(gpt2_dir, workspace, tmp_path):
    """Every row is longer than max_batch_tokens: each batch holds one row and exceeds the budget. Not refused (a
    researcher may mean it), but said in the estimate (Python, command line, Studio) with the value and the fix."""
    from mistudio.errors import render
    from mistudio.data import report_line

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"text": "row {i} has a few more words in it"}}\n' for i in range(12))
                    + '{"text": 12345}\n')
    est = ms.estimate(gpt2_dir, str(data), [0], max_batch_tokens=5, workspace=workspace)
    [template] = [w for w in est["warning_templates"] if "max_batch_tokens=5" in w]
    python = render(template)
    assert "every sample" in python and "each batch will hold one row and exceed the budget" in python
    longest = int(python.split("up to ")[1].split(" tokens")[0])
    assert longest > 5 and f"pass max_batch_tokens={longest}" in python
    assert f"--max-batch-tokens {longest}" in render(template, "cli")
    assert "Max batch tokens" in render(template, "studio")
    assert est["summary"].endswith("· 2 warnings")  # the budget and the skipped row
    one = ms.estimate(gpt2_dir, str(data), [0], workspace=workspace)
    assert one["summary"].endswith("· 1 warning") and "1 of 13 rows gives no sample" in one["warnings"][0]
    assert "1 row skipped" in report_line(one["report"]) and "1 rows" not in report_line(one["report"])
    assert "12 samples from 13 rows" in report_line(one["report"])
    # some rows over the budget, not all: those get a batch of their own
    some = ms.estimate(gpt2_dir, "sample", [0], max_samples=40, max_batch_tokens=50, workspace=workspace)
    [template] = [w for w in some["warning_templates"] if "max_batch_tokens=50" in w]
    assert "every sample" not in template and "batch of its own" in template
    # with a window the forwards hold windows, not documents: the budget is compared with them, and the fix is
    # a budget of a window or a smaller window (max_length is not used with a window)
    windowed = ms.estimate(gpt2_dir, "sample", [0], max_samples=40, window=32, max_batch_tokens=16,
                           workspace=workspace)
    [template] = [w for w in windowed["warning_templates"] if "max_batch_tokens=16" in w]
    assert "windows of up to 32 tokens" in template and "max_batch_tokens=32" in template, template
    assert "«window»" in template and "max_length" not in template, template
    within = ms.estimate(gpt2_dir, "sample", [0], max_samples=40, window=32, max_batch_tokens=50, workspace=workspace)
    assert not [w for w in within["warnings"] if "max_batch_tokens" in w]  # every forward is one 32-token window


# -- 2. batch_size="auto" -----------------------------------------------------------------------------------
def test_auto_batch_size_on_cpu_records_its_choice(gpt2_dir, workspace, fixed):
    ext = ms.extract(gpt2_dir, "sample", batch_size="auto", workspace=workspace, **SMALL)
    params = ext.store.record.params
    auto = params.batch_size_auto
    assert params.batch_size == auto["chosen"] in (1, 4, 16, 64)
    assert "throughput" in auto["reason"] and [t["batch_size"] for t in auto["tried"]] == [1, 4, 16, 64]
    _same(_values(ext), _values(fixed))


def test_auto_batch_size_picks_the_largest_that_does_not_run_out_of_memory(gpt2_dir, workspace, monkeypatch):
    import mistudio.autobatch

    monkeypatch.setattr(mistudio.autobatch, "is_accelerator", lambda _device: True)  # the memory search

    def oom_above_4(_index: int, batch_size: int) -> None:
        if batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    job = ms.Workspace(workspace).submit(gpt2_dir, "sample", [0], max_samples=40, batch_size="auto",
                                         before_batch=oom_above_4).wait(120)
    assert job.status == "COMPLETED", job.error
    auto = job.record.params.batch_size_auto
    assert job.record.params.batch_size == auto["chosen"] == 4
    assert [(t["batch_size"], t["ok"]) for t in auto["tried"]] == [(64, False), (32, False), (16, False), (8, False),
                                                                    (4, True)]


def test_auto_batch_size_refuses_a_token_budget(gpt2_dir, workspace):
    with pytest.raises(InputError, match="max_batch_tokens=64 both size"):
        ms.Workspace(workspace).submit(gpt2_dir, "sample", [0], batch_size="auto", max_batch_tokens=64)


# -- 3. token budget and micro-batches ----------------------------------------------------------------------
def test_token_budget_batches_stay_within_the_budget_and_resume_on_boundaries():
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 200, size=500))[::-1]
    lengths[:3] = [400, 300, 260]  # longer than the budget: a batch each
    budget = 256
    ranges = batch_ranges(len(lengths), 8, 0, lengths, budget)
    assert ranges[0] == (0, 1) and ranges[1] == (1, 2) and ranges[2] == (2, 3)
    assert [b for b, _ in ranges[1:]] == [e for _, e in ranges[:-1]] and ranges[-1][1] == len(lengths)
    for b, e in ranges[3:]:
        assert (e - b) * lengths[b] <= budget
        assert e == len(lengths) or (e - b + 1) * lengths[b] > budget  # greedy: the next one would not fit
    for b, _ in ranges[::7]:  # a resume from any boundary continues on the same boundaries
        assert batch_ranges(len(lengths), 8, b, lengths, budget) == [r for r in ranges if r[0] >= b]


def test_token_budget_and_micro_batches_equal_fixed_batches(gpt2_dir, workspace, fixed):
    budget = ms.extract(gpt2_dir, "sample", max_batch_tokens=300, workspace=workspace, **SMALL)
    assert budget.store.record.params.max_batch_tokens == 300
    _same(_values(budget), _values(fixed))
    micro = ms.extract(gpt2_dir, "sample", batch_size=16, micro_batch_size=3, workspace=workspace, **SMALL)
    _same(_values(micro), _values(fixed))
    np.testing.assert_array_equal(micro.store.input_ids(), fixed.store.input_ids())


def test_a_micro_batch_larger_than_the_batch_is_refused_with_both_fixes(gpt2_dir, workspace):
    """A micro-batch of more samples than the batch would run as the batch: the two settings contradict."""
    for call in (ms.Workspace(workspace).submit, functools.partial(ms.estimate, workspace=workspace)):
        with pytest.raises(InputError, match=r"micro_batch_size=16 is more than the batch \(batch_size=4\).*"
                                             r"micro_batch_size=4 or less.*batch_size=16"):
            call(gpt2_dir, "sample", [0], batch_size=4, micro_batch_size=16)
    assert not os.path.exists(os.path.join(workspace, "extractions"))  # refused before a store was made
    assert ms.estimate(gpt2_dir, "sample", [0], batch_size="auto", micro_batch_size=16, max_samples=8,
                       workspace=workspace)["samples"] == 8  # auto batches are sized to the micro-batch's pieces
    assert ms.estimate(gpt2_dir, "sample", [0], max_batch_tokens=4096, micro_batch_size=16, max_samples=8,
                       workspace=workspace)["samples"] == 8  # a token budget sizes the batches: batch_size is unused
    ws = ms.Workspace(workspace)
    with pytest.raises(InputError, match="micro_batch_size=16 is more than the batch"):
        ws.save_preset("contradiction", model=gpt2_dir, layers=[0], batch_size=4, micro_batch_size=16)
    job = ws.submit(gpt2_dir, "sample", [0], batch_size=4, micro_batch_size=2, max_samples=4).wait(60)
    with pytest.raises(InputError, match="micro_batch_size=16 is more than the batch"):
        ws.retry(job.id, micro_batch_size=16)
    assert ws.retry(job.id, batch_size=1).wait(60).status == "COMPLETED"  # a smaller batch: the micro-batch caps


def test_token_budget_resume_continues_the_store(gpt2_dir, workspace, fixed):
    ws = ms.Workspace(workspace)

    def fail_third(index: int, _size: int) -> None:
        if index == 2:
            raise RuntimeError("injected failure")

    job = ws.submit(gpt2_dir, "sample", max_batch_tokens=300, before_batch=fail_third,
                    **{k: v for k, v in SMALL.items() if k != "progress"}).wait(120)
    assert job.status == "FAILED" and job.record.progress.samples_committed > 0
    ws._handles.clear()  # resume from the metadata alone, as after a restart
    done = ws.resume(job.id).wait(120)
    assert done.status == "COMPLETED", done.error
    _same(_values(ws.open(job.id)), _values(fixed))


# -- 4. big models ------------------------------------------------------------------------------------------
def test_device_map_over_cpu_equals_one_device(gpt2_dir, workspace, fixed):
    pytest.importorskip("accelerate")
    whole = ms.extract(gpt2_dir, "sample", device_map={"": "cpu"}, workspace=workspace, **SMALL)
    assert whole.store.record.model.device_map == {"": "cpu"}
    _same(_values(whole), _values(fixed))
    split = {"wte": "cpu", "wpe": "cpu", "drop": "cpu", "h.0": "cpu", "h.1": "cpu", "h.2": "cpu", "ln_f": "cpu"}
    per_block = ms.extract(gpt2_dir, "sample", device_map=split, workspace=workspace, **SMALL)
    _same(_values(per_block), _values(fixed))
    auto = ms.extract(gpt2_dir, "sample", device_map="auto", max_memory={"cpu": "1GiB"}, workspace=workspace,
                      **SMALL)
    assert auto.store.record.params.max_memory == {"cpu": "1GiB"}
    _same(_values(auto), _values(fixed))


def test_quantization_without_bitsandbytes_names_the_extra(gpt2_dir, workspace):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(InputError, match=r'quantization=.nf4. needs bitsandbytes.*pip install "mistudio\[quant\]"'):
        ms.Workspace(workspace).submit(gpt2_dir, "sample", [0], quantization="nf4")
    with pytest.raises(InputError, match="quantization='int4' is not one of"):
        ms.Workspace(workspace).submit(gpt2_dir, "sample", [0], quantization="int4")
    assert not os.path.exists(os.path.join(workspace, "extractions")) or not os.listdir(
        os.path.join(workspace, "extractions"))


def test_a_failure_before_the_auto_choice_and_an_oom_under_a_budget_are_worded(gpt2_dir, workspace):
    ws = ms.Workspace(workspace)

    def broken(_index: int, _size: int) -> None:
        raise RuntimeError("injected failure")

    job = ws.submit(gpt2_dir, "sample", [0], max_samples=20, batch_size="auto", before_batch=broken).wait(120)
    assert job.status == "FAILED" and "injected failure" in job.error["error_message"]

    def oom(_index: int, _size: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    job = ws.submit(gpt2_dir, "sample", [0], max_samples=20, max_batch_tokens=512, before_batch=oom).wait(120)
    assert job.error["error_type"] == "OOM" and job.error["suggested_retry_params"] == {"max_batch_tokens": 256}
    assert ws.submit(gpt2_dir, "sample", [0], max_samples=5).wait(120).status == "COMPLETED"  # the worker lives
