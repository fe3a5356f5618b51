"""Long documents: window/stride forwards overlapping windows and stores every token once."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import mistudio as ms
from mistudio.data import window_spans

W, S = 16, 6


def _long_ids(folder, n: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(" ".join(ms.sample_texts()[:40]))["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def test_window_spans_own_each_token_once_with_most_left_context():
    for length in (1, 16, 17, 48, 53):
        spans = window_spans(length, W, S)
        owned = np.concatenate([np.arange(own, stop) for _, stop, own in spans])
        assert np.array_equal(owned, np.arange(length))
        for start, stop, own in spans:
            assert stop - start <= W
            # the owner is the first window holding the token: no earlier window reaches it
            assert all(s2 + W <= own for s2, _, _ in spans if s2 < start)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_document_three_windows_long_equals_direct_forward_per_window(family, tiny_models, workspace):
    folder = tiny_models[family]
    doc = _long_ids(folder, 3 * W)
    short = _long_ids(folder, 5)
    data = [short, doc, doc[:20]]
    ext = ms.extract(folder, data, layers=[0, 1], hooks=["residual", "mlp"], dtype="float32", batch_size=2,
                     window=W, stride=S, workspace=workspace, progress=False)
    assert ext.metadata["params"]["window"] == W and ext.metadata["params"]["stride"] == S
    assert ext.n_tokens == sum(len(d) for d in data)  # every token stored once
    report = ext.metadata["dataset"]["report"]
    assert report["n_truncated"] == 0 and report["n_truncated_tokens"] == 0
    assert ext.verify().ok

    model = AutoModel.from_pretrained(folder).eval()
    for row, ids in enumerate(data):
        s = ext.sample(row, tokens=False)
        assert list(s["input_ids"]) == ids and np.array_equal(s["positions"], np.arange(len(ids)))
        for start, stop, own in window_spans(len(ids), W, S):
            assert np.array_equal(s["window_positions"][own:stop], np.arange(own - start, stop - start))
            with torch.inference_mode():
                hidden = model(torch.tensor([ids[start:stop]]), output_hidden_states=True).hidden_states
            for layer in (0, 1):
                want = hidden[layer + 1][0, own - start:].numpy()
                got = s["activations"][f"layers.{layer}.residual"][own:stop]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_default_still_truncates_and_counts(gpt2_dir, workspace):
    doc = _long_ids(gpt2_dir, 40)
    ext = ms.extract(gpt2_dir, [doc], layers=[0], max_length=16, workspace=workspace, progress=False)
    assert ext.n_tokens == 16
    report = ext.metadata["dataset"]["report"]
    assert report["n_truncated"] == 1 and report["n_truncated_tokens"] == 24
    assert "positions" not in ext.sample(0)["activations"] and "window_positions" not in ext.sample(0)


@pytest.mark.parametrize("kw, fix", [(dict(window=16, stride=17), "stride=8"), (dict(stride=4), "window="),
                                     (dict(window=500), "window=128 or less"), (dict(window=1), "at least 2")])
def test_bad_window_arguments(gpt2_dir, workspace, kw, fix):
    with pytest.raises(ms.InputError, match=fix):
        ms.Workspace(workspace).submit(gpt2_dir, ["text"], layers=[0], **kw)


def test_resume_of_windowed_store_without_special_rows_equals_a_clean_run(gpt2_dir, workspace):
    """A failed job resumed from its commit mark (rows, not tokens) ends equal to a clean run, statistics too."""
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    eos = tok.eos_token_id
    doc = _long_ids(gpt2_dir, 200)
    data = [[eos] + doc[i:i + n] + [eos] for i, n in zip(range(0, 200, 7), [60, 50, 40, 33, 20, 9, 5] * 4)]
    args = dict(layers=[0, 1], dtype="float32", batch_size=2, window=W, stride=S, exclude_special=True, chunk_mb=0.01)
    ws = ms.Workspace(workspace)
    clean = ms.extract(gpt2_dir, data, workspace=workspace, progress=False, **args)

    failed = []

    def fail(index, _size):
        if index == 5 and not failed:  # once: the resume (same request) runs through
            failed.append(index)
            raise RuntimeError("injected failure")
    job = ws.submit(gpt2_dir, data, before_batch=fail, **args).wait(120)
    assert job.status == "FAILED" and 0 < job.record.progress.tokens_committed < clean.n_tokens
    resumed = ws.resume(job.id).wait(120)
    assert resumed.status == "COMPLETED", resumed.error
    ext = resumed.extraction()
    assert ext.verify().ok
    for hp in clean.hook_points:
        np.testing.assert_array_equal(ext.activations(hp)[:], clean.activations(hp)[:], err_msg=hp)
        a, b = ext.metadata["statistics"][hp], clean.metadata["statistics"][hp]
        assert a["norm_hist"] == b["norm_hist"] and a["count"] == b["count"]
