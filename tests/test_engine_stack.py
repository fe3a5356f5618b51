"""Hostile checks of the grouped engine (hook points of a batch in one stack): statistics against a numpy
reference of the pre-grouping computation, stored rows against single-sample forwards, across batching modes,
storage dtypes, outliers, NaNs, zero-row batches and SAEs on stored and unstored hook points."""
from __future__ import annotations


import numpy as np
import pytest

import mistudio as ms
from mistudio.request import Request

from stats_reference import edited_model, reference_rows, reference_stats

TEXTS = ms.sample_texts()[:20]
ALL = ["residual", "mlp", "attention"]


@pytest.fixture(scope="module")
def loud_token_model(tiny_models, tmp_path_factory):
    """The tiny GPT-2 whose token 5's embedding is scaled by 1e4: its rows are far over 100x the median norm
    (outliers), and with 1e6 past float16's range in layer 0."""
    def edit(weight):
        weight[5].mul_(1e4)
        weight[7].mul_(1e6)
        weight[9].zero_()

    return edited_model(tiny_models["gpt2"], tmp_path_factory.mktemp("loudtok") / "m", edit)


def _texts_with_loud_tokens(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i, t in enumerate(TEXTS):
        ids = tok(t)["input_ids"][:30]
        if i % 3 == 0:
            ids[len(ids) // 2] = 5
        if i % 7 == 1:
            ids[-1] = 7
        if i % 5 == 2:
            ids[0] = 9
        out.append(tok.decode(ids))
    return out


CASES = {
    "plain": dict(batch_size=4),
    "micro": dict(batch_size=8, micro_batch_size=3),
    "window": dict(batch_size=4, window=8, stride=4),
    "window_micro": dict(batch_size=4, window=8, stride=4, micro_batch_size=3),
    "budget": dict(batch_size=8, max_batch_tokens=64),
    "left": dict(batch_size=4, padding_side="left"),
}


def _compare(ext, ref, request, storage, exact_rows=False):
    for hp in ext.hook_points:
        stored = ext.activations(hp)[:]
        want_rows = ref[hp]
        assert stored.shape == want_rows.shape, hp
        got = ext.record.statistics[hp].model_dump() if hasattr(ext.record.statistics[hp], "model_dump") else \
            dict(ext.metadata["statistics"][hp])
        want = reference_stats(want_rows, ext, request, storage)
        assert got["count"] == want["count"], hp
        assert got["zeros"] == want["zeros"], hp
        assert got["n_nan"] == want["n_nan"], hp
        assert got["n_out_of_range"] == want["n_out_of_range"], hp
        assert got["max_abs"] == pytest.approx(want["max_abs"], rel=1e-4, nan_ok=True), hp
        assert got["sum"] == pytest.approx(want["sum"], rel=1e-3, abs=1e-3 * max(1.0, want["max_abs"]), nan_ok=True), hp
        assert got["sum_sq"] == pytest.approx(want["sum_sq"], rel=1e-3, nan_ok=True), hp
        diff = np.abs(np.array(got["norm_hist"]) - np.array(want["norm_hist"])).sum()
        assert diff <= 2, (hp, diff)
        assert got["n_outliers"] == want["n_outliers"], (hp, got["outliers"][:5], want["outliers"][:5])
        assert [r for r, _ in got["outliers"]] == [r for r, _ in want["outliers"]], hp
        if storage == "float32":
            np.testing.assert_allclose(stored, want_rows, rtol=2e-3, atol=2e-3 * max(1.0, float(
                np.nanmax(np.abs(want_rows))) if want_rows.size else 1.0), err_msg=hp)


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_statistics_equal_the_per_hook_point_reference(loud_token_model, workspace, case):
    kw = CASES[case]
    texts = _texts_with_loud_tokens(loud_token_model)
    ext = ms.extract(loud_token_model, texts, layers="all", hooks=ALL, dtype="float32", max_length=32,
                     workspace=workspace, progress=False, device="cpu", **kw)
    assert len(ext.hook_points) == 9
    ref = reference_rows(loud_token_model, ext, ext.hook_points, window=kw.get("window"), stride=kw.get("stride"))
    request = Request.build(model="m", **kw)
    # outliers must exist somewhere, or this test cannot fail on them
    assert any(ext.metadata["statistics"][hp]["n_outliers"] for hp in ext.hook_points)
    _compare(ext, ref, request, "float32")


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_storage_counts_values_out_of_range_per_hook_point(loud_token_model, workspace, storage):
    texts = _texts_with_loud_tokens(loud_token_model)
    ext = ms.extract(loud_token_model, texts, layers="all", hooks=ALL, dtype=storage, max_length=32,
                     batch_size=4, workspace=workspace, progress=False, device="cpu")
    ref = reference_rows(loud_token_model, ext, ext.hook_points)
    request = Request.build(model="m", batch_size=4)
    _compare(ext, ref, request, storage)
    if storage == "float16":
        for hp in ext.hook_points:
            stored = ext.activations(hp)[:]
            assert ext.metadata["statistics"][hp]["n_out_of_range"] == int(np.isinf(stored).sum()), hp
        assert ext.metadata["statistics"]["layers.0.residual"]["n_out_of_range"] > 0


def test_exclude_special_with_batches_of_no_rows(tiny_models, workspace):
    """A text of only <|endoftext|> is only special tokens, so with batch_size=1 and exclude_special some
    batches keep zero rows; the grouped stack of (hook points, 0, width) must give empty statistics."""
    model = tiny_models["gpt2"]
    eot = "<|endoftext|>"
    texts = [eot, "hello world there", eot * 2, eot, "a b c d e f", eot * 3]
    ext = ms.extract(model, texts, layers="all", hooks=ALL, dtype="float32", max_length=16, batch_size=1,
                     exclude_special=True, workspace=workspace, progress=False, device="cpu")
    rows_at = ext.store.activation_offsets()
    assert (np.diff(rows_at) == 0).any(), "no sample without rows: the test would not test zero-row batches"
    ref = reference_rows(model, ext, ext.hook_points, exclude_special=True)
    _compare(ext, ref, Request.build(model="m", batch_size=1), "float32")


def test_all_rows_removed_in_every_batch_of_a_micro_batched_run(tiny_models, workspace):
    model = tiny_models["gpt2"]
    texts = ["<|endoftext|>", "<|endoftext|><|endoftext|>", "x y<|endoftext|>", "<|endoftext|>", "<|endoftext|>"]
    ext = ms.extract(model, texts, layers=[0, 2], hooks=ALL, dtype="bfloat16", max_length=16, batch_size=2,
                     micro_batch_size=1, exclude_special=True, workspace=workspace, progress=False, device="cpu")
    ref = reference_rows(model, ext, ext.hook_points, exclude_special=True)
    _compare(ext, ref, Request.build(model="m", batch_size=2), "bfloat16")


@pytest.fixture(scope="module")
def nan_model(tiny_models, tmp_path_factory):
    return edited_model(tiny_models["gpt2"], tmp_path_factory.mktemp("nanmodel") / "m",
                        lambda weight: weight[11].fill_(float("nan")))


def test_nan_rows_are_counted_per_hook_point_and_do_not_leak_to_others(nan_model, workspace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(nan_model)
    texts = []
    for i, t in enumerate(TEXTS[:12]):
        ids = tok(t)["input_ids"][:20]
        if i in (2, 9):
            ids[-1] = 11  # the last token: causal attention keeps the NaN to its own row (and later layers)
        texts.append(tok.decode(ids))
    ext = ms.extract(nan_model, texts, layers="all", hooks=ALL, dtype="float32", max_length=32, batch_size=4,
                     workspace=workspace, progress=False, device="cpu")
    ref = reference_rows(nan_model, ext, ext.hook_points)
    for hp in ext.hook_points:
        stored = ext.activations(hp)[:]
        assert ext.metadata["statistics"][hp]["n_nan"] == int(np.isnan(stored).sum()), hp
        assert int(np.isnan(stored).sum()) == int(np.isnan(ref[hp]).sum()), hp
    _compare(ext, ref, Request.build(model="m", batch_size=4), "float32")
